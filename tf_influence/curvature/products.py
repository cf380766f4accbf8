"""Curvature-vector products of one batch: Hessian (three ways) and Gauss-Newton.

Every function here is pure: it takes an `Objective`, the selected variables, one batch
`(x, y, w)` and tangent vectors, and returns `Σ_{i∈batch} wᵢ C_i v` (a *sum*, so that batch results
add up exactly; `operators.HessianOperator` divides by `Σ wᵢ` and adds the regulariser).

Tangents come as a list of variable-shaped tensors with a leading axis of k vectors. All k products
of a batch are one vectorised computation (`tf.vectorized_map` over the tangents: the batch's forward
pass is shared and every matmul of the tangent pass becomes one k-times wider matmul), never a
sequential loop over the tangents; k may be unknown when traced (a `None` dimension).

Modes (for `curvature="hessian"`):
  forward_over_back: a `ForwardAccumulator` around a `GradientTape` — the jvp of the gradient
                     (back_over_back for models with looping recurrent layers, which the
                     accumulator cannot trace).
  back_over_back:    the gradient of ⟨∇L, v⟩; reuses one forward/backward pass for k vectors.
  finite_difference: (∇L(θ + r v) − ∇L(θ − r v)) / 2r with exact first derivatives; the model is
                     evaluated at θ ± r v without assigning its variables (Keras 3, see
                     `Objective.outputs`), so it is traceable and works batch by batch.
`curvature="gauss_newton"` gives `Jᵀ ∇²_out ℓ J v` (PSD when the loss is convex in the outputs).

Both nested-derivative modes run inside `exact_second_derivatives(model)`, which the caller's
`tf.function` traces: TensorFlow's own second derivatives through LayerNormalization,
GroupNormalization and BatchNormalization (training) are wrong (see tf_influence/normalization.py).
"""

import contextlib

import numpy as np
import tensorflow as tf

from tf_influence.layers import looping_recurrent_layers
from tf_influence.normalization import exact_second_derivatives
from tf_influence.params import densify

MODES = ("forward_over_back", "back_over_back", "finite_difference")
CURVATURES = ("hessian", "gauss_newton")
_ZERO = tf.UnconnectedGradients.ZERO


def batch_curvature_product(objective, tf_vars, batch, tangents, *, mode, curvature, variables=None, step=None):
    """`Σᵢ wᵢ Cᵢ vⱼ` for each of the k tangents `vⱼ` (list of `[k, *var.shape]` tensors).

    `variables` (the selected variables, as given to `Objective.outputs`) and `step` (a fixed
    finite-difference step r, default `ε^(1/3)·(1 + ‖θ‖)/‖v‖`) are used by mode="finite_difference".
    An empty batch (a replica's empty shard) gives zeros: pfor fails on zero-size batches.
    """
    def product():
        return _batch_curvature_product(objective, tf_vars, batch, tangents, mode=mode, curvature=curvature,
                                        variables=variables, step=step)

    examples = tf.shape(batch[2])[0]
    if isinstance(examples, tf.Tensor) and tf.get_static_value(examples) is None:
        return tf.cond(examples > 0, product, lambda: [tf.zeros_like(t) for t in tangents])
    return product() if int(examples) > 0 else [tf.zeros_like(t) for t in tangents]


def _batch_curvature_product(objective, tf_vars, batch, tangents, *, mode, curvature, variables, step):
    x, y, w = batch
    # pfor cannot vectorise through a recurrent layer's while loop: those models map the tangents
    # one after another.
    vectorize = not looping_recurrent_layers(objective.model)
    if curvature == "gauss_newton":
        return _map_tangents(lambda v: _gauss_newton_vp(objective, tf_vars, x, y, w, v), tangents, vectorize)
    if mode == "finite_difference":
        return _map_tangents(lambda v: finite_difference(objective, variables, tf_vars, batch, v, step=step), tangents,
                             vectorize)
    if mode == "forward_over_back" and not vectorize:
        # TensorFlow's ForwardAccumulator cannot differentiate the variables a recurrent layer's
        # while loop captures ("variable without handle data"); back-over-back is just as exact.
        mode = "back_over_back"
    loss = lambda: objective.weighted_loss_sum(x, y, w)  # noqa: E731
    patch = exact_second_derivatives(objective.model) if mode in MODES[:2] else contextlib.nullcontext()
    with patch:
        if mode == "forward_over_back":
            return _map_tangents(lambda v: forward_over_back(loss, tf_vars, v), tangents)
        if mode == "back_over_back":
            return back_over_back(loss, tf_vars, tangents, vectorize=vectorize)
    raise ValueError(f"mode {mode!r} has no per-batch product")


