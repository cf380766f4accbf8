"""Per-example gradients and gradient-vector products of one batch.

`⟨gᵢ, s⟩` for every example i of a batch is either one forward-mode pass per direction s (the jvp
of the vector of per-example losses along s: `gradient_dot`, never materialising the `[batch, p]`
per-example gradients) or the per-example gradients (`per_example_gradients`) times all directions
in one matrix product. `influence.batch_functions` chooses between them by cost.
"""

import tensorflow as tf

from tf_influence.layers import batch_coupled_layers, looping_recurrent_layers
from tf_influence.params import densify

_ZERO = tf.UnconnectedGradients.ZERO


def per_example_losses(objective, batch):
    x, y, _ = batch
    return objective.per_example_loss(y, objective.outputs(x))


def per_example_gradients(objective, tf_vars, space, batch):
    """`[batch, p]`: the gradient of each example's loss (no weights, no regulariser).

    Each example's gradient comes from its own forward and backward pass, vectorised over the
    examples (pfor): the cost grows like m. The Jacobian of the batch's loss vector (one backward
    pass per example, each over the whole batch: m² work) is kept for models where that is the
    definition: examples coupled within a batch (training-mode BatchNormalization), and recurrent
    layers whose while loops pfor cannot vectorise.
    """
    model = objective.model
    if batch_coupled_layers(model, training=objective.training) or looping_recurrent_layers(model):
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            losses = per_example_losses(objective, batch)
        jac = tape.jacobian(losses, tf_vars, unconnected_gradients=_ZERO)
        return space.flatten([densify(j) for j in jac], batch_dims=1)

    def one(example):
        example = tf.nest.map_structure(lambda t: t[tf.newaxis], example)
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            loss = per_example_losses(objective, example)[0]
        return space.flatten([densify(g) for g in tape.gradient(loss, tf_vars, unconnected_gradients=_ZERO)])

    return tf.vectorized_map(one, batch)


def gradient_dot(objective, tf_vars, space, batch, directions):
    """`[batch, k]`: `⟨gᵢ, sⱼ⟩` for each example i and each row sⱼ of `directions` `[k, p]`."""
    tangents = space.unflatten(directions)

    def one(tangent):
        with tf.autodiff.ForwardAccumulator(tf_vars, tangent) as acc:
            losses = per_example_losses(objective, batch)
        return acc.jvp(losses, unconnected_gradients=_ZERO)

    k = directions.shape[0]
    if k is not None and k <= 8:
        return tf.stack([one([t[j] for t in tangents]) for j in range(k)], axis=1)
    columns = tf.map_fn(one, tangents, fn_output_signature=tf.TensorSpec([None], directions.dtype))
    return tf.transpose(columns)
