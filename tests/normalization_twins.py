"""Hand-written plain-TensorFlow twins of the small normalisation models in the tests.

The twins use my own formulas (no Keras, no stop_gradient): `tanh(Dense or Conv2D)` →
normalisation → Dense, a mean squared error, and a dense Hessian from nested GradientTape
jacobians. Parameters come in the order of `model.trainable_variables` (kernel, bias, γ, β, ...).
"""

import contextlib

import numpy as np
import tensorflow as tf

from tf_influence.curvature.products import back_over_back, forward_over_back
from tf_influence.normalization import exact_second_derivatives

N = 6


def _dense(h, kernel, bias):
    return tf.tensordot(h, kernel, 1) + bias


def _normalize(h, axes, eps):
    mean = tf.reduce_mean(h, axes, keepdims=True)
    variance = tf.reduce_mean((h - mean) ** 2, axes, keepdims=True)
    return (h - mean) / tf.sqrt(variance + eps)


def _affine(h, params, shape, scale, center):
    if scale:
        h = h * tf.reshape(next(params), shape)
    if center:
        h = h + tf.reshape(next(params), shape)
    return h


def layer_norm_twin(axes, center, scale, rms=False, eps=1e-3):
    def norm(h, params):
        shape = [1] * len(h.shape)
        for a in axes:
            shape[a] = h.shape[a]
        if rms:  # Keras' deprecated rms_scaling: x / sqrt(var(x) + eps) * gamma, no centring
            mean = tf.reduce_mean(h, axes, keepdims=True)
            return h / tf.sqrt(tf.reduce_mean((h - mean) ** 2, axes, keepdims=True) + eps) * tf.reshape(
                next(params), shape)
        return _affine(_normalize(h, axes, eps), params, shape, scale, center)
    return norm


def group_norm_twin(groups, eps=1e-3):
    def norm(h, params):
        channels = h.shape[-1]
        grouped = tf.reshape(h, [-1, *h.shape[1:-1], groups, channels // groups])
        axes = [a for a in range(1, len(grouped.shape)) if a != len(grouped.shape) - 2]
        h = tf.reshape(_normalize(grouped, axes, eps), [-1, *h.shape[1:]])
        return _affine(h, params, [channels], True, True)
    return norm


def batch_norm_twin(axis=-1, eps=1e-3):
    def norm(h, params):
        channel = axis % len(h.shape)
        shape = [h.shape[a] if a == channel else 1 for a in range(len(h.shape))]
        h = _normalize(h, [a for a in range(len(h.shape)) if a != channel], eps)
        return _affine(h, params, shape, True, True)
    return norm


def _twin_forward(kind, norm, x, params):
    params = iter(params)
    if kind == "conv":
        kernel, bias = next(params), next(params)
        h = tf.tanh(tf.nn.conv2d(x, kernel, strides=1, padding="VALID") + bias)
    else:
        h = tf.tanh(_dense(x, next(params), next(params)))
    h = norm(h, params)
    h = tf.reshape(h, [h.shape[0], -1])
    return _dense(h, next(params), next(params))


def twin_hessian(kind, norm, x, y, values):
    shapes = [v.shape for v in values]
    sizes = [int(np.prod(s)) for s in shapes]

    @tf.function
    def hessian(theta):
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                params = [tf.reshape(p, s) for p, s in zip(tf.split(theta, sizes), shapes)]
                loss = mse(y, _twin_forward(kind, norm, x, params))
            grad = inner.gradient(loss, theta)
        return outer.jacobian(grad, theta, experimental_use_pfor=False)

    return hessian(tf.concat([tf.reshape(v, [-1]) for v in values], 0)).numpy()


def mse(y, out):
    return tf.reduce_mean(tf.reduce_sum((out - y) ** 2, axis=-1))


def make_data(kind, rng):
    shape = {"conv": (N, 5, 5, 2), "sequence": (N, 4, 3), "dense": (N, 5)}[kind]
    return tf.constant(rng.standard_normal(shape)), tf.constant(rng.standard_normal((N, 2)))


def flat(parts):
    return np.concatenate([np.reshape(p, [-1]) for p in parts])


def split(vector, variables):
    sizes = [int(np.prod(v.shape)) for v in variables]
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return [tf.constant(np.reshape(p, v.shape)) for p, v in zip(parts, variables)]


def products(model, objective, variables, vectors, *, patched):
    """Forward-over-back and back-over-back products for each row of `vectors`."""
    tangents = [split(v, variables) for v in vectors]
    stacked = [tf.stack(parts) for parts in zip(*tangents)]
    with exact_second_derivatives(model) if patched else contextlib.nullcontext():
        fob = np.stack([flat(forward_over_back(objective, variables, t)) for t in tangents])
        bob = np.stack([flat([p[j] for p in back_over_back(objective, variables, stacked)])
                        for j in range(len(vectors))])
    return fob, bob
