"""What plain CG (`cg.py`) and block CG (`block_cg.py`) share: argument checks, stop flags, the `SolveInfo`."""

import logging
import time
import warnings

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError, NegativeCurvatureError, NotFiniteError
from tf_influence.operators.rows import operator_size
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.rows import as_rows, relative_norms

_log = logging.getLogger(__name__)

# Why a compiled loop stopped early (the graph cannot raise a readable error; it returns a flag).
OK, NEGATIVE_CURVATURE, NOT_FINITE, PRECONDITIONER_NOT_PD = 0, 1, 2, 3
DEFAULT_MAXITER_CAP = 1000


def check_arguments(operator, b, x0, tol, maxiter, preconditioner, jit_compile, *, name="cg"):
    """Checks CG's arguments (shared by `cg` and `block_cg`); raises InputError with the fix.

    Returns:
      `(rows, single, x0_rows, tol, maxiter)`: `b` as `[k, p]` rows, whether it was one vector,
      the starting point as rows (zeros if `x0` is None), and the validated `tol`, `maxiter`.
    """
    p = operator_size(operator)
    if getattr(operator, "is_self_adjoint", None) is False:
        raise InputError(
            f"{name} needs a self-adjoint operator; {getattr(operator, 'name', type(operator).__name__)} "
            "has is_self_adjoint=False. Use a symmetric curvature (Hessian or Gauss-Newton)."
        )
    if getattr(operator, "is_positive_definite", None) is False:
        raise InputError(
            f"{name} needs a positive definite operator; this one is hinted is_positive_definite=False. "
            "Add damping (HessianOperator(damping=...)) or use curvature='gauss_newton'."
        )
    if jit_compile and getattr(operator, "problem", None) is not None:
        raise InputError(
            f"{name}(jit_compile=True) compiles the whole loop with XLA, which cannot iterate the "
            "operator's tf.data pass. Build the operator with jit_compile=True instead (e.g. "
            "tfi.HessianOperator(..., jit_compile=True)): each batch's product is then compiled."
        )
    tol = arguments.positive_float(tol, "tol")
    maxiter = arguments.positive_int(min(10 * p, DEFAULT_MAXITER_CAP) if maxiter is None else maxiter, "maxiter")
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
    return rows, single, x0_rows, tol, maxiter


def loop_signature(operator):
    """The input signature of a compiled CG loop `(b, x0, tol, maxiter)`: any number of rows, one trace."""
    rows = tf.TensorSpec([None, operator_size(operator)], operator.dtype)
    return [rows, rows, tf.TensorSpec([], operator.dtype), tf.TensorSpec([], tf.int32)]


def solve_info(name, rows, r_norm, iters_per_rhs, iterations, tol, maxiter, operator, preconditioner, start,
               **extra):
    """The `SolveInfo` of a CG-type solve (warns when some right-hand side did not converge)."""
    b_norm = np.linalg.norm(rows.numpy().astype(np.float64), axis=-1)
    residuals = relative_norms(r_norm, b_norm)
    done = r_norm <= tol * b_norm
    converged = bool(np.all(done))
    if not converged:
        warnings.warn(
            f"{name} did not converge: {int(np.sum(~done))} of {len(done)} right-hand side(s) still have "
            f"relative residual up to {residuals.max():.3g} > tol={tol:g} after maxiter={maxiter} "
            "iterations. Raise maxiter, add damping (a better-conditioned H + λI), or pass a "
            "preconditioner.",
            stacklevel=3,
        )
    info = SolveInfo(
        method="cg",
        iterations=int(iterations),
        residual=float(residuals.max()),
        converged=converged,
        seconds=time.perf_counter() - start,
        residual_is_estimate=True,  # the recurrence residual; equals b − Ax up to rounding
        extra=dict(iterations_per_rhs=np.asarray(iters_per_rhs).astype(int).tolist(), residuals=residuals.tolist(),
                   tol=tol, maxiter=int(maxiter), damping=getattr(operator, "damping", None),
                   preconditioned=preconditioner is not None, **extra),
    )
    _log.debug("%s: %d iterations, residual %.3g, converged=%s", name, info.iterations, info.residual, converged)
    return info


def first_bad(flag, value, row, bad, values, code):
    """`(flag, value, row)` updated to the first row where `bad` holds, if no flag is set yet."""
    any_bad = tf.reduce_any(bad) & tf.equal(flag, OK)
    index = tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32)
    return (tf.where(any_bad, code, flag), tf.where(any_bad, tf.gather(values, index), value),
            tf.where(any_bad, index, row))


def raise_for_flag(flag, value, where, operator):
    """Raises the error a CG loop's stop flag stands for (nothing for `OK`); `where` names the
    right-hand side and the iteration (counted from 1)."""
    if flag == OK:
        return
    if flag == NEGATIVE_CURVATURE:
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
    if flag == NOT_FINITE:
        raise NotFiniteError(
            f"cg: the operator product became NaN/Inf at {where} (pᵀAp = {value}). Check the model, "
            "data and loss for NaN/Inf, and the operator for overflow."
        )
    raise InputError(
        f"cg: the preconditioner is not positive definite: rᵀMr = {value:.4g} ≤ 0 at {where}. A "
        "preconditioner must approximate (H + λI)⁻¹ and be positive definite; add damping to it."
    )
