"""EKFAC and KFAC: approximate `(H + λI)⁻¹` from Kronecker-factored layer curvature.

`EKFAC(...)` / `KFAC(...)` are method objects. `prepare(source)` asks the `CurvatureSource` for the
factors of the curvature (fitted once per model weights and settings; see `tf_influence.curvature`)
and applies

    x = (C + λI)⁻¹ b          C: the layer-block-diagonal KFAC / EKFAC approximation of the
                              Fisher / Gauss-Newton matrix of the mean loss; λ = the damping
                              (+ the objective's l2, whose curvature is exactly l2·I)

as a few matmuls per layer. It approximates the damped Gauss-Newton solve; it is not the exact
`(H + λI)⁻¹` of a Hessian operator, and it needs no second derivatives of the model, so with
`tol=None` it never builds a Hessian operator (unless `residual_rows` asks for a check against one).
`preconditioner(operator)` gives the same inverse as a `tf.linalg.LinearOperator` for
`cg(..., preconditioner=...)`.

Refinement to a stated accuracy (`tol`, off by default; `DEFAULT_TOL` is a good first value): `(C + λI)⁻¹` preconditions
conjugate gradient on the exact curvature (`source.hessian()`: the Influence's curvature + λI),
all right-hand sides together, until each has relative residual `‖(H + λI) x_j − b_j‖ / ‖b_j‖ ≤ tol`
(or `maxiter` iterations). The first iterate is the factored solve rescaled to minimise the error
in the `H + λI` norm (at least as good as starting from the factored solve, which costs one more
product). Each iteration is one pass of exact curvature products over the data for all
right-hand sides. Block-diagonal Kronecker factors fall apart at small damping (on a digits MLP at
λ = 0.01 the unrefined EKFAC scores correlate 0.90 with the exact solve's); a few refinement
iterations restore it (see the README's benchmark table). Like CG, refinement needs `H + λI`
positive definite: where it is not, use `curvature="gauss_newton"`, more damping, or `tol=None`.

Stop rule: `tol=None`: none (one-shot); `info.residual` is then the exact relative residual of
the first `residual_rows` right-hand sides (one operator pass; `residual_is_estimate` is True when
not every row was checked, and NaN when none was). With `tol`: CG's stop rule; `info.iterations`
and `info.residual` are CG's (the recurrence residual), `info.converged` whether `tol` was met.
"""

import dataclasses
import time
import typing

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.curvature.factors import FactorSettings, Factors
from tf_influence.errors import InputError
from tf_influence.operators.ekfac import EKFACOperator
from tf_influence.operators.source import CurvatureSource
from tf_influence.solvers.cg import cg
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.rows import as_rows, relative_residuals

DEFAULT_TOL = 0.1


