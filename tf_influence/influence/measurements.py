"""Measurements: the per-example quantity of the model whose change is attributed to the training data.

By default influence attributes the test *loss*. A measurement `m(y, f(x)) -> [batch]` (a class
margin, a logit, a probability, one output of several, any function of the outputs and labels)
replaces the loss on the TEST side only (docs/mathematics.md, "Measurements"):

    score(z_test, zᵢ) = σ · ∇m(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)

H and the training gradients ∇ℓ(zᵢ) stay those of the training objective (removing zᵢ moves θ the
same way whatever is measured). σ orients the score so that **a positive score always means the
training example helped**: σ = +1 for a measurement where lower is better (the loss), σ = −1 for
one where higher is better (margin, logit, probability, and a plain function by default). Removing
zᵢ changes the measurement by `Δm = σ · score · wᵢ/Σw` (`Influence.predicted_change`).

Named shortcuts, for classifiers whose last output axis holds C class scores (or one unit for
binary labels y ∈ {0, 1}), with labels as class ids, `[..., 1]` class ids or one-hot rows:

  "margin"       z_c − log Σ_{j≠c} exp z_j = log(p_c / (1 − p_c)), the margin of TRAK
                 (MadryLab/trak, trak/modelout_functions.py, `ImageClassificationModelOutput`),
                 which kronfluence's examples use as their measurement (negated, as a cost). A smooth
                 version of "correct logit minus the largest other logit". Binary: (2y − 1)·z.
  "logit"        z_c, the correct class's logit. Binary: (2y − 1)·z (the log-odds of the label).
  "probability"  p_c = softmax(z)_c. Binary: sigmoid((2y − 1)·z).
  an output name the value of that output of a multi-output model (shape [batch] or [batch, 1]).

Models that output probabilities (`from_logits=False` in their loss) are supported for "margin"
(log-probabilities give the same margin: it is unchanged by adding a constant to every logit) and
"probability"; "logit" is refused (logits cannot be recovered from probabilities). Whether outputs
are logits is read from the loss (`from_logits` of a Keras loss, a `functools.partial` or the loss
function's default); pass `margin(from_logits=...)` when the loss does not say.
"""

import functools
import inspect

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError

SHORTCUTS = ("margin", "logit", "probability")


