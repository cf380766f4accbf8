"""Exact second derivatives through Keras normalisation layers.

Why TensorFlow gets them wrong. `tf.nn.moments` (tensorflow/python/ops/nn_impl.py), which Keras 3
reaches through `keras.ops.moments`, computes

    mean     = reduce_mean(x, axes)
    variance = reduce_mean(squared_difference(x, stop_gradient(mean)), axes)

The gradient of the variance, `2(xᵢ − μ)/n`, is still right: the term through the mean,
`−(2/n²) Σⱼ (xⱼ − μ)`, is zero. But that gradient is built from `x − stop_gradient(μ)`, so its own
derivative (the second derivative of the variance) misses the dependence of μ on x:

    TensorFlow: ∂²σ²/∂x∂xᵀ = (2/n) I          exact: (2/n) (I − 𝟙𝟙ᵀ/n)

Both forward-over-back and back-over-back products differentiate that gradient graph (the jvp
and the gradient of StopGradient are zero), so per normalisation group of n values the Hessian
with respect to the layer input x loses exactly `(∂L/∂σ²) · (−2/n²) 𝟙𝟙ᵀ`, where
`∂L/∂σ² = −½ (σ² + ε)^(−3/2) Σᵢ bᵢ γᵢ (xᵢ − μ)` and b is the gradient arriving at the output.
Through the chain rule this corrupts the Hessian block of the parameters *before* the layer;
blocks that involve only the layer's own γ, β or later parameters are right. Affected in Keras 3:

  * LayerNormalization (not with rms_scaling=True, which uses `reduce_variance`: exact),
  * GroupNormalization,
  * BatchNormalization in training mode without a mask (the masked path and synchronized=True
    compute their moments without stop_gradient; inference uses the moving statistics);
    with renorm=True too, which this module does not fix (listed by `inexact_layers`).

RMSNormalization and UnitNormalization have no mean to stop and are exact.

`exact_second_derivatives(model)` replaces, for its duration, the `call` of every such layer
instance by the same computation with `variance = mean((x − mean)²)` and no stop_gradient:
identical forward values (the same operations minus an identity), identical first derivatives,
right derivatives of every order. `inexact_layers` lists the layers it cannot fix. tf-keras
layers are handled by `tf_influence.normalization_tf_keras`.
"""

import contextlib
import sys
import threading

import keras
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.layers import walk_layers
from tf_influence.normalization_rules import Rule, moments

_LOCK = threading.RLock()
_ACTIVE = {}  # (id(layer), attribute) -> [layer, depth, had_own, own]


@contextlib.contextmanager
def exact_second_derivatives(model):
    """Makes second (and higher) derivatives through the model's normalisation layers exact.

    While the context is open, each LayerNormalization, GroupNormalization and
    BatchNormalization instance in `model` (nested models and layers that own sublayers
    included) computes its moments without `stop_gradient`. Forward values and first derivatives
    are unchanged (to rounding); nested derivatives (forward-over-back, back-over-back Hessian
    products) become exact. Everything is restored on exit, also when an exception escapes.
    Contexts nest and may be entered from several places at once: a layer is restored when the
    last context that patched it exits.

    The replacement acts whenever the layer's Python `call` runs: eagerly, or while a
    `tf.function` is traced. Enter the context inside the traced function (or trace inside the
    context); a graph traced earlier keeps the original `call`. A graph traced inside keeps the
    exact formulation after the context exits, which computes the same values.

    Layers listed by `inexact_layers(model, training=True)` are not made exact.

    Args:
      model: a Keras 3 or tf-keras layer or model.

    Yields:
      The tuple of layers that were patched.

    Raises:
      InputError: when `model` is not a Keras layer or model.

    Example:
      >>> with exact_second_derivatives(model):
      ...     hv = tfi.hvp.forward_over_back(lambda: loss(y, model(x, training=True)), params, v)
    """
    _check_layer(model, "exact_second_derivatives")
    targets = []
    for layer in walk_layers(model, include_root=True):
        rule = _rule(layer)
        if rule is not None and not rule.overridden(layer) and rule.needed(layer):
            targets.append((layer, rule))
    entered = []
    try:
        with _LOCK:
            for layer, rule in targets:
                _patch(layer, rule)
                entered.append((layer, rule))
        yield tuple(layer for layer, _ in targets)
    finally:
        with _LOCK:
            for layer, rule in reversed(entered):
                _unpatch(layer, rule.attribute)


