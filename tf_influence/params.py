"""Which variables θ the influence is taken over, and flat <-> variable-shaped conversions.

Only trainable variables of trainable layers can be selected; frozen layers (`trainable=False`)
and non-trainable variables such as BatchNormalization statistics are constants of the objective.
"Freeze the front of the network" is a one-liner: `variables=model.layers[-1]` (or its name).
"""

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.layers import find_layer, walk_layers


def select_variables(model, variables=None):
    """Resolves a variable selection to a list of the model's trainable variables, in model order.

    Args:
      model: a Keras model (Keras 3 or tf-keras).
      variables: `None` (every trainable variable), or a layer, a layer name, a variable, or a
        list/tuple mixing those.

    Returns:
      A non-empty list of variables, ordered as in `model.trainable_variables`, without repeats.

    Raises:
      InputError: if the model has no trainable variables, a name matches no layer, a layer is
        frozen, or a variable is not a trainable variable of the model.

    Example:
      >>> head = select_variables(model, model.layers[-1])   # last layer only (frozen backbone)
    """
    trainable = list(model.trainable_variables)
    if not trainable:
        raise InputError(
            f"Model {model.name!r} has no trainable variables (every layer is frozen or the model is "
            "not built). Build the model and set trainable=True on the layers to study."
        )
    if variables is None:
        return trainable
    index = {}
    for i, v in enumerate(trainable):
        index.setdefault(id(v), i)
        index.setdefault(id(_tf_variable(v)), i)
    items = variables if isinstance(variables, (list, tuple)) else [variables]
    if not items:
        raise InputError("variables is an empty list; pass None to select every trainable variable.")
    chosen = set()
    for item in items:
        chosen.update(_resolve(model, item, index, trainable))
    return [trainable[i] for i in sorted(chosen)]


def _resolve(model, item, index, trainable):
    if isinstance(item, str):
        layer = _find_layer(model, item)
        return _resolve(model, layer, index, trainable)
    if hasattr(item, "trainable_weights") and hasattr(item, "name") and not _is_variable(item):
        if not item.trainable:
            raise InputError(
                f"Layer {item.name!r} is frozen (trainable=False), so its variables are constants. "
                "Set layer.trainable = True or select another layer."
            )
        found = [index[id(v)] for v in item.trainable_weights if id(v) in index]
        if not found:
            raise InputError(
                f"Layer {item.name!r} has no trainable variables in model {model.name!r} "
                f"(its trainable weights: {[v.name for v in item.trainable_weights]})."
            )
        return found
    if _is_variable(item):
        if id(item) in index:
            return [index[id(item)]]
        name = getattr(item, "path", None) or item.name
        if any(id(item) in (id(v), id(_tf_variable(v))) for v in model.non_trainable_variables):
            raise InputError(
                f"Variable {name!r} is not trainable (e.g. a BatchNormalization statistic); only "
                "trainable variables can be selected."
            )
        raise InputError(
            f"Variable {name!r} is not a trainable variable of model {model.name!r}. Pass variables "
            "from model.trainable_variables, a layer, or a layer name."
        )
    raise InputError(
        "variables must be None, a layer, a layer name, a variable, or a list of those. "
        f"Received an object of type {type(item).__name__}."
    )


def _find_layer(model, name):
    layer = find_layer(model, name)
    if layer is None:
        names = [layer.name for layer in walk_layers(model)]
        raise InputError(f"No layer named {name!r} in model {model.name!r}. Layers: {names}.")
    return layer


def _is_variable(obj):
    return isinstance(obj, tf.Variable) or type(obj).__name__ == "Variable" and hasattr(obj, "assign")


def _tf_variable(v):
    """The `tf.Variable` behind a Keras 3 variable (what tapes and ForwardAccumulator track)."""
    if isinstance(v, tf.Variable):
        return v
    return v.value


def tf_variables(variables):
    """The `tf.Variable`s behind a list of (Keras 3 or tf.Variable) variables."""
    return [_tf_variable(v) for v in variables]


class ParameterSpace:
    """The flat coordinate system of a list of variables.

    `flatten` maps variable-shaped tensors (optionally with leading batch axes) to flat vectors
    `[..., p]`; `unflatten` is its inverse.

    Example:
      >>> space = ParameterSpace(model.trainable_variables)
      >>> flat = space.flatten(model.trainable_variables)     # [p]
      >>> parts = space.unflatten(flat)                      # list shaped like the variables
    """

    def __init__(self, variables):
        self.variables = list(variables)
        self.shapes = [tuple(int(d) for d in v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = int(sum(self.sizes))
        dtypes = {tf.as_dtype(v.dtype) for v in self.variables}
        if len(dtypes) != 1:
            raise InputError(
                f"The selected variables have mixed dtypes {sorted(d.name for d in dtypes)}; "
                "select variables of one dtype (e.g. exclude mixed-precision layers)."
            )
        (self.dtype,) = dtypes

    def flatten(self, tensors, batch_dims=0):
        tensors = list(tensors)
        if len(tensors) != len(self.shapes):
            raise InputError(
                f"Expected {len(self.shapes)} tensors shaped like the variables {self.shapes}. "
                f"Received {len(tensors)}."
            )
        parts = []
        for t, shape, size in zip(tensors, self.shapes, self.sizes):
            t = tf.convert_to_tensor(densify(t), dtype=self.dtype)
            lead = tf.shape(t)[:batch_dims]
            parts.append(tf.reshape(t, tf.concat([lead, [size]], 0)))
        return tf.concat(parts, axis=-1)

    def unflatten(self, flat):
        flat = tf.convert_to_tensor(flat, dtype=self.dtype)
        lead = tf.shape(flat)[:-1]
        parts = tf.split(flat, self.sizes, axis=-1)
        return [tf.reshape(p, tf.concat([lead, shape], 0)) for p, shape in zip(parts, self.shapes)]

    def as_flat_vectors(self, vectors):
        """Accepts a flat `[p]`/`[k, p]` tensor or a variable-shaped list; returns `[k, p]`."""
        if isinstance(vectors, (list, tuple)):
            if len(vectors) != len(self.shapes):
                raise InputError(
                    f"Expected a list of {len(self.shapes)} tensors shaped like the variables "
                    f"{self.shapes}, or flat vectors of length {self.size}. Received a list of "
                    f"{len(vectors)}."
                )
            first = tf.convert_to_tensor(densify(vectors[0]))
            batch_dims = first.shape.rank - len(self.shapes[0])
            flat = self.flatten(vectors, batch_dims=batch_dims)
        else:
            flat = tf.convert_to_tensor(vectors, dtype=self.dtype)
        if flat.shape.rank == 1:
            flat = flat[tf.newaxis]
        if flat.shape.rank != 2 or flat.shape[-1] != self.size:
            raise InputError(
                f"Vectors must have {self.size} entries (the selected parameters). Received shape "
                f"{tuple(flat.shape)}."
            )
        return flat


def densify(t):
    """Converts `tf.IndexedSlices` (e.g. Embedding gradients) to dense tensors."""
    if isinstance(t, tf.IndexedSlices):
        return tf.convert_to_tensor(t)
    return t
