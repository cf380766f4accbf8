"""Direct solve of `(H + λI) x = b` with the dense matrix: Cholesky, or an eigendecomposition when
`H + λI` is indefinite. The factorisation is computed once and reused for every right-hand side."""

import dataclasses
import logging
import time
import typing
import warnings

import numpy as np
import scipy.linalg
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError, NegativeCurvatureError, ResourceError
from tf_influence.operators.hessian import MAX_DENSE_SIZE
from tf_influence.operators.rows import operator_size
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import as_rows, relative_norms

_log = logging.getLogger(__name__)

_ON_INDEFINITE = ("warn", "raise", "ignore")


class DenseFactorization:
    """`A = L Lᵀ` (Cholesky) or `A = Q Λ Qᵀ` (eigh) of a symmetric float64 matrix, for repeated solves.

    Attributes:
      dense: the matrix `[p, p]` (float64 NumPy).
      kind: "cholesky" or "eigh".
      extra: diagnostics (`reciprocal_condition`, `min_eigenvalue`, ...).
    """

    def __init__(self, dense, *, damping=None, on_indefinite="warn"):
        self.dense = dense
        self.extra = dict(damping=damping)
        self._cholesky, self.extra["reciprocal_condition"] = _cholesky(dense)
        if self._cholesky is not None:
            self.kind = "cholesky"
        else:
            self.kind = "eigh"
            self._eigenvalues, self._eigenvectors = np.linalg.eigh(dense)
            self._check_eigenvalues(damping, on_indefinite)
        self.extra["factorization"] = self.kind

    def solve(self, rhs):
        """`A⁻¹ rhs` for `rhs` `[p, k]` (float64 NumPy)."""
        if self.kind == "cholesky":
            return scipy.linalg.cho_solve(self._cholesky, rhs, check_finite=False)
        q = self._eigenvectors
        return q @ ((q.T @ rhs) / self._eigenvalues[:, None])

    def quadratic_forms(self, rhs):
        """`[k]`: `bⱼᵀ A⁻¹ bⱼ` for the columns of `rhs` `[p, k]`, without forming `A⁻¹ bⱼ`.

        Cholesky: the squared column norms of `L⁻¹ rhs` (one triangular solve for the block);
        eigh: `Σᵢ (qᵢᵀ bⱼ)² / λᵢ`. Half the work of `solve` and no residual.

        Example:
          >>> values = factorization.quadratic_forms(gradients.T)   # self-influence of a batch
        """
        if self.kind == "cholesky":
            lower = scipy.linalg.solve_triangular(self._cholesky[0], rhs, lower=True, check_finite=False)
            return np.einsum("ij,ij->j", lower, lower)
        projected = self._eigenvectors.T @ rhs
        return np.einsum("ij,ij->j", projected, projected / self._eigenvalues[:, None])

    def _check_eigenvalues(self, damping, on_indefinite):
        eigenvalues, p = self._eigenvalues, len(self._eigenvalues)
        smallest, largest = float(eigenvalues[0]), float(np.max(np.abs(eigenvalues)))
        self.extra.update(min_eigenvalue=smallest, max_abs_eigenvalue=largest)
        if np.min(np.abs(eigenvalues)) <= p * np.finfo(np.float64).eps * largest:
            raise NegativeCurvatureError(
                f"H + λI is singular: its eigenvalue closest to zero is "
                f"{eigenvalues[np.argmin(np.abs(eigenvalues))]:.3g} (largest |eigenvalue| {largest:.3g}), "
                f"so (H + λI)x = b has no unique solution{_damping_text(damping)}. Add damping, e.g. "
                f"damping={_fixing_damping(damping, smallest, largest):.3g}."
            )
        if smallest < 0 and on_indefinite != "ignore":
            message = (
                f"H + λI is indefinite: {int(np.sum(eigenvalues < 0))} of {p} eigenvalues are negative, the most "
                f"negative is {smallest:.4g}{_damping_text(damping)}. The solution is exact for this indefinite "
                f"system, but influence is usually meant for a positive definite one: damping="
                f"{_fixing_damping(damping, smallest, largest):.3g} would make it so."
            )
            if on_indefinite == "raise":
                raise NegativeCurvatureError(message)
            warnings.warn(message, stacklevel=4)


def factorize(operator, *, on_indefinite="warn", max_size=MAX_DENSE_SIZE):
    """The `DenseFactorization` of `operator.to_dense()` (p ≤ `max_size`), checked to be symmetric."""
    arguments.one_of(on_indefinite, "on_indefinite", _ON_INDEFINITE)
    p = operator_size(operator)
    if p > max_size:
        raise ResourceError(
            f"direct needs the dense {p}x{p} matrix: about {2 * p * p * 8 / 2**30:.1f} GiB in float64 "
            f"(matrix and factor) and {p} operator products; the limit is max_size={max_size}. Select "
            "fewer variables (e.g. variables=model.layers[-1]) or use method=\"cg\"."
        )
    if getattr(operator, "is_self_adjoint", None) is False:
        raise InputError("direct solves symmetric systems; the operator is hinted is_self_adjoint=False.")
    dense_matrix = getattr(operator, "dense_matrix", None)
    if callable(dense_matrix):  # HessianOperator: built in a few compiled passes, symmetric, float64
        dense = dense_matrix(tf.float64)
    else:
        dense = np.asarray(operator.to_dense(), dtype=np.float64)
        scale = float(np.max(np.abs(dense))) if dense.size else 0.0
        asymmetry = float(np.max(np.abs(dense - dense.T))) if dense.size else 0.0
        if asymmetry > 1e-6 * scale:
            raise InputError(
                f"direct solves symmetric systems; this operator's matrix is not symmetric (max |A − Aᵀ| = "
                f"{asymmetry:.3g}, max |A| = {scale:.3g}). Use a Hessian or Gauss-Newton operator."
            )
        dense = 0.5 * (dense + dense.T)
    return DenseFactorization(dense, damping=getattr(operator, "damping", None), on_indefinite=on_indefinite)


