"""`EKFACOperator`: the block-diagonal KFAC/EKFAC curvature `C + λI` as a LinearOperator."""

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError

HEURISTIC = "heuristic"
HEURISTIC_FRACTION = 0.1


class EKFACOperator(tf.linalg.LinearOperator):
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
      >>> preconditioner = op.inverse()                # a LinearOperator
    """

    def __init__(self, factors, *, damping, dtype=None, name="EKFACOperator"):
        self.factors = factors
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

    def _shape(self):
        return tf.TensorShape([self.factors.space.size, self.factors.space.size])

    def _shape_tensor(self):
        return tf.constant([self.factors.space.size] * 2, dtype=tf.int32)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        return self._apply(x, adjoint_arg, power=1.0)

    def _solve(self, rhs, adjoint=False, adjoint_arg=False):
        return self._apply(rhs, adjoint_arg, power=-1.0)

    def apply_rows(self, rows, *, inverse=True):
        """`(C + λI)^{±1}` on each row of `rows` `[k, p]`; returns `[k, p]` in the factors' dtype."""
        rows = tf.cast(tf.convert_to_tensor(rows), self.compute_dtype)
        return self._rows(rows, -1.0 if inverse else 1.0)

    def layer_matrices(self, rows):
        """Splits flat rows `[k, p]` into per-layer matrices `[k, d_a, d_g]` (compute dtype)."""
        parts = self._split(tf.cast(rows, self.compute_dtype))
        index = {id(v): i for i, v in enumerate(self.factors.variables)}
        matrices = []
        for block in self.factors.blocks:
            k = tf.shape(rows)[0]
            pieces = []
            if block.kernel is not None:
                pieces.append(tf.reshape(parts[index[id(block.kernel)]], [k, block.in_features, block.out_features]))
            if block.bias is not None:
                pieces.append(tf.reshape(parts[index[id(block.bias)]], [k, 1, block.out_features]))
            matrices.append(tf.concat(pieces, axis=1))
        return matrices

    def _split(self, rows):
        """Flat rows `[k, p]` -> per-variable `[k, size]` pieces, kept in the compute dtype (the
        variables may be float32 while the factors are float64; `space.unflatten` would cast)."""
        return tf.split(rows, self.factors.space.sizes, axis=-1)

    def _apply(self, x, adjoint_arg, power):
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        if x.shape.rank != 2:
            raise InputError(f"{self.name} supports no batch shape; received a tensor of shape {x.shape}.")
        result = self._rows(tf.cast(tf.transpose(x), self.compute_dtype), power)
        return tf.cast(tf.transpose(result), self.dtype)

    def _rows(self, rows, power):
        matrices = self.layer_matrices(rows)
        parts = [None] * len(self.factors.variables)
        index = {id(v): i for i, v in enumerate(self.factors.variables)}
        for block, layer, values, damping, m in zip(
                self.factors.blocks, self.factors.layers, self.eigenvalues, self.dampings, matrices):
            scale = (values + damping) if power > 0 else 1.0 / (values + damping)
            projected = m if layer.q_a is None else tf.einsum("ka,nkl->nal", layer.q_a, m)
            projected = tf.einsum("nal,lb->nab", projected, layer.q_s) * scale
            back = tf.einsum("nab,lb->nal", projected, layer.q_s)
            back = back if layer.q_a is None else tf.einsum("ka,nal->nkl", layer.q_a, back)
            k = tf.shape(rows)[0]
            if block.kernel is not None:
                parts[index[id(block.kernel)]] = tf.reshape(back[:, : block.in_features], [k, -1])
            if block.bias is not None:
                parts[index[id(block.bias)]] = back[:, -1]
        return tf.concat(parts, axis=-1)


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
