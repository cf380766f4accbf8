"""Checks that a model, its loss and its outputs fit together: warnings where numbers would silently be wrong.

Each function looks at one batch (the first of the training data) and returns a message, or None
when all is well; `Objective.check_model` turns the messages into warnings.

  logits_mismatch    a `from_logits=True` loss given probabilities (a softmax/sigmoid output), or a
                     probability loss (`from_logits=False`, the default of loss names) given logits:
                     Keras computes a different loss without a word.
  saturated_losses   cross-entropy losses that are exactly 0: the outputs are so large that the
                     probabilities round to 1, the gradients to 0, and those examples' scores to 0.
  nondeterministic   the model called twice with `training=True` gives different outputs (Dropout,
                     GaussianNoise, random augmentation): every gradient and curvature product is random.
"""

import numpy as np
import tensorflow as tf

from tf_influence.layers import leaf_layers
from tf_influence.losses import from_logits

_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")
_STOCHASTIC = ("Dropout", "Noise", "Random")


def logits_mismatch(loss, loss_name, outputs, model=None):
    """A message when a cross-entropy's `from_logits` does not match what the model outputs, else None.

    `model` (optional) lets the activation of its last layer count as evidence (single-output models).
    """
    key = str(loss_name).lower().replace("_", "")
    logits = from_logits(loss)
    if "crossentropy" not in key or logits is None or not isinstance(outputs, tf.Tensor):
        return None
    values = outputs.numpy().astype(np.float64)
    if values.size == 0:
        return None
    in_unit = bool(np.all((values >= 0) & (values <= 1)))
    multiclass = values.ndim >= 2 and values.shape[-1] > 1 and "binary" not in key
    sums_to_one = multiclass and bool(np.all(np.abs(values.sum(axis=-1) - 1) <= 1e-3))
    activation = _output_activation(model) if model is not None else None
    looks_like_probabilities = (in_unit and sums_to_one) or activation in _PROBABILITY_ACTIVATIONS
    if logits and looks_like_probabilities:
        why = f"its last layer has a {activation} activation" if activation in _PROBABILITY_ACTIVATIONS else (
            "they lie in [0, 1] and sum to 1 over the last axis")
        return (f"The loss {loss_name!r} has from_logits=True, but the model's outputs look like probabilities "
                f"({why}). Keras then applies a second softmax/sigmoid and the losses, gradients and scores are not "
                "those the model was trained with. Use from_logits=False, or remove the output activation.")
    if not logits and (not in_unit or (multiclass and not sums_to_one)):
        how = ("some lie outside [0, 1]" if not in_unit else "they do not sum to 1 over the last axis")
        return (f"The loss {loss_name!r} expects probabilities (from_logits=False, the default of Keras loss "
                f"names), but the model's outputs look like logits ({how}; range [{values.min():.3g}, "
                f"{values.max():.3g}]). Keras then clips or renormalises them and the losses, gradients and scores "
                f"are not those of a logits model. Pass a loss object with from_logits=True, e.g. "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
    return None


def saturated_losses(loss_name, losses, outputs, name):
    """A message when cross-entropy losses are exactly 0 (saturated outputs whose gradients vanish), else None."""
    key = str(loss_name).lower().replace("_", "")
    if "crossentropy" not in key:
        return None
    values = np.asarray(losses)
    zero = int(np.sum(values == 0))
    if zero == 0:
        return None
    largest = max(float(np.max(np.abs(o.numpy()))) for o in tf.nest.flatten(outputs))
    return (f"{zero} of {values.size} examples in the first batch of {name} have a {loss_name!r} loss of exactly 0 "
            f"in {losses.dtype.name}: the outputs are saturated (largest |output| {largest:.3g}), so these examples' "
            "probabilities round to 1, their gradients to 0 and their influence scores will be 0. Usual causes: "
            "very large weights (e.g. scaled up, or diverged training) or a badly overfit model. Check the model, or "
            "compute in float64 (keras.config.set_floatx('float64') before building it).")


def nondeterministic(model, call, x, name):
    """A message when the model is random in training mode (two identical calls `call(x)` differ, or it
    has stochastic layers whose random state the stateless evaluation freezes), else None."""
    first = [t.numpy() for t in tf.nest.flatten(call(x))]
    second = [t.numpy() for t in tf.nest.flatten(call(x))]
    difference = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(first, second))
    layers = [layer.name for layer in leaf_layers(model) if any(s in type(layer).__name__ for s in _STOCHASTIC)]
    which = f" (stochastic layers: {layers})" if layers else ""
    if difference == 0 and not layers:
        return None
    if difference == 0:  # evaluated statelessly: one random draw (e.g. one dropout mask), frozen
        return (f"The model is called with training=True and is random{which}: tf_influence evaluates it "
                "without advancing its random state, so every loss, gradient and curvature product uses one "
                "frozen draw (e.g. one dropout mask), a model that is neither the trained nor the served one; "
                "two identical runs agree only because the draw is frozen. Use training=False (the default), "
                "which turns Dropout and noise layers off.")
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in first)
    return (f"The model is called with training=True and is random: two identical calls on the first batch of "
            f"{name} differ by up to {difference:.3g} (outputs up to {scale:.3g}){which}. Every loss, gradient and "
            "curvature product is then a random draw, so two identical runs give different scores. Use "
            "training=False (the default), which turns Dropout and noise layers off.")


def _output_activation(model):
    """The name of the activation of the model's last leaf layer ("softmax", "sigmoid", ...), or None."""
    layers = list(leaf_layers(model))
    if not layers:
        return None
    last = layers[-1]
    activation = getattr(last, "activation", None)
    if activation is None and type(last).__name__ in ("Softmax",):
        return "softmax"
    name = getattr(activation, "__name__", None) if callable(activation) else activation
    return str(name).lower() if name else None