def inexact_layers(model, *, training=False):
    """Layers whose second derivatives stay wrong inside `exact_second_derivatives`.

    These are subclasses of the normalisation layers that override a method the replacement
    re-implements (their own formulas are unknown) and, when `training` is True,
    BatchNormalization with renorm=True (Keras 3) or synchronized=True (tf-keras). A library
    that offers exact Hessian products can refuse exactly these.

    Args:
      model: a Keras layer or model.
      training: the `training` flag the model is called with (BatchNormalization uses its batch
        moments only in training mode).

    Returns:
      A list of layers, in the order `tf_influence.layers.walk_layers` finds them.

    Raises:
      InputError: when `model` is not a Keras layer or model.

    Example:
      >>> [layer.name for layer in inexact_layers(model, training=True)]
      []
    """
    _check_layer(model, "inexact_layers")
    found = []
    for layer in walk_layers(model, include_root=True):
        rule = _rule(layer)
        if rule is None or not rule.needed(layer):
            continue
        if (training or not rule.training_only) and (rule.overridden(layer) or rule.unfixed(layer, training)):
            found.append(layer)
    return found


def _check_layer(model, caller):
    if not _is_layer(model):
        raise InputError(
            f"{caller} expected a Keras model or layer. Received: {type(model).__name__} ({model!r:.80}). "
            "Fix: pass the model itself (for several models, enter one context per model).")


def _is_layer(obj):
    if isinstance(obj, keras.layers.Layer):
        return True
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(obj, tf_keras.layers.Layer)


def _rule(layer):
    rules = _RULES
    if "tf_keras" in sys.modules and not isinstance(layer, keras.layers.Layer):
        from tf_influence.normalization_tf_keras import RULES as rules
    for rule in rules:
        if isinstance(layer, rule.base):
            return rule
    return None


def _patch(layer, rule):
    key = (id(layer), rule.attribute)
    entry = _ACTIVE.get(key)
    if entry is not None:
        entry[1] += 1
        return
    had_own = rule.attribute in layer.__dict__
    own = layer.__dict__.get(rule.attribute)
    replacement = rule.replacement(layer, getattr(layer, rule.attribute))
    _ACTIVE[key] = [layer, 1, had_own, own]
    object.__setattr__(layer, rule.attribute, replacement)


def _unpatch(layer, attribute):
    key = (id(layer), attribute)
    entry = _ACTIVE[key]
    entry[1] -= 1
    if entry[1]:
        return
    del _ACTIVE[key]
    _, _, had_own, own = entry
    if had_own:
        object.__setattr__(layer, attribute, own)
    else:
        object.__delattr__(layer, attribute)


def _symbolic(x):
    return isinstance(x, keras.KerasTensor)


def _shape(x):
    """Static sizes where known, dynamic ones elsewhere (as `keras.ops.shape`)."""
    dynamic = tf.shape(x)
    return [size if size is not None else dynamic[i] for i, size in enumerate(x.shape)]


def _compute_dtype(x):
    return keras.backend.result_type(x.dtype, "float32")


def _layer_norm_call(layer, original):
    """Keras 3's `ops.layer_normalization` (non-rms branch) with exact moments."""

    def call(inputs):
        if _symbolic(inputs):
            return original(inputs)
        x = tf.convert_to_tensor(inputs)
        original_dtype = x.dtype
        x = tf.cast(x, _compute_dtype(x))
        ndims = len(x.shape)
        axis = sorted(layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])
        broadcast_shape = [1] * ndims
        for dim in axis:
            broadcast_shape[dim] = x.shape[dim]

        def broadcast(v):
            v = tf.cast(tf.convert_to_tensor(v), x.dtype)
            if len(v.shape) != ndims and axis != [ndims - 1]:
                return tf.reshape(v, broadcast_shape)
            return v

        mean, variance = moments(x, axis)
        inv = tf.math.rsqrt(variance + layer.epsilon)
        if layer.gamma is not None:
            inv = inv * broadcast(layer.gamma)
        res = -mean * inv
        if layer.beta is not None:
            res = res + broadcast(layer.beta)
        outputs = tf.cast(x * inv + res, original_dtype)
        return tf.cast(outputs, layer.compute_dtype)

    return call


