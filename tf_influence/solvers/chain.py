"""`method="chain"`: exact inverse-Hessian-vector products for deep chains of Dense layers.

For a Keras Sequential (or single-path Functional) model of Dense layers with twice-differentiable
elementwise activations, ending in softmax cross-entropy, binary cross-entropy or mean squared error,
the Hessian of the mean loss over a batch of n examples is solved exactly in time linear in the depth
(DESIGN.md, "Exact chain solver"): closed-form per-layer derivative blocks, then the backward Riccati
sweep of `tf_influence.linalg.riccati`. The same blocks give an exact Hessian-vector product in
linear time (`ChainHessian.matmul`) and the inertia of `H + λI` for free.

Entry points:
  `ChainHessian(model, loss, data, ...)`: a `tf.linalg.LinearOperator` (matmul and solve exact).
  `chain_solve(model, loss, data, b, ...) -> (x, SolveInfo)`.
  `Chain(...)`: the method object; `Chain().solve(hessian_operator, b_rows) -> (x_rows, SolveInfo)`.
"""

import dataclasses
import logging
import time
import typing
import warnings

import numpy as np
import tensorflow as tf

from tf_influence.data import as_dataset
from tf_influence.errors import InputError, NegativeCurvatureError, ResourceError, UnsupportedLayerError
from tf_influence.linalg.riccati import ChainBlocks, chain_factor_solve, chain_factorize, chain_matmul
from tf_influence.objective import Objective
from tf_influence.params import ParameterSpace, select_variables
from tf_influence.solvers.info import SolveInfo

_log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 2 * 2**30
_SUPPORTED = ("Dense (kernel and bias; any twice-differentiable elementwise activation), Activation, "
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


_CLOSED_FORMS = {
    "linear": lambda u: (u, tf.ones_like(u), tf.zeros_like(u)),
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "softplus": lambda u: (tf.math.softplus(u),) + _sigmoid(u)[:2],
    "silu": _silu,
    "elu": _elu,
    "exponential": lambda u: (tf.exp(u),) * 3,
    "relu": lambda u: (tf.nn.relu(u), tf.cast(u > 0, u.dtype), tf.zeros_like(u)),
}


class _Activation(typing.NamedTuple):
    name: str
    fn: typing.Callable
    closed_form: bool


def _activation(fn):
    """Identifies an activation: a Keras built-in with default arguments gets its closed form."""
    if fn is None:
        return _Activation("linear", None, True)
    name = getattr(fn, "__name__", None) or type(fn).__name__.lower()
    module = getattr(fn, "__module__", "") or ""
    builtin = module.startswith(("keras", "tf_keras")) and not isinstance(fn, type)
    if builtin and name in _CLOSED_FORMS:
        return _Activation(name, fn, True)
    return _Activation(name, fn, False)


def _derivatives(activation, u, layer_name):
    """`(σ(u), σ'(u), σ''(u))`, closed form or by autodiff of the (checked) elementwise function."""
    if activation.closed_form:
        return _CLOSED_FORMS[activation.name](u)
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
class _Stage:
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


class _LossSpec(typing.NamedTuple):
    kind: str            # "sparse_ce" | "ce" | "bce" | "mse"
    from_logits: bool
    label_smoothing: float
    name: str


def _loss_spec(objective):
    fn = objective._loss_fn  # noqa: SLF001 - the resolved per-example loss of the Objective
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
    return _LossSpec(kind, bool(config.get("from_logits", False)), float(config.get("label_smoothing", 0.0) or 0.0),
                     base)


def _flat_layers(model):
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None) is not None and hasattr(layer, "inputs"):
            yield from _flat_layers(layer)
        elif type(layer).__name__ != "InputLayer":
            yield layer


