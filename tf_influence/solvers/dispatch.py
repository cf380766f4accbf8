"""The registry of IHVP methods: names to method classes, `make_solver`, and `inverse_hvp`.

Each method lives in its own module with its function and its method class (see
`tf_influence.solvers.method` for what a method object is); this module only maps names to them.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.solvers.auto import Auto
from tf_influence.solvers.cg import CG
from tf_influence.solvers.chain import Chain
from tf_influence.solvers.direct import Direct
from tf_influence.solvers.ekfac import EKFAC, KFAC
from tf_influence.solvers.lissa import LiSSA
from tf_influence.solvers.scipy_ncg import ScipyNCG

SOLVERS = {"auto": Auto, "direct": Direct, "cg": CG, "lissa": LiSSA, "scipy": ScipyNCG, "scipy_ncg": ScipyNCG,
           "ekfac": EKFAC, "kfac": KFAC, "chain": Chain}


def make_solver(method, **options):
    """A method object from a name (`"cg"`, ...), a method class, or a method object.

    Options override the defaults (or, for a method object, its settings).

    Raises:
      InputError: unknown name, unknown option, or an invalid option value.

    Example:
      >>> make_solver("cg", tol=1e-8)
      CG(tol=1e-08, maxiter=None, preconditioner=None, jit_compile=False)
    """
    if isinstance(method, str):
        cls = SOLVERS.get(method.lower())
        if cls is None:
            raise InputError(f"Unknown method {method!r}. Known methods: {sorted(SOLVERS)}.")
        return _construct(cls, options)
    if isinstance(method, type) and callable(getattr(method, "solve", None)):
        return _construct(method, options)
    if callable(getattr(method, "solve", None)) and hasattr(method, "name"):
        if not options:
            return method
        if not dataclasses.is_dataclass(method):
            raise InputError(
                f"Options {sorted(options)} cannot be applied to the method object {method!r}; "
                "set them when you create it."
            )
        return _construct(type(method), {**_settings(method), **options})
    raise InputError(
        f"method must be a method name ({sorted(SOLVERS)}) or a method object with .solve and .name "
        f"(e.g. tfi.solvers.CG(tol=1e-8)). Received {type(method).__name__}."
    )


def inverse_hvp(operator_or_influence, vectors, *, method="cg", **options):
    """`(H + λI)⁻¹ v` for each vector, by any method.

    Args:
      operator_or_influence: a square `tf.linalg.LinearOperator` (e.g. `tfi.HessianOperator`), or
        an object with an `.operator` attribute holding one (e.g. `tfi.Influence`).
      vectors: flat `[p]` or `[k, p]`, or a list of tensors shaped like the selected variables
        (optionally with a leading axis of k vectors; needs an operator with `.space`).
      method: a name in `SOLVERS` ("cg", "direct", "lissa", "scipy", ...) or a method object.
      **options: the method's settings, e.g. `tol=1e-8` for "cg", `scale=...` for "lissa".

    Returns:
      `(x, info)`: `x` in the form of `vectors` (a flat tensor, or a list shaped like the
      variables), `info` a `SolveInfo`.

    Example:
      >>> x, info = tfi.inverse_hvp(H, g_test, method="cg", tol=1e-8)
      >>> x, info = tfi.inverse_hvp(influence, model_shaped_list, method="direct")
    """
    operator = _operator_of(operator_or_influence)
    solver = make_solver(method, **options)
    space = getattr(operator, "space", None)
    if isinstance(vectors, (list, tuple)):
        if space is None:
            raise InputError(
                "vectors given as a list of variable-shaped tensors need an operator with a parameter "
                f"space (tfi.HessianOperator); {type(operator).__name__} has none. Pass flat vectors [k, p]."
            )
        first = tf.convert_to_tensor(vectors[0]) if len(vectors) else None
        batched = first is not None and first.shape.rank == len(space.shapes[0]) + 1
        rows = space.as_flat_vectors(vectors)
        x, info = solver.solve(operator, rows)
        parts = space.unflatten(x)
        return (parts if batched else [part[0] for part in parts]), info
    flat = tf.convert_to_tensor(vectors)
    if flat.shape.rank not in (1, 2):
        raise InputError(
            f"vectors must be flat [p] or [k, p], or a list shaped like the variables. Received shape "
            f"{tuple(np.shape(vectors))}."
        )
    x, info = solver.solve(operator, flat if flat.shape.rank == 2 else flat[tf.newaxis])
    return (x if flat.shape.rank == 2 else x[0]), info


def _operator_of(obj):
    if isinstance(obj, tf.linalg.LinearOperator):
        return obj
    operator = getattr(obj, "operator", None)
    if operator is not None:
        return operator
    if hasattr(obj, "shape") and (callable(getattr(obj, "matmul_rows", None)) or hasattr(obj, "matmul")):
        return obj
    raise InputError(
        "Expected a tf.linalg.LinearOperator (e.g. tfi.HessianOperator) or an object with an .operator "
        f"attribute (e.g. tfi.Influence). Received {type(obj).__name__}."
    )


def _construct(cls, options):
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None
    unknown = sorted(set(options) - set(names)) if names is not None else []
    if unknown:
        raise InputError(f"Unknown option(s) {unknown} for method {cls.name!r}. Its options: {names}.")
    return cls(**options)


def _settings(method):
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
