"""The training objective: a Keras model, a per-example loss, and regularisation.

    R(θ) = Σᵢ wᵢ ℓ(zᵢ, θ) / Σᵢ wᵢ  +  Σ weight regularisers (model.losses)  +  (l2/2)·‖θ‖²

`Objective` knows how to evaluate per-example losses and the data-independent part Ω(θ); it holds
no data and no curvature. Sums over data live in `hvp.py` and `operators.py`.
"""

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError, NotFiniteError


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
        self.loss_name, self._loss_fn = _resolve_loss(loss, model)

    def outputs(self, x):
        return self.model(x, training=self.training)

    def per_example_loss(self, y, outputs):
        """Per-example losses `[batch]`; extra axes (e.g. time steps) are averaged."""
        losses = tf.convert_to_tensor(self._loss_fn(y, outputs))
        if losses.shape.rank is not None and losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        return losses

    def weighted_loss_sum(self, x, y, w):
        """`Σᵢ wᵢ ℓᵢ` over one batch."""
        losses = self.per_example_loss(y, self.outputs(x))
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
        _check_labels(self.loss_name, y, outputs, name)
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


def _resolve_loss(loss, model):
    module = _keras_module(model)
    if isinstance(loss, str):
        try:
            resolved = module.losses.get(loss)
        except (ValueError, TypeError) as e:
            raise InputError(
                f"Unknown loss name {loss!r}. Use a Keras loss name such as "
                "'sparse_categorical_crossentropy', 'binary_crossentropy' or 'mse', or pass a callable."
            ) from e
        if resolved is None:
            raise InputError(f"Unknown loss name {loss!r}.")
        name = loss
        loss = resolved
    else:
        name = getattr(loss, "name", None) or getattr(loss, "__name__", type(loss).__name__)
    if hasattr(loss, "call") and hasattr(loss, "get_config"):  # a Keras Loss instance
        return name, loss.call
    if callable(loss):
        return name, loss
    raise InputError(
        f"loss must be a Keras loss, a loss name, or a callable returning per-example losses. "
        f"Received: {type(loss).__name__}."
    )


def _keras_module(model):
    if type(model).__module__.startswith("tf_keras") or any(
        c.__module__.startswith("tf_keras") for c in type(model).__mro__
    ):
        import tf_keras

        return tf_keras
    import keras

    return keras


def _weight_regularization(model):
    if hasattr(model, "_get_regularization_losses"):  # Keras 3: fresh regulariser(variable) terms
        return list(model._get_regularization_losses())
    return [t for t in model.losses]  # tf-keras: callable weight losses, evaluated on access


def _check_labels(loss_name, y, outputs, name):
    """Label checks for the common Keras losses, where Keras itself would silently misbehave."""
    key = str(loss_name).lower().replace("_", "")
    if not isinstance(y, tf.Tensor) or not isinstance(outputs, tf.Tensor):
        return
    if "sparsecategorical" in key:
        num_classes = outputs.shape[-1]
        values = tf.cast(y, tf.float64)
        integral = bool(tf.reduce_all(tf.equal(values, tf.round(values))))
        if not integral or not y.dtype.is_integer and not y.dtype.is_floating:
            raise InputError(
                f"{name}: {loss_name!r} needs integer class labels. Received dtype {y.dtype.name} "
                "with non-integer values; use one-hot labels with 'categorical_crossentropy' instead."
            )
        lo, hi = float(tf.reduce_min(values)), float(tf.reduce_max(values))
        if num_classes is not None and (lo < 0 or hi >= num_classes):
            raise InputError(
                f"{name}: class labels must lie in [0, {num_classes}) for a model with {num_classes} "
                f"outputs. Received labels in [{lo:g}, {hi:g}]."
            )
        if y.shape.rank is not None and y.shape.rank > 1 and y.shape[-1] != 1:
            raise InputError(
                f"{name}: {loss_name!r} needs labels of shape [batch] or [batch, 1]. Received "
                f"{tuple(y.shape)}; one-hot labels go with 'categorical_crossentropy'."
            )
    elif "categoricalcrossentropy" in key or key in ("kldivergence", "kld"):
        if tuple(y.shape) != tuple(outputs.shape):
            raise InputError(
                f"{name}: {loss_name!r} needs one-hot labels shaped like the output "
                f"{tuple(outputs.shape)}. Received {tuple(y.shape)}; integer labels go with "
                "'sparse_categorical_crossentropy'."
            )
    elif "binarycrossentropy" in key or "binaryfocal" in key:
        values = tf.cast(y, tf.float64)
        if bool(tf.reduce_any((values < 0) | (values > 1))):
            raise InputError(f"{name}: {loss_name!r} needs labels in [0, 1]. Received values outside it.")
    if y.dtype == tf.string:
        raise InputError(f"{name}: labels are strings; encode them as numbers first.")