def _plan(model, variables, spec, *, training, curvature):
    """Splits the model into a constant prefix and a list of stages; checks every layer."""
    outputs = getattr(model, "outputs", None)
    if outputs is not None and len(outputs) != 1:
        raise UnsupportedLayerError(f"method='chain' needs a single-output model. {model.name!r} has {len(outputs)}.")
    layers = list(_flat_layers(model))
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
            act = _activation(fn) if kind == "Activation" else _Activation(kind.lower(), layer, False)
            stages[-1].activations.append(act)
        elif kind in _INFERENCE_IDENTITY and not training:
            continue
        else:
            raise UnsupportedLayerError(
                f"Layer {layer.name!r} ({kind}) is not supported by method='chain'. Supported: {_SUPPORTED}. "
                "Select only the Dense layers after it (variables=[...]) or use method='cg'.")
    missing = [v for v in variables if id(v) not in covered]
    if missing:
        names = [getattr(v, "path", None) or v.name for v in missing]
        raise UnsupportedLayerError(f"method='chain' cannot handle the selected variables {names}; supported: {_SUPPORTED}.")
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
    return _Stage(layer, [_activation(layer.activation)], kernel_selected, bias_selected)


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
    stage.activations[-1] = _Activation("linear", None, True)


# -- Loss blocks at the last state -------------------------------------------------------------

def _loss_terms(spec, z, y, coeff):
    """Per-example losses `[n]`, the weighted gradient `[n, c]` and Hessian blocks `[n, c, c]` in `z`."""
    n, c = int(z.shape[0]), int(z.shape[1])
    if spec.kind == "sparse_ce":
        labels = tf.cast(tf.reshape(y, [n]), tf.int64)
        y = tf.one_hot(labels, c, dtype=z.dtype)
    else:
        y = tf.reshape(tf.cast(y, z.dtype), [n, c])
    if spec.label_smoothing:
        s = spec.label_smoothing
        y = y * (1 - s) + (s / c if spec.kind in ("ce", "sparse_ce") else 0.5 * s)
    w = coeff[:, tf.newaxis]
    if spec.kind in ("ce", "sparse_ce"):
        p = tf.nn.softmax(z)
        mass = tf.reduce_sum(y, axis=1, keepdims=True)
        losses = -tf.reduce_sum(y * tf.nn.log_softmax(z), axis=1)
        grad = w * (mass * p - y)
        hess = (w * mass)[:, :, tf.newaxis] * (tf.linalg.diag(p) - p[:, :, tf.newaxis] * p[:, tf.newaxis, :])
    elif spec.kind == "bce":
        s = tf.sigmoid(z)
        losses = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z), axis=1)
        grad = w * (s - y) / c
        hess = tf.linalg.diag(w * s * (1 - s) / c)
    else:
        losses = tf.reduce_mean(tf.square(z - y), axis=1)
        grad = w * 2 * (z - y) / c
        hess = tf.linalg.diag(tf.broadcast_to(2 * w / c, [n, c]))
    return losses, grad, hess


def _block_diagonal(blocks):
    """`[n, c, c]` -> the `[n·c, n·c]` block-diagonal matrix."""
    n, c = int(blocks.shape[0]), int(blocks.shape[1])
    eye = tf.eye(n, dtype=blocks.dtype)
    return tf.reshape(tf.einsum("iab,iq->iaqb", blocks, eye), [n * c, n * c])


# -- Per-stage closed-form blocks --------------------------------------------------------------

