"""Plumbing shared by the solvers: right-hand sides as rows, row-wise operator products, a cache
of compiled loops. Private: nothing here is public API."""

import collections
import weakref

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError

_CACHE_SIZE = 16
_compiled = collections.OrderedDict()


def operator_size(operator):
    """The side p of a square operator, with a clear error for anything else."""
    shape = getattr(operator, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or shape[-1] is None:
        raise InputError(
            "Expected a square tf.linalg.LinearOperator of static shape [p, p] (e.g. "
            f"tfi.HessianOperator). Received {type(operator).__name__} of shape {shape}."
        )
    return int(shape[-1])


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


def apply_rows(operator, rows):
    """`A rᵢ` for each row `rᵢ` of `rows` `[k, p]`, in one call (one data pass for a HessianOperator).

    Uses `operator.apply(rows)` when the operator has it (HessianOperator, EKFAC...), calls a plain
    callable on the rows, and otherwise uses `matmul` on the transposed rows.
    """
    apply = getattr(operator, "apply", None)
    if callable(apply):
        return apply(rows)
    if isinstance(operator, tf.linalg.LinearOperator):
        return tf.linalg.matrix_transpose(operator.matmul(rows, adjoint_arg=True))
    if callable(operator):
        return tf.convert_to_tensor(operator(rows), dtype=rows.dtype)
    raise InputError(
        "Expected a tf.linalg.LinearOperator (or a callable mapping rows [k, p] to rows [k, p]). "
        f"Received {type(operator).__name__}."
    )


def row_dot(a, b):
    return tf.reduce_sum(a * b, axis=-1)


def relative_residuals(operator, x, b):
    """`‖A xᵢ − bᵢ‖ / ‖bᵢ‖` per row with the exact operator (one pass); 0 where `bᵢ = 0` and `xᵢ = 0`."""
    r = b - apply_rows(operator, x)
    r_norm = np.linalg.norm(np.asarray(r, dtype=np.float64), axis=-1)
    b_norm = np.linalg.norm(np.asarray(b, dtype=np.float64), axis=-1)
    return np.where(b_norm > 0, r_norm / np.where(b_norm > 0, b_norm, 1.0), r_norm)


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
