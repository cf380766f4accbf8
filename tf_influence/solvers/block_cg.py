"""Block conjugate gradient: k right-hand sides searching one shared Krylov space, compiled as one loop.

Plain CG on k right-hand sides (`solvers.cg`) runs k independent recurrences that share each
operator product. Block CG (O'Leary 1980) lets every right-hand side use the search directions of
all the others: after t iterations each solution is optimal (in the A-norm) over the sum of the k
Krylov spaces, so it converges in fewer iterations — each still one `A` product on `[k, p]` rows,
one pass over the data for a `HessianOperator`. Measured on a 2,410-parameter MLP with 50 test
gradients: 5 iterations instead of 15 (λ = 0.1) and 8 instead of 37 (λ = 0.01) for tol 1e-6.

The search block is orthonormalised at every step (a QR factorisation), the breakdown-free form of
Ji & Li (2017, "A breakdown-free block conjugate gradient method"): when right-hand sides coincide
or some converge, the block becomes rank deficient, and orthonormal rows keep `Pᵀ A P` as well
conditioned as A itself (its eigenvalues lie in A's spectrum).
"""

import time

import numpy as np
import tensorflow as tf

from tf_influence.solvers.cg_common import (NEGATIVE_CURVATURE, NOT_FINITE, OK, PRECONDITIONER_NOT_PD,
                                            check_arguments, first_bad, loop_signature, raise_for_flag, solve_info)
from tf_influence.solvers.rows import row_dot, shared_loop


def block_cg(operator, b, *, x0=None, tol=1e-6, maxiter=None, preconditioner=None, jit_compile=False):
    """Solves `A X = B` for k right-hand sides at once by block conjugate gradient.

    Algorithm (rows: `X`, `R`, `B` are `[k, p]`; the search block `P` is `[m, p]`, m = min(k, p),
    with orthonormal rows; `M ≈ A⁻¹` the preconditioner, identity if none):
    `R = B − A X0`, `P = orth(M R)`; repeat: `W = A P`, `α = (P Wᵀ)⁻¹ P Rᵀ`, `X += αᵀ P`,
    `R −= αᵀ W`, `Z = M R`, `β = −(P Wᵀ)⁻¹ W Zᵀ`, `P = orth(Z + βᵀ P)`. For k = 1 the iterates are
    those of plain CG. Every right-hand side keeps improving until all have converged.

    Stop rule: right-hand side j has converged when `‖r_j‖ ≤ tol · ‖b_j‖` (r the recurrence
    residual, the true residual up to rounding); the solve stops when all have, or after `maxiter`
    iterations.

    Args:
      operator: the matrix `A` as a square self-adjoint `tf.linalg.LinearOperator` (its damping λ
        already part of `A`), or anything with `.matmul_rows(rows)` or `.matmul`.
      b: right-hand sides, `[p]` or `[k, p]`.
      x0: starting point shaped like `b` (default zeros; costs one extra product).
      tol: relative tolerance of the stop rule, > 0.
      maxiter: most iterations (default `min(10·p, 1000)`).
      preconditioner: `M ≈ A⁻¹`, a self-adjoint positive definite `tf.linalg.LinearOperator` or a
        callable mapping rows `[k, p]` to `M` applied row-wise.
      jit_compile: compile the loop with XLA (in-memory operators only, as for `cg`).

    Returns:
      `(x, info)` as `cg` returns them: `info.iterations` counts block iterations (operator
      products on the whole block); `extra["iterations_per_rhs"]` the iteration at which each
      right-hand side first met the tolerance; `extra["block"]` is True.

    Raises:
      NegativeCurvatureError: `Pᵀ A P` is not positive definite: some direction p in the search
        space has `pᵀAp ≤ 0` (A is not positive definite); add damping or use Gauss-Newton.
      NotFiniteError, InputError: as `cg`.

    Performance: per iteration one `A` product on m rows, plus `O(p·k²)` for the QR factorisation
    and `O(k³)` for the `[m, m]` eigendecomposition; memory about 6 `[k, p]` blocks.

    Example:
      >>> H = tfi.HessianOperator(model, loss, (x, y), damping=1e-2)
      >>> x, info = block_cg(H, g_test, tol=1e-8)      # g_test: [k, p]
    """
    start = time.perf_counter()
    rows, single, x0_rows, tol, maxiter = check_arguments(operator, b, x0, tol, maxiter, preconditioner,
                                                              jit_compile, name="block_cg")
    loop = shared_loop(_loop, [operator, preconditioner], loop_signature(operator), jit_compile=jit_compile,
                       has_x0=x0 is not None)
    result = loop(rows, x0_rows, tf.constant(tol, rows.dtype), tf.constant(int(maxiter)))
    x, r_norm, iters_per_rhs, iterations, flag, bad_value, bad_row = (t.numpy() for t in result)
    where = (f"iteration {int(iterations)}" if int(bad_row) < 0 else
             f"right-hand side {int(bad_row)}, iteration {int(iterations)}")
    raise_for_flag(int(flag), float(bad_value), where, operator)
    info = solve_info("block_cg", rows, r_norm, iters_per_rhs, iterations, tol, maxiter, operator,
                          preconditioner, start, block=True)
    x = tf.convert_to_tensor(x, dtype=operator.dtype)
    return (x[0] if single else x), info


