"""Arnoldi / low-rank influence (Schioppa et al. 2022): the top eigenpairs of the curvature, computed once.

`Arnoldi(rank=k)` computes, once per model weights, the k eigenpairs `(μⱼ, vⱼ)` of largest |μ| of
the curvature H (the source's `hessian()`: the Influence's curvature, "hessian" or
"gauss_newton", with its l2 term) by block Lanczos (`linalg.top_eigenpairs`: the symmetric form of
Arnoldi), and then applies influence in that basis, `V` = the `[k, p]` eigenvector rows:

    x = Vᵀ diag(1 / (μ + λ)) V b  +  c · (b − Vᵀ V b)

How λ enters: inside the subspace exactly, as `1 / (μⱼ + λ)`. Outside it (`complement`):
  "damping" (default)  the curvature is taken as 0 there, so `c = 1/λ`: x is the exact inverse of
                       `Vᵀ diag(μ) V + λI` (Woodbury), and tends to the exact solve as k grows.
  "drop"               `c = 0`: influence restricted to the subspace, as in Schioppa et al.; the
                       part of b outside the top-k eigenvectors is ignored.
"damping" is the default because it is the exact inverse of a matrix that tends to `H + λI` as k
grows (accuracy per rank: benchmarks/approximations.py); "drop" ignores the part of b outside the
subspace. Where λ is small the 1/λ complement is large: with λ = 0 only "drop" is defined.

An indefinite H (a Hessian away from a minimum) has negative μ; a pair with μⱼ + λ near 0 makes
the solve blow up exactly as the exact solve of `H + λI` does: add damping or use
`curvature="gauss_newton"`.

Cost: `prepare` multiplies `krylov_dimension` vectors by the curvature (default 2k + block size,
in passes of `block_size` rows: one data pass each) and keeps `2·krylov_dimension·p` numbers
while it runs, `k·p` after. Each solve is two `[rows, p] × [p, k]` products; no data pass.

Stop rule: none (one-shot). `info.residual` is NaN (`residual_is_estimate=True`): the method
solves a truncated system on purpose; `info.extra` holds the eigenpairs' Ritz residuals.
"""

import dataclasses
import logging
import time
import typing

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError
from tf_influence.linalg.lanczos import top_eigenpairs
from tf_influence.operators.rows import operator_size
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import as_rows

_log = logging.getLogger(__name__)

COMPLEMENTS = ("damping", "drop")


def arnoldi(operator, b, *, rank, complement="damping", krylov_dimension=None, block_size=None, seed=0):
    """`(H + λI)⁻¹ b` approximated in the top-`rank` eigenbasis of H (see the module docstring).

    Args:
      operator: `H + λI` as a square self-adjoint `tf.linalg.LinearOperator` whose `damping`
        attribute is λ (e.g. `tfi.HessianOperator(..., damping=λ)`; 0 if it has none).
      b: right-hand sides `[p]` or `[k, p]`.
      rank: eigenpairs kept, 1 ≤ rank ≤ p.
      complement: "damping" (1/λ outside the subspace) or "drop" (0 outside).
      krylov_dimension, block_size, seed: of `linalg.top_eigenpairs`.

    Returns:
      `(x, info)` with `x` shaped like `b`.

    Example:
      >>> H = tfi.HessianOperator(model, loss, (x, y), curvature="gauss_newton", damping=1e-2)
      >>> x, info = arnoldi(H, g_test, rank=100)
    """
    return Arnoldi(rank=rank, complement=complement, krylov_dimension=krylov_dimension, block_size=block_size,
                   seed=seed).solve(operator, b)


