"""Per-output losses of a multi-output model, combined as `model.compile(loss=..., loss_weights=...)` does.

Keras trains a model with outputs `f₁, …, f_K` on `Σ_k w_k · mean_i ℓ_k(y_{k,i}, f_{k,i})`, so the
per-example loss whose influence is taken is `ℓᵢ = Σ_k w_k ℓ_k(y_{k,i}, f_{k,i})` (each `ℓ_k` averaged
over its non-batch axes, as Keras's reduction does). Losses and weights are given as in
`model.compile`: a dict keyed by output name (the model's output dict keys, or `model.output_names`
for a list of outputs) or a list in output order; an output without a loss (None, or missing
from the dict) does not enter the objective. Labels `y` come as a dict with the same keys or a
tuple in output order.

Example:
  >>> losses = OutputLosses({"cls": "sparse_categorical_crossentropy", "reg": "mse"}, model,
  ...                       {"cls": 1.0, "reg": 0.5}, resolve=lambda part: resolve_loss(part, model))
  >>> losses(y, model(x))        # [batch]: ℓ_cls + 0.5·ℓ_reg per example
"""

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError


class OutputLosses:
    """`fn(y_true, y_pred) -> [batch]`: the weighted sum of per-output per-example losses.

    Args:
      losses: dict `{output_name: loss}` or list with one loss (or None) per output.
      model: the multi-output model.
      weights: None (1 for every output), or a dict / list like `losses`.
      resolve: `fn(loss) -> (name, per_example_fn)` for one output's loss.

    Attributes:
      name: a display name, e.g. "cls: sparse_categorical_crossentropy + 0.5·reg: mse".
      losses: the user's per-output losses (by name or position, as given).
    """

    def __init__(self, losses, model, weights, *, resolve):
        self.losses = losses
        self.model = model
        self.output_names = list(getattr(model, "output_names", None) or [])
        keys = list(losses) if isinstance(losses, dict) else list(range(len(losses)))
        if not keys or all(losses[k] is None for k in keys):
            raise InputError(f"loss is an empty {type(losses).__name__}; give at least one output a loss.")
        self.weights = _weights(weights, losses, keys)
        self._parts = {k: resolve(losses[k]) for k in keys if losses[k] is not None}
        label = lambda k: k if isinstance(k, str) else f"output {k}"  # noqa: E731
        self.name = " + ".join(
            ("" if self.weights[k] == 1 else f"{self.weights[k]:g}·") + f"{label(k)}: {self._parts[k][0]}"
            for k in self._parts)
        self.__name__ = "output_losses"

    def parts(self, y_true, y_pred):
        """`[(key, loss_name, loss_fn, weight, y_k, f_k)]` for every output with a loss."""
        if not isinstance(y_pred, (dict, list, tuple)):
            raise InputError(
                f"loss has per-output losses ({self.name}), but the model returns a single tensor. Pass one "
                "loss for a single-output model.")
        names = list(y_pred) if isinstance(y_pred, dict) else self.output_names[:len(y_pred)]
        found = []
        for position, name in enumerate(names):
            key = name if isinstance(self.losses, dict) else position
            if key not in self._parts:
                continue
            loss_name, fn = self._parts[key]
            output = y_pred[name] if isinstance(y_pred, dict) else y_pred[position]
            found.append((key, loss_name, fn, self.weights[key], _labels(y_true, name, position, len(names)), output))
        unknown = sorted(str(k) for k in self._parts if k not in {f[0] for f in found})
        if unknown:
            raise InputError(
                f"loss names outputs {unknown} that the model does not have; its outputs are {names}. Key the "
                "losses by output name (the model's output dict keys or model.output_names), or give a list in "
                "output order.")
        return found

    def __call__(self, y_true, y_pred):
        total = None
        for key, loss_name, fn, weight, labels, output in self.parts(y_true, y_pred):
            losses = tf.convert_to_tensor(fn(labels, output))
            if losses.shape.rank is not None and losses.shape.rank > 1:
                losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
            term = tf.cast(weight, losses.dtype) * losses
            total = term if total is None else total + tf.cast(term, total.dtype)
        return total


def _labels(y_true, name, position, count):
    if isinstance(y_true, dict):
        if name not in y_true:
            raise InputError(
                f"the labels y are a dict with keys {sorted(y_true)}, but the output {name!r} has a loss and no "
                "labels. Give y a key for every output that has a loss.")
        return y_true[name]
    if isinstance(y_true, (list, tuple)):
        if len(y_true) != count:
            raise InputError(
                f"the labels y hold {len(y_true)} arrays for a model with {count} outputs. Give one label array "
                "per output (a tuple in output order) or a dict keyed by output name.")
        return y_true[position]
    raise InputError(
        f"the model has {count} outputs with per-output losses, but y is a single array. Give y as a tuple with "
        "one label array per output (in output order) or a dict keyed by output name.")


def _weights(weights, losses, keys):
    if weights is None:
        return {k: 1.0 for k in keys}
    if isinstance(losses, dict) != isinstance(weights, dict) or (
            not isinstance(weights, dict) and len(weights) != len(keys)):
        raise InputError(
            f"loss_weights must match loss: a dict with the same keys, or a list of the same length. Received "
            f"loss with {keys} and loss_weights={weights!r}.")
    given = {k: weights.get(k, 1.0) for k in keys} if isinstance(weights, dict) else dict(zip(keys, weights))
    extra = sorted(set(weights) - set(keys)) if isinstance(weights, dict) else []
    bad = {k: w for k, w in given.items() if not isinstance(w, (int, float, np.number)) or not np.isfinite(w) or w < 0}
    if extra or bad:
        raise InputError(
            f"loss_weights must be finite numbers ≥ 0 keyed like loss ({keys}). Received loss_weights={weights!r}.")
    return {k: float(w) for k, w in given.items()}
