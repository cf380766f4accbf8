"""Exact products and solves with the Hessian of a layered chain, from per-layer derivative blocks.

A chain `z_ℓ = f_ℓ(z_{ℓ−1}; x_ℓ)`, ℓ = 1..L, ends in a scalar loss `Λ(z_L)`; `z_0` is data. With
`b_ℓ = ∂loss/∂z_ℓ` held fixed, each layer contributes first-order blocks `Dx_ℓ = ∂f_ℓ/∂x_ℓ`,
`Dz_ℓ = ∂f_ℓ/∂z_{ℓ−1}` and the second-order blocks of `φ_ℓ = b_ℓᵀ f_ℓ`: `Fxx_ℓ`, `Fzx_ℓ = ∇_z∇_x φ_ℓ`
(stored `[p_ℓ, a_{ℓ−1}]`), `Fzz_ℓ`. The Hessian of the loss in `x = (x_1, ..., x_L)` is then

    vᵀ H v = Σ_ℓ [v_ℓᵀ Fxx_ℓ v_ℓ + 2 v_ℓᵀ Fzx_ℓ δz_{ℓ−1} + δz_{ℓ−1}ᵀ Fzz_ℓ δz_{ℓ−1}] + δz_Lᵀ ∇²Λ δz_L,
    δz_0 = 0,  δz_ℓ = Dz_ℓ δz_{ℓ−1} + Dx_ℓ v_ℓ.

`chain_matmul` evaluates `(H + diag(shift)) v` by a forward tangent and a backward adjoint sweep;
`chain_factorize` + `chain_factor_solve` solve `(H + diag(shift)) x = g` by the backward Riccati
sweep (docs/mathematics.md, "Exact chain solver"). Each pivot `S_ℓ` is the block of a Schur complement of
`H + diag(shift)` (eliminating x_L, ..., x_{ℓ+1}), so Cholesky succeeds on every pivot exactly when
the matrix is positive definite, and the count of its negative eigenvalues is the sum of those of the
pivots (Haynsworth inertia additivity). Both sweeps cost time linear in the depth L.

Blocks use 0-based stage indices: stage 0 reads the data, so `dz[0]`, `fzx[0]` and `fzz[0]` are
never used and may be None. Any of `fxx`, `fzx`, `fzz` may be None for zero (Gauss-Newton).
"""

import typing

import numpy as np
import tensorflow as tf

from tf_influence.errors import NegativeCurvatureError


class ChainBlocks(typing.NamedTuple):
    """Derivative blocks of a chain (0-based stages; `a_ℓ` state size, `p_ℓ` parameters of stage ℓ).

    Attributes:
      dx: per stage `[a_ℓ, p_ℓ]`.
      dz: per stage `[a_ℓ, a_{ℓ−1}]` (entry 0 unused).
      fxx: per stage `[p_ℓ, p_ℓ]` or None.
      fzx: per stage `[p_ℓ, a_{ℓ−1}]` or None (entry 0 unused).
      fzz: per stage `[a_{ℓ−1}, a_{ℓ−1}]` or None (entry 0 unused).
      loss_hessian: `[a_L, a_L]`, the Hessian of the loss in the last state.
      shift: per stage `[p_ℓ]`, added to the diagonal (damping, l2).
    """

    dx: list
    dz: list
    fxx: list
    fzx: list
    fzz: list
    loss_hessian: tf.Tensor
    shift: list


class Pivot(typing.NamedTuple):
    """A factored pivot `S_ℓ`: Cholesky factor, or eigendecomposition when `S_ℓ` is indefinite."""

    cholesky: typing.Optional[tf.Tensor]
    eigenvalues: typing.Optional[tf.Tensor]
    eigenvectors: typing.Optional[tf.Tensor]
    negatives: int

    def solve(self, rhs):
        if self.cholesky is not None:
            return tf.linalg.cholesky_solve(self.cholesky, rhs)
        q = self.eigenvectors
        return q @ ((tf.transpose(q) @ rhs) / self.eigenvalues[:, tf.newaxis])


class ChainFactorization(typing.NamedTuple):
    """Output of `chain_factorize`: pivots, couplings `T_ℓ`, gains `S_ℓ⁻¹T_ℓ`, and the inertia."""

    pivots: list
    couplings: list
    gains: list
    inertia: int


