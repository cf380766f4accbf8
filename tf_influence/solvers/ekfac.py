"""EKFAC and KFAC: approximate `(H + λI)⁻¹` from Kronecker-factored layer curvature.

`EKFAC(...)` / `KFAC(...)` are method objects: `solve(operator, b)` fits the factors of the
curvature (from `operator.objective`, `operator.dataset`, `operator.selected_variables`; see
`tf_influence.curvature`), caches them for the model's current weights, and applies

    x = (C + λI)⁻¹ b          C: the layer-block-diagonal KFAC / EKFAC approximation of the
                              Fisher / Gauss-Newton matrix of the mean loss; λ = operator.damping
                              (+ the objective's l2, whose curvature is exactly l2·I)

as a few matmuls per layer. It approximates the damped Gauss-Newton solve; it is not the exact
`(H + λI)⁻¹` of a Hessian operator. `preconditioner(operator)` gives the same inverse as a
`tf.linalg.LinearOperator` for `cg(..., preconditioner=...)`, and `scores(...)` scores all
training examples without per-example training gradients.

Stop rule: none (one-shot). `info.residual` is the exact relative residual
`max_j ‖(H + λI) x_j − b_j‖ / ‖b_j‖` of the first `residual_rows` right-hand sides against the
operator (one operator pass; `residual_is_estimate` is True when not every row was checked).
"""

import dataclasses
import time
import typing
import warnings

import numpy as np
import tensorflow as tf

from tf_influence.curvature.factors import Factors, check_weight_sharing, fit_factors
from tf_influence.curvature.operator import EKFACOperator
from tf_influence.curvature.scores import ekfac_scores
from tf_influence.curvature.storage import model_fingerprint
from tf_influence.errors import InputError
from tf_influence.solvers._common import as_rows, relative_residuals
from tf_influence.solvers.info import SolveInfo


