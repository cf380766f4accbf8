"""`method="chain"`: exact inverse-Hessian-vector products for deep chains of Dense layers.

For a Keras Sequential (or single-path Functional) model of Dense layers with twice-differentiable
elementwise activations, ending in softmax cross-entropy, binary cross-entropy or mean squared error,
the Hessian of the mean loss over a batch of n examples is solved exactly in time linear in the depth
(docs/mathematics.md, "Exact chain solver"): `ChainHessian` (tf_influence/operators/chain.py) builds
closed-form per-layer derivative blocks, and the backward Riccati sweep of
`tf_influence.linalg.riccati` factorises `H + λI` once; every later solve reuses the factorisation.
The inertia of `H + λI` comes for free.

Entry points:
  `chain_solve(model, loss, data, b, ...) -> (x, SolveInfo)`.
  `Chain(...)`: the method object; `Chain().solve(hessian_operator, b_rows) -> (x_rows, SolveInfo)`.
"""

import dataclasses
import logging
import time
import typing
import warnings

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError, NegativeCurvatureError
from tf_influence.operators.chain import DEFAULT_MAX_MEMORY_BYTES, ChainHessian
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import relative_residuals

_log = logging.getLogger(__name__)

_ON_INDEFINITE = ("warn", "raise", "ignore")


def _solve(hessian, rows, on_indefinite):
    """`(x, SolveInfo)`: exact solves with the (cached) Riccati factorisation of `hessian`."""
    started = time.perf_counter()
    factorization = hessian.factorization
    if factorization.inertia:
        message = (f"H + λI (λ = {hessian.damping:g}) has {factorization.inertia} negative eigenvalue(s): the chain "
                   "solution is exact but influence scores from an indefinite Hessian are hard to interpret. Raise "
                   "damping above |λ_min(H)| (tfi.extreme_eigenvalues) or use curvature='gauss_newton'.")
        if on_indefinite == "raise":
            raise NegativeCurvatureError(message)
        if on_indefinite == "warn":
            warnings.warn(message, stacklevel=4)
    x = hessian.solve_rows(rows)
    worst = float(np.max(relative_residuals(hessian, x, rows)))
    tol = float(np.sqrt(np.finfo(hessian.dtype.as_numpy_dtype).eps))
    if not worst <= tol:
        _log.warning("chain solve: relative residual %.2e above %.1e; H + λI is ill-conditioned, add damping.", worst, tol)
    pivots = factorization.pivots
    extra = dict(inertia=factorization.inertia, damping=hessian.damping, l2=hessian.problem.objective.l2,
                 curvature=hessian.curvature, examples=hessian.parameters["examples"], layers=len(pivots),
                 eigh_pivots=sum(1 for p in pivots if p is not None and p.cholesky is None))
    info = SolveInfo(method="chain", iterations=0, residual=worst, converged=worst <= tol,
                     seconds=time.perf_counter() - started, residual_is_estimate=False, extra=extra)
    return x, info


def chain_solve(model, loss, data, b, variables=None, *, damping=0.0, l2=0.0, curvature="hessian",
                training=False, on_indefinite="warn", dtype=tf.float64, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES):
    """Solves `(H + λI) x = b` exactly for a Dense chain over all of `data` (one batch of n examples).

    Args:
      model, loss, data, variables, damping, l2, curvature, training, dtype, max_memory_bytes: as for
        `ChainHessian`.
      b: right-hand sides: a flat `[p]` vector, rows `[k, p]`, or a list shaped like the variables.
      on_indefinite: when `H + λI` has negative eigenvalues: `"warn"` (default), `"raise"`
        (`NegativeCurvatureError`) or `"ignore"`; the exact solution is returned otherwise.

    Returns:
      `(x, info)`: x `[p]` or `[k, p]` like b (a list input gives rows), in `dtype`; `info` a `SolveInfo`
      with the exact relative residual and `info.extra["inertia"]`, the number of negative eigenvalues.

    Raises:
      NegativeCurvatureError: `H + λI` singular (the message gives the inertia and a damping to try).
      UnsupportedLayerError, InputError, ResourceError: see `ChainHessian`.

    Example:
      >>> x, info = chain_solve(model, "sparse_categorical_crossentropy", (x_train, y_train), g, damping=1e-3)
      >>> info.extra["inertia"]
      0
    """
    arguments.one_of(on_indefinite, "on_indefinite", _ON_INDEFINITE)
    hessian = ChainHessian(model, loss, data, variables, damping=damping, l2=l2, curvature=curvature,
                           training=training, dtype=dtype, max_memory_bytes=max_memory_bytes)
    single = not isinstance(b, (list, tuple)) and np.ndim(b) == 1
    rows = hessian.space.as_flat_vectors(b) if isinstance(b, (list, tuple)) else tf.convert_to_tensor(b)
    rows = tf.cast(tf.reshape(rows, [-1, hessian.size]) if single else rows, hessian.dtype)
    if rows.shape.rank != 2 or rows.shape[-1] != hessian.size:
        raise InputError(f"b must have shape [p] or [k, p] with p = {hessian.size}. Received {tuple(np.shape(b))}.")
    x, info = _solve(hessian, rows, on_indefinite)
    return (x[0] if single else x), info


@dataclasses.dataclass(frozen=True)
class Chain(Method):
    """The exact chain solver as a method object.

    `prepare(source)` builds the problem's `ChainHessian` (model, loss, l2, training flag, all the
    data as one batch, damping, selected variables, curvature) and factorises it once; every solve
    reuses the factorisation. Sample weights are honoured; model L2 weight regularisers are included.

    Attributes:
      on_indefinite: `"warn"`, `"raise"` or `"ignore"` when `H + λI` has negative eigenvalues.
      max_memory_bytes: refuse (ResourceError) above this estimate.
      dtype: computation dtype, "float64" by default; results are cast to the operator's dtype.

    Example:
      >>> H = tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y), damping=1e-3)
      >>> x_rows, info = Chain().solve(H, g_rows)
    """

    on_indefinite: str = "warn"
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
    dtype: str = "float64"

    name: typing.ClassVar[str] = "chain"

    def __post_init__(self):
        arguments.one_of(self.on_indefinite, "on_indefinite", _ON_INDEFINITE, owner="Chain")
        arguments.positive_int(self.max_memory_bytes, "max_memory_bytes", owner="Chain")
        if tf.as_dtype(self.dtype) not in (tf.float32, tf.float64):
            raise InputError(f"Chain: dtype must be 'float32' or 'float64'. Received {self.dtype!r}.")

    def prepare(self, source):
        hessian = source.chain(dtype=self.dtype, max_memory_bytes=self.max_memory_bytes)
        dtype = hessian.problem.dtype

        def solve(b):
            rows = tf.convert_to_tensor(b)
            single = rows.shape.rank == 1
            rows = rows[tf.newaxis] if single else rows
            if rows.shape.rank != 2 or rows.shape[-1] != hessian.size:
                raise InputError(f"b must have shape [p] or [k, p] with p = {hessian.size}. Received "
                                 f"{tuple(rows.shape)}.")
            x, info = _solve(hessian, tf.cast(rows, hessian.dtype), self.on_indefinite)
            x = tf.cast(x, dtype)
            return (x[0] if single else x), info

        return Prepared(self, hessian, solve)
