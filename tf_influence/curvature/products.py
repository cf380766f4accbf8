"""Curvature-vector products of one batch: Hessian (three ways) and Gauss-Newton.

Every function here is pure: it takes an `Objective`, the selected variables, one batch
`(x, y, w)` and tangent vectors, and returns `Σ_{i∈batch} wᵢ C_i v` (a *sum*, so that batch results
add up exactly; `operators.HessianOperator` divides by `Σ wᵢ` and adds the regulariser).

Tangents come as a list of variable-shaped tensors with a leading axis of k vectors. All k products
of a batch are one vectorised computation (`tf.vectorized_map` over the tangents: the batch's forward
pass is shared and every matmul of the tangent pass becomes one k-times wider matmul), never a
sequential loop over the tangents; k may be unknown when traced (a `None` dimension).

Modes (for `curvature="hessian"`):
  forward_over_back: a `ForwardAccumulator` around a `GradientTape` — the jvp of the gradient.
  back_over_back:    the gradient of ⟨∇L, v⟩; reuses one forward/backward pass for k vectors.
  finite_difference: (∇R(θ + r v) − ∇R(θ − r v)) / 2r, done over the whole data set in
                     `operators/hessian.py` because it moves the variables; for diagnostics.
`curvature="gauss_newton"` gives `Jᵀ ∇²_out ℓ J v` (PSD when the loss is convex in the outputs).
"""

import tensorflow as tf

from tf_influence.params import densify

MODES = ("forward_over_back", "back_over_back", "finite_difference")
CURVATURES = ("hessian", "gauss_newton")
_ZERO = tf.UnconnectedGradients.ZERO


def batch_curvature_product(objective, tf_vars, batch, tangents, *, mode, curvature):
    """`Σᵢ wᵢ Cᵢ vⱼ` for each of the k tangents `vⱼ` (list of `[k, *var.shape]` tensors)."""
    x, y, w = batch
    if curvature == "gauss_newton":
        return _map_tangents(lambda v: _gauss_newton_vp(objective, tf_vars, x, y, w, v), tangents)
    loss = lambda: objective.weighted_loss_sum(x, y, w)  # noqa: E731
    if mode == "forward_over_back":
        return _map_tangents(lambda v: forward_over_back(loss, tf_vars, v), tangents)
    if mode == "back_over_back":
        return back_over_back(loss, tf_vars, tangents)
    raise ValueError(f"mode {mode!r} has no per-batch product")


def regularizer_curvature_product(objective, tf_vars, variables, tangents):
    """Exact Hessian-vector products of Ω(θ) (weight regularisers + l2), for k tangents."""
    loss = lambda: objective.regularization(variables)  # noqa: E731
    return _map_tangents(lambda v: forward_over_back(loss, tf_vars, v), tangents)


def forward_over_back(loss_fn, tf_vars, v):
    """Hessian of the scalar `loss_fn()` times one variable-shaped tangent list `v`."""
    with tf.autodiff.ForwardAccumulator(tf_vars, v) as acc:
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            loss = loss_fn()
        grads = [densify(g) for g in tape.gradient(loss, tf_vars, unconnected_gradients=_ZERO)]
    return [densify(h) for h in acc.jvp(grads, unconnected_gradients=_ZERO)]


def back_over_back(loss_fn, tf_vars, tangents):
    """Hessian of `loss_fn()` times k tangents: one forward/backward pass, then the second backward
    pass vectorised over the k tangents (its output gradients)."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(tf_vars)
        with tf.GradientTape() as inner:
            inner.watch(tf_vars)
            loss = loss_fn()
        grads = [densify(g) for g in inner.gradient(loss, tf_vars, unconnected_gradients=_ZERO)]

    def one(v):
        return [densify(h) for h in outer.gradient(grads, tf_vars, output_gradients=v, unconnected_gradients=_ZERO)]

    return _map_tangents(one, tangents)


def _gauss_newton_vp(objective, tf_vars, x, y, w, v):
    with tf.GradientTape() as tape:
        tape.watch(tf_vars)
        with tf.autodiff.ForwardAccumulator(tf_vars, v) as acc:
            outputs = objective.outputs(x)
        jv = acc.jvp(outputs, unconnected_gradients=_ZERO)
    flat_out = [tf.stop_gradient(o) for o in tf.nest.flatten(outputs)]
    flat_jv = tf.nest.flatten(jv)
    with tf.autodiff.ForwardAccumulator(flat_out, flat_jv) as acc_out:
        with tf.GradientTape() as out_tape:
            out_tape.watch(flat_out)
            structured = tf.nest.pack_sequence_as(outputs, flat_out)
            losses = objective.per_example_loss(y, structured)
            loss = tf.reduce_sum(tf.cast(w, losses.dtype) * losses)
        grad_out = out_tape.gradient(loss, flat_out, unconnected_gradients=_ZERO)
    h_jv = acc_out.jvp(grad_out, unconnected_gradients=_ZERO)
    products = tape.gradient(tf.nest.flatten(outputs), tf_vars, output_gradients=h_jv,
                             unconnected_gradients=_ZERO)
    return [densify(p) for p in products]


def _map_tangents(fn, tangents):
    """`fn` (one variable-shaped tangent list -> products) for each of the k tangents, vectorised."""
    if tangents[0].shape[0] == 1:
        return [tf.expand_dims(h, 0) for h in fn([t[0] for t in tangents])]
    return tf.vectorized_map(fn, list(tangents))
