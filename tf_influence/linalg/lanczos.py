"""Lanczos on a self-adjoint operator: extreme eigenvalues (to choose damping and LiSSA's scale) and the
top eigenpairs by block Lanczos (for low-rank influence, `solvers/arnoldi.py`)."""

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


@dataclasses.dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs of a self-adjoint operator, largest |eigenvalue| first.

    Attributes:
      values: `[k]` Ritz values (float64 NumPy).
      vectors: `[k, p]` orthonormal Ritz vectors as rows (float64 NumPy).
      residuals: `[k]` `‖A vⱼ − μⱼ vⱼ‖`, from the last block's products (an upper bound of how far
        each pair is from an exact eigenpair; an exact invariant subspace gives zeros).
      products: operator products used (rows multiplied, over all passes).
      passes: calls of the operator (one data pass each for a `HessianOperator`).
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    products: int
    passes: int


def top_eigenpairs(operator, rank, *, krylov_dimension=None, block_size=None, seed=0, shift=0.0):
    """The `rank` eigenpairs of largest magnitude of a self-adjoint operator, by block Lanczos.

    Algorithm: block Lanczos with full re-orthogonalisation (the block form of Arnoldi for a
    symmetric operator, as in Schioppa et al. 2022): starting from a random orthonormal block `Q₁`
    `[b, p]`, each pass multiplies the newest block by the operator (one call of
    `operator.matmul_rows` on b rows: one data pass for a `HessianOperator`), orthogonalises the
    products twice against every block so far and orthonormalises them (QR) into the next block,
    until the basis `Q` has `krylov_dimension` rows. The Rayleigh-Ritz step diagonalises
    `T = Q (A − shift·I) Qᵀ` (from the stored products, no extra pass) and returns its `rank` Ritz
    pairs of largest |value|. When the Krylov space becomes invariant (e.g. `krylov_dimension = p`),
    the pairs are exact.

    Args:
      operator: a square self-adjoint `tf.linalg.LinearOperator` (or anything `matmul_rows` takes).
      rank: how many pairs to return, 1 ≤ rank ≤ p.
      krylov_dimension: basis size m (default `min(p, 2·rank + block_size)`); larger is more
        accurate. Memory: `2·m·p` numbers.
      block_size: rows per pass (default `min(rank, 32)`).
      seed: seed of the random start block.
      shift: subtracted from the operator's eigenvalues (e.g. its damping λ, to return the
        eigenvalues of the undamped curvature).

    Returns:
      `Eigenpairs`.

    Raises:
      InputError: rank outside [1, p], or a non-self-adjoint operator.

    Example:
      >>> pairs = top_eigenpairs(tfi.HessianOperator(model, loss, (x, y)), rank=20)
      >>> pairs.values[:3], pairs.residuals[:3]
    """
    if getattr(operator, "is_self_adjoint", None) is False:
        raise InputError("top_eigenpairs needs a self-adjoint operator (is_self_adjoint=True).")
    p = int(operator.shape[-1])
    rank = int(rank)
    if not 1 <= rank <= p:
        raise InputError(f"rank must be an integer in [1, p={p}]. Received: rank={rank}.")
    block = min(rank, 32) if block_size is None else int(block_size)
    if block < 1:
        raise InputError(f"block_size must be ≥ 1. Received: block_size={block_size}.")
    m = min(p, 2 * rank + block) if krylov_dimension is None else int(krylov_dimension)
    if not rank <= m <= p:
        raise InputError(f"krylov_dimension must be in [rank={rank}, p={p}]. Received: {krylov_dimension}.")
    dtype = operator.dtype
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, min(block, m))))
    basis, products, passes, rows = [q.T], [], 0, 0
    while True:
        newest = basis[-1]
        product = _rows_product(operator, tf.constant(newest, dtype)).astype(np.float64) - shift * newest
        products.append(product)
        passes, rows = passes + 1, rows + len(newest)
        size = sum(len(b) for b in basis)
        if size >= m:
            break
        Q = np.concatenate(basis)
        w = product.copy()
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            w -= (w @ Q.T) @ Q
        # An orthonormal basis of the new directions (SVD: also right when the products are dependent).
        u, singular, _ = np.linalg.svd(w.T, full_matrices=False)
        keep = singular > 1e3 * np.finfo(np.float64).eps * max(1.0, float(np.abs(product).max()))
        if not keep.any():  # the Krylov space is invariant: every Ritz pair is exact
            break
        basis.append(u.T[keep][: m - size])
    Q, AQ = np.concatenate(basis), np.concatenate(products)
    T = Q @ AQ.T
    values, vectors = np.linalg.eigh(0.5 * (T + T.T))
    order = np.argsort(-np.abs(values))[:rank]
    values, ritz = values[order], vectors[:, order].T @ Q
    residuals = np.linalg.norm(vectors[:, order].T @ AQ - values[:, None] * ritz, axis=1)
    return Eigenpairs(values, ritz, residuals, rows, passes)


def _rows_product(operator, rows):
    """`A rᵢ` for rows `[k, p]`: the operator's own `matmul_rows` (one data pass), else `matmul`."""
    method = getattr(operator, "matmul_rows", None)
    if callable(method):
        return method(rows).numpy()
    return tf.linalg.matrix_transpose(operator.matmul(rows, adjoint_arg=True)).numpy()
