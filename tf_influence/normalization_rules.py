"""The pieces both normalisation patch tables share: a `Rule` (how one layer class is made exact) and
`moments` without `stop_gradient` (see tf_influence/normalization.py)."""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one normalisation class is made exact.

    Attributes:
      base: the layer class.
      attribute: the instance attribute replaced (a method name, usually "call").
      replacement: `replacement(layer, original) -> function` with the signature of `original`.
      methods: methods the replacement re-implements; a subclass overriding one is left alone.
      training_only: True where the layer uses batch moments only in training mode.
      needed: `needed(layer) -> bool`, False where the layer is exact already.
      unfixed: `unfixed(layer, training) -> bool`, True where the replacement falls back to a
        path whose second derivatives stay wrong.
    """

    base: type
    attribute: str
    replacement: object
    methods: tuple
    training_only: bool = False
    needed: object = lambda layer: True
    unfixed: object = lambda layer, training: False

    def overridden(self, layer):
        return any(getattr(type(layer), name, None) is not getattr(self.base, name, None)
                   for name in self.methods)


def moments(x, axes):
    """Mean and variance over `axes` (kept as size-1 dims), differentiable to every order.

    The same operations as `tf.nn.moments` without its `stop_gradient` on the mean, so the values
    agree bit for bit.

    Args:
      x: a float tensor.
      axes: list of axes to reduce.

    Returns:
      `(mean, variance)`, each shaped like `x` with `axes` of size 1.
    """
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    return mean, variance
