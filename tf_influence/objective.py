"""The training objective: a Keras model, a per-example loss, and regularisation.

    R(θ) = Σᵢ wᵢ ℓ(zᵢ, θ) / Σᵢ wᵢ  +  Σ weight regularisers (model.losses)  +  (l2/2)·‖θ‖²

`Objective` knows how to evaluate per-example losses and the data-independent part Ω(θ); it holds
no data and no curvature. `Problem` joins it with the data and the selected variables.
"""

import contextlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_influence import loss_checks
from tf_influence.errors import InputError, NotFiniteError
from tf_influence.losses import check_labels, resolve_loss
from tf_influence.output_losses import OutputLosses


class Objective:
    """A model with a per-example loss and regularisation.

    Args:
      model: a built Keras model (Sequential, Functional or subclassed; Keras 3 or tf-keras).
      loss: a Keras loss instance, a loss name (`"sparse_categorical_crossentropy"`, `"mse"`, ...),
        or a callable `fn(y_true, y_pred) -> [batch]` of per-example losses; labels and outputs
        are rank-aligned as Keras aligns them. For a multi-output model, a dict
        `{output_name: loss}` or a list with one loss per output, as in `model.compile`.
      l2: coefficient of the extra `(l2/2)·‖θ‖²` term over the selected variables.
      training: value of the `training` argument the model is called with (default False, so
        dropout is off and BatchNormalization uses its moving statistics).
      loss_weights: for per-output losses, a dict or list of weights (default 1 each): the
        per-example loss is `Σ_k w_k ℓ_k`, as `model.compile(loss_weights=...)` trains.

    Example:
      >>> objective = Objective(model, "sparse_categorical_crossentropy", l2=1e-3)
      >>> losses = objective.per_example_loss(y, objective.outputs(x))   # [batch]
    """

    def __init__(self, model, loss, *, l2=0.0, training=False, loss_weights=None):
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
        self.loss = loss
        self.loss_weights = loss_weights
        self.loss_name, self.loss_function = resolve_loss(loss, model, loss_weights)

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

    @property
    def needs_autograph(self):
        """False for Keras 3 models: Keras 3 runs them without AutoGraph (its trainer's steps are
        `do_not_convert`), so traced functions skip AutoGraph's conversion of every Python function
        they call (about half of the first trace of a curvature product). tf-keras models may rely on it.
        """
        return not self.can_substitute

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
        return _per_example(tf.convert_to_tensor(self.loss_function(y, outputs)))

    def weighted_loss_sum(self, x, y, w, values=None):
        """`Σᵢ wᵢ ℓᵢ` over one batch (at the variable `values` given, see `outputs`)."""
        losses = self.per_example_loss(y, self.outputs(x, values))
        return tf.reduce_sum(tf.cast(w, losses.dtype) * losses)

    def regularization(self, variables, *, l2=True):
        """Ω(θ): the model's weight regularisers plus `(l2/2)·‖θ‖²` over `variables` (without it if `l2=False`)."""
        terms = [tf.cast(t, variables[0].dtype) for t in _weight_regularization(self.model)]
        if self.l2 and l2:
            terms.append(0.5 * self.l2 * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables]))
        if not terms:
            return tf.constant(0.0, dtype=variables[0].dtype)
        return tf.add_n(terms)

    def compiled_key(self):
        """`(identity, options)`: what identifies this objective's traced graphs (`tf_influence.compiled`).

        The model by identity; the loss by value when it can be (a name, or a Keras loss's class and
        config, so that a fresh `SparseCategoricalCrossentropy(from_logits=True)` is the same loss),
        else by identity; the training flag, l2, loss weights; an `Objective` subclass by identity.
        """
        identity = [self.model] + ([] if type(self) is Objective else [self])
        options = (_loss_key(self.loss, identity), repr(self.training), self.l2, repr(self.loss_weights))
        return identity, options

    def validate(self, batch, name="data"):
        """Checks one batch eagerly so that problems surface with a clear message, not deep in a graph.

        Returns the model's outputs on the batch (`check_model` can take them instead of a second pass).
        """
        x, y, w = batch
        shapes = lambda s: tf.nest.map_structure(lambda t: tuple(t.shape), s)  # noqa: E731
        try:
            outputs = self.outputs(x)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise InputError(
                f"The model could not be called on {name}: x has shape {shapes(x)}. "
                f"Expected inputs matching the model's input shape. Original error: {e}"
            ) from e
        multi_output = isinstance(outputs, (list, tuple, dict)) and not isinstance(self.loss_function, OutputLosses)
        hint = ""
        if multi_output:
            names = list(outputs) if isinstance(outputs, dict) else list(getattr(self.model, "output_names", []))
            hint = (f" The model has {len(outputs)} outputs {names}: give one loss per output as in model.compile, "
                    f"loss={{{', '.join(repr(n) + ': ...' for n in names)}}} (or a list in output order), and "
                    "optionally loss_weights (same keys); the per-example loss is then Σ_k w_k·ℓ_k.")
            if isinstance(self.loss, str) or hasattr(self.loss, "get_config"):
                raise InputError(f"The loss {self.loss_name!r} is one loss for one output.{hint}")
        for loss_name, labels, output in self._label_pairs(y, outputs):
            check_labels(loss_name, labels, output, name)
        try:
            losses = self.per_example_loss(y, outputs)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"The loss {self.loss_name!r} could not be computed on {name}: labels y have shape "
                f"{shapes(y)} and dtype {tf.nest.map_structure(lambda t: t.dtype.name, y)}; the model's "
                f"output has shape {shapes(outputs)}. Original error: {e}{hint}"
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
        return outputs

    def check_model(self, batch, name="data", *, outputs=None):
        """Warns (once, on one batch) where the numbers would silently not be what the user means.

        A `from_logits` setting that does not match the outputs, cross-entropy losses saturated to
        exactly 0, and a random model (stochastic layers run with `training=True`); see
        `tf_influence.loss_checks`. Returns the messages.
        """
        x, y, _ = batch
        outputs = self.outputs(x) if outputs is None else outputs  # `validate`'s, on the same batch
        messages = []
        if isinstance(self.loss_function, OutputLosses):
            parts = [(self.loss_function.losses[key], loss_name, fn, labels, output, None)
                     for key, loss_name, fn, _, labels, output in self.loss_function.parts(y, outputs)]
        else:
            parts = [(self.loss, self.loss_name, self.loss_function, y, outputs, self.model)]
        for loss, loss_name, fn, labels, output, model in parts:
            messages.append(loss_checks.logits_mismatch(loss, loss_name, output, model))
            losses = _per_example(tf.convert_to_tensor(fn(labels, output)))
            messages.append(loss_checks.saturated_losses(loss_name, losses, output, name))
        if self.training:
            messages.append(loss_checks.nondeterministic(self.model, self.outputs, x, name))
        messages = [m for m in messages if m]
        for message in messages:
            warnings.warn(message, stacklevel=3)
        return messages

    def _label_pairs(self, y, outputs):
        if isinstance(self.loss_function, OutputLosses):
            return [(loss_name, labels, output)
                    for _, loss_name, _, _, labels, output in self.loss_function.parts(y, outputs)]
        return [(self.loss_name, y, outputs)]


