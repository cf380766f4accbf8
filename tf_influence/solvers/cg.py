"""Conjugate gradient for `(H + λI) x = b`, many right-hand sides at once, compiled as one loop."""

import dataclasses
import logging
import time
import typing
import warnings

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError, NegativeCurvatureError, NotFiniteError
from tf_influence.operators.rows import matmul_rows, operator_size
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import as_rows, compiled, relative_norms, row_dot

_log = logging.getLogger(__name__)

# Why the loop stopped early (the graph cannot raise a readable error; it returns a flag).
_OK, _NEGATIVE_CURVATURE, _NOT_FINITE, _PRECONDITIONER_NOT_PD = 0, 1, 2, 3
_DEFAULT_MAXITER_CAP = 1000


def cg(operator, b, *, x0=None, tol=1e-6, maxiter=None, preconditioner=None, jit_compile=False):
    """Solves `A x = b` for a self-adjoint positive definite `A` (e.g. `H + λI`) by conjugate gradient.

    Algorithm (docs/mathematics.md, "Conjugate gradient"), with a preconditioner `M ≈ A⁻¹` (identity if none):
    `x = x0, r = b − A x0, z = M r, p = z, ρ = rᵀz`; repeat: `w = A p`, `α = ρ / pᵀw`, `x += α p`,
    `r −= α w`, `z = M r`, `p = z + (ρ_new / ρ) p`. All k right-hand sides advance together: each
    iteration is one `A` product on `[k, p]` rows (one pass over the data for a `HessianOperator`).
    A right-hand side that has converged is frozen while the others continue.

    Stop rule: right-hand side j stops when `‖r_j‖ ≤ tol · ‖b_j‖` (r the recurrence residual); the
    solve stops when every one has, or after `maxiter` iterations.

    Args:
      operator: the matrix `A` as a square self-adjoint `tf.linalg.LinearOperator`; its damping λ
        (for `HessianOperator`) is already part of `A`. Anything with `.matmul_rows(rows)` or `.matmul`.
      b: right-hand sides, `[p]` or `[k, p]` (k vectors as rows).
      x0: starting point shaped like `b` (default zeros; costs one extra product).
      tol: relative tolerance of the stop rule, > 0.
      maxiter: most iterations (default `min(10·p, 1000)`).
      preconditioner: `M ≈ A⁻¹`, a self-adjoint positive definite `tf.linalg.LinearOperator` (e.g.
        EKFAC or a diagonal) or a callable mapping rows `[k, p]` to `M` applied row-wise.
      jit_compile: compile the loop with XLA. Needs an XLA-compatible operator (in-memory
        matrices); for a `HessianOperator` use its own `jit_compile=True` instead.

    Returns:
      `(x, info)`: `x` shaped like `b`; `info` a `SolveInfo` with `iterations` (operator products
      in the loop), `residual` (largest final relative recurrence residual), `converged`, and
      `extra["iterations_per_rhs"]`, `extra["residuals"]`.

    Raises:
      NegativeCurvatureError: `pᵀAp ≤ 0` for some search direction (A is not positive
        definite); add damping or use `curvature="gauss_newton"`.
      NotFiniteError: NaN/Inf appeared in a product.
      InputError: bad shapes or options, an operator hinted not self-adjoint / not positive
        definite, or a preconditioner that is not positive definite.

    Warns:
      UserWarning when some right-hand side did not reach the tolerance within `maxiter`.

    Example:
      >>> H = tfi.HessianOperator(model, loss, (x, y), damping=1e-3)
      >>> x, info = cg(H, g_test, tol=1e-8)        # g_test: [k, p]
      >>> info.iterations, info.residual
    """
    start = time.perf_counter()
    p = operator_size(operator)
    if getattr(operator, "is_self_adjoint", None) is False:
        raise InputError(
            f"cg needs a self-adjoint operator; {getattr(operator, 'name', type(operator).__name__)} "
            "has is_self_adjoint=False. Use a symmetric curvature (Hessian or Gauss-Newton)."
        )
    if getattr(operator, "is_positive_definite", None) is False:
        raise InputError(
            "cg needs a positive definite operator; this one is hinted is_positive_definite=False. "
            "Add damping (HessianOperator(damping=...)) or use curvature='gauss_newton'."
        )
    if jit_compile and getattr(operator, "problem", None) is not None:
        raise InputError(
            "cg(jit_compile=True) compiles the whole loop with XLA, which cannot iterate the "
            "operator's tf.data pass. Build the operator with jit_compile=True instead (e.g. "
            "tfi.HessianOperator(..., jit_compile=True)): each batch's product is then compiled."
        )
    tol = arguments.positive_float(tol, "tol")
    maxiter = arguments.positive_int(min(10 * p, _DEFAULT_MAXITER_CAP) if maxiter is None else maxiter, "maxiter")
    if preconditioner is not None:
        m_shape = getattr(preconditioner, "shape", None)
        if m_shape is not None and tuple(m_shape) != (p, p):
            raise InputError(
                f"The preconditioner must be [p, p] = [{p}, {p}] like the operator. Received shape "
                f"{tuple(m_shape)}."
            )
        if m_shape is None and not callable(preconditioner):
            raise InputError(
                "preconditioner must be a tf.linalg.LinearOperator or a callable on rows [k, p]. "
                f"Received {type(preconditioner).__name__}."
            )
    rows, single = as_rows(operator, b)
    if x0 is not None:
        x0_rows, _ = as_rows(operator, x0, name="x0")
        if x0_rows.shape != rows.shape:
            raise InputError(f"x0 must be shaped like b {tuple(np.shape(b))}. Received {tuple(np.shape(x0))}.")
    else:
        x0_rows = tf.zeros_like(rows)

    loop = compiled([operator, preconditioner], (bool(jit_compile), x0 is not None),
                    lambda op_ref, m_ref: _build_loop(op_ref, m_ref, jit_compile, x0 is not None))
    result = loop(rows, x0_rows, tf.constant(tol, rows.dtype), tf.constant(int(maxiter)))
    x, r_norm, iters_per_rhs, iterations, flag, bad_value, bad_row = (t.numpy() for t in result)
    _raise_for_flag(int(flag), float(bad_value), int(bad_row), int(iterations), operator)

    b_norm = np.linalg.norm(rows.numpy().astype(np.float64), axis=-1)
    residuals = relative_norms(r_norm, b_norm)
    done = r_norm <= tol * b_norm
    converged = bool(np.all(done))
    if not converged:
        warnings.warn(
            f"cg did not converge: {int(np.sum(~done))} of {len(done)} right-hand side(s) still have "
            f"relative residual up to {residuals.max():.3g} > tol={tol:g} after maxiter={maxiter} "
            "iterations. Raise maxiter, add damping (a better-conditioned H + λI), or pass a "
            "preconditioner.",
            stacklevel=2,
        )
    info = SolveInfo(
        method="cg",
        iterations=int(iterations),
        residual=float(residuals.max()),
        converged=converged,
        seconds=time.perf_counter() - start,
        residual_is_estimate=True,  # the recurrence residual; equals b − Ax up to rounding
        extra=dict(iterations_per_rhs=iters_per_rhs.astype(int).tolist(), residuals=residuals.tolist(),
                   tol=tol, maxiter=int(maxiter), damping=getattr(operator, "damping", None),
                   preconditioned=preconditioner is not None),
    )
    _log.debug("cg: %d iterations, residual %.3g, converged=%s", info.iterations, info.residual, converged)
    x = tf.convert_to_tensor(x, dtype=operator.dtype)
    return (x[0] if single else x), info


