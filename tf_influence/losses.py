"""Loss functions as the library uses them: resolved from names, objects or callables, and label checks.

`resolve_loss` turns a Keras loss name, a Keras `Loss` instance, a callable, or per-output losses of
a multi-output model (a dict or list, as in `model.compile`) into a per-example function
`fn(y_true, y_pred) -> [batch]`. Labels and predictions are aligned exactly as Keras aligns them
before calling a loss (`align_ranks`): `model.compile` wraps a loss name or a plain function in
`LossFunctionWrapper`, whose `call` squeezes or expands the last axis when the ranks differ by one
and that axis has size 1 (labels `[n]` against outputs `[n, 1]` become `[n, 1]`), while a `Loss`
instance's own `call` is used as it is. `check_labels` refuses labels that Keras itself would
silently misuse (out-of-range class ids, one-hot labels for a sparse loss, ...).
"""

import functools

import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.output_losses import OutputLosses


def resolve_loss(loss, model, loss_weights=None):
    """`(name, fn)`: a display name and the per-example loss function `fn(y_true, y_pred)`.

    Args:
      loss: a Keras loss name, a Keras `Loss` instance, a callable `fn(y_true, y_pred)`, or for a
        multi-output model a dict `{output_name: loss}` or a list with one loss per output.
      model: the model (its Keras flavour resolves names; its outputs name the parts).
      loss_weights: for per-output losses, a dict or list of weights (default 1 each), as in
        `model.compile(loss_weights=...)`.

    Example:
      >>> name, fn = resolve_loss("binary_crossentropy", model)
      >>> fn(np.ones(4), model(x))          # labels [4] against outputs [4, 1]: as Keras does
    """
    if isinstance(loss, (dict, list, tuple)):
        combined = OutputLosses(loss, model, loss_weights, resolve=lambda part: resolve_loss(part, model))
        return combined.name, combined
    if loss_weights is not None:
        raise InputError(
            "loss_weights weigh the losses of a multi-output model; pass loss as a dict {output_name: loss} "
            f"or a list with one loss per output. Received a single loss {_describe(loss)} with "
            f"loss_weights={loss_weights!r}.")
    module = keras_module(model)
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
        return name, _aligned(loss)
    raise InputError(
        f"loss must be a Keras loss, a loss name, a callable returning per-example losses, or (multi-output "
        f"models) a dict/list of per-output losses. Received: {type(loss).__name__}."
    )


def align_ranks(y_true, y_pred):
    """Keras's `squeeze_or_expand_to_same_rank` on one label/prediction pair.

    When the ranks differ by one and the longer one ends in an axis of size 1, that axis is
    squeezed, except that a rank-1 tensor is expanded instead (`[n]` vs `[n, 1]` -> both `[n, 1]`).
    """
    if not (hasattr(y_true, "shape") and hasattr(y_pred, "shape")):
        return y_true, y_pred
    true_rank, pred_rank = len(y_true.shape), len(y_pred.shape)
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        if pred_rank == 1:
            y_pred = tf.expand_dims(y_pred, -1)
        else:
            y_true = tf.squeeze(y_true, -1)
    elif pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        if true_rank == 1:
            y_true = tf.expand_dims(y_true, -1)
        else:
            y_pred = tf.squeeze(y_pred, -1)
    return y_true, y_pred


def from_logits(loss):
    """The `from_logits` setting of a Keras loss (instance, name or `functools.partial`), or None if unknown."""
    if isinstance(loss, str):
        return False if "crossentropy" in loss.lower().replace("_", "") else None
    if isinstance(loss, functools.partial):
        return bool(loss.keywords.get("from_logits", False))
    config = {}
    if hasattr(loss, "get_config"):
        try:
            config = loss.get_config() or {}
        except (NotImplementedError, TypeError):
            config = {}
    return bool(config["from_logits"]) if "from_logits" in config else None


def keras_module(model):
    """The Keras package a model was built with: `keras` (Keras 3) or `tf_keras` (Keras 2)."""
    if type(model).__module__.startswith("tf_keras") or any(
        c.__module__.startswith("tf_keras") for c in type(model).__mro__
    ):
        import tf_keras

        return tf_keras
    import keras

    return keras


def check_labels(loss_name, y, outputs, name):
    """Label checks for the common Keras losses, where Keras itself would silently misbehave."""
    key = str(loss_name).lower().replace("_", "")
    if not isinstance(y, tf.Tensor) or not isinstance(outputs, tf.Tensor):
        return
    if y.dtype == tf.string:
        raise InputError(f"{name}: labels are strings; encode them as numbers first.")
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


def _aligned(fn):
    """`fn` with its labels and predictions aligned as Keras's `LossFunctionWrapper.call` aligns them."""

    @functools.wraps(fn)
    def aligned(y_true, y_pred):
        if _same_structure(y_true, y_pred):
            pairs = [align_ranks(t, p) for t, p in zip(tf.nest.flatten(y_true), tf.nest.flatten(y_pred))]
            y_true = tf.nest.pack_sequence_as(y_true, [t for t, _ in pairs])
            y_pred = tf.nest.pack_sequence_as(y_pred, [p for _, p in pairs])
        return fn(y_true, y_pred)

    return aligned


def _same_structure(a, b):
    try:
        tf.nest.assert_same_structure(a, b, check_types=False)
        return True
    except (ValueError, TypeError):
        return False


def _describe(loss):
    return repr(loss) if isinstance(loss, str) else type(loss).__name__