def solve_factorized(factorization, operator, b):
    """`(x, SolveInfo)` for `b` `[p]` / `[k, p]` with a `DenseFactorization` of `operator`."""
    start = time.perf_counter()
    rows, single = as_rows(operator, b)
    rhs = rows.numpy().astype(np.float64).T  # [p, k]
    x = factorization.solve(rhs)
    residuals = relative_norms(np.linalg.norm(factorization.dense @ x - rhs, axis=0), np.linalg.norm(rhs, axis=0))
    extra = dict(factorization.extra, residuals=residuals.tolist())
    info = SolveInfo(method="direct", iterations=0, residual=float(residuals.max()), converged=True,
                     seconds=time.perf_counter() - start, extra=extra)
    _log.debug("direct: %s, residual %.3g", extra["factorization"], info.residual)
    x = tf.convert_to_tensor(x.T, dtype=operator.dtype)
    return (x[0] if single else x), info


def quadratic_forms(factorization, operator, rows):
    """`[k]` float64 NumPy: `rowⱼᵀ A⁻¹ rowⱼ` for rows `[k, p]` with a `DenseFactorization` of `operator`."""
    rows, _ = as_rows(operator, rows)
    return factorization.quadratic_forms(rows.numpy().astype(np.float64).T)


def direct(operator, b, *, on_indefinite="warn", max_size=MAX_DENSE_SIZE):
    """Solves `A x = b` exactly with the dense matrix `A = operator.to_dense()` (e.g. `H + λI`).

    The dense matrix is built once and factored in float64: Cholesky when `A` is positive definite
    and well conditioned, otherwise a symmetric eigendecomposition `A = QΛQᵀ`, `x = Q Λ⁻¹ Qᵀ b`, which
    stays exact for an indefinite but nonsingular `A` (a Hessian away from a minimum without enough
    damping). To solve again with the same matrix, use `Direct().prepare(...)` (as `tfi.Influence`
    does), which keeps the factorisation.

    Stop rule: none (one-shot); `info.residual` is the exact `max_j ‖A x_j − b_j‖ / ‖b_j‖`.

    Args:
      operator: a square, self-adjoint `tf.linalg.LinearOperator` of size p ≤ `max_size`; its
        damping λ is part of `to_dense()`.
      b: right-hand sides `[p]` or `[k, p]` (k vectors as rows).
      on_indefinite: what to do when `A` has a negative eigenvalue: `"warn"` (default: solve
        by eigendecomposition and warn with the most negative eigenvalue and the damping that
        would fix it), `"raise"` (NegativeCurvatureError) or `"ignore"`.
      max_size: largest p to densify (default 20,000); the dense matrix and its factor need about
        `2·p²·8` bytes.

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
    as_rows(operator, b)  # refuse bad right-hand sides before the expensive factorisation
    factorization = factorize(operator, on_indefinite=on_indefinite, max_size=max_size)
    return solve_factorized(factorization, operator, b)


@dataclasses.dataclass(frozen=True)
class Direct(Method):
    """Dense Cholesky / eigendecomposition solve (`solvers.direct`); exact, for p ≤ max_size.

    `prepare` builds and factors the dense `H + λI` once; `prepared.factorization` is the
    `DenseFactorization`, and `prepared.quadratic_forms(rows)` gives `gᵀ(H + λI)⁻¹g` per row by
    one triangular solve (self-influence without solving for each example).

    Example:
      >>> prepared = Direct().prepare(CurvatureSource(problem, damping=1e-3))
      >>> x, info = prepared.solve(g_rows)
    """

    on_indefinite: str = "warn"
    max_size: int = MAX_DENSE_SIZE
    name: typing.ClassVar[str] = "direct"

    def __post_init__(self):
        arguments.one_of(self.on_indefinite, "on_indefinite", _ON_INDEFINITE, owner="Direct")
        arguments.positive_int(self.max_size, "max_size", owner="Direct")

    def prepare(self, source):
        operator = source.hessian()
        factorization = factorize(operator, on_indefinite=self.on_indefinite, max_size=self.max_size)
        prepared = Prepared(self, operator, lambda rows: solve_factorized(factorization, operator, rows),
                            quadratic_forms=lambda rows: quadratic_forms(factorization, operator, rows))
        prepared.factorization = factorization
        return prepared


def _cholesky(dense):
    """`(factor, rcond)`, or `(None, rcond)` when `dense` is not numerically positive definite."""
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
    return factor, float(rcond)


def _damping_text(damping):
    return f" (with damping λ={damping:g})" if damping is not None else ""


def _fixing_damping(damping, smallest, largest):
    """A damping that makes `H + λI` positive definite: shift the smallest eigenvalue to ~1e-3·largest."""
    return (damping or 0.0) + max(0.0, -smallest) + 1e-3 * largest
