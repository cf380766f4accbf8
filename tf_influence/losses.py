"""Loss functions as the library uses them: resolved from names, objects or callables, and label checks.

`resolve_loss` turns a Keras loss name, a Keras `Loss` instance or a callable into a per-example
function `fn(y_true, y_pred) -> [batch]`; `check_labels` refuses labels that Keras itself would
silently misuse (out-of-range class ids, one-hot labels for a sparse loss, ...).
"""

import tensorflow as tf

from tf_influence.errors import InputError


def resolve_loss(loss, model):
    """`(name, fn)`: a display name and the per-example loss function `fn(y_true, y_pred)`."""
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
        return name, loss
    raise InputError(
        f"loss must be a Keras loss, a loss name, or a callable returning per-example losses. "
        f"Received: {type(loss).__name__}."
    )


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
