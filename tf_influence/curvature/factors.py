"""KFAC and EKFAC factors of the Fisher / Gauss-Newton matrix, fitted over a data set.

For a layer with input rows `a` (1 appended for the bias) and pre-activation gradient rows `g`,
the per-example weight gradient is `G_i = Σ_t a_t g_tᵀ` (`[d_a, d_g]`). With `w_i` the sample
weights and `W = Σ w_i` (the normalisation of `HessianOperator`'s mean objective):

    A = Σ_i w_i Σ_t a_t a_tᵀ / (T·W)        S = Σ_i w_i Σ_t g_t g_tᵀ / W       (first pass)
    A = Q_A diag(λ_A) Q_Aᵀ,  S = Q_S diag(λ_S) Q_Sᵀ
    KFAC:  C ≈ A ⊗ S, eigenvalues λ_A ⊗ λ_S in the basis Q_A ⊗ Q_S
    EKFAC: eigenvalues Λ* = Σ_i w_i (Q_Aᵀ G_i Q_S)² / W                     (second pass)

(T = positions: 1 for Dense on vectors, output pixels for a convolution, KFC.) That is the
"expand" treatment of a layer whose weights are shared over T > 1 positions (Eschenhagen et al.
2023, "Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures"); the
"reduce" treatment sums over positions first (ā_i = Σ_t a_t / T, ĝ_i = Σ_t g_t):

    A = Σ_i w_i ā_i ā_iᵀ / W                S = Σ_i w_i ĝ_i ĝ_iᵀ / W

It is exact where the positions are averaged before a loss with constant output Hessian (a linear
convolution, global average pooling, MSE) and can be the better basis when pooling follows a
convolution (tests/test_ekfac.py: Pearson with the direct solve 0.902 vs 0.849 on a pooled CNN).
Embedding layers always use "expand" (their A stays diagonal). Grouped blocks (depthwise and
grouped convolutions) have one such factorisation per group; elementwise blocks (normalisation
scale and offset, PReLU alpha, transposed-convolution biases) have their exact block instead (see
`statistics.py` and `blocks.py`). `g` comes from the output-space targets of `targets.py`: the
exact output Hessian (GGN; the default for outputs of up to 32 entries per example), sampled labels
(true Fisher), or true labels (empirical Fisher); the rows of all targets come from one batched
back-propagation (`layer_rows.py`). With a single example and T = 1, KFAC is exactly the layer's
block of that curvature.

The per-batch statistics run as compiled functions shared by every fit on the same model and
settings (`passes.py`): a refit or a new `Influence` traces nothing.

Memory: per layer `d_a² + d_g² + d_a·d_g`; the EKFAC pass of a layer with T > 1 positions holds
`N·d_a·d_g` numbers per batch of N examples (choose the batch size accordingly).
"""

import dataclasses
import logging
import time

import tensorflow as tf

from tf_influence import arguments
from tf_influence.curvature import statistics as _statistics
from tf_influence.curvature import targets as _targets
from tf_influence.curvature.capture import find_blocks
from tf_influence.curvature.passes import fit_passes
from tf_influence.errors import InputError
from tf_influence.params import ParameterSpace

_log = logging.getLogger(__name__)

METHODS = ("ekfac", "kfac")
WEIGHT_SHARING = ("expand", "reduce")


