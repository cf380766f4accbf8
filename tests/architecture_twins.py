"""Plain-TensorFlow twins of a small transformer classifier and a BatchNorm ResNet block (float64).

Each twin recomputes its Keras model with my own formulas (one-hot embedding lookup, normalisation
with the mean inside the variance, attention written out with einsum) from a flat parameter
vector in `model.trainable_variables` order, so nested GradientTapes differentiate it correctly to
any order: its dense Hessian and per-example gradients are the references the library's exact
influence is checked against.
"""

import keras
import numpy as np
import tensorflow as tf

L = keras.layers
# KEY_DIM = 4: Keras' TensorFlow backend scales attention logits by tf.cast(1/√key_dim), a float32 constant,
# so only a power-of-four key_dim makes that scale exact in float64.
VOCAB, LENGTH, WIDTH, HEADS, KEY_DIM, CLASSES = 7, 4, 4, 2, 4, 3
EPS = 1e-3  # Keras' default epsilon of LayerNormalization and BatchNormalization


def transformer():
    """Embedding → LayerNormalization → self-attention → average pooling → Dense."""
    tokens = keras.Input((LENGTH,), dtype="int32")
    h = L.Embedding(VOCAB, WIDTH, name="embedding")(tokens)
    h = L.LayerNormalization(name="norm")(h)
    h = L.MultiHeadAttention(HEADS, KEY_DIM, name="attention")(h, h)
    h = L.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, L.Dense(CLASSES, name="head")(h))


def resnet_block():
    """Conv → BN → ReLU → Conv → BN, added to the first activation → ReLU → pooling → Dense (BN in training mode)."""
    inputs = keras.Input((5, 5, 2))
    h = L.Activation("relu")(L.BatchNormalization(name="bn1")(L.Conv2D(3, 3, padding="same", name="conv1")(inputs)))
    r = L.BatchNormalization(name="bn2")(L.Conv2D(3, 3, padding="same", name="conv2")(h))
    h = L.GlobalAveragePooling2D()(L.Activation("relu")(L.Add()([h, r])))
    return keras.Model(inputs, L.Dense(CLASSES, name="head")(h))


def _normalize(h, axes):
    mean = tf.reduce_mean(h, axes, keepdims=True)
    return (h - mean) / tf.sqrt(tf.reduce_mean((h - mean) ** 2, axes, keepdims=True) + EPS)


def transformer_logits(params, tokens):
    embedding, gamma, beta, wq, bq, wk, bk, wv, bv, wo, bo, wd, bd = params
    h = tf.einsum("ntv,vd->ntd", tf.one_hot(tokens, VOCAB, dtype=tf.float64), embedding)
    h = _normalize(h, [-1]) * gamma + beta
    q = (tf.einsum("ntd,dhk->nthk", h, wq) + bq) / np.sqrt(KEY_DIM)
    k = tf.einsum("ntd,dhk->nthk", h, wk) + bk
    v = tf.einsum("ntd,dhk->nthk", h, wv) + bv
    attention = tf.nn.softmax(tf.einsum("nshk,nthk->nhts", k, q), axis=-1)
    out = tf.einsum("nthk,hkd->ntd", tf.einsum("nhts,nshk->nthk", attention, v), wo) + bo
    return tf.reduce_mean(out, axis=1) @ wd + bd


def resnet_logits(params, x):
    k1, b1, g1, e1, k2, b2, g2, e2, wd, bd = params
    conv = lambda h, k, b: tf.nn.conv2d(h, k, 1, "SAME") + b  # noqa: E731
    h = tf.nn.relu(_normalize(conv(x, k1, b1), [0, 1, 2]) * g1 + e1)  # batch statistics (training mode)
    r = _normalize(conv(h, k2, b2), [0, 1, 2]) * g2 + e2
    return tf.reduce_mean(tf.nn.relu(h + r), axis=[1, 2]) @ wd + bd


def cross_entropy(y, logits):
    """Per-example sparse softmax cross-entropy from logits, written out."""
    return tf.reduce_logsumexp(logits, axis=-1) - tf.gather(logits, y, axis=-1, batch_dims=1)


class Twin:
    """A logits function of `(params, x)` with the shapes of a Keras model's trainable variables."""

    def __init__(self, logits, model):
        self.logits = logits
        self.shapes = [tuple(v.shape) for v in model.trainable_variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.theta = tf.constant(np.concatenate([v.numpy().ravel() for v in model.trainable_variables]))

    def params(self, theta):
        return [tf.reshape(p, s) for p, s in zip(tf.split(theta, self.sizes), self.shapes)]

    def losses(self, theta, x, y):
        return cross_entropy(tf.constant(y), self.logits(self.params(theta), tf.constant(x)))

    def hessian(self, x, y):
        """Dense Hessian of the mean loss over (x, y) as one batch, by nested tapes."""
        theta = self.theta
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                loss = tf.reduce_mean(self.losses(theta, x, y))
            grad = inner.gradient(loss, theta)
        return outer.jacobian(grad, theta).numpy()

    def per_example_gradients(self, x, y):
        """`[n, p]`: each example's loss gradient, (x, y) forming one batch."""
        theta = self.theta
        with tf.GradientTape() as tape:
            tape.watch(theta)
            losses = self.losses(theta, x, y)
        return tape.jacobian(losses, theta).numpy()