def _stage_blocks(stage, z_in, derivs, c_out, kernel, bias, *, first, hessian):
    """Closed forms for `z_out = σ(z_in W + b)` with output adjoint `c_out`: dx, dz, fxx, fzx, fzz."""
    n, m = int(z_in.shape[0]), int(z_in.shape[1])
    d = stage.units
    _, s1, s2 = derivs
    za = tf.concat([z_in, tf.ones([n, 1], z_in.dtype)], 1) if bias is not None else z_in
    m1 = int(za.shape[1])
    columns = _columns(stage, m, d, bias is not None)
    eye_d = tf.eye(d, dtype=z_in.dtype)
    eye_n = tf.eye(n, dtype=z_in.dtype)
    gamma, beta = c_out * s1, c_out * s2                      # ∂loss/∂u and c·σ''
    dx = tf.reshape(tf.einsum("ijk,jl->ijkl", tf.einsum("ij,ik->ijk", s1, za), eye_d), [n * d, m1 * d])
    dx = tf.gather(dx, columns, axis=1)
    dz = fxx = fzx = fzz = None
    if not first:
        dz = tf.reshape(tf.einsum("ijk,il->ijlk", s1[:, :, tf.newaxis] * tf.transpose(kernel)[tf.newaxis], eye_n),
                        [n * d, n * m])
    if hessian:
        moments = tf.einsum("ij,ik,il->jkl", beta, za, za)                       # [d, m1, m1]
        fxx = tf.reshape(tf.einsum("jkl,jq->kjlq", moments, eye_d), [m1 * d, m1 * d])
        fxx = tf.gather(tf.gather(fxx, columns, axis=0), columns, axis=1)
        if not first:
            fzx = tf.einsum("ijk,lj->kjil", tf.einsum("ij,ik->ijk", beta, za), kernel)
            fzx += tf.einsum("ij,kl->kjil", gamma, tf.eye(m1, m, dtype=z_in.dtype))
            fzx = tf.gather(tf.reshape(fzx, [m1 * d, n * m]), columns, axis=0)
            per_example = tf.einsum("ij,kj,lj->ikl", beta, kernel, kernel)          # [n, m, m]
            fzz = tf.reshape(tf.einsum("ikl,iq->ikql", per_example, eye_n), [n * m, n * m])
    return dx, dz, fxx, fzx, fzz


def _columns(stage, m, d, has_bias):
    cols = list(range(m * d)) if stage.kernel_selected else []
    if has_bias and stage.bias_selected:
        cols += list(range(m * d, (m + 1) * d))
    return tf.constant(cols, dtype=tf.int32)


def _composed(stage, u):
    """Value, σ', σ'' of the stage's composed elementwise activations at pre-activation `u`."""
    value, d1, d2 = u, tf.ones_like(u), tf.zeros_like(u)
    for act in stage.activations:
        v, a1, a2 = _derivatives(act, value, stage.name)
        value, d1, d2 = v, a1 * d1, a2 * d1 * d1 + a1 * d2
    return value, d1, d2


# -- Data, sizes, regularisers ------------------------------------------------------------------

def _one_batch(data):
    """All of `data` as one `(x, y, w)` batch of tensors."""
    xs, ys, ws = [], [], []
    for x, y, w in as_dataset(data, batch_size=2**31 - 1, name="data"):
        if isinstance(x, (dict, list, tuple)) or isinstance(y, (dict, list, tuple)):
            raise InputError("method='chain' needs a single input tensor x and label tensor y; received a "
                             f"structure of type {type(x).__name__ if isinstance(x, (dict, list, tuple)) else type(y).__name__}.")
        xs.append(x), ys.append(y), ws.append(w)
    return tf.concat(xs, 0), tf.concat(ys, 0), tf.concat(ws, 0)


def memory_estimate(num_examples, layer_shapes, *, itemsize=8):
    """Bytes the chain blocks and factorization need for `n` examples.

    Args:
      num_examples: n, the examples read as one batch.
      layer_shapes: per Dense stage, `(inputs, units, selected_parameters)`.
      itemsize: bytes per number (8 for float64).

    Returns:
      An integer number of bytes (blocks, factorization, and the largest transient Riccati state).
    """
    total, transient = 0, 0
    for l, (m, d, p) in enumerate(layer_shapes):
        a_in, a_out = num_examples * m, num_examples * d
        total += a_out * p + 2 * p * p                        # dx, fxx, pivot
        if l:
            total += a_out * a_in + 3 * p * a_in + a_in * a_in  # dz, fzx, coupling, gain, fzz
        transient = max(transient, 3 * a_out * a_out + a_out * a_in)
    return int((total + transient) * itemsize)