def finite_difference(objective, variables, tf_vars, batch, v, *, step=None):
    """`(∇L(θ + r v) − ∇L(θ − r v)) / 2r` for one batch and one variable-shaped tangent list `v`.

    L is the batch's weighted loss sum. The model is evaluated at θ ± r v through
    `objective.outputs(x, values=...)` (no variable is assigned), so this is traceable. The step
    is `step` if given, else `ε^(1/3)·(1 + ‖θ‖)/‖v‖` (ε: the variables' machine epsilon), the same
    for every batch; a zero tangent gives zeros.
    """
    x, y, w = batch
    dtype = tf_vars[0].dtype
    values = [tf.convert_to_tensor(t) for t in tf_vars]
    v = [tf.cast(t, dtype) for t in v]
    v_norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in v]))
    nonzero = v_norm > 0
    if step is None:
        theta_norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in values]))
        eps = np.finfo(dtype.as_numpy_dtype).eps ** (1 / 3)
        r = eps * (1 + theta_norm) / tf.where(nonzero, v_norm, tf.ones_like(v_norm))
    else:
        r = tf.constant(step, dtype)

    def gradient_at(sign):
        shifted = [t + sign * r * d for t, d in zip(values, v)]
        with tf.GradientTape() as tape:
            tape.watch(shifted)
            loss = objective.weighted_loss_sum(x, y, w, values=list(zip(variables, shifted)))
        return [densify(g) for g in tape.gradient(loss, shifted, unconnected_gradients=_ZERO)]

    plus, minus = gradient_at(1.0), gradient_at(-1.0)
    return [tf.where(nonzero, (p - m) / (2 * r), tf.zeros_like(p)) for p, m in zip(plus, minus)]


def regularizer_curvature_product(objective, tf_vars, variables, tangents):
    """Exact Hessian-vector products of Ω(θ) (weight regularisers + l2), for k tangents.

    The l2 term's Hessian is `l2·I`, multiplied directly; only the model's weight regularisers are
    differentiated (a vectorised trace costs a second or more, so a model without them traces nothing).
    """
    products = [objective.l2 * tf.convert_to_tensor(t) for t in tangents] if objective.l2 else \
        [tf.zeros_like(t) for t in tangents]
    if not objective.has_weight_regularizers:
        return products
    loss = lambda: objective.regularization(variables, l2=False)  # noqa: E731
    weights = _map_tangents(lambda v: forward_over_back(loss, tf_vars, v), tangents)
    return [a + tf.cast(b, a.dtype) for a, b in zip(products, weights)]


def forward_over_back(loss_fn, tf_vars, v):
    """Hessian of the scalar `loss_fn()` times one variable-shaped tangent list `v`."""
    with tf.autodiff.ForwardAccumulator(tf_vars, v) as acc:
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            loss = loss_fn()
        grads = [densify(g) for g in tape.gradient(loss, tf_vars, unconnected_gradients=_ZERO)]
    return [densify(h) for h in acc.jvp(grads, unconnected_gradients=_ZERO)]


def back_over_back(loss_fn, tf_vars, tangents, *, vectorize=True):
    """Hessian of `loss_fn()` times k tangents: one forward/backward pass, then the second backward
    pass over the k tangents (its output gradients), vectorised unless `vectorize=False`."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(tf_vars)
        with tf.GradientTape() as inner:
            inner.watch(tf_vars)
            loss = loss_fn()
        grads = [densify(g) for g in inner.gradient(loss, tf_vars, unconnected_gradients=_ZERO)]

    def one(v):
        return [densify(h) for h in outer.gradient(grads, tf_vars, output_gradients=v, unconnected_gradients=_ZERO)]

    return _map_tangents(one, tangents, vectorize)


def _gauss_newton_vp(objective, tf_vars, x, y, w, v):
    if looping_recurrent_layers(objective.model):
        outputs, jv, tape = _jvp_by_double_vjp(objective, tf_vars, x, v)
    else:
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


def _jvp_by_double_vjp(objective, tf_vars, x, v):
    """`J v` as the derivative of the linear map `u ↦ ⟨Jᵀu, v⟩` (two reverse passes), for models whose
    recurrent while loops the ForwardAccumulator cannot trace. Returns the outputs, `J v` and a
    persistent tape of the outputs."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tf_vars)
        outputs = objective.outputs(x)
    flat = tf.nest.flatten(outputs)
    dummies = [tf.zeros_like(o) for o in flat]
    with tf.GradientTape() as dual:
        dual.watch(dummies)
        vjp = tape.gradient(flat, tf_vars, output_gradients=dummies, unconnected_gradients=_ZERO)
        inner = tf.add_n([tf.reduce_sum(densify(a) * tf.cast(b, a.dtype)) for a, b in zip(vjp, v)])
    jv = dual.gradient(inner, dummies, unconnected_gradients=_ZERO)
    return outputs, tf.nest.pack_sequence_as(outputs, jv), tape


def _map_tangents(fn, tangents, vectorize=True):
    """`fn` (one variable-shaped tangent list -> products) for each of the k tangents, vectorised
    (pfor) or, with `vectorize=False`, one after another (`tf.map_fn`)."""
    if tangents[0].shape[0] == 1:
        return [tf.expand_dims(h, 0) for h in fn([t[0] for t in tangents])]
    if vectorize:
        return tf.vectorized_map(fn, list(tangents))
    specs = [tf.TensorSpec(t.shape[1:], t.dtype) for t in tangents]
    return tf.map_fn(fn, list(tangents), fn_output_signature=specs)