def chain_matmul(blocks, v):
    """`(H + diag(shift)) v` for per-stage parameter blocks `v[ℓ]` `[p_ℓ, k]`; returns the same layout.

    Performance: `O(Σ_ℓ (a_ℓ p_ℓ + a_ℓ a_{ℓ−1} + p_ℓ² + a_{ℓ−1}²) k)` time: linear in depth.
    """
    num = len(blocks.dx)
    tangents_in = [None] * num
    tangent = None
    for l in range(num):
        tangents_in[l] = tangent
        out = blocks.dx[l] @ v[l]
        if tangent is not None:
            out += blocks.dz[l] @ tangent
        tangent = out
    adjoint = blocks.loss_hessian @ tangent
    result = [None] * num
    for l in range(num - 1, -1, -1):
        t_in = tangents_in[l]
        h = blocks.shift[l][:, tf.newaxis] * v[l] + tf.linalg.matmul(blocks.dx[l], adjoint, transpose_a=True)
        if blocks.fxx[l] is not None:
            h += blocks.fxx[l] @ v[l]
        if l > 0 and blocks.fzx[l] is not None:
            h += blocks.fzx[l] @ t_in
        result[l] = h
        if l > 0:
            adjoint = tf.linalg.matmul(blocks.dz[l], adjoint, transpose_a=True)
            if blocks.fzx[l] is not None:
                adjoint += tf.linalg.matmul(blocks.fzx[l], v[l], transpose_a=True)
            if blocks.fzz[l] is not None:
                adjoint += blocks.fzz[l] @ t_in
    return result


def chain_factorize(blocks, *, stage_names=None):
    """The backward Riccati sweep's factorization of `H + diag(shift)` (independent of right-hand sides).

    For ℓ = L..1 with `G_L = ∇²Λ`: `S_ℓ = Fxx_ℓ + diag(shift_ℓ) + Dx_ℓᵀ G_ℓ Dx_ℓ`,
    `T_ℓ = Fzx_ℓ + Dx_ℓᵀ G_ℓ Dz_ℓ`, `G_{ℓ−1} = Fzz_ℓ + Dz_ℓᵀ G_ℓ Dz_ℓ − T_ℓᵀ S_ℓ⁻¹ T_ℓ`.

    Args:
      blocks: a `ChainBlocks`.
      stage_names: names used in error messages (default "stage 0", ...).

    Returns:
      A `ChainFactorization`; its `inertia` is the number of negative eigenvalues of `H + diag(shift)`.

    Raises:
      NegativeCurvatureError: if a pivot is singular to working precision (then `H + diag(shift)` is
        singular, or indefinite with a singular Schur complement); the message gives the inertia
        counted so far and a damping to try.

    Performance: `O(Σ_ℓ p_ℓ³ + p_ℓ² a_ℓ + p_ℓ a_ℓ² + a_ℓ³)` time, `O(Σ_ℓ p_ℓ² + p_ℓ a_ℓ)` memory.
    """
    num = len(blocks.dx)
    names = stage_names or [f"stage {l}" for l in range(num)]
    g = blocks.loss_hessian
    pivots, couplings, gains = [None] * num, [None] * num, [None] * num
    inertia = 0
    for l in range(num - 1, -1, -1):
        dx = blocks.dx[l]
        g_dx = g @ dx
        p = int(dx.shape[-1])
        if p:
            s = tf.linalg.matmul(dx, g_dx, transpose_a=True) + tf.linalg.diag(blocks.shift[l])
            if blocks.fxx[l] is not None:
                s += blocks.fxx[l]
            pivots[l] = _factor_pivot(0.5 * (s + tf.transpose(s)), names[l], inertia)
            inertia += pivots[l].negatives
        if l == 0:
            break
        dz = blocks.dz[l]
        g_new = tf.linalg.matmul(dz, g @ dz, transpose_a=True)
        if blocks.fzz[l] is not None:
            g_new += blocks.fzz[l]
        if p:
            t = tf.linalg.matmul(g_dx, dz, transpose_a=True)
            if blocks.fzx[l] is not None:
                t += blocks.fzx[l]
            gain = pivots[l].solve(t)
            g_new -= tf.linalg.matmul(t, gain, transpose_a=True)
            couplings[l], gains[l] = t, gain
        g = 0.5 * (g_new + tf.transpose(g_new))
    return ChainFactorization(pivots, couplings, gains, inertia)


