"""Conjugate gradient for `(H + λI) x = b`, many right-hand sides at once, compiled as one loop."""

import dataclasses
import time
import typing

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.solvers.block_cg import block_cg
from tf_influence.solvers.cg_common import (NEGATIVE_CURVATURE, NOT_FINITE, OK, PRECONDITIONER_NOT_PD,
                                            check_arguments, first_bad, loop_signature, raise_for_flag, solve_info)
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import row_dot, shared_loop


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
    rows, single, x0_rows, tol, maxiter = check_arguments(operator, b, x0, tol, maxiter, preconditioner, jit_compile)

    loop = shared_loop(_loop, [operator, preconditioner], loop_signature(operator), jit_compile=jit_compile,
                       has_x0=x0 is not None)
    result = loop(rows, x0_rows, tf.constant(tol, rows.dtype), tf.constant(int(maxiter)))
    x, r_norm, iters_per_rhs, iterations, flag, bad_value, bad_row = (t.numpy() for t in result)
    raise_for_flag(int(flag), float(bad_value), f"right-hand side {int(bad_row)}, iteration {int(iterations)}",
                   operator)
    info = solve_info("cg", rows, r_norm, iters_per_rhs, iterations, tol, maxiter, operator, preconditioner, start)
    x = tf.convert_to_tensor(x, dtype=operator.dtype)
    return (x[0] if single else x), info


def _loop(products, b, x0, tol, maxiter, *, has_x0):
    """The whole CG iteration as one `tf.while_loop` (traced by `shared_loop`); `products`: A and M."""
    A, M = products
    M = M or tf.identity
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
        iters=tf.zeros([k], tf.int32), flag=tf.constant(OK), bad_value=zero, bad_row=tf.constant(-1),
    )
    state["flag"], state["bad_value"], state["bad_row"] = first_bad(
        state["flag"], zero, tf.constant(-1), active & ~(rho > 0), rho, PRECONDITIONER_NOT_PD)

    def cond(s):
        return (s["i"] < maxiter) & tf.reduce_any(s["active"]) & tf.equal(s["flag"], OK)

    def body(s):
        active, p, rho = s["active"], s["p"], s["rho"]
        w = A(p)
        curvature = row_dot(p, w)
        finite = tf.math.is_finite(curvature) & tf.reduce_all(tf.math.is_finite(w), axis=-1)
        flag, bad_value, bad_row = first_bad(s["flag"], s["bad_value"], s["bad_row"],
                                              active & ~finite, curvature, NOT_FINITE)
        rayleigh = curvature / tf.maximum(row_dot(p, p), tiny)
        flag, bad_value, bad_row = first_bad(flag, bad_value, bad_row,
                                              active & finite & (curvature <= 0), rayleigh,
                                              NEGATIVE_CURVATURE)
        step = active & finite & (curvature > 0)
        alpha = tf.where(step, rho / tf.where(step, curvature, tf.ones_like(curvature)), zero)
        x = s["x"] + alpha[:, None] * p
        r = s["r"] - alpha[:, None] * w
        z = M(r)
        rho_new = row_dot(r, z)
        r_norm = tf.where(step, tf.norm(r, axis=-1), s["r_norm"])
        still = step & (r_norm > threshold)
        flag, bad_value, bad_row = first_bad(flag, bad_value, bad_row, still & ~(rho_new > 0), rho_new,
                                              PRECONDITIONER_NOT_PD)
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


@dataclasses.dataclass(frozen=True)
class CG(Method):
    """Compiled conjugate gradient, all right-hand sides in one pass over the data per iteration.

    With `block=True` (default) several right-hand sides are solved by block CG
    (`solvers.block_cg`: one shared Krylov space, fewer iterations); one right-hand side, or
    `block=False`, runs plain CG (`solvers.cg`). Both stop at the same tolerance.

    Example:
      >>> x, info = CG(tol=1e-8).solve(H, g_rows)
    """

    tol: float = 1e-6
    maxiter: typing.Optional[int] = None
    preconditioner: typing.Any = None
    jit_compile: bool = False
    block: bool = True
    name: typing.ClassVar[str] = "cg"
    iterative: typing.ClassVar[bool] = True

    def __post_init__(self):
        arguments.positive_float(self.tol, "tol", owner="CG")
        if self.maxiter is not None:
            arguments.positive_int(self.maxiter, "maxiter", owner="CG")

    def prepare(self, source):
        operator = source.hessian()

        def solve(rows):
            several = self.block and tf.convert_to_tensor(rows).shape.rank == 2 and rows.shape[0] > 1
            return (block_cg if several else cg)(
                operator, rows, tol=self.tol, maxiter=self.maxiter, preconditioner=self.preconditioner,
                jit_compile=self.jit_compile)

        return Prepared(self, operator, solve)
