"""The model as a chain of stages for the exact chain solver: activations, layer planning, the loss.

A Keras Sequential (or single-path Functional) model of Dense layers with twice-differentiable
elementwise activations, ending in softmax cross-entropy, binary cross-entropy or mean squared error,
is read as a chain of stages `z_ℓ = σ_ℓ(z_{ℓ−1} W_ℓ + b_ℓ)`: `plan_stages` splits it into a
constant prefix (layers before the first selected variable) and the stages, refusing any layer it
cannot model; `loss_spec` identifies the loss in closed form. The closed-form derivative blocks of
each stage are in `chain_blocks.py`; the mathematics is in docs/mathematics.md ("Exact chain solver").
"""

import dataclasses
import typing
import warnings

import tensorflow as tf

from tf_influence.errors import InputError, UnsupportedLayerError
from tf_influence.layers import is_nested_model, walk_layers

DEFAULT_MAX_MEMORY_BYTES = 2 * 2**30
SUPPORTED = ("Dense (kernel and bias; any twice-differentiable elementwise activation), Activation, "
              "ReLU, LeakyReLU, Dropout/GaussianNoise/GaussianDropout/AlphaDropout (inference only), "
              "InputLayer; any layers before the first selected layer")
_INFERENCE_IDENTITY = ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "SpatialDropout1D")
_KINKED = ("relu", "relu6", "leaky_relu", "leakyrelu", "hard_sigmoid", "hard_silu", "hard_swish",
           "hard_tanh", "hard_shrink", "soft_shrink", "threshold")
_LOSSES = {"sparse_categorical_crossentropy": "sparse_ce", "categorical_crossentropy": "ce",
           "binary_crossentropy": "bce", "mean_squared_error": "mse"}



# -- Activations: value, first and second derivative -------------------------------------------
# Closed forms where they agree with TensorFlow's kernels to rounding; everything else (gelu among
# them: TF 2.21's float64 Gelu kernel differs from exact GELU by ~4e-9) is differentiated by autodiff
# of the layer's own activation, so the chain Hessian is that of the function the model computes.

def _sigmoid(u):
    s = tf.sigmoid(u)
    return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)


def _silu(u):
    s = tf.sigmoid(u)
    return u * s, s * (1 + u * (1 - s)), s * (1 - s) * (2 + u * (1 - 2 * s))


def _tanh(u):
    t = tf.tanh(u)
    return t, 1 - t * t, -2 * t * (1 - t * t)


def _elu(u):
    e = tf.exp(tf.minimum(u, 0.0))
    negative = u < 0  # at u = 0, TF's ELU gradient takes the linear branch
    return tf.where(negative, e - 1, u), tf.where(negative, e, tf.ones_like(u)), tf.where(negative, e, tf.zeros_like(u))


CLOSED_FORMS = {
    "linear": lambda u: (u, tf.ones_like(u), tf.zeros_like(u)),
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "softplus": lambda u: (tf.math.softplus(u),) + _sigmoid(u)[:2],
    "silu": _silu,
    "elu": _elu,
    "exponential": lambda u: (tf.exp(u),) * 3,
    "relu": lambda u: (tf.nn.relu(u), tf.cast(u > 0, u.dtype), tf.zeros_like(u)),
}


class Activation(typing.NamedTuple):
    name: str
    fn: typing.Callable
    closed_form: bool


def _activation(fn):
    """Identifies an activation: a Keras built-in with default arguments gets its closed form."""
    if fn is None:
        return Activation("linear", None, True)
    name = getattr(fn, "__name__", None) or type(fn).__name__.lower()
    module = getattr(fn, "__module__", "") or ""
    builtin = module.startswith(("keras", "tf_keras")) and not isinstance(fn, type)
    if builtin and name in CLOSED_FORMS:
        return Activation(name, fn, True)
    return Activation(name, fn, False)