def _group_norm_call(layer, original):
    """Keras 3's `GroupNormalization.call` with exact moments."""

    def call(inputs):
        if _symbolic(inputs):
            return original(inputs)
        inputs = tf.convert_to_tensor(inputs)
        input_shape = _shape(inputs)
        group_shape = list(input_shape)
        group_shape[0] = -1
        group_shape[layer.axis] = input_shape[layer.axis] // layer.groups
        group_shape.insert(layer.axis, layer.groups)
        grouped = tf.reshape(inputs, group_shape)

        inputs_dtype = grouped.dtype
        grouped = tf.cast(grouped, _compute_dtype(grouped))
        reduction_axes = list(range(1, len(grouped.shape)))
        reduction_axes.pop(-2 if layer.axis == -1 else layer.axis - 1)
        broadcast_shape = [1] * len(inputs.shape)
        broadcast_shape[layer.axis] = inputs.shape[layer.axis] // layer.groups
        broadcast_shape.insert(layer.axis, layer.groups)

        mean, variance = moments(grouped, reduction_axes)
        inv = tf.math.rsqrt(variance + layer.epsilon)
        if layer.scale:
            inv = inv * tf.cast(tf.reshape(layer.gamma, broadcast_shape), grouped.dtype)
        res = -mean * inv
        if layer.center:
            res = res + tf.cast(tf.reshape(layer.beta, broadcast_shape), grouped.dtype)
        normalized = tf.cast(grouped * inv + res, inputs_dtype)
        return tf.cast(tf.reshape(normalized, input_shape), layer.compute_dtype)

    return call


def _batch_norm_call(layer, original):
    """Keras 3's `BatchNormalization.call` in training mode with exact moments.

    Inference, masks, synchronized=True and renorm=True go to the original `call` (the first
    three are already exact; renorm is listed by `inexact_layers`).
    """

    def call(inputs, training=None, mask=None):
        if (_symbolic(inputs) or not (training and layer.trainable) or mask is not None
                or layer.synchronized or layer.renorm):
            return original(inputs, training=training, mask=mask)
        x = tf.convert_to_tensor(inputs)
        x = tf.cast(x, _compute_dtype(x))
        ndims = len(x.shape)
        axis = layer.axis % ndims
        mean, variance = moments(x, [i for i in range(ndims) if i != axis])
        mean, variance = tf.reshape(mean, [-1]), tf.reshape(variance, [-1])
        moving_mean = tf.cast(layer.moving_mean, x.dtype)
        moving_variance = tf.cast(layer.moving_variance, x.dtype)
        layer.moving_mean.assign(moving_mean * layer.momentum + mean * (1.0 - layer.momentum))
        layer.moving_variance.assign(moving_variance * layer.momentum
                                     + variance * (1.0 - layer.momentum))
        gamma = tf.cast(layer.gamma, x.dtype) if layer.scale else None
        beta = tf.cast(layer.beta, x.dtype) if layer.center else None
        outputs = keras.ops.batch_normalization(x, mean, variance, axis=layer.axis, offset=beta,
                                                scale=gamma, epsilon=layer.epsilon)
        return tf.cast(outputs, layer.compute_dtype)

    return call


_RULES = (
    Rule(keras.layers.LayerNormalization, "call", _layer_norm_call, ("call",),
         needed=lambda layer: not layer.rms_scaling),
    Rule(keras.layers.GroupNormalization, "call", _group_norm_call,
         ("call", "_reshape_into_groups", "_apply_normalization", "_create_broadcast_shape")),
    Rule(keras.layers.BatchNormalization, "call", _batch_norm_call, ("call", "_moments"), training_only=True,
         unfixed=lambda layer, training: training and layer.renorm),
)