def _build_loop(op_ref, m_ref, jit_compile, has_x0):
    """The whole CG iteration as one `tf.function` around a `tf.while_loop`."""

    def loop(b, x0, tol, maxiter):
        operator, preconditioner = op_ref(), m_ref()
        A = lambda v: matmul_rows(operator, v)  # noqa: E731
        M = (lambda r: matmul_rows(preconditioner, r)) if preconditioner is not None else tf.identity  # noqa: E731
        k = tf.shape(b)[0]
        zero = tf.zeros([], b.dtype)
        tiny = tf.constant(np.finfo(b.dtype.as_numpy_dtype).tiny, b.dtype)
        threshold = tol * tf.norm(b, axis=-1)
        x = x0
        r = b - A(x0) if has_x0 else b
        z = M(r)
        rho = row_dot(r, z)
        r_norm = tf.norm(r, axis=-1)
        active = r_norm > threshold
        state = dict(
            i=tf.constant(0), x=x, r=r, p=z, rho=rho, r_norm=r_norm, active=active,
            iters=tf.zeros([k], tf.int32), flag=tf.constant(_OK), bad_value=zero, bad_row=tf.constant(-1),
        )
        state["flag"], state["bad_value"], state["bad_row"] = _first_bad(
            state["flag"], zero, tf.constant(-1), active & ~(rho > 0), rho, _PRECONDITIONER_NOT_PD)

        def cond(s):
            return (s["i"] < maxiter) & tf.reduce_any(s["active"]) & tf.equal(s["flag"], _OK)

        def body(s):
            active, p, rho = s["active"], s["p"], s["rho"]
            w = A(p)
            curvature = row_dot(p, w)
            finite = tf.math.is_finite(curvature) & tf.reduce_all(tf.math.is_finite(w), axis=-1)
            flag, bad_value, bad_row = _first_bad(s["flag"], s["bad_value"], s["bad_row"],
                                                  active & ~finite, curvature, _NOT_FINITE)
            rayleigh = curvature / tf.maximum(row_dot(p, p), tiny)
            flag, bad_value, bad_row = _first_bad(flag, bad_value, bad_row,
                                                  active & finite & (curvature <= 0), rayleigh,
                                                  _NEGATIVE_CURVATURE)
            step = active & finite & (curvature > 0)
            alpha = tf.where(step, rho / tf.where(step, curvature, tf.ones_like(curvature)), zero)
            x = s["x"] + alpha[:, None] * p
            r = s["r"] - alpha[:, None] * w
            z = M(r)
            rho_new = row_dot(r, z)
            r_norm = tf.where(step, tf.norm(r, axis=-1), s["r_norm"])
            still = step & (r_norm > threshold)
            flag, bad_value, bad_row = _first_bad(flag, bad_value, bad_row, still & ~(rho_new > 0), rho_new,
                                                  _PRECONDITIONER_NOT_PD)
            beta = tf.where(still, rho_new / tf.where(step, rho, tf.ones_like(rho)), zero)
            p = tf.where(still[:, None], z + beta[:, None] * p, p)
            return (dict(
                i=s["i"] + 1, x=x, r=r, p=p, rho=tf.where(step, rho_new, rho), r_norm=r_norm,
                active=still | active & ~step,
                iters=s["iters"] + tf.cast(step, tf.int32), flag=flag, bad_value=bad_value, bad_row=bad_row,
            ),)

        (state,) = tf.while_loop(cond, body, (state,))
        return (state["x"], state["r_norm"], state["iters"], state["i"], state["flag"],
                state["bad_value"], state["bad_row"])

    return tf.function(loop, jit_compile=bool(jit_compile), reduce_retracing=False, autograph=False)


