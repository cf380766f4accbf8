"""`scipy.optimize.fmin_ncg` on the quadratic `½xᵀAx − bᵀx`, as Koh & Liang's influence code did."""

import dataclasses
import logging
import time
import typing
import warnings

import numpy as np
import scipy.optimize
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError
from tf_influence.operators.rows import matmul_rows, operator_size
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import as_rows, relative_residuals

_log = logging.getLogger(__name__)


def scipy_ncg(operator, b, *, x0=None, avextol=1e-8, maxiter=100):
    """Solves `A x = b` (e.g. `A = H + λI`) by minimising `f(x) = ½xᵀAx − bᵀx` with `fmin_ncg`.

    For parity with published influence numbers (Koh & Liang 2017 used exactly this, with
    `avextol=1e-8`, `maxiter=100` and the start `x0 = b`). Each right-hand side is solved on its
    own, in a Python loop over NumPy vectors; every `f`, `∇f = Ax − b` and `A p` costs one operator
    product (one pass over the data for a `HessianOperator`; `f` and `∇f` at the same point share
    it). Prefer `cg`, which is compiled and solves all right-hand sides in one pass per iteration.

    Stop rule: SciPy's — the Newton step's mean absolute size `‖Δx‖₁ / p` falls below `avextol`,
    or `maxiter` Newton iterations.

    Args:
      operator: a square self-adjoint `tf.linalg.LinearOperator` (positive definite for the
        minimiser to exist); damping λ is part of it.
      b: right-hand sides `[p]` or `[k, p]`.
      x0: start, shaped like `b` (default `b`, as in the original code).
      avextol: SciPy's convergence tolerance on the step.
      maxiter: most Newton iterations per right-hand side.

    Returns:
      `(x, info)`: `x` shaped like `b`; `info.iterations` the largest number of Newton iterations,
      `info.residual` the exact largest relative residual (one extra operator pass), `converged`
      when SciPy reported success for every right-hand side; `info.extra` has per-RHS
      `newton_iterations`, `operator_products` and SciPy's `warnflags`.

    Example:
      >>> x, info = scipy_ncg(H, g_test)
    """
    start = time.perf_counter()
    operator_size(operator)
    rows, single = as_rows(operator, b)
    avextol = arguments.positive_float(avextol, "avextol")
    maxiter = arguments.positive_int(maxiter, "maxiter")
    starts = rows if x0 is None else as_rows(operator, x0, name="x0")[0]
    if starts.shape != rows.shape:
        raise InputError(f"x0 must be shaped like b {tuple(np.shape(b))}. Received {tuple(np.shape(x0))}.")

    solutions, newton, products, flags = [], [], [], []
    for j in range(int(rows.shape[0])):
        problem = _Quadratic(operator, rows[j].numpy().astype(np.float64))
        x, _, _, _, _, warnflag = scipy.optimize.fmin_ncg(
            problem.value, starts[j].numpy().astype(np.float64), fprime=problem.gradient,
            fhess_p=problem.product, avextol=avextol, maxiter=int(maxiter), full_output=True, disp=False,
            callback=problem.count_iteration)
        solutions.append(x)
        newton.append(problem.iterations)
        products.append(problem.products)
        flags.append(int(warnflag))
    x = tf.constant(np.stack(solutions), dtype=operator.dtype)
    residuals = relative_residuals(operator, x, rows)
    converged = all(flag == 0 for flag in flags)
    if not converged:
        warnings.warn(
            f"scipy fmin_ncg did not converge for {sum(f != 0 for f in flags)} of {len(flags)} "
            f"right-hand side(s) (warnflags {flags}: 1 = maxiter={maxiter} reached, 2 = line search / "
            f"precision loss); largest relative residual {residuals.max():.3g}. Add damping, raise "
            "maxiter, or use method='cg'.",
            stacklevel=2,
        )
    info = SolveInfo(
        method="scipy", iterations=int(max(newton)), residual=float(residuals.max()), converged=converged,
        seconds=time.perf_counter() - start,
        extra=dict(newton_iterations=newton, operator_products=products, warnflags=flags,
                   residuals=residuals.tolist(), avextol=avextol, maxiter=int(maxiter),
                   damping=getattr(operator, "damping", None)),
    )
    _log.debug("scipy_ncg: %s Newton iterations, residual %.3g", newton, info.residual)
    return (x[0] if single else x), info


class _Quadratic:
    """`f(x) = ½xᵀAx − bᵀx` with its gradient and Hessian products over NumPy vectors."""

    def __init__(self, operator, b):
        self.operator, self.b = operator, b
        self.dtype = operator.dtype
        self.products = 0
        self.iterations = 0
        self._last = (None, None)

    def _times(self, v):
        self.products += 1
        row = tf.constant(v[np.newaxis], dtype=self.dtype)
        return matmul_rows(self.operator, row)[0].numpy().astype(np.float64)

    def _ax(self, x):
        if self._last[0] is None or not np.array_equal(self._last[0], x):
            self._last = (np.array(x, copy=True), self._times(x))
        return self._last[1]

    def value(self, x):
        return 0.5 * float(x @ self._ax(x)) - float(self.b @ x)

    def gradient(self, x):
        return self._ax(x) - self.b

    def product(self, x, p):
        return self._times(p)

    def count_iteration(self, x):
        self.iterations += 1


@dataclasses.dataclass(frozen=True)
class ScipyNCG(Method):
    """`scipy.optimize.fmin_ncg` per right-hand side (`solvers.scipy_ncg`), for parity with Koh & Liang.

    Example:
      >>> x, info = ScipyNCG(avextol=1e-8).solve(H, g_rows)
    """

    avextol: float = 1e-8
    maxiter: int = 100
    name: typing.ClassVar[str] = "scipy"
    iterative: typing.ClassVar[bool] = True

    def __post_init__(self):
        arguments.positive_float(self.avextol, "avextol", owner="ScipyNCG")
        arguments.positive_int(self.maxiter, "maxiter", owner="ScipyNCG")

    def prepare(self, source):
        operator = source.hessian()
        return Prepared(self, operator, lambda rows: scipy_ncg(operator, rows, avextol=self.avextol,
                                                               maxiter=self.maxiter))