@dataclasses.dataclass(frozen=True)
class EKFAC:
    """Eigenvalue-corrected KFAC (George et al. 2018) as an IHVP method.

    Args:
      fisher: "true" (labels sampled from the model, default), "empirical" (true labels) or
        "ggn" (exact Gauss-Newton statistics, one backward pass per output unit).
      num_samples: sampled labels per example (fisher="true").
      seed: sampling seed.
      dtype: factor dtype, "float64" (default) or "float32".
      weight_sharing: "expand" (KFC, default) or "reduce": how layers applied at several positions
        (Conv2D, Dense on sequences) are factored; "reduce" can fit better when pooling follows.
      factors: precomputed `Factors` to use instead of fitting (they must match the operator's
        model and variables).
      residual_rows: how many right-hand sides to check against the exact operator (0: none; the
        residual is then reported as NaN with `residual_is_estimate=True`).

    Example:
      >>> H = tfi.HessianOperator(model, loss, train, curvature="gauss_newton", damping=1e-3)
      >>> x, info = EKFAC(seed=0).solve(H, g_test)
      >>> x_cg, _ = cg(H, g_test, tol=1e-8, preconditioner=EKFAC().preconditioner(H))
    """

    fisher: str = "true"
    num_samples: int = 1
    seed: int = 0
    dtype: str = "float64"
    weight_sharing: str = "expand"
    factors: Factors = None
    residual_rows: int = 8
    name: typing.ClassVar[str] = "ekfac"
    _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.residual_rows, (int, np.integer)) or self.residual_rows < 0:
            raise InputError(f"residual_rows must be an integer ≥ 0. Received: {self.residual_rows!r}.")
        check_weight_sharing(self.weight_sharing)
        if self.factors is not None and self.factors.method != self.name:
            raise InputError(
                f"{type(self).__name__} received factors fitted with method={self.factors.method!r}; "
                f"fit them with method={self.name!r}.")

    def fit(self, operator):
        """The factors for `operator` (fitted once per model weights, then cached)."""
        _check_operator(operator)
        if self.factors is not None:
            if [id(v) for v in self.factors.variables] != [id(v) for v in operator.selected_variables]:
                raise InputError(
                    "The given factors were fitted for other variables than the operator's "
                    f"({len(self.factors.variables)} vs {len(operator.selected_variables)} variables). "
                    "Fit them with the same model and variable selection.")
            return self.factors
        # Keyed by the settings too: make_solver(EKFAC(...), **options) copies this dict to the new object.
        key = (id(operator), model_fingerprint(operator.model), self.name, self.fisher, self.num_samples,
               self.seed, self.dtype, self.weight_sharing)
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = fit_factors(
                operator.objective, operator.dataset, operator.selected_variables, method=self.name,
                fisher=self.fisher, num_samples=self.num_samples, seed=self.seed, dtype=self.dtype,
                weight_sharing=self.weight_sharing, strategy=getattr(operator, "strategy", None))
        return self._cache[key]

    def inverse_operator(self, operator):
        """`EKFACOperator` for `C + λI` with λ = operator.damping + l2; `.solve` applies the inverse."""
        factors = self.fit(operator)
        damping = float(operator.damping) + float(operator.objective.l2)
        _warn_regularizers(operator)
        return EKFACOperator(factors, damping=damping, dtype=operator.dtype)

    def preconditioner(self, operator):
        """`(C + λI)⁻¹` as a self-adjoint positive definite `tf.linalg.LinearOperator`."""
        return self.inverse_operator(operator).inverse()

    def solve(self, operator, b):
        """`x ≈ (H + λI)⁻¹ b` for rows `b` `[k, p]` (or `[p]`); returns `(x, SolveInfo)`."""
        start = time.perf_counter()
        rows, single = as_rows(operator, b)
        inverse = self.inverse_operator(operator)
        x = tf.cast(inverse.apply_rows(rows, inverse=True), operator.dtype)
        checked = min(self.residual_rows, int(rows.shape[0]))
        if checked:
            residual = float(np.max(relative_residuals(operator, x[:checked], rows[:checked])))
        else:
            residual = float("nan")
        factors = inverse.factors
        info = SolveInfo(
            method=self.name, iterations=0, residual=residual, converged=True,
            seconds=time.perf_counter() - start, residual_is_estimate=checked < int(rows.shape[0]),
            extra=dict(damping=inverse.damping, fisher=factors.settings.fisher,
                       fit_seconds=factors.seconds, layers=[b.name for b in factors.blocks],
                       residual_rows=checked))
        return (x[0] if single else x), info

    def scores(self, operator, test_gradients, train=None, *, batch_size=None):
        """`[k, n_train]` scores `g_testᵀ (C + λI)⁻¹ gᵢ` (train defaults to the operator's data)."""
        inverse = self.inverse_operator(operator)
        train = operator.dataset if train is None else train
        return ekfac_scores(inverse, test_gradients, train, objective=operator.objective, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class KFAC(EKFAC):
    """KFAC (Martens & Grosse 2015; KFC for convolutions) as an IHVP method: one pass, eigenvalues
    `λ_A ⊗ λ_S`, with the damping added exactly in the Kronecker eigenbasis. Options as `EKFAC`."""

    name: typing.ClassVar[str] = "kfac"


def _check_operator(operator):
    missing = [a for a in ("objective", "dataset", "selected_variables", "damping") if not hasattr(operator, a)]
    if missing:
        raise InputError(
            "EKFAC/KFAC fit their factors from a tfi.HessianOperator (model, loss, data, variables). "
            f"Received {type(operator).__name__}, which lacks {missing}.")


def _warn_regularizers(operator):
    if any(getattr(v, "regularizer", None) is not None for v in operator.model.trainable_weights):
        warnings.warn(
            "The model has weight regularisers (model.losses); KFAC/EKFAC leave out their curvature "
            "(only l2= is added exactly). Use the objective's l2 option instead, or a CG/direct solve.",
            stacklevel=3)