@dataclasses.dataclass(frozen=True)
class Arnoldi(Method):
    """Low-rank influence in the top eigenbasis of the curvature (Schioppa et al. 2022).

    Args:
      rank: eigenpairs of largest |μ| kept (default 100; at most p).
      complement: "damping" (default; the exact inverse of the rank-k curvature + λI) or "drop"
        (influence restricted to the subspace).
      krylov_dimension: block Lanczos basis size (default `2·rank + block_size`, at most p).
      block_size: rows multiplied per curvature pass (default `min(rank, 32)`).
      seed: seed of the Lanczos start block.

    Example:
      >>> inf = tfi.Influence(model, loss, train, method=tfi.solvers.Arnoldi(rank=200), damping=1e-2)
      >>> inf.scores(test)
    """

    rank: int = 100
    complement: str = "damping"
    krylov_dimension: typing.Optional[int] = None
    block_size: typing.Optional[int] = None
    seed: int = 0
    name: typing.ClassVar[str] = "arnoldi"
    exact: typing.ClassVar[bool] = False

    def __post_init__(self):
        arguments.positive_int(self.rank, "rank", owner="Arnoldi")
        arguments.one_of(self.complement, "complement", COMPLEMENTS, owner="Arnoldi")
        if self.krylov_dimension is not None:
            arguments.positive_int(self.krylov_dimension, "krylov_dimension", owner="Arnoldi")
        if self.block_size is not None:
            arguments.positive_int(self.block_size, "block_size", owner="Arnoldi")
        arguments.integer(self.seed, "seed")

    def prepare(self, source):
        operator = source.hessian()
        p = operator_size(operator)
        damping = float(getattr(operator, "damping", source.damping) or 0.0)
        if self.complement == "damping" and damping <= 0:
            raise InputError(
                "Arnoldi(complement='damping') applies 1/λ outside the top eigenvectors and needs damping "
                f"λ > 0. Received damping={damping}. Pass a damping, or complement='drop'.")
        if self.rank > p:
            raise InputError(f"Arnoldi rank must be at most p={p} (the number of parameters). "
                             f"Received rank={self.rank}.")
        start = time.perf_counter()
        pairs = top_eigenpairs(operator, self.rank, krylov_dimension=self.krylov_dimension,
                               block_size=self.block_size, seed=self.seed, shift=damping)
        seconds = time.perf_counter() - start
        shifted = pairs.values + damping
        smallest = float(np.min(np.abs(shifted)))
        if smallest <= 1e3 * np.finfo(np.float64).eps * float(np.max(np.abs(shifted))):
            raise InputError(
                f"Arnoldi: an eigenvalue of H + λI in the kept subspace is (numerically) zero ({smallest:.3g}); "
                "its inverse does not exist. Add damping or use curvature='gauss_newton'.")
        scale = 1.0 / shifted
        outside = 1.0 / damping if self.complement == "damping" else 0.0
        vectors = pairs.vectors
        _log.info("arnoldi: %d eigenpairs in %d passes (%.2fs); |μ| from %.3g to %.3g, max Ritz residual %.2g",
                  self.rank, pairs.passes, seconds, abs(pairs.values[0]), abs(pairs.values[-1]),
                  float(pairs.residuals.max()))

        def solve(b):
            begin = time.perf_counter()
            rows, single = as_rows(operator, b)
            flat = rows.numpy().astype(np.float64)
            coefficients = flat @ vectors.T
            x = (coefficients * scale) @ vectors
            if outside:
                x += outside * (flat - coefficients @ vectors)
            x = tf.constant(x, operator.dtype)
            info = SolveInfo(
                method=self.name, iterations=0, residual=float("nan"), converged=True,
                seconds=time.perf_counter() - begin, residual_is_estimate=True,
                extra=dict(rank=self.rank, complement=self.complement, damping=damping, passes=pairs.passes,
                           products=pairs.products, prepare_seconds=seconds,
                           largest_eigenvalue=float(pairs.values[0]), smallest_kept=float(pairs.values[-1]),
                           max_ritz_residual=float(pairs.residuals.max())))
            return (x[0] if single else x), info

        prepared = Prepared(self, operator, solve)
        prepared.eigenpairs = pairs
        return prepared