@dataclasses.dataclass(frozen=True)
class FactorSettings:
    """Settings that change the fitted factors (saved with them and checked on reload).

    Attributes:
      method: "ekfac" (eigenvalue-corrected, two passes) or "kfac" (one pass).
      fisher: "auto" (default: "ggn" for outputs of at most `targets.EXACT_MAX_OUTPUTS` entries per
        example, else "true"), "ggn" (the exact Gauss-Newton expectation, one back-propagation per
        output entry, batched), "true" (labels sampled from the model) or "empirical" (true labels).
        Fitted factors record the resolved mode.
      num_samples: sampled labels per example for fisher="true".
      seed: seed of the label sampling (the same labels in both passes).
      dtype: accumulation and factor dtype, "float64" (default) or "float32".
      weight_sharing: for layers applied at T > 1 positions (Conv, Dense on sequences), "expand"
        (positions as extra examples, KFC; default) or "reduce" (positions summed first).
    """

    method: str = "ekfac"
    fisher: str = "auto"
    num_samples: int = 1
    seed: int = 0
    dtype: str = "float64"
    weight_sharing: str = "expand"

    def __post_init__(self):
        arguments.one_of(self.method, "method", METHODS)
        arguments.one_of(self.fisher, "fisher", _targets.FISHER_MODES)
        arguments.positive_int(self.num_samples, "num_samples")
        arguments.integer(self.seed, "seed")
        arguments.one_of(self.dtype, "dtype", ("float64", "float32"))
        arguments.one_of(self.weight_sharing, "weight_sharing", WEIGHT_SHARING)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerFactors:
    """Eigendecomposed factors of one block (tensors of the settings' dtype; grouped blocks have a
    leading group axis G on every tensor).

    Attributes:
      q_a: eigenvectors of A `[d_a, d_a]`, or None for the identity (Embedding, diagonal blocks).
      eig_a: eigenvalues of A `[d_a]`.
      q_s: eigenvectors of S `[d_g, d_g]`.
      eig_s: eigenvalues of S `[d_g]`.
      corrected: EKFAC eigenvalues Λ* `[d_a, d_g]` (None for KFAC).
    """

    q_a: tf.Tensor
    eig_a: tf.Tensor
    q_s: tf.Tensor
    eig_s: tf.Tensor
    corrected: tf.Tensor = None

    def eigenvalues(self, method):
        """`[d_a, d_g]` eigenvalues of the layer's curvature in the basis `Q_A ⊗ Q_S`."""
        if method == "ekfac":
            if self.corrected is None:
                raise InputError("These factors were fitted with method='kfac'; refit with method='ekfac'.")
            return self.corrected
        return self.eig_a[..., :, tf.newaxis] * self.eig_s[..., tf.newaxis, :]


class Factors:
    """Fitted KFAC/EKFAC factors for the selected variables of a model.

    Use `fit_factors` to create them and `EKFACOperator(factors, damping=...)` to apply the
    approximate curvature or its inverse. `save`/`load` live in `storage.py`.

    Attributes:
      settings: the `FactorSettings`.
      blocks: the `LayerBlock`s, in model order (see `blocks.py`; `describe()` lists them).
      layers: the `LayerFactors`, one per block.
      variables: the selected variables; `space`: their `ParameterSpace`.
      model: the model; `objective`: the `Objective` they were fitted with (None after `load`).
      num_examples: examples seen; `total_weight`: their summed sample weight.
      model_fingerprint: the fingerprint of the weights they were fitted on (None if unknown).
      data_fingerprint: the fingerprint of the training examples they were fitted on (None if
        unknown); computed on first access for freshly fitted factors.
    """

    def __init__(self, settings, model, variables, blocks, layers, *, objective=None,
                 num_examples=0, total_weight=0.0, seconds=0.0, model_fingerprint=None, data_fingerprint=None):
        self.settings = settings
        self.model = model
        self.variables = list(variables)
        self.space = ParameterSpace(self.variables)
        self.blocks = list(blocks)
        self.layers = list(layers)
        self.objective = objective
        self.num_examples = int(num_examples)
        self.total_weight = float(total_weight)
        self.seconds = float(seconds)
        self.model_fingerprint = model_fingerprint
        self._data_fingerprint = data_fingerprint  # a string, or a function computing it (lazily)

    @property
    def data_fingerprint(self):
        if callable(self._data_fingerprint):
            self._data_fingerprint = self._data_fingerprint()
        return self._data_fingerprint

    @property
    def method(self):
        return self.settings.method

    def eigenvalues(self):
        """Per layer, the `[d_a, d_g]` curvature eigenvalues (Λ* for EKFAC, λ_A ⊗ λ_S for KFAC)."""
        return [layer.eigenvalues(self.method) for layer in self.layers]

    def describe(self):
        """One line per block: its layer, kind and how its curvature block is represented."""
        lines = []
        for block in self.blocks:
            if block.kind == "elementwise":
                size = block.a_size * block.out_features
                form = f"exact {'diagonal' if block.diagonal else 'dense'} block of {size} parameters"
            else:
                groups = f"{block.groups} groups of " if block.groups > 1 else ""
                a = f"diagonal [{block.a_size}]" if block.diagonal_inputs else f"[{block.a_size}x{block.a_size}]"
                form = f"{groups}Kronecker {a} ⊗ [{block.out_features}x{block.out_features}]"
            names = ", ".join(getattr(v, "name", "?") for v in block.variables)
            lines.append(f"{block.name} ({type(block.layer).__name__}: {names}): {block.kind}, {form}")
        return lines

    def __repr__(self):
        names = [b.name for b in self.blocks]
        return (f"Factors(method={self.method!r}, fisher={self.settings.fisher!r}, layers={names}, "
                f"parameters={self.space.size}, examples={self.num_examples})")