@dataclasses.dataclass(frozen=True)
class EKFAC(Method):
    """Eigenvalue-corrected KFAC (George et al. 2018) as an IHVP method.

    Args:
      fisher: "auto" (default: the exact Gauss-Newton expectation "ggn" when an example's output
        has at most 32 entries, else "true"), "ggn", "true" (labels sampled from the model) or
        "empirical" (true labels); see `tf_influence.curvature.targets`.
      num_samples: sampled labels per example (fisher="true").
      seed: sampling seed.
      dtype: factor dtype, "float64" (default) or "float32".
      weight_sharing: "expand" (KFC, default) or "reduce": how layers applied at several positions
        (Conv2D, Dense on sequences) are factored; "reduce" can fit better when pooling follows.
      factors: precomputed `Factors` to use instead of fitting (they must match the problem's
        model and variables).
      tol: relative residual to refine to with preconditioned CG on the exact curvature (e.g.
        `DEFAULT_TOL`), or None (default) for the one-shot factored solve (no exact curvature
        products; the model needs no second derivatives).
      maxiter: most refinement iterations (each one exact curvature pass over the data).
      residual_rows: with `tol=None`, how many right-hand sides to check against the exact
        operator (default 0: none, so no exact curvature product is computed; the residual is then
        reported as NaN with `residual_is_estimate=True`).

    Example:
      >>> H = tfi.HessianOperator(model, loss, train, curvature="gauss_newton", damping=1e-3)
      >>> x, info = EKFAC(seed=0).solve(H, g_test)
      >>> x_cg, _ = cg(H, g_test, tol=1e-8, preconditioner=EKFAC().preconditioner(H))
    """

    fisher: str = "auto"
    num_samples: int = 1
    seed: int = 0
    dtype: str = "float64"
    weight_sharing: str = "expand"
    factors: Factors = None
    tol: typing.Optional[float] = None
    maxiter: int = 100
    residual_rows: int = 0
    name: typing.ClassVar[str] = "ekfac"

    @property
    def exact(self):
        """True when refining: the solution is that of `(H + λI) x = b` to `tol`."""
        return self.tol is not None

    @property
    def factored(self):
        """True for the one-shot solve, whose result is exactly the factors' `(C + λI)⁻¹ b`."""
        return self.tol is None

    def __post_init__(self):
        owner = type(self).__name__
        arguments.integer(self.residual_rows, "residual_rows", minimum=0, owner=owner)
        if self.tol is not None:
            arguments.positive_float(self.tol, "tol", owner=owner)
        arguments.positive_int(self.maxiter, "maxiter", owner=owner)
        self.factor_settings()  # validates the settings
        if self.factors is not None and self.factors.method != self.name:
            raise InputError(
                f"{type(self).__name__} received factors fitted with method={self.factors.method!r}; "
                f"fit them with method={self.name!r}.")

    def factor_settings(self):
        """The `FactorSettings` these options fit."""
        return FactorSettings(method=self.name, fisher=self.fisher, num_samples=self.num_samples, seed=self.seed,
                              dtype=self.dtype, weight_sharing=self.weight_sharing)

    def inverse(self, source):
        """The `EKFACOperator` `C + λI` (its `solve_rows` applies the approximate inverse) for `source`."""
        if self.factors is None:
            return source.ekfac(self.factor_settings())
        problem = source.problem
        if problem is not None and [id(v) for v in self.factors.variables] != [id(v) for v in problem.variables]:
            raise InputError(
                "The given factors were fitted for other variables than the problem's "
                f"({len(self.factors.variables)} vs {len(problem.variables)} variables). "
                "Fit them with the same model and variable selection.")
        if problem is not None:
            _check_fitted_on(self.factors, problem)
        l2 = problem.objective.l2 if problem is not None else 0.0
        dtype = problem.dtype if problem is not None else None
        return EKFACOperator(self.factors, damping=source.factored_damping(self.factors) + float(l2), dtype=dtype)

    def fit(self, operator):
        """The factors for `operator`'s problem (fitted once per model weights, then cached)."""
        return self.inverse(CurvatureSource.of(operator)).factors

    def preconditioner(self, operator):
        """`(C + λI)⁻¹` as a self-adjoint positive definite `tf.linalg.LinearOperator`."""
        return self.inverse(CurvatureSource.of(operator)).inverse()

    def prepare(self, source):
        inverse = self.inverse(source)
        if self.tol is not None:
            return self._prepare_refined(source, inverse)
        dtype = source.problem.dtype if source.problem is not None else inverse.dtype

        def solve(b):
            start = time.perf_counter()
            rows, single = as_rows(inverse, tf.cast(b, inverse.dtype))
            x = tf.cast(inverse.solve_rows(rows), dtype)
            checked = min(self.residual_rows, int(rows.shape[0]))
            residual = float("nan")
            if checked:
                exact = source.hessian()
                residual = float(np.max(relative_residuals(exact, x[:checked], tf.cast(rows[:checked], exact.dtype))))
            return (x[0] if single else x), info(start, int(rows.shape[0]), residual, checked)

        def info(start, rows, residual=float("nan"), checked=0):
            factors = inverse.factors
            return SolveInfo(
                method=self.name, iterations=0, residual=residual, converged=True,
                seconds=time.perf_counter() - start, residual_is_estimate=checked < rows,
                extra=dict(damping=inverse.damping, fisher=factors.settings.fisher, fit_seconds=factors.seconds,
                           layers=[block.name for block in factors.blocks], blocks=factors.describe(),
                           residual_rows=checked))

        prepared = Prepared(self, inverse, solve)
        prepared.inverse = inverse
        if not self.residual_rows:  # scores may skip the solve: see influence/eigenbasis_scores.py
            prepared.eigenbasis, prepared.info = inverse, info
        return prepared

    def _prepare_refined(self, source, inverse):
        exact = source.hessian()
        size = int(inverse.shape[-1])

        def preconditioner(rows):  # one object, so CG's compiled loop is reused across solves
            return tf.ensure_shape(inverse.solve_rows(rows), [None, size])  # keep the static width

        def solve(b):
            start = time.perf_counter()
            rows, single = as_rows(exact, tf.cast(b, exact.dtype))
            x, info = cg(exact, rows, tol=self.tol, maxiter=self.maxiter, preconditioner=preconditioner)
            factors = inverse.factors
            info = dataclasses.replace(
                info, method=self.name, seconds=time.perf_counter() - start,
                extra=dict(info.extra, refined=True, fisher=factors.settings.fisher, fit_seconds=factors.seconds,
                           layers=[block.name for block in factors.blocks]))
            return (x[0] if single else x), info

        prepared = Prepared(self, exact, solve)
        prepared.inverse = inverse
        return prepared


def _check_fitted_on(factors, problem):
    """Refuses given factors fitted on other weights or other training data than the problem's."""
    stale = []
    if factors.model_fingerprint is not None and factors.model_fingerprint != problem.fingerprint():
        stale.append("model weights")
    if factors.data_fingerprint is not None and factors.data_fingerprint != problem.data_fingerprint():
        stale.append("training data")
    if stale:
        raise InputError(
            f"The given factors were fitted on other {' and '.join(stale)} than this problem's: their curvature is "
            "stale. Refit them (fit_factors, or EKFAC() without factors=), or restore the weights and data they "
            "were fitted on.")


@dataclasses.dataclass(frozen=True)
class KFAC(EKFAC):
    """KFAC (Martens & Grosse 2015; KFC for convolutions) as an IHVP method: one pass, eigenvalues
    `λ_A ⊗ λ_S`, with the damping added exactly in the Kronecker eigenbasis. Options as `EKFAC`
    (including the refinement `tol`)."""

    name: typing.ClassVar[str] = "kfac"
