"""Layers whose second derivatives TensorFlow gets wrong, and whether they lie on the selected path.

TensorFlow/Keras compute the variance in LayerNormalization, GroupNormalization and
BatchNormalization (training mode) with `stop_gradient` on the mean. First derivatives stay exact
(Σ(xᵢ − μ) = 0 cancels the dropped term) but second derivatives do not: forward-over-back and
back-over-back Hessian-vector products through such a layer are silently wrong (relative errors of
order 1 measured on TF 2.21). Gauss-Newton products and finite differences use only first
derivatives of the network and stay correct.
"""

from tf_influence.layers import sublayers, walk_layers

_ALWAYS = ("LayerNormalization", "GroupNormalization")
_IN_TRAINING = ("BatchNormalization", "SyncBatchNormalization")


def second_derivative_traps(model, variables, *, training=False):
    """Names of the layers whose HVP would be wrong for these selected variables.

    A layer is reported when some selected variable sits at or before it in the model's layer
    order (for Sequential and Functional models, a topological order). Subclassed models give no
    order, so any such layer is reported.
    """
    kinds = _ALWAYS + (_IN_TRAINING if training else ())
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
        if type(layer).__name__ not in kinds:
            continue
        if not has_order or first_selected is None or position >= first_selected:
            traps.append(layer.name)
    return traps


def _is_graph_model(model):
    names = {c.__name__ for c in type(model).__mro__}
    if "Sequential" in names:
        return all(_is_graph_model(l) for l in model.layers if getattr(l, "layers", None))
    if "Functional" in names and type(model).__name__ in ("Functional", "Model"):
        return all(_is_graph_model(l) for l in model.layers if getattr(l, "layers", None))
    return False


def trap_message(traps, mode):
    return (
        f"Hessian-vector products with mode={mode!r} would be silently wrong: TensorFlow's second "
        f"derivatives through {', '.join(traps)} (normalisation with stop_gradient on the mean) are "
        "incorrect. Fixes: use curvature='gauss_newton' (exact, PSD), mode='finite_difference' "
        "(correct but slower), or select only variables after the last normalisation layer "
        "(e.g. variables=model.layers[-1]). Pass on_unsafe_layers='warn' to proceed anyway; "
        "tfi.check_hvp(...) reports the error."
    )