def fit_factors(problem, *, settings=None, **options):
    """Fits KFAC or EKFAC factors with one (KFAC) or two (EKFAC) passes over the problem's data.

    Args:
      problem: a `tfi.Problem` (model, loss, data, selected variables, strategy). Every selected
        variable must sit in a supported layer. Under a `tf.distribute.Strategy` every batch is
        split across the replicas and the statistics summed (sampled labels are drawn for the
        whole batch), so the factors equal the single-device ones.
      settings: a `FactorSettings`, or None to build one from `options`.
      **options: `FactorSettings` fields: method ("ekfac" or "kfac"), fisher ("true", "empirical",
        "ggn"), num_samples, seed, dtype ("float64" or "float32"), weight_sharing ("expand" or
        "reduce").

    Returns:
      `Factors`.

    Raises:
      UnsupportedLayerError: a selected variable lies in a layer KFAC cannot factor.
      InputError: bad settings, zero total weight, or a loss the sampler does not know (fisher="true").
      NotFiniteError: the gradients or factors contain NaN/Inf.

    Example:
      >>> problem = tfi.Problem(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y))
      >>> factors = fit_factors(problem, method="ekfac", seed=0)
      >>> inverse = EKFACOperator(factors, damping=1e-3).inverse()
    """
    if settings is None:
        settings = FactorSettings(**options)
    elif options:
        raise InputError(f"Pass either settings= or the options {sorted(options)}, not both.")
    objective, batches = problem.objective, problem.batches
    weights_fingerprint = problem.fingerprint()
    blocks = find_blocks(problem.model, problem.variables)
    fisher, num_targets = _targets.resolve_targets(objective, problem.first_outputs, settings.fisher,
                                                   settings.num_samples)
    settings = dataclasses.replace(settings, fisher=fisher)
    start = time.perf_counter()
    passes = fit_passes(objective, blocks, settings, strategy=problem.strategy, num_targets=num_targets)
    sums, total_weight, count = passes.first_pass(objective, batches)
    if total_weight <= 0:
        raise InputError("data has zero total sample weight; the mean objective is undefined.")
    layers = []
    for block, (a_sum, s_sum) in zip(blocks, sums):
        q_a, eig_a, q_s, eig_s = _statistics.eigendecompose(block, a_sum / total_weight, s_sum / total_weight)
        layers.append(LayerFactors(q_a=q_a, eig_a=eig_a, q_s=q_s, eig_s=eig_s))
    if settings.method == "ekfac":
        corrected = passes.second_pass(objective, batches, layers)
        layers = [dataclasses.replace(layer, corrected=tf.maximum(c / total_weight, 0.0))
                  for layer, c in zip(layers, corrected)]
    seconds = time.perf_counter() - start
    _log.info("fitted %s factors for %d layers on %d examples in %.2fs", settings.method, len(blocks), count,
              seconds)
    return Factors(settings, problem.model, problem.variables, blocks, layers, objective=objective,
                   num_examples=count, total_weight=total_weight, seconds=seconds,
                   model_fingerprint=weights_fingerprint, data_fingerprint=problem.data_fingerprint)
