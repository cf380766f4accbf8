"""Extreme eigenvalues of a self-adjoint operator by Lanczos, to choose damping and LiSSA's scale."""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError


@dataclasses.dataclass(frozen=True)
class SpectrumEstimate:
    """Ritz values of a Lanczos run: `largest`/`smallest` approximate the extreme eigenvalues.

    Lanczos finds the extremes first: after ~30 iterations `largest` is usually accurate to a few
    digits; `smallest` may still be above the true minimum of a large operator.
    """

    largest: float
    smallest: float
    ritz_values: np.ndarray
    iterations: int

    @property
    def suggested_damping(self):
        """Damping that makes the operator positive definite: 0 if it seems so, else 1.1·|smallest| plus 1e-3 of the largest."""
        if self.smallest > 0:
            return 0.0
        return 1.1 * abs(self.smallest) + 1e-3 * abs(self.largest)

    def __str__(self):
        return (f"eigenvalues in ≈[{self.smallest:.4g}, {self.largest:.4g}] ({self.iterations} Lanczos "
                f"iterations); suggested damping {self.suggested_damping:.3g}")


def extreme_eigenvalues(operator, *, num_iterations=30, seed=0):
    """Estimates the largest and smallest eigenvalues of a self-adjoint `LinearOperator`.

    Runs Lanczos with full re-orthogonalisation (memory `num_iterations × p`).

    Args:
      operator: a square self-adjoint `tf.linalg.LinearOperator` (e.g. `tfi.HessianOperator`;
        its damping is included in the estimate).
      num_iterations: Lanczos steps (matvecs); capped at p.
      seed: seed of the random start vector.

    Returns:
      A `SpectrumEstimate`.

    Example:
      >>> est = tfi.extreme_eigenvalues(tfi.HessianOperator(model, loss, (x, y)))
      >>> print(est)          # eigenvalues in ≈[-0.012, 4.1] ...; suggested damping 0.0174
    """
    if not operator.is_self_adjoint:
        raise InputError("extreme_eigenvalues needs a self-adjoint operator (is_self_adjoint=True).")
    p = int(operator.shape[-1])
    k = min(int(num_iterations), p)
    if k < 1:
        raise InputError(f"num_iterations must be ≥ 1. Received {num_iterations}.")
    rng = np.random.default_rng(seed)
    dtype = operator.dtype.as_numpy_dtype
    q = rng.standard_normal(p)
    q /= np.linalg.norm(q)
    basis, alphas, betas = [q], [], []
    for j in range(k):
        w = operator.matvec(tf.constant(basis[-1], dtype=operator.dtype)).numpy().astype(np.float64)
        alpha = float(basis[-1] @ w)
        alphas.append(alpha)
        Q = np.stack(basis)
        for _ in range(2):
            w -= Q.T @ (Q @ w)
        beta = float(np.linalg.norm(w))
        if j == k - 1 or beta <= 1e3 * np.finfo(dtype).eps * max(abs(alpha), 1.0):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    ritz = np.linalg.eigvalsh(T)
    return SpectrumEstimate(float(ritz[-1]), float(ritz[0]), ritz, m)
