"""Per-layer statistics rows: layer inputs `a` and pre-activation gradients `g` for several output targets.

KFAC/EKFAC factors need, per example and per output-space target `u_s` (see `targets.py`), the
gradient rows `g_s = J_zᵀ u_s` at every factored layer's pre-activation `z`. With C targets per
example (C = the output size for the exact Gauss-Newton expectation, or the number of sampled
labels), a Python loop of C backward passes is slow, so the C back-propagations are batched: the
batch is tiled C times (copy s of every example carries target `u_s`), the model runs once on the
`C·N` rows, and ONE backward pass with the stacked targets as output gradients gives every `g_s`
(`tile_batch`). The forward pass is repeated C times too, but as one large batch; the inputs `a`
are read from the first copy. This needs a forward pass that treats examples independently and
deterministically (inference mode, as the objective is evaluated): a model whose outputs mix
examples of a batch (BatchNormalization in training mode) or draw random numbers (dropout with
`training=True`) would not give C identical copies.
"""

import tensorflow as tf

from tf_influence.curvature import targets as _targets
from tf_influence.curvature.capture import capture
from tf_influence.data import tile_batch

_ZERO = tf.UnconnectedGradients.ZERO


def layer_rows(objective, blocks, x, y, *, fisher, num_samples=1, seed=(0, 0), dtype=tf.float64,
               whole_batch_targets=False, num_targets=None):
    """One (tiled) forward pass with capture and one backward pass for all output targets.

    Args:
      objective: the `Objective` (model and per-example loss).
      blocks: the `LayerBlock`s to record.
      x, y: one batch.
      fisher: "true", "empirical" or "ggn" (a resolved mode; see `targets.resolve_fisher`).
      num_samples: sampled labels per example for fisher="true".
      seed: stateless seed `[2]` of the label sampling.
      dtype: dtype of the returned rows (token ids of embeddings stay integers).
      whole_batch_targets: inside `strategy.run` with `x` this replica's shard: labels are sampled
        for the whole batch and cut to the shard, as on a single device.
      num_targets: the number of targets per example (`targets.target_count`), when the caller
        knows it; None runs one extra untiled forward pass to find it.

    Returns:
      Per block, `(a, [(g, c), ...])`: input rows `a` `[N, T, d_a]` (int token ids `[N, T]` for
      embeddings) and, per target s, pre-activation gradient rows `g` `[N, T, d_g]` with
      per-example weights `c` `[N]` (see `targets.output_targets`). With fisher="empirical", `g` is
      the gradient of each example's own loss, so `Σ_t a_t g_tᵀ` is its weight gradient.
    """
    if num_targets is None:
        num_targets = _targets.target_count(objective, objective.outputs(x), fisher, num_samples)
    with tf.GradientTape(persistent=True) as tape:
        with capture(blocks, tape=tape) as recording:
            tiled_outputs = objective.outputs(tile_batch(x, num_targets))
    recording.check_called(blocks)
    outputs = _first_copy(tiled_outputs, num_targets)
    targets = _targets.whole_batch_targets if whole_batch_targets else _targets.output_targets
    us, weights = targets(objective, outputs, y, fisher=fisher, num_samples=num_samples, seed=seed)
    if len(us) != num_targets:
        raise ValueError(f"internal: {len(us)} output targets for {num_targets} batch copies")
    stacked = tf.concat(us, axis=0) if num_targets > 1 else us[0]
    grads = tape.gradient(tiled_outputs, recording.flat_preactivations(), output_gradients=stacked,
                          unconnected_gradients=_ZERO)
    del tape
    result, offset = [], 0
    for index, block in enumerate(blocks):
        inputs = [_first_copy(x_in, num_targets) for x_in in recording.inputs[index]]
        block_grads = [_per_target(t, num_targets) for t in grads[offset:offset + len(inputs)]]
        if block.kind == "elementwise":  # exact per-example gradients [N, 1, p], summed over the calls; a = 1
            gs = [tf.add_n([block.output_rows(t[s], x_in) for t, x_in in zip(block_grads, inputs)])
                  for s in range(num_targets)]
            a = tf.ones_like(gs[0][..., :1])
        else:
            a = tf.concat([block.input_rows(x_in) for x_in in inputs], axis=1)
            if block.kind != "embedding":
                a = tf.cast(a, dtype)
            gs = [tf.concat([block.output_rows(t[s]) for t in block_grads], axis=1) for s in range(num_targets)]
        result.append((a, [(tf.cast(g, dtype), tf.cast(c, dtype)) for g, c in zip(gs, weights)]))
        offset += len(inputs)
    return result


def _per_target(t, copies):
    """Gradients of the tiled batch split into the `copies` targets: `[copies, N, ...]`."""
    return tf.reshape(t, tf.concat([[copies, tf.shape(t)[0] // copies], tf.shape(t)[1:]], 0))


def _first_copy(tensors, copies):
    """The first of `copies` equal parts along axis 0 (rows of the untiled batch, in their order)."""
    if copies == 1:
        return tensors

    def first(t):
        if t is None:  # elementwise blocks may record no input
            return None
        t = tf.convert_to_tensor(t)
        return t[: tf.shape(t)[0] // copies]

    return tf.nest.map_structure(first, tensors)