def _l2_coefficient(regularizer, variable, layer, what):
    """The `c` of a `c·‖w‖²` weight regulariser (Hessian `2c·I`); refuses anything else.

    `c` is read by evaluating the regulariser on a unit vector, so it carries the rounding Keras
    applies (Keras 3 casts `l2` through float32).
    """
    if regularizer is None:
        return 0.0
    kind = type(regularizer).__name__
    config = regularizer.get_config() if hasattr(regularizer, "get_config") else {}
    if kind in ("L2", "L1L2") and not config.get("l1", 0.0):
        return float(regularizer(tf.ones([1], dtype=tf.as_dtype(variable.dtype))))
    raise UnsupportedLayerError(
        f"Layer {layer.name!r} has {what}_regularizer={kind}({config}); method='chain' supports L2 weight "
        "regularisers only (L1 is not twice differentiable). Remove it or use method='cg'.")


# -- The operator ------------------------------------------------------------------------------

class ChainHessian(tf.linalg.LinearOperator):
    """`H + λI` of a Dense chain over one batch of n examples, exact, with linear-time matmul and solve.

    `H` is the Hessian (or Gauss-Newton matrix) of `R(θ) = Σ wᵢ ℓᵢ / Σ wᵢ + Ω(θ)` over the selected
    variables θ, with Ω the model's L2 weight regularisers plus `(l2/2)·‖θ‖²`: the same matrix as
    `tfi.HessianOperator` on the same data, computed in `dtype` (float64 by default). Flat vectors
    follow the order of `select_variables(model, variables)` (that of `model.trainable_variables`).

    Supported models: Dense layers with elementwise activations (closed forms for linear, tanh, sigmoid,
    softplus, silu, elu, exponential, relu; autodiff of the activation otherwise, e.g. gelu), Activation /
    ReLU / LeakyReLU layers, inference-time Dropout; any layers before the first selected layer (a
    frozen front is evaluated as data). Losses: (sparse) categorical cross-entropy with softmax or
    logits, binary cross-entropy with sigmoid or logits, mean squared error.

    Args:
      model: a built Keras model (Sequential or single-path Functional).
      loss: a loss name, Keras loss instance, or an `Objective` (then `l2` and `training` come from it).
      data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset`; all of it is read as one batch.
      variables: `None` (all trainable variables) or layers / names / variables, as in `HessianOperator`.
      damping: λ ≥ 0 added to the diagonal.
      l2: extra `(l2/2)·‖θ‖²` in the objective.
      curvature: `"hessian"` or `"gauss_newton"` (with respect to the model's outputs, logits only).
      training: the `training` flag the model is evaluated with (Dropout needs False).
      dtype: computation dtype (`tf.float64` by default).
      max_memory_bytes: refuse with a `ResourceError` when the blocks would need more (default 2 GiB).

    Shape: `[p, p]`, p the number of selected parameters.

    Performance: building the blocks and `matmul` cost `O(Σ_ℓ a_ℓ p_ℓ + a_ℓ² + p_ℓ²)` per vector, with
    `a_ℓ = n·width_ℓ`; the first `solve` factorizes in `O(Σ_ℓ p_ℓ³ + p_ℓ² a_ℓ + p_ℓ a_ℓ² + a_ℓ³)`, later
    solves reuse it. All linear in depth; memory `O(Σ_ℓ p_ℓ² + p_ℓ a_ℓ + a_ℓ²)` (see `memory_estimate`).

    Hints: `is_self_adjoint=True`. `is_positive_definite=True` only for Gauss-Newton with a positive
    diagonal shift (every supported loss is convex in its input); otherwise None: a Hessian can be
    indefinite, and `inertia` tells.

    Example:
      >>> H = ChainHessian(model, "sparse_categorical_crossentropy", (x, y), damping=1e-3)
      >>> hv = H.matvec(v)                  # exact, linear time in depth
      >>> x = H.solvevec(g)                 # exact (H + λI)⁻¹ g
      >>> H.inertia                         # negative eigenvalues of H + λI
    """

    def __init__(self, model, loss, data, variables=None, *, damping=0.0, l2=0.0, curvature="hessian",
                 training=False, dtype=tf.float64, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES, name="ChainHessian"):
        damping = float(damping)
        if not np.isfinite(damping) or damping < 0:
            raise InputError(f"damping must be a finite number ≥ 0. Received: damping={damping}.")
        if curvature not in ("hessian", "gauss_newton"):
            raise InputError(f"curvature must be 'hessian' or 'gauss_newton'. Received {curvature!r}.")
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float32, tf.float64):
            raise InputError(f"dtype must be float32 or float64. Received {dtype.name}.")
        if isinstance(loss, Objective):
            if l2:
                raise InputError("Pass l2 either in the Objective or as l2=..., not both.")
            objective = loss
        else:
            objective = Objective(model, loss, l2=l2, training=training)
        self.model, self.objective, self.damping, self.curvature = model, objective, damping, curvature
        self.selected_variables = select_variables(model, variables)
        self.space = ParameterSpace(self.selected_variables)
        spec = _loss_spec(objective)
        prefix, self._stages = _plan(model, self.selected_variables, spec, training=objective.training,
                                     curvature=curvature)
        x, y, w = _one_batch(data)
        objective.validate((x, y, w), "data")
        n = int(x.shape[0])
        shapes = [(s.inputs, s.units, s.size) for s in self._stages]
        need = memory_estimate(n, shapes, itemsize=dtype.size)
        if need > max_memory_bytes:
            widest = max(n * max(m, d) for m, d, _ in shapes)
            raise ResourceError(
                f"method='chain' would need about {need / 2**30:.2f} GiB for n={n} examples and {len(shapes)} "
                f"Dense layers (state size n·width up to {widest}, up to {max(p for *_, p in shapes)} parameters "
                f"per layer); the limit is max_memory_bytes={max_memory_bytes} ({max_memory_bytes / 2**30:.2f} GiB). "
                "Memory grows as (n·width)² per layer: use fewer examples, raise max_memory_bytes, or use "
                "method='cg' / 'ekfac'.")
        self._blocks, self.loss_values = self._build(prefix, spec, x, y, w, dtype)
        self._order(self.selected_variables)
        self._factorization = None
        min_shift = min((float(tf.reduce_min(s)) for s in self._blocks.shift if s.shape[0]), default=0.0)
        pd_hint = True if curvature == "gauss_newton" and min_shift > 0 else None
        p = self.space.size
        super().__init__(dtype=dtype, is_self_adjoint=True, is_positive_definite=pd_hint, is_square=True, name=name,
                         parameters=dict(damping=damping, curvature=curvature, l2=objective.l2, size=p, examples=n))

    # -- Construction ---------------------------------------------------------------------------

    def _build(self, prefix, spec, x, y, w, dtype):
        model_dtype = tf.as_dtype(self.space.dtype)
        z = x
        for layer in prefix:
            z = layer(z, training=self.objective.training)
        z = tf.cast(z, dtype)
        if z.shape.rank != 2:
            raise UnsupportedLayerError(
                f"method='chain' needs the input of layer {self._stages[0].name!r} to be [batch, features]; "
                f"received shape {tuple(z.shape)}. Add a Flatten layer before it.")
        saved = []
        for stage in self._stages:
            kernel = tf.cast(stage.layer.kernel, dtype)
            bias = None if getattr(stage.layer, "bias", None) is None else tf.cast(stage.layer.bias, dtype)
            u = z @ kernel + (bias if bias is not None else 0)
            value, s1, s2 = _composed(stage, u)
            saved.append((z, s1, s2, kernel, bias))
            z = value
        last = self._stages[-1]
        outputs = last.output_fn(z) if last.output_fn is not None else z
        self._check_outputs(x, outputs, model_dtype)
        coeff = tf.cast(w, dtype) / tf.reduce_sum(tf.cast(w, dtype))
        losses, grad, hess = _loss_terms(spec, z, y, coeff)
        self._check_losses(spec, y, outputs, losses)
        hessian = self.curvature == "hessian"
        parts = {k: [None] * len(self._stages) for k in ("dx", "dz", "fxx", "fzx", "fzz")}
        c = grad
        for l in range(len(self._stages) - 1, -1, -1):
            z_in, s1, s2, kernel, bias = saved[l]
            blocks = _stage_blocks(self._stages[l], z_in, (None, s1, s2), c, kernel, bias, first=l == 0, hessian=hessian)
            for key, block in zip(("dx", "dz", "fxx", "fzx", "fzz"), blocks):
                parts[key][l] = block
            c = tf.matmul(c * s1, kernel, transpose_b=True)
        shift = [self._shift(stage, dtype) for stage in self._stages]
        return ChainBlocks(loss_hessian=_block_diagonal(hess), shift=shift, **parts), losses

    def _shift(self, stage, dtype):
        base = self.damping + self.objective.l2
        pieces = []
        if stage.kernel_selected:
            c = _l2_coefficient(getattr(stage.layer, "kernel_regularizer", None), stage.layer.kernel, stage.layer, "kernel")
            pieces.append(tf.fill([stage.inputs * stage.units], tf.constant(base + 2 * c, dtype)))
        if stage.bias_selected:
            c = _l2_coefficient(getattr(stage.layer, "bias_regularizer", None), stage.layer.bias, stage.layer, "bias")
            pieces.append(tf.fill([stage.units], tf.constant(base + 2 * c, dtype)))
        return tf.concat(pieces, 0) if pieces else tf.zeros([0], dtype)

    def _check_outputs(self, x, outputs, model_dtype):
        expected = tf.cast(self.model(x, training=self.objective.training), outputs.dtype)
        tol = float(np.sqrt(np.finfo(model_dtype.as_numpy_dtype).eps))
        scale = max(1.0, float(tf.reduce_max(tf.abs(expected))))
        if expected.shape != outputs.shape or float(tf.reduce_max(tf.abs(expected - outputs))) > tol * scale:
            raise UnsupportedLayerError(
                f"method='chain' rebuilt model {self.model.name!r} as a chain of its layers, but the result differs "
                f"from model(x) (shapes {tuple(outputs.shape)} vs {tuple(expected.shape)}). The model is not a plain "
                f"chain (shared layers, branches or a custom call). Supported: {_SUPPORTED}.")

    def _check_losses(self, spec, y, outputs, losses):
        expected = tf.cast(self.objective.per_example_loss(tf.cast(y, outputs.dtype) if spec.kind != "sparse_ce" else y,
                                                           outputs), losses.dtype)
        if float(tf.reduce_max(tf.abs(expected - losses) / (1 + tf.abs(expected)))) > 1e-6:
            raise InputError(
                f"method='chain' evaluated the loss {spec.name!r} in closed form (from_logits={spec.from_logits}, "
                f"label_smoothing={spec.label_smoothing}) and got values that differ from Keras's; its options are "
                "not supported. Use method='cg'.")

    def _order(self, variables):
        index = {id(v): i for i, v in enumerate(variables)}
        chain_vars = [v for stage in self._stages for v in stage.variables()]
        self._perm = [index[id(v)] for v in chain_vars]
        self._chain_sizes = [self.space.sizes[i] for i in self._perm]
        self._stage_sizes = [stage.size for stage in self._stages]

    # -- Rows <-> per-stage blocks ----------------------------------------------------------------

    def _split(self, rows):
        pieces = tf.split(rows, self.space.sizes, axis=1)
        flat = tf.concat([pieces[i] for i in self._perm], axis=1)
        return [tf.transpose(b) for b in tf.split(flat, self._stage_sizes, axis=1)]

    def _join(self, parts):
        flat = tf.concat([tf.transpose(b) for b in parts], axis=1)
        pieces = tf.split(flat, self._chain_sizes, axis=1)
        ordered = [None] * len(pieces)
        for j, i in enumerate(self._perm):
            ordered[i] = pieces[j]
        return tf.concat(ordered, axis=1)

    # -- Public products ----------------------------------------------------------------------------

    @property
    def factorization(self):
        """The Riccati factorization (computed on first use, then cached)."""
        if self._factorization is None:
            self._factorization = chain_factorize(self._blocks, stage_names=[f"layer {s.name!r}" for s in self._stages])
        return self._factorization

    @property
    def inertia(self):
        """Number of negative eigenvalues of `H + λI` (factorizes on first use)."""
        return self.factorization.inertia

    def apply(self, rows):
        """`(H + λI) vᵀ` for each row of `rows` `[k, p]`; returns `[k, p]`."""
        rows = tf.convert_to_tensor(rows, dtype=self.dtype)
        return self._join(chain_matmul(self._blocks, self._split(rows)))

    def solve_rows(self, rows):
        """`(H + λI)⁻¹ bᵀ` for each row of `rows` `[k, p]`; returns `[k, p]`."""
        rows = tf.convert_to_tensor(rows, dtype=self.dtype)
        return self._join(chain_factor_solve(self.factorization, self._blocks, self._split(rows)))

    # -- LinearOperator interface ----------------------------------------------------------------

    def _shape(self):
        return tf.TensorShape([self.space.size, self.space.size])

    def _shape_tensor(self):
        return tf.constant([self.space.size, self.space.size], dtype=tf.int32)

    def _columns(self, x, adjoint_arg):
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        if x.shape.rank != 2:
            raise InputError(f"{self.name} supports no batch shape; received a tensor of shape {x.shape}.")
        return tf.transpose(x)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        return tf.transpose(self.apply(self._columns(x, adjoint_arg)))

    def _solve(self, rhs, adjoint=False, adjoint_arg=False):
        return tf.transpose(self.solve_rows(self._columns(rhs, adjoint_arg)))