def chain_factor_solve(factorization, blocks, rhs):
    """Solves `(H + diag(shift)) x = rhs` for per-stage blocks `rhs[ℓ]` `[p_ℓ, k]`, given `chain_factorize`.

    Backward: `q_ℓ = rhs_ℓ + Dx_ℓᵀ r_ℓ`, `k_ℓ = S_ℓ⁻¹ q_ℓ`, `r_{ℓ−1} = Dz_ℓᵀ r_ℓ − T_ℓᵀ k_ℓ` (`r_L = 0`);
    forward: `x_ℓ = k_ℓ − S_ℓ⁻¹T_ℓ δz_{ℓ−1}`, `δz_ℓ = Dz_ℓ δz_{ℓ−1} + Dx_ℓ x_ℓ` (`δz_0 = 0`).

    Performance: `O(Σ_ℓ (p_ℓ² + p_ℓ a_ℓ + a_ℓ²) k)`: linear in depth.
    """
    num = len(blocks.dx)
    k = tf.shape(rhs[0])[-1]
    r = tf.zeros(tf.stack([tf.shape(blocks.loss_hessian)[0], k]), dtype=blocks.loss_hessian.dtype)
    steps = [None] * num
    for l in range(num - 1, -1, -1):
        pivot = factorization.pivots[l]
        if pivot is not None:
            q = rhs[l] + tf.linalg.matmul(blocks.dx[l], r, transpose_a=True)
            steps[l] = pivot.solve(q)
        else:
            steps[l] = rhs[l]  # p_ℓ = 0: an empty block
        if l > 0:
            r = tf.linalg.matmul(blocks.dz[l], r, transpose_a=True)
            if pivot is not None:
                r -= tf.linalg.matmul(factorization.couplings[l], steps[l], transpose_a=True)
    x = [None] * num
    tangent = None
    for l in range(num):
        x[l] = steps[l]
        if tangent is not None and factorization.gains[l] is not None:
            x[l] = steps[l] - factorization.gains[l] @ tangent
        out = blocks.dx[l] @ x[l]
        if tangent is not None:
            out += blocks.dz[l] @ tangent
        tangent = out
    return x


def _factor_pivot(s, name, inertia_so_far):
    """Cholesky when it succeeds and is well conditioned; otherwise an eigendecomposition."""
    size = int(s.shape[-1])
    tol = size * np.finfo(s.dtype.as_numpy_dtype).eps
    try:
        chol = tf.linalg.cholesky(s)
    except tf.errors.InvalidArgumentError:
        chol = None
    if chol is not None:
        diag = tf.linalg.diag_part(chol)
        finite = bool(tf.reduce_all(tf.math.is_finite(chol)))
        if finite and float(tf.reduce_min(diag)) ** 2 > tol * float(tf.reduce_max(diag)) ** 2:
            return Pivot(chol, None, None, 0)
    eigenvalues, eigenvectors = tf.linalg.eigh(s)
    magnitude = tf.abs(eigenvalues)
    largest, smallest = float(tf.reduce_max(magnitude)), float(tf.reduce_min(magnitude))
    negatives = int(tf.reduce_sum(tf.cast(eigenvalues < 0, tf.int32)))
    if not np.isfinite(largest) or smallest <= tol * largest:
        most_negative = float(tf.reduce_min(eigenvalues))
        hint = max(1e-6 * largest, 10.0 * max(-most_negative, 0.0), 1e-12)
        raise NegativeCurvatureError(
            f"H + damping·I is singular to working precision: the pivot of {name} (the Schur complement "
            f"on its {size} parameters) has eigenvalues from {float(tf.reduce_min(eigenvalues)):.3g} to "
            f"{float(tf.reduce_max(eigenvalues)):.3g}, smallest magnitude {smallest:.3g} ≤ {tol:.2g}·"
            f"{largest:.3g}. Inertia so far: {inertia_so_far + negatives} negative eigenvalue(s) counted in "
            f"this and later layers. Add damping (e.g. damping={hint:.2g}, or above |λ_min| of H from "
            "tfi.extreme_eigenvalues for a positive definite system), or use curvature='gauss_newton'."
        )
    return Pivot(None, eigenvalues, eigenvectors, negatives)