def _derivatives(activation, u, layer_name):
    """`(σ(u), σ'(u), σ''(u))`, closed form or by autodiff of the (checked) elementwise function."""
    if activation.closed_form:
        return CLOSED_FORMS[activation.name](u)
    _check_elementwise(activation, u, layer_name)
    with tf.GradientTape() as outer:
        outer.watch(u)
        with tf.GradientTape() as inner:
            inner.watch(u)
            value = tf.cast(activation.fn(u), u.dtype)
        first = inner.gradient(value, u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    second = outer.gradient(first, u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return value, first, second


def _check_elementwise(activation, u, layer_name):
    """An elementwise σ has Jacobian diag(σ'): its jvp along t equals (∇Σσ) ⊙ t."""
    tangent = tf.random.stateless_normal(tf.shape(u), seed=[1, 2], dtype=u.dtype)
    with tf.autodiff.ForwardAccumulator(u, tangent) as acc:
        with tf.GradientTape() as tape:
            tape.watch(u)
            value = tf.cast(activation.fn(u), u.dtype)
    if value.shape != u.shape:
        raise UnsupportedLayerError(_not_elementwise(activation.name, layer_name))
    first = tape.gradient(value, u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    jvp = acc.jvp(value, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    gap = tf.abs(jvp - first * tangent)
    if float(tf.reduce_max(gap - 1e-8 * (tf.abs(jvp) + tf.abs(first * tangent)))) > 0:
        raise UnsupportedLayerError(_not_elementwise(activation.name, layer_name))


def _not_elementwise(name, layer_name):
    return (f"Layer {layer_name!r}: activation {name!r} is not elementwise, which method='chain' needs "
            "(softmax/sigmoid are accepted only as the last activation, fused with a cross-entropy on "
            "probabilities). Use an elementwise activation or method='cg'.")


# -- The model as a chain of stages ------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    """One Dense layer with the elementwise activations that follow it."""

    layer: typing.Any
    activations: list
    kernel_selected: bool
    bias_selected: bool
    output_fn: typing.Any = None  # the softmax/sigmoid fused into the loss, if any

    @property
    def name(self):
        return self.layer.name

    @property
    def units(self):
        return int(self.layer.kernel.shape[-1])

    @property
    def inputs(self):
        return int(self.layer.kernel.shape[0])

    @property
    def size(self):
        return self.inputs * self.units * self.kernel_selected + self.units * self.bias_selected

    def variables(self):
        return ([self.layer.kernel] if self.kernel_selected else []) + (
            [self.layer.bias] if self.bias_selected else [])


class LossSpec(typing.NamedTuple):
    kind: str            # "sparse_ce" | "ce" | "bce" | "mse"
    from_logits: bool
    label_smoothing: float
    name: str


def loss_spec(objective):
    fn = objective.loss_function
    owner = getattr(fn, "__self__", None)
    config = {}
    if owner is not None and hasattr(owner, "get_config"):
        config = owner.get_config()
        base = getattr(getattr(owner, "fn", None), "__name__", None) or type(owner).__name__
    else:
        base = getattr(fn, "__name__", type(fn).__name__)
    kind = _LOSSES.get(base)
    if kind is None:
        raise InputError(
            f"method='chain' needs a loss it knows in closed form: {sorted(_LOSSES)} (names or Keras loss "
            f"instances, from_logits either way). Received {objective.loss_name!r}. Use method='cg' for "
            "other losses."
        )
    if config.get("ignore_class") is not None or config.get("axis", -1) not in (-1, 1):
        raise InputError(
            f"method='chain' supports {base} with axis=-1 and ignore_class=None. Received "
            f"axis={config.get('axis', -1)}, ignore_class={config.get('ignore_class')}."
        )
    return LossSpec(kind, bool(config.get("from_logits", False)), float(config.get("label_smoothing", 0.0) or 0.0),
                     base)


def _chain_layers(model):
    """The model's layers in order, nested models flattened, composite layers kept whole."""
    for layer in walk_layers(model, into=is_nested_model):
        if not is_nested_model(layer) and type(layer).__name__ != "InputLayer":
            yield layer


def plan_stages(model, variables, spec, *, training, curvature):
    """Splits the model into a constant prefix and a list of stages; checks every layer."""
    outputs = getattr(model, "outputs", None)
    if outputs is not None and len(outputs) != 1:
        raise UnsupportedLayerError(f"method='chain' needs a single-output model. {model.name!r} has {len(outputs)}.")
    layers = list(_chain_layers(model))
    selected = {id(v) for v in variables}
    first = next((i for i, layer in enumerate(layers)
                  if any(id(w) in selected for w in layer.trainable_weights)), None)
    if first is None:
        raise UnsupportedLayerError(
            f"method='chain' found no layer of {model.name!r} that owns the selected variables; "
            "subclassed models are not supported (use a Sequential or Functional chain).")
    stages, covered = [], set()
    for layer in layers[first:]:
        kind = type(layer).__name__
        if kind == "Dense":
            stages.append(_dense_stage(layer, selected, covered))
        elif kind in ("Activation", "ReLU", "LeakyReLU"):
            fn = layer.activation if kind == "Activation" else layer
            act = _activation(fn) if kind == "Activation" else Activation(kind.lower(), layer, False)
            stages[-1].activations.append(act)
        elif kind in _INFERENCE_IDENTITY and not training:
            continue
        else:
            raise UnsupportedLayerError(
                f"Layer {layer.name!r} ({kind}) is not supported by method='chain'. Supported: {SUPPORTED}. "
                "Select only the Dense layers after it (variables=[...]) or use method='cg'.")
    missing = [v for v in variables if id(v) not in covered]
    if missing:
        names = [getattr(v, "path", None) or v.name for v in missing]
        raise UnsupportedLayerError(f"method='chain' cannot handle the selected variables {names}; supported: {SUPPORTED}.")
    _fuse_output_activation(stages[-1], spec, curvature)
    for stage in stages:
        for act in stage.activations:
            if act.name in _KINKED:
                warnings.warn(
                    f"Layer {stage.name!r} uses activation {act.name!r}, whose second derivative is zero almost "
                    "everywhere: the chain Hessian (like autodiff) ignores its kinks, and H is singular along "
                    "inactive units. Add damping, or prefer a smooth activation (softplus, gelu, silu).",
                    stacklevel=4)
    return layers[:first], stages


def _dense_stage(layer, selected, covered):
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise UnsupportedLayerError(f"Dense layer {layer.name!r} uses LoRA or quantization; method='chain' "
                                    "supports plain float Dense layers only.")
    if getattr(layer, "activity_regularizer", None) is not None:
        raise UnsupportedLayerError(f"Dense layer {layer.name!r} has an activity_regularizer, which "
                                    "method='chain' does not model. Remove it or use method='cg'.")
    if len(layer.kernel.shape) != 2:
        raise UnsupportedLayerError(f"Dense layer {layer.name!r} has a kernel of shape {layer.kernel.shape}.")
    kernel_selected = id(layer.kernel) in selected
    bias_selected = getattr(layer, "bias", None) is not None and id(layer.bias) in selected
    covered.update(id(v) for v, s in ((layer.kernel, kernel_selected), (getattr(layer, "bias", None), bias_selected)) if s)
    return Stage(layer, [_activation(layer.activation)], kernel_selected, bias_selected)


def _fuse_output_activation(stage, spec, curvature):
    """Cross-entropies on probabilities are taken on the logits: the final softmax/sigmoid moves into the loss."""
    while len(stage.activations) > 1 and stage.activations[-1].name == "linear":
        stage.activations.pop()
    last = stage.activations[-1].name
    wanted = {"sparse_ce": "softmax", "ce": "softmax", "bce": "sigmoid"}.get(spec.kind)
    if spec.from_logits or spec.kind == "mse":
        if last == "softmax":
            raise UnsupportedLayerError(
                f"The output layer {stage.name!r} applies softmax, but the loss {spec.name!r} takes "
                f"{'logits' if spec.from_logits else 'values'}; method='chain' supports softmax only fused with a "
                "cross-entropy on probabilities (from_logits=False).")
        return
    if last != wanted:
        raise UnsupportedLayerError(
            f"{spec.name} with from_logits=False needs a {wanted} output activation; layer {stage.name!r} ends "
            f"with {last!r}. Use from_logits=True for logit outputs.")
    if curvature == "gauss_newton":
        raise InputError(
            "curvature='gauss_newton' is taken with respect to the model's outputs (here probabilities), "
            "which method='chain' does not model; use a logits model with from_logits=True, or curvature='hessian'.")
    stage.output_fn = stage.activations[-1].fn  # the output activation now lives in the loss
    stage.activations[-1] = Activation("linear", None, True)


def composed(stage, u):
    """Value, σ', σ'' of the stage's composed elementwise activations at pre-activation `u`."""
    value, d1, d2 = u, tf.ones_like(u), tf.zeros_like(u)
    for act in stage.activations:
        v, a1, a2 = _derivatives(act, value, stage.name)
        value, d1, d2 = v, a1 * d1, a2 * d1 * d1 + a1 * d2
    return value, d1, d2