def _first_bad(flag, value, row, bad, values, code):
    """Records the first row where `bad` holds (if no flag is set yet)."""
    any_bad = tf.reduce_any(bad) & tf.equal(flag, _OK)
    index = tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32)
    return (tf.where(any_bad, code, flag), tf.where(any_bad, tf.gather(values, index), value),
            tf.where(any_bad, index, row))


def _raise_for_flag(flag, value, row, iteration, operator):
    if flag == _OK:
        return
    where = f"right-hand side {row}, iteration {iteration}"  # iterations counted from 1
    if flag == _NEGATIVE_CURVATURE:
        damping = getattr(operator, "damping", None)
        now = f" (damping is {damping:g})" if damping is not None else ""
        more = (f"damping larger than the current one by more than {-value:.3g}" if value < 0 else
                "a positive damping")
        raise NegativeCurvatureError(
            f"cg met negative curvature at {where}: pᵀ(H + λI)p / ‖p‖² = {value:.4g} ≤ 0, so H + λI is "
            f"not positive definite{now} and CG cannot solve it. Use {more} "
            "(tfi.extreme_eigenvalues(operator).suggested_damping estimates one), or "
            "curvature=\"gauss_newton\" (positive semi-definite), or method=\"direct\" for small problems."
        )
    if flag == _NOT_FINITE:
        raise NotFiniteError(
            f"cg: the operator product became NaN/Inf at {where} (pᵀAp = {value}). Check the model, "
            "data and loss for NaN/Inf, and the operator for overflow."
        )
    raise InputError(
        f"cg: the preconditioner is not positive definite: rᵀMr = {value:.4g} ≤ 0 at {where}. A "
        "preconditioner must approximate (H + λI)⁻¹ and be positive definite; add damping to it."
    )


@dataclasses.dataclass(frozen=True)
class CG(Method):
    """Compiled conjugate gradient (`solvers.cg`), all right-hand sides in one pass per iteration.

    Example:
      >>> x, info = CG(tol=1e-8).solve(H, g_rows)
    """

    tol: float = 1e-6
    maxiter: typing.Optional[int] = None
    preconditioner: typing.Any = None
    jit_compile: bool = False
    name: typing.ClassVar[str] = "cg"
    iterative: typing.ClassVar[bool] = True

    def __post_init__(self):
        arguments.positive_float(self.tol, "tol", owner="CG")
        if self.maxiter is not None:
            arguments.positive_int(self.maxiter, "maxiter", owner="CG")

    def prepare(self, source):
        operator = source.hessian()
        return Prepared(self, operator, lambda rows: cg(
            operator, rows, tol=self.tol, maxiter=self.maxiter, preconditioner=self.preconditioner,
            jit_compile=self.jit_compile))
