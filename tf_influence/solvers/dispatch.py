"""One entry point for every IHVP method, and small method objects the influence API can hold.

A method object is a frozen dataclass of settings with a `name` and
`solve(operator, rows) -> (x_rows, SolveInfo)`; `SOLVERS` maps names to their classes (other
"ekfac"/"kfac" and "chain" live in their own modules).
"""

import dataclasses
import typing

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.operators import MAX_DENSE_SIZE
from tf_influence.solvers.cg import cg
from tf_influence.solvers.chain import Chain
from tf_influence.solvers.direct import direct
from tf_influence.solvers.ekfac import EKFAC, KFAC
from tf_influence.solvers.lissa import lissa
from tf_influence.solvers.scipy_ncg import scipy_ncg


@dataclasses.dataclass(frozen=True)
class Direct:
    """Dense Cholesky / eigendecomposition solve (`solvers.direct`); exact, for p ≤ max_size."""

    on_indefinite: str = "warn"
    max_size: int = MAX_DENSE_SIZE
    name: typing.ClassVar[str] = "direct"

    def __post_init__(self):
        _check_choice(self, "on_indefinite", ("warn", "raise", "ignore"))
        _check_positive_int(self, "max_size")

    def solve(self, operator, rows):
        return direct(operator, rows, on_indefinite=self.on_indefinite, max_size=self.max_size)


@dataclasses.dataclass(frozen=True)
class CG:
    """Compiled conjugate gradient (`solvers.cg`), all right-hand sides in one pass per iteration."""

    tol: float = 1e-6
    maxiter: typing.Optional[int] = None
    preconditioner: typing.Any = None
    jit_compile: bool = False
    name: typing.ClassVar[str] = "cg"

    def __post_init__(self):
        _check_positive_float(self, "tol")
        if self.maxiter is not None:
            _check_positive_int(self, "maxiter")

    def solve(self, operator, rows):
        return cg(operator, rows, tol=self.tol, maxiter=self.maxiter, preconditioner=self.preconditioner,
                  jit_compile=self.jit_compile)


@dataclasses.dataclass(frozen=True)
class LiSSA:
    """Stochastic Neumann series (`solvers.lissa`); `scale="auto"` estimates λ_max by Lanczos."""

    scale: typing.Union[float, str] = "auto"
    batch_size: typing.Optional[int] = 256
    recursion_depth: int = 1000
    num_samples: int = 1
    seed: int = 0
    sampling: str = "independent"
    progress: bool = True
    check_residual: bool = True
    name: typing.ClassVar[str] = "lissa"

    def __post_init__(self):
        if self.scale != "auto":
            _check_positive_float(self, "scale")
        if self.batch_size is not None:
            _check_positive_int(self, "batch_size")
        _check_positive_int(self, "recursion_depth")
        _check_positive_int(self, "num_samples")
        _check_choice(self, "sampling", ("independent", "shuffled_epochs"))

    def solve(self, operator, rows):
        return lissa(operator, rows, scale=self.scale, batch_size=self.batch_size,
                     recursion_depth=self.recursion_depth, num_samples=self.num_samples, seed=self.seed,
                     sampling=self.sampling, progress=self.progress, check_residual=self.check_residual)


@dataclasses.dataclass(frozen=True)
class ScipyNCG:
    """`scipy.optimize.fmin_ncg` per right-hand side (`solvers.scipy_ncg`), for parity with Koh & Liang."""

    avextol: float = 1e-8
    maxiter: int = 100
    name: typing.ClassVar[str] = "scipy"

    def __post_init__(self):
        _check_positive_float(self, "avextol")
        _check_positive_int(self, "maxiter")

    def solve(self, operator, rows):
        return scipy_ncg(operator, rows, avextol=self.avextol, maxiter=self.maxiter)


SOLVERS = {"direct": Direct, "cg": CG, "lissa": LiSSA, "scipy": ScipyNCG, "scipy_ncg": ScipyNCG,
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
    if hasattr(obj, "shape") and (callable(getattr(obj, "apply", None)) or hasattr(obj, "matmul")):
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


def _check_choice(obj, field, choices):
    value = getattr(obj, field)
    if value not in choices:
        raise InputError(f"{type(obj).__name__}: {field} must be one of {choices}. Received {field}={value!r}.")


def _check_positive_int(obj, field):
    value = getattr(obj, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{type(obj).__name__}: {field} must be a positive integer. Received {field}={value!r}.")


def _check_positive_float(obj, field):
    value = getattr(obj, field)
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value <= 0:
        raise InputError(f"{type(obj).__name__}: {field} must be a positive number. Received {field}={value!r}.")