# -- Entry points -------------------------------------------------------------------------------

_ON_INDEFINITE = ("warn", "raise", "ignore")


def _solve(hessian, rows, on_indefinite, started):
    factorization = hessian.factorization
    if factorization.inertia:
        message = (f"H + λI (λ = {hessian.damping:g}) has {factorization.inertia} negative eigenvalue(s): the chain "
                   "solution is exact but influence scores from an indefinite Hessian are hard to interpret. Raise "
                   "damping above |λ_min(H)| (tfi.extreme_eigenvalues) or use curvature='gauss_newton'.")
        if on_indefinite == "raise":
            raise NegativeCurvatureError(message)
        if on_indefinite == "warn":
            warnings.warn(message, stacklevel=3)
    x = hessian.solve_rows(rows)
    residual = hessian.apply(x) - rows
    norms = tf.linalg.norm(rows, axis=1)
    relative = tf.linalg.norm(residual, axis=1) / tf.where(norms > 0, norms, tf.ones_like(norms))
    worst = float(tf.reduce_max(relative))
    tol = float(np.sqrt(np.finfo(hessian.dtype.as_numpy_dtype).eps))
    if not worst <= tol:
        _log.warning("chain solve: relative residual %.2e above %.1e; H + λI is ill-conditioned, add damping.", worst, tol)
    pivots = factorization.pivots
    extra = dict(inertia=factorization.inertia, damping=hessian.damping, l2=hessian.objective.l2,
                 curvature=hessian.curvature, examples=hessian.parameters["examples"], layers=len(pivots),
                 eigh_pivots=sum(1 for p in pivots if p is not None and p.cholesky is None))
    info = SolveInfo(method="chain", iterations=0, residual=worst, converged=worst <= tol,
                     seconds=time.perf_counter() - started, residual_is_estimate=False, extra=extra)
    return x, info


