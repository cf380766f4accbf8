"""`exact_second_derivatives` for tf-keras (Keras 2, `TF_USE_LEGACY_KERAS=1`) layers.

Imported by `tf_influence.normalization` only when tf-keras is already loaded. Measured on
tf-keras 2.21 (float64 and float32, forward-over-back against finite differences):

  * LayerNormalization: its unfused path (float64, epsilon < 1.001e-5, or axes that are not the
    trailing ones) calls `tf.nn.moments`: wrong. The fused path (`fused_batch_norm`, float32)
    has right second derivatives and is left alone.
  * BatchNormalization in training mode: the unfused path reaches `tf.nn.moments` through
    `_calculate_mean_and_var`: wrong; the fused path and the masked path (`tf.nn.weighted_moments`,
    which has no stop_gradient) are right. Only `_calculate_mean_and_var` is replaced, so virtual
    batches, adjustment and renorm keep tf-keras' own code. synchronized=True
    (SyncBatchNormalization) computes per-replica moments with `tf.nn.moments` and is listed by
    `inexact_layers` in training mode.
  * GroupNormalization uses `tf.nn.weighted_moments`: right, not patched.
"""

import tensorflow as tf
import tf_keras
from tf_keras.src.layers.normalization.batch_normalization import BatchNormalizationBase

from tf_influence.normalization_rules import Rule, moments


def _fused(layer, ndims):
    """Whether tf-keras' LayerNormalization takes its fused path (as its `_fused_can_be_used`)."""
    axis = sorted(layer.axis)
    contiguous = axis[-1] == ndims - 1 and axis[-1] - axis[0] == len(axis) - 1
    return contiguous and layer.epsilon >= 1.001e-5 and layer.dtype == "float32"


def _layer_norm_call(layer, original):
    """tf-keras `LayerNormalization.call`, unfused branch, with exact moments."""

    def call(inputs):
        if isinstance(inputs, tf.RaggedTensor) or _fused(layer, inputs.shape.rank):
            return original(inputs)
        inputs = tf.cast(inputs, layer.compute_dtype)
        input_shape = inputs.shape
        ndims = len(input_shape)
        broadcast_shape = [1] * ndims
        for dim in layer.axis:
            broadcast_shape[dim] = input_shape[dim]

        def broadcast(v):
            if v is not None and len(v.shape) != ndims and layer.axis != [ndims - 1]:
                return tf.reshape(v, broadcast_shape)
            return v

        input_dtype = inputs.dtype
        if input_dtype in (tf.float16, tf.bfloat16) and layer.dtype == "float32":
            inputs = tf.cast(inputs, tf.float32)
        mean, variance = moments(inputs, layer.axis)
        outputs = tf.nn.batch_normalization(inputs, mean, variance, offset=broadcast(layer.beta),
                                            scale=broadcast(layer.gamma),
                                            variance_epsilon=layer.epsilon)
        outputs = tf.cast(outputs, input_dtype)
        outputs.set_shape(input_shape)
        return outputs

    return call


def _batch_norm_moments(layer, original):
    """tf-keras `BatchNormalizationBase._calculate_mean_and_var` with exact moments."""

    def calculate_mean_and_var(inputs, reduction_axes, keep_dims, mask=None):
        if mask is not None or layer.synchronized:
            return original(inputs, reduction_axes, keep_dims, mask=mask)
        x = tf.cast(inputs, tf.float32) if inputs.dtype == tf.float16 else inputs
        mean, variance = moments(x, reduction_axes)
        if not keep_dims:
            mean, variance = tf.squeeze(mean, reduction_axes), tf.squeeze(variance, reduction_axes)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)

    return calculate_mean_and_var


RULES = (
    Rule(tf_keras.layers.LayerNormalization, "call", _layer_norm_call, ("call",)),
    Rule(BatchNormalizationBase, "_calculate_mean_and_var", _batch_norm_moments,
         ("_moments", "_calculate_mean_and_var", "_no_sync_calculate_mean_and_var"), training_only=True,
         unfixed=lambda layer, training: training and layer.synchronized),
)
