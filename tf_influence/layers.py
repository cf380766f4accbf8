"""The one walk over a Keras model's layers, in model order, nested models and composite layers included.

Sequential and Functional models list their layers in `model.layers` (a topological order for
Functional models); a nested model or a layer that owns sublayers (MultiHeadAttention's projections,
a custom block) is descended into. Keras 3 layers have no public list of sublayers, so a layer's
sublayers are the `Layer` objects among its attributes (and in lists, tuples and dicts held by them),
in the order they were assigned.

Example:
  >>> [layer.name for layer in leaf_layers(model)]
  ['dense', 'dense_1']
"""

import collections.abc


def walk_layers(model, *, into=None, include_root=False):
    """Every layer of `model`, depth first: a composite layer before its parts, each layer once.

    Args:
      model: a Keras model or layer (Keras 3 or tf-keras).
      into: `fn(layer) -> bool`, whether to descend into a composite layer (default: always);
        e.g. `into=is_nested_model` keeps composite layers such as MultiHeadAttention whole.
      include_root: also yield `model` itself, first.

    Example:
      >>> [layer.name for layer in walk_layers(model)]
      ['dense', 'block', 'block_dense', 'dense_1']
    """
    seen = {id(model)}
    if include_root:
        yield model
    yield from _walk(model, seen, into)


def leaf_layers(model):
    """The layers of `model` that own no sublayers, in model order."""
    for layer in walk_layers(model):
        if not sublayers(layer):
            yield layer


def sublayers(layer):
    """The direct sublayers of `layer`: `layer.layers` for models, else the `Layer`s among its
    attributes and inside the lists, tuples and dicts they hold (nested containers included)."""
    listed = getattr(layer, "layers", None)
    if isinstance(listed, (list, tuple)):
        return [item for item in listed if _is_layer(item)]
    unique = {}
    for item in _layers_in(list(vars(layer).values()), {id(layer)}):
        unique.setdefault(id(item), item)
    return list(unique.values())


def own_weights(layer):
    """The trainable weights of `layer` that none of its sublayers holds (all of them for a leaf)."""
    inner = {id(w) for child in sublayers(layer) for w in getattr(child, "trainable_weights", [])}
    return [w for w in getattr(layer, "trainable_weights", []) if id(w) not in inner]


def is_nested_model(layer):
    """True for a Keras model used as a layer (it has `inputs`/`layers`), as opposed to a composite layer."""
    return isinstance(getattr(layer, "layers", None), (list, tuple)) and hasattr(layer, "inputs")


def find_layer(model, name):
    """The layer named `name` anywhere in `model`, or None."""
    for layer in walk_layers(model):
        if layer.name == name:
            return layer
    return None


def owning_layers(model, variables):
    """`{id(variable): layer}`: the innermost layer of `model` whose trainable weights hold each variable."""
    owners = {}
    for layer in walk_layers(model):
        for weight in getattr(layer, "trainable_weights", []):
            owners[id(weight)] = layer  # deeper layers come later and win
    return {id(v): owners[id(v)] for v in variables if id(v) in owners}


def looping_recurrent_layers(model):
    """The recurrent layers of `model` that run a `tf.while_loop` over time (RNN, GRU, LSTM,
    ConvLSTM, Bidirectional, ... with `unroll=False`)."""
    return [layer for layer in walk_layers(model) if hasattr(layer, "cell") and not getattr(layer, "unroll", False)]


def batch_coupled_layers(model, *, training):
    """The layers of `model` whose output for one example depends on the other examples of its batch:
    trainable BatchNormalization layers called in training mode (they normalise by batch moments).
    Per-example quantities computed one example at a time are wrong for such models."""
    if not training:
        return []
    return [layer for layer in walk_layers(model)
            if "BatchNormalization" in type(layer).__name__ and getattr(layer, "trainable", False)]


def _walk(layer, seen, into):
    for child in sublayers(layer):
        if id(child) in seen:
            continue
        seen.add(id(child))
        yield child
        if into is None or into(child):
            yield from _walk(child, seen, into)


def _layers_in(values, seen):
    """The layers among `values`, looking inside containers but not inside layers."""
    found = []
    for value in values:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if _is_layer(value):
            found.append(value)
        elif isinstance(value, collections.abc.Mapping):
            found.extend(_layers_in(list(value.values()), seen))
        elif isinstance(value, (list, tuple, set, frozenset)):
            found.extend(_layers_in(list(value), seen))
    return found


def _is_layer(obj):
    return (hasattr(obj, "trainable_weights") and hasattr(obj, "call") and hasattr(obj, "name")
            and not isinstance(obj, type))
