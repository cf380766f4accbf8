"""`TridiagonalKFACOperator`: KFAC with neighbouring layers' cross-curvature (Martens & Grosse 2015, §4.3).

With the damped Kronecker blocks of `curvature.cross_factors` (Σ: the matrix of blocks over layers)

    Σ_ii = A_ii ⊗ G_ii + λI,      Σ_i,i+1 = A_i,i+1 ⊗ G_i,i+1,

the operator is the matrix Σ̂ that agrees with Σ on the diagonal and first off-diagonal blocks and
whose inverse is block-tridiagonal (the layers' gradients as a Gaussian Markov chain: the
maximum-entropy completion of those blocks). With

    Ψ_i = Σ_i,i+1 Σ_i+1,i+1⁻¹,     C_i = Σ_ii − Ψ_i Σ_i+1,i   (C_L = Σ_LL),
    Ξ = I with −Ψ_i at block (i, i + 1),

`Σ̂⁻¹ = Ξᵀ diag(C_i⁻¹) Ξ` (`solve_rows`) and `Σ̂ = Ξ⁻¹ diag(C_i) Ξ⁻ᵀ` (`matmul_rows`). Each C_i is a
Schur complement of the positive definite 2 × 2 block matrix of layers i and i + 1, so Σ̂ is
positive definite. With one layer, or with zero cross factors, it is KFAC with the damping added
exactly.

Unlike Martens & Grosse, who keep every factor Kronecker-structured (their Appendix B), the blocks
are dense `(d_a·d_g)²` matrices: exact, and meant for small layers (the solver's `max_layer_size`).
"""

import numpy as np
import scipy.linalg
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.linalg.kronecker import LayerLayout, join_layers, split_layers
from tf_influence.operators.rows import RowsOperator


class TridiagonalKFACOperator(RowsOperator):
    """`Σ̂`, block-tridiagonal-inverse KFAC with damping λ, as a LinearOperator with an exact inverse.

    Args:
      cross: `CrossFactors` (from `curvature.fit_cross_factors`).
      variables: the selected variables (every one in a layer of `cross.blocks`), in flat order.
      damping: λ > 0 added to every diagonal block (include the objective's l2 here).
      dtype: dtype of the vectors it is applied to (products are computed in float64).

    Example:
      >>> op = TridiagonalKFACOperator(fit_cross_factors(problem), problem.variables, damping=1e-2)
      >>> x = op.solve_rows(g_test_rows)

    Raises:
      InputError: a damped 2 × 2 neighbour block that is not positive definite.
    """

    def __init__(self, cross, variables, *, damping, dtype=tf.float64, name="TridiagonalKFACOperator"):
        self.cross = cross
        self.damping = float(damping)
        index = {id(v): i for i, v in enumerate(variables)}
        self.layouts = [LayerLayout(None if b.kernel is None else index[id(b.kernel)],
                                    None if b.bias is None else index[id(b.bias)], b.in_features, b.out_features)
                        for b in cross.blocks]
        self.variable_sizes = [int(np.prod(v.shape)) for v in variables]
        self.size = sum(self.variable_sizes)
        self.layer_shapes = [(a.shape[0], g.shape[0]) for a, g in zip(cross.a, cross.g)]
        self.psi, self.cholesky = _factorize(cross, self.damping)
        super().__init__(dtype=tf.as_dtype(dtype), is_self_adjoint=True, is_positive_definite=True,
                         is_non_singular=True, is_square=True, name=name, parameters=dict(damping=damping))

    def _matmul_rows(self, rows):
        parts = self._split(rows)
        y = [parts[0]]  # Ξᵀ y = v, forward
        for i in range(1, len(parts)):
            y.append(parts[i] + y[i - 1] @ self.psi[i - 1])
        z = [yi @ np.tril(c) @ np.tril(c).T for yi, (c, _) in zip(y, self.cholesky)]
        x = [None] * len(z)  # Ξ x = z, backward
        for i in reversed(range(len(z))):
            x[i] = z[i] if i == len(z) - 1 else z[i] + x[i + 1] @ self.psi[i].T
        return self._join(x, rows)

    def _solve_rows(self, rows):
        v = self._split(rows)
        u = [vi if i == len(v) - 1 else vi - v[i + 1] @ self.psi[i].T for i, vi in enumerate(v)]
        w = [scipy.linalg.cho_solve(c, ui.T).T for ui, c in zip(u, self.cholesky)]
        return self._join([wi if i == 0 else wi - w[i - 1] @ self.psi[i - 1] for i, wi in enumerate(w)], rows)

    def _split(self, rows):
        matrices = split_layers(tf.cast(rows, tf.float64), self.variable_sizes, self.layouts)
        return [m.numpy().reshape(m.shape[0], -1) for m in matrices]

    def _join(self, parts, rows):
        matrices = [tf.constant(x.reshape((-1,) + shape), tf.float64) for x, shape in zip(parts, self.layer_shapes)]
        return tf.cast(join_layers(matrices, self.variable_sizes, self.layouts), rows.dtype)


def _factorize(cross, damping):
    """Per consecutive pair `Ψ_i`, and per layer the Cholesky factor of `C_i`."""
    diagonal = [np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0]) for a, g in zip(cross.a, cross.g)]
    off = [np.kron(a, g) for a, g in zip(cross.a_next, cross.g_next)]
    psi, cholesky = [], []
    for i, sigma in enumerate(diagonal):
        if i < len(off):
            following = _cholesky(diagonal[i + 1], cross.blocks[i + 1].name, damping)
            psi.append(scipy.linalg.cho_solve(following, off[i].T).T)
            sigma = sigma - psi[i] @ off[i].T
        cholesky.append(_cholesky(0.5 * (sigma + sigma.T), cross.blocks[i].name, damping))
    return psi, cholesky


def _cholesky(matrix, name, damping):
    try:
        return scipy.linalg.cho_factor(matrix, lower=True)
    except np.linalg.LinAlgError:
        raise InputError(
            f"Block-tridiagonal KFAC: the damped curvature of layer {name!r} (with its neighbour) is not "
            f"positive definite at damping={damping:g}. Use more damping, or fisher='ggn' with a convex loss."
        ) from None
