"""Right-hand sides as rows, the relative residual, and the cache of compiled solver loops.

Every solver takes right-hand sides `b` as `[p]` or `[k, p]` (k vectors as rows), checks them with
`as_rows`, and reports `relative_residuals` `‖A xᵢ − bᵢ‖ / ‖bᵢ‖` in its `SolveInfo`.
"""

import collections
import weakref

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.operators.rows import matmul_rows, operator_size

_CACHE_SIZE = 16
_compiled = collections.OrderedDict()


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


def compiled(objects, options, build):
    """A compiled function for `objects` (operators, preconditioners) and hashable `options`.

    `build(*refs)` receives weak references to `objects` and returns a `tf.function`; the result
    is kept in a small LRU cache so repeated solves with the same operator do not retrace. Weak
    references keep the cache from holding models alive.
    """
    key = tuple(id(o) for o in objects) + tuple(options)
    entry = _compiled.get(key)
    if entry is not None and all(r() is o for r, o in zip(entry[0], objects)):
        _compiled.move_to_end(key)
        return entry[1]
    refs = [_ref(o) for o in objects]
    fn = build(*refs)
    _compiled[key] = (refs, fn)
    while len(_compiled) > _CACHE_SIZE:
        _compiled.popitem(last=False)
    return fn


def _ref(obj):
    if obj is None:
        return lambda: None
    try:
        return weakref.ref(obj)
    except TypeError:  # not weak-referenceable (e.g. some builtins): hold it
        return lambda: obj
