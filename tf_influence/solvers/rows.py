"""Right-hand sides as rows, the relative residual, and compiled solver loops shared across operators.

Every solver takes right-hand sides `b` as `[p]` or `[k, p]` (k vectors as rows), checks them with
`as_rows`, and reports `relative_residuals` `‖A xᵢ − bᵢ‖ / ‖bᵢ‖` in its `SolveInfo`.
"""

import functools

import numpy as np
import tensorflow as tf

from tf_influence.compiled import shared_function
from tf_influence.errors import InputError
from tf_influence.operators.rows import matmul_rows, operator_size, traced_product


def as_rows(operator, b, name="b"):
    """`b` as `[k, p]` rows of the operator's dtype, and whether it was a single vector `[p]`.

    Raises InputError for wrong shapes and for NaN/Inf entries.
    """
    p = operator_size(operator)
    rows = tf.convert_to_tensor(b, dtype=operator.dtype)
    single = rows.shape.rank == 1
    if single:
        rows = rows[tf.newaxis]
    if rows.shape.rank != 2 or rows.shape[-1] != p:
        raise InputError(
            f"{name} must have shape [p] or [k, p] with p = {p} (the operator's size). "
            f"Received shape {tuple(np.shape(b))}."
        )
    if rows.shape[0] == 0:
        raise InputError(f"{name} holds no right-hand sides (shape {tuple(rows.shape)}).")
    if not bool(tf.reduce_all(tf.math.is_finite(rows))):
        raise InputError(f"{name} contains NaN/Inf entries; every right-hand side must be finite.")
    return rows, single


def row_dot(a, b):
    return tf.reduce_sum(a * b, axis=-1)


def relative_norms(residual_norms, b_norms):
    """`‖rᵢ‖ / ‖bᵢ‖` per row (float64 NumPy); `‖rᵢ‖` itself where `bᵢ = 0`."""
    r = np.asarray(residual_norms, dtype=np.float64)
    b = np.asarray(b_norms, dtype=np.float64)
    return np.where(b > 0, r / np.where(b > 0, b, 1.0), r)


def relative_residuals(operator, x, b):
    """`‖A xᵢ − bᵢ‖ / ‖bᵢ‖` per row with the exact operator (one product for all rows)."""
    r = np.asarray(b - matmul_rows(operator, x), dtype=np.float64)
    return relative_norms(np.linalg.norm(r, axis=-1), np.linalg.norm(np.asarray(b, dtype=np.float64), axis=-1))


def shared_loop(loop, operators, signature, *, jit_compile=False, **options):
    """A compiled solver loop, traced once for every call whose operators trace alike.

    `loop(products, *args, **options)` is the traceable loop; `products[i](rows)` is the product of
    `operators[i]` (None for a None operator, e.g. no preconditioner). Each operator enters through
    its `traced_product` (`tf_influence.operators.rows`): a `HessianOperator` passes its data set and
    damping as inputs, so a new operator of the same model, loss, variables and options (another
    damping, other data, a new `Influence`) reuses the trace; any other operator is keyed by identity.
    The trace is shared through `tf_influence.compiled.shared_function` (held weakly).

    Args:
      loop: a module-level function `loop(products, *args, **options)`.
      operators: the operators the loop multiplies by (None allowed).
      signature: the input signature of `args`.
      jit_compile: compile the loop with XLA.
      **options: hashable keyword arguments of the loop (flags such as `has_x0`); part of the key.

    Returns:
      `call(*args)`, running the loop with these operators' inputs.
    """
    return _SharedLoop(loop, [None if op is None else traced_product(op) for op in operators], options,
                       list(signature), bool(jit_compile))


class _SharedLoop:
    """A callable running one shared trace of `loop` with its operators' inputs (the trace's owner)."""

    def __init__(self, loop, products, options, signature, jit_compile):
        self.loop = loop
        self.products = products
        self.options = options
        self.inputs = tuple(() if product is None else product.inputs for product in products)
        identity = [obj for product in products if product is not None for obj in product.identity]
        keys = tuple(None if product is None else (len(product.identity), product.options) for product in products)
        self.function = shared_function(
            _run_loop, self, identity=identity,
            options=((loop.__module__, loop.__qualname__), keys, tuple(sorted(options.items()))),
            input_signature=signature + [tf.nest.map_structure(tf.type_spec_from_value, self.inputs)],
            jit_compile=jit_compile, autograph=False)

    def __call__(self, *args):
        return self.function(*args, self.inputs)


def _run_loop(owner, *args):
    *args, inputs = args
    products = [None if product is None else functools.partial(product.matmul, given)
                for product, given in zip(owner.products, inputs)]
    return owner.loop(products, *args, **owner.options)
