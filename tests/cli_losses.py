"""A custom loss and a custom layer for the command-line tests, imported as `tests.cli_losses`."""

import keras
import tensorflow as tf


def focal(y_true, y_pred):
    """Per-example focal loss (γ = 2) on logits with integer labels: −(1 − p_y)² log p_y."""
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    log_p_y = tf.gather(tf.nn.log_softmax(y_pred), labels, batch_dims=1)
    return -tf.square(1.0 - tf.exp(log_p_y)) * log_p_y


class Scale(keras.layers.Layer):
    """Multiplies its input by a learned vector: a custom layer that loads only with --custom-objects."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * self.scale