def chain_solve(model, loss, data, b, variables=None, *, damping=0.0, l2=0.0, curvature="hessian",
                training=False, on_indefinite="warn", dtype=tf.float64, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES):
    """Solves `(H + λI) x = b` exactly for a Dense chain over all of `data` (one batch of n examples).

    Args:
      model, loss, data, variables, damping, l2, curvature, training, dtype, max_memory_bytes: as for
        `ChainHessian`.
      b: right-hand sides: a flat `[p]` vector, rows `[k, p]`, or a list shaped like the variables.
      on_indefinite: when `H + λI` has negative eigenvalues: `"warn"` (default), `"raise"`
        (`NegativeCurvatureError`) or `"ignore"`; the exact solution is returned otherwise.

    Returns:
      `(x, info)`: x `[p]` or `[k, p]` like b (a list input gives rows), in `dtype`; `info` a `SolveInfo`
      with the exact relative residual and `info.extra["inertia"]`, the number of negative eigenvalues.

    Raises:
      NegativeCurvatureError: `H + λI` singular (the message gives the inertia and a damping to try).
      UnsupportedLayerError, InputError, ResourceError: see `ChainHessian`.

    Example:
      >>> x, info = chain_solve(model, "sparse_categorical_crossentropy", (x_train, y_train), g, damping=1e-3)
      >>> info.extra["inertia"]
      0
    """
    if on_indefinite not in _ON_INDEFINITE:
        raise InputError(f"on_indefinite must be one of {_ON_INDEFINITE}. Received {on_indefinite!r}.")
    started = time.perf_counter()
    hessian = ChainHessian(model, loss, data, variables, damping=damping, l2=l2, curvature=curvature,
                           training=training, dtype=dtype, max_memory_bytes=max_memory_bytes)
    single = not isinstance(b, (list, tuple)) and np.ndim(b) == 1
    rows = hessian.space.as_flat_vectors(b) if isinstance(b, (list, tuple)) else tf.convert_to_tensor(b)
    rows = tf.cast(tf.reshape(rows, [-1, hessian.space.size]) if single else rows, hessian.dtype)
    if rows.shape.rank != 2 or rows.shape[-1] != hessian.space.size:
        raise InputError(f"b must have shape [p] or [k, p] with p = {hessian.space.size}. Received {tuple(np.shape(b))}.")
    x, info = _solve(hessian, rows, on_indefinite, started)
    return (x[0] if single else x), info