def _loss_key(loss, identity):
    """A hashable description of `loss`; losses known only by identity are appended to `identity`."""
    if isinstance(loss, str):
        return ("name", loss)
    if isinstance(loss, dict):
        return ("dict",) + tuple((repr(k), _loss_key(v, identity)) for k, v in loss.items())
    if isinstance(loss, (list, tuple)):
        return ("list",) + tuple(_loss_key(v, identity) for v in loss)
    module = type(loss).__module__
    wrapped = getattr(loss, "fn", None)  # LossFunctionWrapper: a user's function is known only by identity
    keras_only = all(getattr(t, "__module__", "keras").split(".")[0] in ("keras", "tf_keras") for t in (loss, wrapped)
                     if t is not None)
    if callable(getattr(loss, "get_config", None)) and module.split(".")[0] in ("keras", "tf_keras") and keras_only:
        # A built-in Keras loss: its class and config determine what it computes.
        return ("keras", module, type(loss).__qualname__, repr(sorted(loss.get_config().items())))
    identity.append(loss)
    return ("object", len(identity) - 1)


def _per_example(losses):
    if losses.shape.rank is not None and losses.shape.rank > 1:
        losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
    return losses


def _weight_regularization(model):
    if hasattr(model, "_get_regularization_losses"):  # Keras 3: fresh regulariser(variable) terms
        return list(model._get_regularization_losses())
    return [t for t in model.losses]  # tf-keras: callable weight losses, evaluated on access
