"""Layers whose second derivatives stay wrong, and whether they lie on the selected path.

TensorFlow/Keras compute the variance in LayerNormalization, GroupNormalization and
BatchNormalization (training mode) with `stop_gradient` on the mean: forward-over-back and
back-over-back Hessian-vector products through such a layer are silently wrong (relative errors of
order 1 measured on TF 2.21). The library's curvature products run inside
`tf_influence.normalization.exact_second_derivatives`, which makes them exact; what it cannot fix
(`inexact_layers`: BatchNormalization(renorm=True) in training, tf-keras SyncBatchNormalization,
subclasses that override the normalisation code) is what is reported here. Gauss-Newton products
and finite differences use only first derivatives of the network and stay correct.
"""

from tf_influence.layers import sublayers, walk_layers
from tf_influence.normalization import inexact_layers


def second_derivative_traps(model, variables, *, training=False):
    """Names of the layers whose exact Hessian products would be wrong for these selected variables.

    A layer is reported when it is in `inexact_layers(model, training=training)` and some selected
    variable sits at or before it in the model's layer order (for Sequential and Functional
    models, a topological order). Subclassed models give no order, so any such layer is reported.
    """
    inexact = {id(layer) for layer in inexact_layers(model, training=training)}
    if not inexact:
        return []
    ordered = list(walk_layers(model))
    selected = {id(v) for v in variables}
    has_order = _is_graph_model(model)
    first_selected = None
    for position, layer in enumerate(ordered):
        owns = not sublayers(layer) and any(id(v) in selected for v in getattr(layer, "trainable_weights", []))
        if owns:
            first_selected = position
            break
    traps = []
    for position, layer in enumerate(ordered):
        if id(layer) not in inexact:
            continue
        if not has_order or first_selected is None or position >= first_selected:
            traps.append(layer.name)
    return traps


def _is_graph_model(model):
    names = {c.__name__ for c in type(model).__mro__}
    if "Sequential" in names:
        return all(_is_graph_model(layer) for layer in model.layers if getattr(layer, "layers", None))
    if "Functional" in names and type(model).__name__ in ("Functional", "Model"):
        return all(_is_graph_model(layer) for layer in model.layers if getattr(layer, "layers", None))
    return False


def trap_message(traps, mode):
    return (
        f"Hessian-vector products with mode={mode!r} would be silently wrong: TensorFlow's second "
        f"derivatives through {', '.join(traps)} are incorrect and tf_influence cannot make them exact "
        "(BatchNormalization(renorm=True) in training mode, tf-keras SyncBatchNormalization, or a "
        "subclass that overrides the normalisation code). Fixes: use curvature='gauss_newton' (exact, "
        "PSD), mode='finite_difference' (exact to O(r²), slower; for tf-keras models with "
        "method='direct'), or select only variables after the last such layer (e.g. "
        "variables=model.layers[-1]). Pass on_unsafe_layers='warn' to proceed anyway; "
        "tfi.check_hvp(...) reports the error."
    )
