"""Direct solve of `(H + λI) x = b` with the dense matrix: Cholesky, or an eigendecomposition when
`H + λI` is indefinite."""

import logging
import time
import warnings

import numpy as np
import scipy.linalg
import tensorflow as tf

from tf_influence.errors import InputError, NegativeCurvatureError, ResourceError
from tf_influence.operators import MAX_DENSE_SIZE
from tf_influence.solvers._common import as_rows, operator_size
from tf_influence.solvers.info import SolveInfo

_log = logging.getLogger(__name__)

_ON_INDEFINITE = ("warn", "raise", "ignore")


def direct(operator, b, *, on_indefinite="warn", max_size=MAX_DENSE_SIZE):
    """Solves `A x = b` exactly with the dense matrix `A = operator.to_dense()` (e.g. `H + λI`).

    The dense matrix is built once (p operator products for a `HessianOperator`) and factored in
    float64: Cholesky when `A` is positive definite and well conditioned, otherwise a symmetric
    eigendecomposition `A = QΛQᵀ`, `x = Q Λ⁻¹ Qᵀ b`, which stays exact for an indefinite but
    nonsingular `A` (a Hessian away from a minimum without enough damping).

    Stop rule: none (one-shot); `info.residual` is the exact `max_j ‖A x_j − b_j‖ / ‖b_j‖`.

    Args:
      operator: a square, self-adjoint `tf.linalg.LinearOperator` of size p ≤ `max_size`; its
        damping λ is part of `to_dense()`.
      b: right-hand sides `[p]` or `[k, p]` (k vectors as rows).
      on_indefinite: what to do when `A` has a negative eigenvalue: `"warn"` (default: solve
        by eigendecomposition and warn with the most negative eigenvalue and the damping that
        would fix it), `"raise"` (NegativeCurvatureError) or `"ignore"`.
      max_size: largest p to densify (default `operators.MAX_DENSE_SIZE`); the dense matrix and
        its factor need about `2·p²·8` bytes.

    Returns:
      `(x, info)`: `x` shaped like `b`; `info.extra` holds `factorization` ("cholesky" or
      "eigh"), `min_eigenvalue` (when computed) and `reciprocal_condition` (Cholesky).

    Raises:
      ResourceError: p > max_size (the message says the memory it would need).
      NegativeCurvatureError: `A` is singular (an eigenvalue of zero relative to the largest), or
        indefinite with `on_indefinite="raise"`.

    Example:
      >>> H = tfi.HessianOperator(model, loss, (x, y), variables=model.layers[-1], damping=1e-3)
      >>> x, info = direct(H, g_test)
    """
    start = time.perf_counter()
    if on_indefinite not in _ON_INDEFINITE:
        raise InputError(f"on_indefinite must be one of {_ON_INDEFINITE}. Received {on_indefinite!r}.")
    p = operator_size(operator)
    if p > max_size:
        raise ResourceError(
            f"direct needs the dense {p}x{p} matrix: about {2 * p * p * 8 / 2**30:.1f} GiB in float64 "
            f"(matrix and factor) and {p} operator products; the limit is max_size={max_size}. Select "
            "fewer variables (e.g. variables=model.layers[-1]) or use method=\"cg\"."
        )
    if getattr(operator, "is_self_adjoint", None) is False:
        raise InputError("direct solves symmetric systems; the operator is hinted is_self_adjoint=False.")
    rows, single = as_rows(operator, b)
    dense = np.asarray(operator.to_dense(), dtype=np.float64)
    scale = float(np.max(np.abs(dense))) if dense.size else 0.0
    asymmetry = float(np.max(np.abs(dense - dense.T))) if dense.size else 0.0
    if asymmetry > 1e-6 * scale:
        raise InputError(
            f"direct solves symmetric systems; this operator's matrix is not symmetric (max |A − Aᵀ| = "
            f"{asymmetry:.3g}, max |A| = {scale:.3g}). Use a Hessian or Gauss-Newton operator."
        )
    dense = 0.5 * (dense + dense.T)
    rhs = rows.numpy().astype(np.float64).T  # [p, k]
    damping = getattr(operator, "damping", None)
    extra = dict(damping=damping)

    x, extra["reciprocal_condition"] = _cholesky_solve(dense, rhs)
    if x is not None:
        extra["factorization"] = "cholesky"
    else:
        eigenvalues, vectors = np.linalg.eigh(dense)
        smallest, largest = float(eigenvalues[0]), float(np.max(np.abs(eigenvalues)))
        extra.update(factorization="eigh", min_eigenvalue=smallest, max_abs_eigenvalue=largest)
        floor = p * np.finfo(np.float64).eps * largest
        if np.min(np.abs(eigenvalues)) <= floor:
            raise NegativeCurvatureError(
                f"H + λI is singular: its eigenvalue closest to zero is "
                f"{eigenvalues[np.argmin(np.abs(eigenvalues))]:.3g} (largest |eigenvalue| {largest:.3g}), "
                f"so (H + λI)x = b has no unique solution{_damping_text(damping)}. Add damping, e.g. "
                f"damping={_fixing_damping(damping, smallest, largest):.3g}."
            )
        if smallest < 0 and on_indefinite != "ignore":
            negatives = int(np.sum(eigenvalues < 0))
            message = (
                f"H + λI is indefinite: {negatives} of {p} eigenvalues are negative, the most negative "
                f"is {smallest:.4g}{_damping_text(damping)}. The solution is exact for this indefinite "
                f"system, but influence is usually meant for a positive definite one: damping="
                f"{_fixing_damping(damping, smallest, largest):.3g} would make it so."
            )
            if on_indefinite == "raise":
                raise NegativeCurvatureError(message)
            warnings.warn(message, stacklevel=2)
        x = vectors @ ((vectors.T @ rhs) / eigenvalues[:, None])

    residual = np.linalg.norm(dense @ x - rhs, axis=0)
    b_norm = np.linalg.norm(rhs, axis=0)
    residuals = np.where(b_norm > 0, residual / np.where(b_norm > 0, b_norm, 1.0), residual)
    extra["residuals"] = residuals.tolist()
    info = SolveInfo(method="direct", iterations=0, residual=float(residuals.max()), converged=True,
                     seconds=time.perf_counter() - start, extra=extra)
    _log.debug("direct: %s, residual %.3g", extra["factorization"], info.residual)
    x = tf.convert_to_tensor(x.T, dtype=operator.dtype)
    return (x[0] if single else x), info


def _cholesky_solve(dense, rhs):
    """`(x, rcond)`, or `(None, rcond)` when `dense` is not numerically positive definite."""
    try:
        factor = scipy.linalg.cho_factor(dense, lower=True, check_finite=True)
    except np.linalg.LinAlgError:
        return None, None
    except ValueError as e:  # NaN/Inf in the matrix
        raise InputError(f"The dense operator contains NaN/Inf entries: {e}") from e
    anorm = float(np.max(np.sum(np.abs(dense), axis=0)))
    rcond, info = scipy.linalg.lapack.dpocon(factor[0], anorm, uplo="L")
    if info != 0 or rcond <= dense.shape[0] * np.finfo(np.float64).eps:
        return None, float(rcond)  # too close to singular: let the eigendecomposition judge
    return scipy.linalg.cho_solve(factor, rhs, check_finite=False), float(rcond)


def _damping_text(damping):
    return f" (with damping λ={damping:g})" if damping is not None else ""


def _fixing_damping(damping, smallest, largest):
    """A damping that makes `H + λI` positive definite: shift the smallest eigenvalue to ~1e-3·largest."""
    return (damping or 0.0) + max(0.0, -smallest) + 1e-3 * largest
