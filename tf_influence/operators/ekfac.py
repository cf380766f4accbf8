"""`EKFACOperator`: the block-diagonal KFAC/EKFAC curvature `C + λI` as a LinearOperator."""

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.linalg.kronecker import eigenbasis_product, join_layers, split_layers
from tf_influence.operators.rows import RowsOperator

HEURISTIC = "heuristic"
HEURISTIC_FRACTION = 0.1


class EKFACOperator(RowsOperator):
    """`C + λI` with `C` the layer-block-diagonal KFAC or EKFAC approximation of the curvature.

    Per layer, on a gradient-shaped matrix `V` (`[d_a, d_g]`: kernel rows, then the bias row):

        matmul: V ↦ Q_A [(Q_Aᵀ V Q_S) ⊙ (Λ + λ)] Q_Sᵀ
        solve:  V ↦ Q_A [(Q_Aᵀ V Q_S) ⊘ (Λ + λ)] Q_Sᵀ

    with `Λ` the EKFAC eigenvalues Λ* (or `λ_A ⊗ λ_S` for KFAC). `solve` is exact for this
    operator, so `operator.inverse()` is the cheap approximate inverse `(C + λI)⁻¹`, e.g. for use
    as a CG preconditioner, and `solvevec(g)` is the EKFAC inverse-Hessian-vector product.

    Args:
      factors: fitted `Factors`.
      damping: λ ≥ 0 (a float), or "heuristic": per layer, 0.1 × the mean eigenvalue of that
        layer's `Λ` (then `C + λI` has a different λ on each layer block).
      dtype: dtype of the vectors it is applied to (default: the selected variables' dtype);
        products are computed in the factors' dtype.

    Shape: `[p, p]`, p = number of selected parameters, in `factors.space` (flat) order.

    Performance: matmul/solve on k vectors cost per layer `O(k·(d_a²·d_g + d_a·d_g²))` (two matmuls
    on each side); `O(k·V·d_g + k·d_g²)` for an Embedding of V rows. Memory: the factors.

    Hints: `is_self_adjoint=True`; `is_positive_definite=True` when every `Λ + λ > 0` (checked
    at construction), which damping > 0 guarantees.

    Example:
      >>> factors = fit_factors(objective, (x, y))
      >>> op = EKFACOperator(factors, damping=1e-3)
      >>> x_flat = op.solvevec(g_flat)                 # ≈ (G + λI)⁻¹ g
      >>> x_rows = op.solve_rows(g_rows)               # [k, p] rows
      >>> preconditioner = op.inverse()                # a LinearOperator
    """

    def __init__(self, factors, *, damping, dtype=None, name="EKFACOperator"):
        self.factors = factors
        self.size = factors.space.size
        index = {id(v): i for i, v in enumerate(factors.variables)}
        self.layouts = [block.layout(index) for block in factors.blocks]
        self.compute_dtype = tf.as_dtype(factors.settings.dtype)
        self.eigenvalues = [tf.cast(e, self.compute_dtype) for e in factors.eigenvalues()]
        self.dampings = _layer_dampings(damping, self.eigenvalues)
        self.damping = damping
        singular = [(b.name, float(tf.reduce_min(e)) + d) for b, e, d in
                    zip(factors.blocks, self.eigenvalues, self.dampings) if not _nonsingular(e, d)]
        if singular:
            raise InputError(
                f"The {factors.method.upper()} curvature is singular on layers {[n for n, _ in singular]} "
                f"(smallest eigenvalue + damping = {min(v for _, v in singular):.3g}, zero relative to the "
                f"largest) with damping={damping!r}; its inverse does not exist (this happens with few "
                "examples, e.g. one, or dead units). Use damping > 0 or damping='heuristic'."
            )
        super().__init__(
            dtype=tf.as_dtype(dtype) if dtype is not None else factors.space.dtype,
            is_self_adjoint=True,
            is_positive_definite=True,
            is_non_singular=True,
            is_square=True,
            name=name,
            parameters=dict(damping=damping, method=factors.method),
        )

    def _matmul_rows(self, rows):
        return tf.cast(self._rows(tf.cast(rows, self.compute_dtype), power=1.0), self.dtype)

    def _solve_rows(self, rows):
        return tf.cast(self._rows(tf.cast(rows, self.compute_dtype), power=-1.0), self.dtype)

    def layer_matrices(self, rows):
        """Splits flat rows `[k, p]` into per-layer matrices `[k, d_a, d_g]` (compute dtype)."""
        return split_layers(tf.cast(rows, self.compute_dtype), self.factors.space.sizes, self.layouts)

    def layer_solve(self, rows):
        """`(C + λI)⁻¹` on flat rows `[k, p]`, as per-layer matrices `[k, d_a, d_g]` in the factors'
        (compute) dtype: what factored scoring multiplies with the training gradients' factors."""
        return self._layers(self.layer_matrices(rows), power=-1.0)

    def scales(self, *, inverse=True):
        """Per layer, `1 / (Λ + λ)` (inverse) or `Λ + λ` `[d_a, d_g]`, in the compute dtype."""
        return [(1.0 / (e + d)) if inverse else (e + d) for e, d in zip(self.eigenvalues, self.dampings)]

    def _layers(self, matrices, power):
        scales = self.scales(inverse=power < 0)
        return [eigenbasis_product(m, layer.q_a, layer.q_s, scale)
                for m, layer, scale in zip(matrices, self.factors.layers, scales)]

    def _rows(self, rows, power):
        joined = join_layers(self._layers(self.layer_matrices(rows), power), self.factors.space.sizes, self.layouts)
        return tf.ensure_shape(joined, [None, self.size])  # static width for compiled loops (CG's signature)


def _nonsingular(eigenvalues, damping):
    """`Λ + λ` is positive and not zero relative to its largest entry (rounding level)."""
    smallest = float(tf.reduce_min(eigenvalues)) + damping
    largest = float(tf.reduce_max(eigenvalues)) + damping
    eps = np.finfo(eigenvalues.dtype.as_numpy_dtype).eps
    return smallest > 0 and smallest > eps * largest * int(tf.size(eigenvalues))


def _layer_dampings(damping, eigenvalues):
    if isinstance(damping, str):
        if damping != HEURISTIC:
            raise InputError(
                f"damping must be a number ≥ 0 or {HEURISTIC!r}. Received: damping={damping!r}.")
        return [HEURISTIC_FRACTION * float(tf.reduce_mean(e)) for e in eigenvalues]
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise InputError(f"damping must be a finite number ≥ 0 or {HEURISTIC!r}. Received: damping={damping}.")
    return [damping] * len(eigenvalues)