@dataclasses.dataclass(frozen=True)
class Chain:
    """The exact chain solver as a method object for a `tfi.HessianOperator`.

    `Chain().solve(operator, b_rows)` reads the operator's model, objective (loss, l2, training flag),
    data (all of it, as one batch), damping, selected variables and curvature, and solves exactly with
    `ChainHessian`. Sample weights are honoured; model L2 weight regularisers are included.

    Attributes:
      on_indefinite: `"warn"`, `"raise"` or `"ignore"` when `H + λI` has negative eigenvalues.
      max_memory_bytes: refuse (ResourceError) above this estimate.
      dtype: computation dtype, "float64" by default; results are cast to the operator's dtype.

    Example:
      >>> H = tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y), damping=1e-3)
      >>> x_rows, info = Chain().solve(H, g_rows)
    """

    on_indefinite: str = "warn"
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
    dtype: str = "float64"

    name = "chain"

    def __post_init__(self):
        if self.on_indefinite not in _ON_INDEFINITE:
            raise InputError(f"on_indefinite must be one of {_ON_INDEFINITE}. Received {self.on_indefinite!r}.")
        if not isinstance(self.max_memory_bytes, (int, np.integer)) or self.max_memory_bytes <= 0:
            raise InputError(f"max_memory_bytes must be a positive integer. Received {self.max_memory_bytes!r}.")
        if tf.as_dtype(self.dtype) not in (tf.float32, tf.float64):
            raise InputError(f"dtype must be 'float32' or 'float64'. Received {self.dtype!r}.")

    def solve(self, operator, b_rows):
        """`(H + λI)⁻¹ bᵢ` for each row of `b_rows` `[k, p]`; returns `(x_rows, SolveInfo)`."""
        missing = [a for a in ("model", "objective", "dataset", "damping", "selected_variables", "curvature")
                   if not hasattr(operator, a)]
        if missing:
            raise InputError(f"method='chain' needs a tfi.HessianOperator (it reads the model and data); received "
                             f"{type(operator).__name__}, which lacks {missing}.")
        started = time.perf_counter()
        hessian = ChainHessian(operator.model, operator.objective, operator.dataset, operator.selected_variables,
                               damping=operator.damping, curvature=operator.curvature, dtype=self.dtype,
                               max_memory_bytes=self.max_memory_bytes)
        rows = tf.convert_to_tensor(b_rows)
        if rows.shape.rank != 2 or rows.shape[-1] != hessian.space.size:
            raise InputError(f"b_rows must have shape [k, p] with p = {hessian.space.size}. Received {tuple(rows.shape)}.")
        x, info = _solve(hessian, tf.cast(rows, hessian.dtype), self.on_indefinite, started)
        return tf.cast(x, operator.dtype), info