def _search_block(z, active, m):
    """`[m, p]` orthonormal rows spanning the rows of `z` `[k, p]` of the active right-hand sides,
    and a `[m]` mask of the rows kept.

    Rank-revealing through the eigendecomposition of the Gram matrix of the unit-normalised rows
    (`U S Uᵀ = Ẑ Ẑᵀ`, `P = S^{-1/2} Uᵀ Ẑ`): the directions with a relative singular value below
    `eps^{1/3}` (a repeated right-hand side, a converged one, a rank-deficient block) are dropped
    (their rows set to zero), whatever their position in the block. A QR factorisation without
    pivoting cannot do that: the column after a dropped one keeps a part along the dropped one's
    direction, which then leaves the search space and CG stagnates.
    """
    z = tf.where(active[:, None], z, tf.zeros_like(z))
    norms = tf.norm(z, axis=-1, keepdims=True)
    unit = z / tf.where(norms > 0, norms, tf.ones_like(norms))  # compare like with like
    gram = tf.matmul(unit, unit, transpose_b=True)
    values, vectors = tf.linalg.eigh(0.5 * (gram + tf.transpose(gram)))
    k = tf.shape(values)[0]
    values, vectors = values[k - m:], vectors[:, k - m:]  # the m largest (m = min(k, p) ≥ the rank)
    eps = np.finfo(z.dtype.as_numpy_dtype).eps
    keep = values > tf.constant(eps ** (2 / 3), z.dtype) * tf.maximum(values[-1], tf.constant(1.0, z.dtype))
    scale = tf.where(keep, tf.math.rsqrt(tf.where(keep, values, tf.ones_like(values))), tf.zeros_like(values))
    return tf.matmul(vectors * scale, unit, transpose_a=True), keep


def _masked(rows, active):
    """`rows` with the rows of inactive right-hand sides set to zero."""
    return tf.where(active[:, None], rows, tf.zeros_like(rows))


def _loop(products, b, x0, tol, maxiter, *, has_x0):
    """The whole block CG iteration as one `tf.while_loop` (traced by `shared_loop`); `products`: A and M."""
    A, M = products
    M = M or tf.identity
    k = tf.shape(b)[0]  # dynamic: one trace for every number of right-hand sides
    m = tf.minimum(k, b.shape[1])
    zero = tf.zeros([], b.dtype)
    threshold = tol * tf.norm(b, axis=-1)
    r = b - A(x0) if has_x0 else b
    z = M(r)
    r_norm = tf.norm(r, axis=-1)
    active = r_norm > threshold
    rz = row_dot(r, z)
    flag, bad_value, bad_row = first_bad(tf.constant(OK), zero, tf.constant(-1), active & ~(rz > 0), rz,
                                         PRECONDITIONER_NOT_PD)
    p_rows, keep = _search_block(z, active, m)
    state = dict(i=tf.constant(0), x=x0, r=r, p=p_rows, keep=keep, r_norm=r_norm, active=active,
                 iters=tf.zeros([k], tf.int32), flag=flag, bad_value=bad_value, bad_row=bad_row)

    def cond(s):
        return (s["i"] < maxiter) & tf.reduce_any(s["active"]) & tf.equal(s["flag"], OK)

    def body(s):
        p_rows, active = s["p"], s["active"]
        w = A(p_rows)  # dropped (zero) rows give zero products
        pap = tf.matmul(p_rows, w, transpose_b=True)
        pap = 0.5 * (pap + tf.transpose(pap)) + tf.linalg.diag(tf.cast(~s["keep"], pap.dtype))
        finite = tf.reduce_all(tf.math.is_finite(pap))
        eigenvalues, vectors = tf.linalg.eigh(tf.where(finite, pap, tf.eye(m, dtype=pap.dtype)))
        # P has orthonormal rows, so the eigenvalues of PᵀAP are Rayleigh quotients pᵀAp/‖p‖².
        smallest = eigenvalues[0]
        flag = tf.where(~finite, NOT_FINITE, tf.where(smallest <= 0, NEGATIVE_CURVATURE, OK))
        bad_value = tf.where(finite, smallest, tf.constant(np.nan, pap.dtype))
        ok = tf.equal(flag, OK)
        inverse = tf.where(ok, 1.0 / tf.where(ok, eigenvalues, tf.ones_like(eigenvalues)), zero)

        def pap_solve(rhs):  # (PᵀAP)⁻¹ rhs, rhs [m, k]
            return tf.matmul(vectors, inverse[:, None] * tf.matmul(vectors, rhs, transpose_a=True))

        # Converged right-hand sides are frozen (their columns of α are zero).
        alpha = pap_solve(tf.matmul(p_rows, _masked(s["r"], active), transpose_b=True))  # [m, k]
        x = s["x"] + tf.matmul(alpha, p_rows, transpose_a=True)
        r = s["r"] - tf.matmul(alpha, w, transpose_a=True)
        r_norm = tf.where(active, tf.norm(r, axis=-1), s["r_norm"])
        still = active & (r_norm > threshold)
        z = M(r)
        rz = row_dot(r, z)
        flag, bad_value, bad_row = first_bad(flag, bad_value, tf.constant(-1), still & ~(rz > 0), rz,
                                             PRECONDITIONER_NOT_PD)
        beta = -pap_solve(tf.matmul(w, _masked(z, still), transpose_b=True))  # new block A-orthogonal to P
        p_new, keep = _search_block(z + tf.matmul(beta, p_rows, transpose_a=True), still, m)
        return (dict(i=s["i"] + 1, x=x, r=r, p=p_new, keep=keep, r_norm=r_norm, active=still,
                     iters=s["iters"] + tf.cast(active, tf.int32), flag=flag, bad_value=bad_value,
                     bad_row=bad_row),)

    (state,) = tf.while_loop(cond, body, (state,))
    return (state["x"], state["r_norm"], state["iters"], state["i"], state["flag"], state["bad_value"],
            state["bad_row"])

