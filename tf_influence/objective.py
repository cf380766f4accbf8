"""The training objective: a Keras model, a per-example loss, and regularisation.

    R(θ) = Σᵢ wᵢ ℓ(zᵢ, θ) / Σᵢ wᵢ  +  Σ weight regularisers (model.losses)  +  (l2/2)·‖θ‖²

`Objective` knows how to evaluate per-example losses and the data-independent part Ω(θ); it holds
no data and no curvature. `Problem` joins it with the data and the selected variables.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError, NotFiniteError
from tf_influence.losses import check_labels, resolve_loss


class Objective:
    """A model with a per-example loss and regularisation.

    Args:
      model: a built Keras model (Sequential, Functional or subclassed; Keras 3 or tf-keras).
      loss: a Keras loss instance, a loss name (`"sparse_categorical_crossentropy"`, `"mse"`, ...),
        or a callable `fn(y_true, y_pred) -> [batch]` of per-example losses.
      l2: coefficient of the extra `(l2/2)·‖θ‖²` term over the selected variables.
      training: value of the `training` argument the model is called with (default False, so
        dropout is off and BatchNormalization uses its moving statistics).

    Example:
      >>> objective = Objective(model, "sparse_categorical_crossentropy", l2=1e-3)
      >>> losses = objective.per_example_loss(y, objective.outputs(x))   # [batch]
    """

    def __init__(self, model, loss, *, l2=0.0, training=False):
        if not callable(model) or not hasattr(model, "trainable_variables"):
            raise InputError(f"model must be a Keras model. Received: {type(model).__name__}.")
        if not getattr(model, "built", True) or not model.weights:
            raise InputError(
                f"Model {getattr(model, 'name', '')!r} is not built (it has no weights yet). Call it on "
                "a batch or build it with an input shape first."
            )
        l2 = float(l2)
        if not np.isfinite(l2) or l2 < 0:
            raise InputError(f"l2 must be a finite, non-negative number. Received: l2={l2}.")
        self.model = model
        self.l2 = l2
        self.training = training
        self.loss_name, self.loss_function = resolve_loss(loss, model)

    @property
    def has_weight_regularizers(self):
        """True when some trainable weight of the model has a regulariser (a term of `model.losses`)."""
        if hasattr(self.model, "_get_regularization_losses"):  # Keras 3
            return any(getattr(v, "regularizer", None) is not None for v in self.model.trainable_weights)
        return bool(self.model.losses)  # tf-keras

    @property
    def can_substitute(self):
        """True when `outputs(x, values=...)` can evaluate the model at other variable values (Keras 3)."""
        return isinstance(self.model, keras.layers.Layer)

    def outputs(self, x, values=None):
        """The model's outputs on `x`, called with the objective's `training` flag.

        Keras 3 models run in a `keras.StatelessScope`, so a call in training mode never changes the
        model's state (BatchNormalization's moving statistics stay as they are), and `values` can
        stand in for variables without assigning them (traceable, e.g. for finite differences).

        Args:
          x: a batch of inputs.
          values: optional `[(variable, tensor), ...]`: evaluate the model with these tensors in
            place of those (Keras 3) variables. Gradients flow to the tensors.
        """
        if not self.can_substitute:
            if values:
                raise InputError(
                    "Evaluating the model at other variable values needs a Keras 3 model; this is a "
                    f"{type(self.model).__module__.split('.')[0]} model.")
            return self.model(x, training=self.training)
        scope = keras.StatelessScope(state_mapping=list(values or ())) if (values or self.training) else (
            contextlib.nullcontext())
        with scope:
            return self.model(x, training=self.training)

    def per_example_loss(self, y, outputs):
        """Per-example losses `[batch]`; extra axes (e.g. time steps) are averaged."""
        losses = tf.convert_to_tensor(self.loss_function(y, outputs))
        if losses.shape.rank is not None and losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        return losses

    def weighted_loss_sum(self, x, y, w, values=None):
        """`Σᵢ wᵢ ℓᵢ` over one batch (at the variable `values` given, see `outputs`)."""
        losses = self.per_example_loss(y, self.outputs(x, values))
        return tf.reduce_sum(tf.cast(w, losses.dtype) * losses)

    def regularization(self, variables):
        """Ω(θ): the model's weight regularisers plus `(l2/2)·‖θ‖²` over `variables`."""
        terms = [tf.cast(t, variables[0].dtype) for t in _weight_regularization(self.model)]
        if self.l2:
            terms.append(0.5 * self.l2 * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables]))
        if not terms:
            return tf.constant(0.0, dtype=variables[0].dtype)
        return tf.add_n(terms)

    def validate(self, batch, name="data"):
        """Checks one batch eagerly so that problems surface with a clear message, not deep in a graph."""
        x, y, w = batch
        shapes = lambda s: tf.nest.map_structure(lambda t: tuple(t.shape), s)  # noqa: E731
        try:
            outputs = self.outputs(x)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise InputError(
                f"The model could not be called on {name}: x has shape {shapes(x)}. "
                f"Expected inputs matching the model's input shape. Original error: {e}"
            ) from e
        check_labels(self.loss_name, y, outputs, name)
        try:
            losses = self.per_example_loss(y, outputs)
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"The loss {self.loss_name!r} could not be computed on {name}: labels y have shape "
                f"{shapes(y)} and dtype {tf.nest.map_structure(lambda t: t.dtype.name, y)}; the model's "
                f"output has shape {shapes(outputs)}. Original error: {e}"
            ) from e
        n = int(tf.shape(w)[0])
        if losses.shape.rank == 0:
            raise InputError(
                f"The loss {self.loss_name!r} returned a scalar, but per-example losses of shape "
                f"[{n}] are needed. Pass a Keras loss or loss name, or a function that does not "
                "reduce over the batch (e.g. reduction=None)."
            )
        if tuple(losses.shape) != (n,):
            raise InputError(
                f"The loss {self.loss_name!r} returned shape {tuple(losses.shape)}; expected per-example "
                f"losses of shape [{n}]. Check that labels y {shapes(y)} match the model output "
                f"{shapes(outputs)}."
            )
        if not bool(tf.reduce_all(tf.math.is_finite(losses))):
            bad = int(tf.reduce_sum(tf.cast(~tf.math.is_finite(losses), tf.int32)))
            raise NotFiniteError(
                f"The loss is NaN/Inf for {bad} of {n} examples in the first batch of {name}. Check "
                "the inputs for NaN, the labels' range, and whether the model diverged."
            )
        for t in tf.nest.flatten(x):
            if t.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(t))):
                raise NotFiniteError(f"{name}: x contains NaN/Inf values; clean the data first.")


def _weight_regularization(model):
    if hasattr(model, "_get_regularization_losses"):  # Keras 3: fresh regulariser(variable) terms
        return list(model._get_regularization_losses())
    return [t for t in model.losses]  # tf-keras: callable weight losses, evaluated on access