class Measurement:
    """A per-example scalar of the model's outputs and labels, and which direction of it is good.

    Args:
      fn: `fn(y_true, y_pred) -> [batch]` (extra axes, e.g. time steps, are averaged). `y_pred` is
        what the model returns (a tensor, or a list / dict for multi-output models).
      name: a display name (default: the function's name).
      higher_is_better: True (default) when a larger value is better (a margin, a logit, a
        probability): a positive score then means the training example raised the measurement.
        False for loss-like measurements: a positive score means the example lowered it.

    Attributes:
      orientation: σ = −1 when higher is better, +1 otherwise; `cost = σ·m` is lower-is-better.
      is_loss: True only for the training loss itself (the default measurement).

    Example:
      >>> m = tfi.Measurement(lambda y, out: out[:, 3], name="logit of class 3")
      >>> inf = tfi.Influence(model, loss, train, measurement=m)
      >>> inf.scores(test)          # positive: the training example raised the class-3 logit
    """

    is_loss = False

    def __init__(self, fn, *, name=None, higher_is_better=True):
        if not callable(fn):
            raise InputError(f"A Measurement needs a function fn(y_true, y_pred) -> [batch]. Received "
                             f"{type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.higher_is_better = bool(higher_is_better)

    @property
    def orientation(self):
        return -1.0 if self.higher_is_better else 1.0

    def __call__(self, y, outputs):
        """The measurement `[batch]` (extra axes averaged)."""
        values = tf.convert_to_tensor(self.fn(y, outputs))
        if values.shape.rank is not None and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    def cost(self, y, outputs):
        """`σ·m`: lower is better, like a loss; its gradients are what test points are scored with."""
        values = self(y, outputs)
        return values if not self.higher_is_better else -values

    def bind(self, objective):
        """This measurement, with anything that depends on the model or loss resolved (here: itself)."""
        return self

    def __repr__(self):
        return f"Measurement({self.name!r}, higher_is_better={self.higher_is_better})"


class _Loss(Measurement):
    """The training loss as the measurement (the default)."""

    is_loss = True

    def __init__(self, objective):
        super().__init__(objective.per_example_loss, name="loss", higher_is_better=False)


class _Classification(Measurement):
    """margin / logit / probability of the labelled class, resolved against the model's loss by `bind`."""

    def __init__(self, kind, *, output=None, from_logits=None):
        self.kind, self.output, self.from_logits = kind, output, from_logits
        name = kind if output is None else f"{kind}[{output}]"
        super().__init__(self._unbound, name=name, higher_is_better=True)

    def _unbound(self, y, outputs):
        raise InputError(f"Measurement {self.name!r} must be bound to a model first (Influence does this).")

    def bind(self, objective):
        from_logits = self.from_logits if self.from_logits is not None else loss_from_logits(objective.loss_function)
        if from_logits is None:
            raise InputError(
                f"measurement={self.kind!r} needs to know whether the model outputs logits or probabilities, and "
                f"the loss {objective.loss_name!r} does not say (no from_logits). Pass "
                f"tfi.measurements.{self.kind}(from_logits=True) (or False).")
        if self.kind == "logit" and not from_logits:
            raise InputError(
                "measurement='logit' needs the model's logits, but its loss takes probabilities (from_logits=False) "
                "and logits cannot be recovered from probabilities. Use 'margin' (the same for logits and "
                "log-probabilities) or 'probability', or a model that outputs logits.")
        pick = _output_picker(objective.model, self.output)
        fn = functools.partial(_class_measurement, self.kind, from_logits, pick)
        return Measurement(fn, name=self.name, higher_is_better=True)


class _OutputValue(Measurement):
    """The value of one named output of a multi-output model."""

    def __init__(self, output):
        self.output = output
        super().__init__(self._unbound, name=str(output), higher_is_better=True)

    def _unbound(self, y, outputs):
        raise InputError(f"Measurement {self.name!r} must be bound to a model first (Influence does this).")

    def bind(self, objective):
        pick = _output_picker(objective.model, self.output)
        name = self.output

        def value(y, outputs):
            out = pick(outputs)[1]
            if out.shape.rank is not None and (out.shape.rank > 2 or out.shape.rank == 2 and out.shape[-1] != 1):
                raise InputError(
                    f"measurement={name!r} takes the value of output {name!r}, which has shape {tuple(out.shape)}; "
                    f"a per-example scalar ([batch] or [batch, 1]) is needed. Use tfi.measurements.margin(output="
                    f"{name!r}) for a classifier output, or a Measurement function that reduces it.")
            return tf.reshape(out, [-1])

        return Measurement(value, name=self.name, higher_is_better=True)


def margin(*, output=None, from_logits=None):
    """The margin `z_c − log Σ_{j≠c} exp z_j` of the labelled class c (TRAK's; see the module docstring).

    Args:
      output: for multi-output models, the output (name or dict key) it is taken of.
      from_logits: whether the model outputs logits (default: as its loss says).
    """
    return _Classification("margin", output=output, from_logits=from_logits)


def logit(*, output=None, from_logits=None):
    """The labelled class's logit `z_c` (binary one-unit outputs: `(2y − 1)·z`); refused for probabilities."""
    return _Classification("logit", output=output, from_logits=from_logits)


def probability(*, output=None, from_logits=None):
    """The probability the model gives the labelled class."""
    return _Classification("probability", output=output, from_logits=from_logits)


def output_value(output):
    """The value of the output named `output` (a per-example scalar) of a multi-output model."""
    return _OutputValue(output)


def resolve_measurement(measurement, objective):
    """The bound `Measurement` for `measurement` (None or "loss": the training loss).

    Args:
      measurement: None / "loss", "margin", "logit", "probability", an output name, a `Measurement`,
        or a function `fn(y_true, y_pred) -> [batch]` (higher is better).
      objective: the `Objective` of the model and loss.

    Returns:
      A `Measurement` (`is_loss` True for the loss).
    """
    if measurement is None or measurement == "loss":
        return _Loss(objective)
    if isinstance(measurement, Measurement):
        return measurement.bind(objective)
    if isinstance(measurement, str):
        if measurement in SHORTCUTS:
            return _Classification(measurement).bind(objective)
        names = output_names(objective.model)
        if measurement not in names:
            raise InputError(
                f"Unknown measurement {measurement!r}. Expected 'loss', {', '.join(repr(s) for s in SHORTCUTS)}, "
                f"an output name of the model ({names or 'it has one unnamed output'}), a tfi.Measurement or a "
                "function fn(y_true, y_pred) -> [batch].")
        return _OutputValue(measurement).bind(objective)
    if callable(measurement):
        return Measurement(measurement)
    raise InputError(f"measurement must be None, a name, a tfi.Measurement or a function fn(y_true, y_pred). "
                     f"Received {type(measurement).__name__}.")


class MeasuredObjective:
    """The objective with the measurement's cost `σ·m` in place of the per-example loss.

    What test-side gradients are taken of: `per_example_loss(y, outputs)` returns `measurement.cost`.
    It has the `outputs` / `per_example_loss` of an `Objective`, so gradient code takes either.
    """

    def __init__(self, objective, measurement):
        self.objective = objective
        self.measurement = measurement
        self.model = objective.model
        self.training = objective.training

    def outputs(self, x):
        return self.objective.outputs(x)

    def per_example_loss(self, y, outputs):
        return self.measurement.cost(y, outputs)

    def validate(self, batch, name="test"):
        """Checks the measurement on one batch: it is computable, has shape [batch] and is finite."""
        x, y, w = batch
        n = int(tf.shape(w)[0])
        try:
            values = self.measurement(y, self.outputs(x))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise InputError(f"The measurement {self.measurement.name!r} could not be computed on {name}: "
                             f"{type(e).__name__}: {e}") from e
        if tuple(values.shape) != (n,):
            raise InputError(f"The measurement {self.measurement.name!r} returned shape {tuple(values.shape)} on "
                             f"{name}; expected one value per example, shape [{n}].")
        if not bool(tf.reduce_all(tf.math.is_finite(values))):
            raise InputError(f"The measurement {self.measurement.name!r} is NaN/Inf on the first batch of {name}.")


def loss_from_logits(loss_function):
    """True / False when the loss says whether it takes logits (`from_logits`), else None."""
    owner = getattr(loss_function, "__self__", None)  # a Keras Loss's bound `call`
    if owner is not None and hasattr(owner, "get_config"):
        config = owner.get_config()
        if "from_logits" in config:
            return bool(config["from_logits"])
    if isinstance(loss_function, functools.partial):
        if "from_logits" in loss_function.keywords:
            return bool(loss_function.keywords["from_logits"])
        loss_function = loss_function.func
    try:
        parameter = inspect.signature(loss_function).parameters.get("from_logits")
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return bool(parameter.default)


def output_names(model):
    """The names by which a multi-output model's outputs can be chosen (empty for one output)."""
    names = list(getattr(model, "output_names", None) or [])
    return names if len(names) > 1 else []


def _output_picker(model, output):
    """`fn(outputs) -> (key, tensor)`: selects one output (and remembers its key for the labels)."""
    names = list(getattr(model, "output_names", None) or [])

    def pick(outputs):
        if isinstance(outputs, dict):
            keys = list(outputs)
            if output is None and len(keys) == 1:
                return keys[0], outputs[keys[0]]
            if output in outputs:
                return output, outputs[output]
            if output in names and len(names) == len(keys):
                key = keys[names.index(output)]
                return key, outputs[key]
            raise InputError(f"The model has outputs {keys}; choose one with output=NAME. Received output={output!r}.")
        if isinstance(outputs, (list, tuple)):
            if output is None and len(outputs) == 1:
                return 0, outputs[0]
            if output in names and len(names) == len(outputs):
                return names.index(output), outputs[names.index(output)]
            raise InputError(f"The model has {len(outputs)} outputs {names}; choose one with output=NAME. "
                             f"Received output={output!r}.")
        if output is not None and output not in names:
            raise InputError(f"output={output!r} is not an output of the model (it has one output {names}).")
        return None, outputs

    return pick


def _labels_for(y, key):
    if key is None or not isinstance(y, (dict, list, tuple)):
        return y
    return y[key]


def _class_measurement(kind, from_logits, pick, y, outputs):
    """margin / logit / probability of the labelled class, per example (and per position)."""
    key, scores = pick(outputs)
    y = tf.convert_to_tensor(_labels_for(y, key))
    scores = tf.convert_to_tensor(scores)
    if scores.shape.rank is None or scores.shape.rank < 1:
        raise InputError(f"measurement={kind!r} needs class scores with a class axis; the output has shape "
                         f"{tuple(scores.shape)}.")
    if scores.shape[-1] == 1 or scores.shape.rank == 1:  # one unit: binary labels in {0, 1}
        z = scores[..., 0] if scores.shape.rank > 1 and scores.shape[-1] == 1 else scores
        if not from_logits:
            p = tf.clip_by_value(z, _tiny(z.dtype), 1.0 - _eps(z.dtype))
            z = tf.math.log(p) - tf.math.log1p(-p)
        labels = tf.cast(tf.reshape(y, tf.shape(z)), z.dtype)
        signed = (2.0 * labels - 1.0) * z
        return tf.math.sigmoid(signed) if kind == "probability" else signed
    classes = scores.shape[-1]
    if y.shape.rank == scores.shape.rank and y.shape[-1] == classes:  # one-hot rows
        y = tf.argmax(y, axis=-1)
    elif y.shape.rank == scores.shape.rank and y.shape[-1] == 1:
        y = y[..., 0]
    if y.shape.rank != scores.shape.rank - 1:
        raise InputError(f"measurement={kind!r} needs class labels of shape {tuple(scores.shape[:-1])} (class ids) or "
                         f"one-hot rows {tuple(scores.shape)}. Received labels of shape {tuple(y.shape)}.")
    onehot = tf.cast(tf.one_hot(tf.cast(y, tf.int32), classes), tf.bool)
    if kind == "probability":
        probs = tf.nn.softmax(scores, axis=-1) if from_logits else scores
        return tf.reduce_sum(tf.where(onehot, probs, tf.zeros_like(probs)), axis=-1)
    z = scores if from_logits else tf.math.log(tf.maximum(scores, _tiny(scores.dtype)))
    correct = tf.reduce_sum(tf.where(onehot, z, tf.zeros_like(z)), axis=-1)
    if kind == "logit":
        return correct
    others = tf.where(onehot, tf.fill(tf.shape(z), tf.constant(-float("inf"), z.dtype)), z)
    return correct - tf.reduce_logsumexp(others, axis=-1)


def _tiny(dtype):
    return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).tiny)


def _eps(dtype):
    return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps)
