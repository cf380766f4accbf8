"""Kronecker factors of neighbouring layers' curvature blocks, for block-tridiagonal KFAC.

KFAC (docs/mathematics.md, "KFAC and EKFAC") approximates the Gauss-Newton block of layers i and j by
`A_ij ⊗ G_ij` with

    A_ij = E[a_i a_jᵀ]                 (layer inputs, a 1 appended for the bias)
    G_ij = E[Σ_s c_s g_is g_jsᵀ]       (pre-activation gradients for each output target s, `targets.py`)

and keeps only i = j. Martens & Grosse (2015, §4.3) also keep the neighbouring blocks j = i + 1
and invert the result as a block-tridiagonal inverse (`solvers/tridiagonal_kfac.py`).
`fit_cross_factors` computes `A_ii, G_ii` and `A_i,i+1, G_i,i+1` for consecutive factored layers
(in model order) in one pass over the data. The whole matrix of blocks `[A_ij ⊗ G_ij]` is positive
semi-definite whenever the output Hessians are (it is a principal submatrix of `A ⊗ G`).

Layers applied at T > 1 positions (Conv2D, Dense on sequences) use KFAC's "reduce" rows (`a`
averaged and `g` summed over positions): the one form in which layers with different numbers of
positions pair up. Embedding, grouped-convolution and elementwise (normalisation) blocks are not
supported.
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf

from tf_influence.curvature import statistics as _statistics
from tf_influence.curvature import targets as _targets
from tf_influence.curvature.capture import find_blocks
from tf_influence.curvature.layer_rows import layer_rows
from tf_influence.errors import InputError, NotFiniteError, UnsupportedLayerError


@dataclasses.dataclass(frozen=True)
class CrossFactors:
    """Per-layer and neighbouring-layer Kronecker factors (float64 NumPy), means over the data.

    Attributes:
      blocks: the `LayerBlock`s, in model order.
      a, g: per layer i, `A_ii` `[d_a, d_a]` and `G_ii` `[d_g, d_g]`.
      a_next, g_next: per consecutive pair (i, i + 1), `A_i,i+1` `[d_a_i, d_a_i+1]` and `G_i,i+1`.
      fisher: the resolved output-target mode ("ggn", "true" or "empirical").
      num_examples, total_weight, seconds: examples seen, their summed weight, fitting time.
    """

    blocks: list
    a: list
    g: list
    a_next: list
    g_next: list
    fisher: str
    num_examples: int
    total_weight: float
    seconds: float


def fit_cross_factors(problem, *, fisher="auto", num_samples=1, seed=0):
    """`A_ij`, `G_ij` for every layer and its successor, in one pass over the problem's data.

    Args:
      problem: a `tfi.Problem` (no distribution strategy).
      fisher: output targets, as `FactorSettings.fisher` ("auto", "ggn", "true", "empirical").
      num_samples: sampled labels per example for fisher="true".
      seed: label sampling seed.

    Returns:
      `CrossFactors`.

    Raises:
      UnsupportedLayerError: an Embedding (or another layer without dense inputs) is selected.
      InputError: a distribution strategy, or zero total weight.
      NotFiniteError: NaN/Inf in the statistics.

    Example:
      >>> cross = fit_cross_factors(tfi.Problem(model, loss, (x, y)))
      >>> cross.a_next[0].shape        # (d_a of layer 0, d_a of layer 1)
    """
    if problem.strategy is not None:
        raise InputError("Block-tridiagonal KFAC does not run under a distribution strategy. "
                         "Received a problem with a strategy; use method='kfac' there.")
    objective, batches = problem.objective, problem.batches
    blocks = find_blocks(problem.model, problem.variables)
    other = [f"{b.name} ({b.kind}{f', {b.groups} groups' if b.groups > 1 else ''})" for b in blocks
             if b.kind not in ("dense", "conv", "transposed") or b.groups > 1]
    if other:
        raise UnsupportedLayerError(f"Block-tridiagonal KFAC supports Dense and ungrouped convolution layers only; "
                                    f"received {other}. Use method='kfac' or 'ekfac' for them, or select only the "
                                    "supported layers' variables.")
    fisher, num_targets = _targets.resolve_targets(objective, problem.first_outputs, fisher, num_samples)

    @tf.function(reduce_retracing=True)
    def batch_sums(x, y, w, step):
        w = tf.cast(w, tf.float64)
        rows = layer_rows(objective, blocks, x, y, fisher=fisher, num_samples=num_samples,
                          seed=tf.stack([tf.cast(seed, tf.int64), step]), num_targets=num_targets)
        reduced = [(tf.reduce_mean(a, axis=1), [(tf.reduce_sum(g, axis=1), c) for g, c in gs]) for a, gs in rows]
        diagonal = [_pair_sums(w, layer, layer) for layer in reduced]
        neighbours = [_pair_sums(w, first, second) for first, second in zip(reduced[:-1], reduced[1:])]
        return diagonal, neighbours, tf.reduce_sum(w)

    start = time.perf_counter()
    totals, total_weight, count = None, 0.0, 0
    for step, (x, y, w) in enumerate(batches):
        diagonal, neighbours, weight = batch_sums(x, y, w, tf.constant(step, tf.int64))
        sums = [[t.numpy() for t in pair] for pair in diagonal + neighbours]
        totals = sums if totals is None else [[s + t for s, t in zip(p, q)] for p, q in zip(totals, sums)]
        total_weight += float(weight)
        count += int(tf.shape(w)[0])
    if total_weight <= 0:
        raise InputError("data has zero total sample weight; the mean objective is undefined.")
    if not all(np.isfinite(t).all() for pair in totals for t in pair):
        raise NotFiniteError("NaN/Inf in the layer inputs or pre-activation gradients while fitting "
                             "block-tridiagonal KFAC factors. Check the data, the loss and the weights.")
    means = [[t / total_weight for t in pair] for pair in totals]
    layers = len(blocks)
    return CrossFactors(
        blocks=blocks, a=[m[0] for m in means[:layers]], g=[m[1] for m in means[:layers]],
        a_next=[m[0] for m in means[layers:]], g_next=[m[1] for m in means[layers:]], fisher=fisher,
        num_examples=count, total_weight=total_weight, seconds=time.perf_counter() - start)


def _pair_sums(w, first, second):
    """`Σ_n w_n a_n bᵀ_n` and `Σ_n w_n Σ_s c_s g_ns hᵀ_ns` for two layers' reduced rows."""
    (a, gs), (b, hs) = first, second
    g, weights = _statistics.stacked_targets(gs, w)
    h, _ = _statistics.stacked_targets(hs, w)
    return _statistics.weighted_gram(w, a[:, tf.newaxis], b[:, tf.newaxis]), _statistics.weighted_gram(
        weights, g[:, tf.newaxis], h[:, tf.newaxis])
