"""Layer capture without hooks: each block's inputs and pre-activation outputs during a forward pass.

Keras has no forward/backward hooks. `capture(blocks)` temporarily replaces `layer.call` on each
layer instance by a wrapper that runs the original `call` with the layer's activation switched off,
records the input `x` and the pre-activation output `z`, and applies the activation itself. The
caller differentiates a loss with respect to the recorded `z` (a `GradientTape` can differentiate
with respect to any tensor it recorded) to get `g = ∂ℓ/∂z`. A separable convolution is computed by
the wrapper as its depthwise and pointwise parts, so that the intermediate is recorded too; for
elementwise parameters the wrapper also records their features `∂z/∂p` (see `LayerBlock`). Every
change is undone when the context exits, also when an exception escapes.

`find_blocks` turns a model and a variable selection into `LayerBlock`s (see `blocks.py` for the
kinds), walking composite layers (MultiHeadAttention, nested models, custom blocks) down to the
layers that own the weights, and refuses the weights it cannot factor, naming their layers.
"""

import contextlib

import numpy as np
import tensorflow as tf

from tf_influence.curvature import patches as _patches
from tf_influence.curvature.blocks import DENSE_LIMIT, LayerBlock
from tf_influence.errors import UnsupportedLayerError
from tf_influence.layers import is_nested_model, own_weights, sublayers, walk_layers

CONVOLUTIONS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D")
TRANSPOSED = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
ELEMENTWISE = {"LayerNormalization": ("gamma", "beta"), "BatchNormalization": ("gamma", "beta"),
               "GroupNormalization": ("gamma", "beta"), "RMSNormalization": ("scale",), "PReLU": ("alpha",)}
SUPPORTED_LAYERS = ("Dense", "EinsumDense", "Embedding", *CONVOLUTIONS, "SeparableConv2D", *TRANSPOSED,
                    *ELEMENTWISE)


def find_blocks(model, variables):
    """The `LayerBlock`s holding the selected variables, in model order.

    Args:
      model: a Keras model (Sequential, Functional, subclassed; nested models and layers that own
        sublayers, such as MultiHeadAttention, are searched down to the layers owning the weights).
      variables: the selected variables (e.g. from `tfi.select_variables`).

    Returns:
      A list of `LayerBlock` (a transposed convolution gives two: its kernel and its bias; a
      separable convolution two: its depthwise and pointwise kernels).

    Raises:
      UnsupportedLayerError: when a selected variable belongs to a layer that cannot be factored
        (not one of `SUPPORTED_LAYERS`, or LoRA, quantisation, causal 2-D padding, output_padding,
        dilated 3-D windows, an EinsumDense that is not a matmul), naming every such layer and the
        alternatives.

    Example:
      >>> blocks = find_blocks(model, select_variables(model))
      >>> [(b.name, b.kind) for b in blocks]
      [('dense', 'dense'), ('layer_normalization', 'elementwise'), ('dense_1', 'dense')]
    """
    selected = {id(v) for v in variables}
    blocks, problems, covered, refused = [], [], set(), []
    parents = {id(child): layer for layer in walk_layers(model, include_root=True) for child in sublayers(layer)}
    for layer in walk_layers(model):
        mine = [v for v in own_weights(layer) if id(v) in selected and id(v) not in covered]
        if not mine:
            continue
        covered.update(id(v) for v in mine)
        try:
            blocks.extend(_layer_blocks(layer, mine))
        except _Unsupported as reason:
            owner = _outermost(layer, parents, model)
            problems.append(f"{owner.name!r} ({type(owner).__name__}: {reason})" if owner is layer else
                            f"{owner.name!r} ({type(owner).__name__}, in its sublayer {layer.name!r} "
                            f"({type(layer).__name__}): {reason})")
            refused.append(owner.name)
    missing = [getattr(v, "path", v.name) for v in variables if id(v) not in covered]
    if missing:
        problems.append(f"variables not owned by any layer: {missing}")
    if problems:
        supported = sorted({b.name for b in blocks} - set(refused))
        hint = f" (here variables={supported})" if supported else ""
        raise UnsupportedLayerError(
            f"KFAC/EKFAC cannot factor the selected weights of: {'; '.join(problems)}. Supported layers: "
            f"{', '.join(SUPPORTED_LAYERS)} (and composites of them, e.g. MultiHeadAttention). Fixes: an exact "
            "method, method='direct' (up to ~10k parameters) or method='cg' (with damping or "
            "curvature='gauss_newton'), which take any layer; or select only supported layers"
            f"{hint}.")
    return blocks


class _Unsupported(Exception):
    pass


def _outermost(layer, parents, model):
    """The outermost layer (below the model and nested models) that contains `layer`."""
    owner = layer
    while id(owner) in parents and parents[id(owner)] is not model and not is_nested_model(parents[id(owner)]):
        owner = parents[id(owner)]
    return owner


def _layer_blocks(layer, mine):
    kind = type(layer).__name__
    if kind not in SUPPORTED_LAYERS:
        raise _Unsupported(_why_not(layer))
    if getattr(layer, "lora_enabled", False):
        raise _Unsupported("LoRA is enabled")
    if getattr(layer, "quantization_mode", None) or getattr(layer.dtype_policy, "quantization_mode", None):
        raise _Unsupported("quantised")
    ids = {id(v) for v in mine}
    pick = lambda name: getattr(layer, name, None) if id(getattr(layer, name, None)) in ids else None  # noqa: E731
    if kind in ELEMENTWISE:
        return [_elementwise(layer, mine)]
    known = ("kernel", "bias", "embeddings", "depthwise_kernel", "pointwise_kernel")
    if any(all(v is not getattr(layer, name, None) for name in known) for v in mine):
        raise _Unsupported("holds extra variables")
    if kind == "Embedding":
        vocab, dim = (int(d) for d in layer.embeddings.shape)
        return [LayerBlock(layer, "embedding", pick("embeddings"), None, vocab, dim)]
    if kind in ("Dense", "EinsumDense"):
        shape = [int(d) for d in layer.kernel.shape]
        if kind == "EinsumDense":
            try:
                d_in = _patches.einsum_in_features(layer)
            except ValueError as e:
                raise _Unsupported(str(e)) from None
        else:
            d_in = shape[0]
        return [LayerBlock(layer, "dense", pick("kernel"), pick("bias"), d_in, int(np.prod(shape)) // d_in)]
    if kind == "SeparableConv2D":
        return _separable(layer, pick)
    _check_window(layer)
    shape = [int(d) for d in layer.kernel.shape]
    if kind in TRANSPOSED:  # kernel [*k, c_out, c_in]; the bias is an exact elementwise block
        blocks = []
        if pick("kernel") is not None:
            blocks.append(LayerBlock(layer, "transposed", layer.kernel, None, shape[-1], int(np.prod(shape[:-1]))))
        if pick("bias") is not None:
            blocks.append(_elementwise(layer, [layer.bias]))
        return blocks
    window = int(np.prod(shape[:-2]))
    if kind.startswith("Depthwise"):  # kernel [*k, C, m]: one Kronecker per input channel
        return [LayerBlock(layer, "conv", pick("kernel"), pick("bias"), window, shape[-1], groups=shape[-2])]
    groups = getattr(layer, "groups", 1)
    return [LayerBlock(layer, "conv", pick("kernel"), pick("bias"), window * shape[-2], shape[-1] // groups,
                       groups=groups)]


def _why_not(layer):
    if hasattr(layer, "cell") or type(layer).__name__.endswith("Cell"):
        return ("recurrent layer: its weights act through a nonlinear recurrence over time steps, which has no "
                "Kronecker-factored form")
    return "layer type not supported"


def _check_window(layer):
    kind = type(layer).__name__
    if kind == "Conv2D" and layer.padding == "causal":
        raise _Unsupported("causal padding")
    if kind in TRANSPOSED and getattr(layer, "output_padding", None) is not None:
        raise _Unsupported(f"output_padding={layer.output_padding}")
    if kind.startswith("Conv3D") and any(r != 1 for r in layer.dilation_rate):
        raise _Unsupported(f"dilated 3-D convolution (dilation_rate={layer.dilation_rate})")


def _separable(layer, pick):
    if _patches.channels_first(layer):
        raise _Unsupported("data_format='channels_first'")
    depthwise = [int(d) for d in layer.depthwise_kernel.shape]  # [*k, C, m]
    pointwise = [int(d) for d in layer.pointwise_kernel.shape]  # [1, 1, C·m, F]
    blocks = []
    if pick("depthwise_kernel") is not None:
        blocks.append(LayerBlock(layer, "conv", layer.depthwise_kernel, None, int(np.prod(depthwise[:-2])),
                                 depthwise[-1], groups=depthwise[-2], role="depthwise"))
    if pick("pointwise_kernel") is not None or pick("bias") is not None:
        blocks.append(LayerBlock(layer, "dense", pick("pointwise_kernel"), pick("bias"), pointwise[-2], pointwise[-1],
                                 role="pointwise"))
    return blocks


def _elementwise(layer, params):
    size = sum(int(np.prod(v.shape)) for v in params)
    diagonal = size > DENSE_LIMIT
    d_a, d_g = (size, 1) if diagonal else (1, size)
    return LayerBlock(layer, "elementwise", None, None, d_a, d_g, params=tuple(params), diagonal=diagonal)


@contextlib.contextmanager
def capture(blocks, *, tape=None):
    """Records each block's inputs and pre-activation outputs during forward passes.

    Args:
      blocks: `LayerBlock`s from `find_blocks`.
      tape: optional `GradientTape` that should watch the recorded pre-activations.

    Yields:
      A `Recording`: `recording.inputs[i]` and `recording.preactivations[i]` list, per call of
      block i's layer, its input (for elementwise blocks: the parameters' features) and its
      pre-activation output.

    Example:
      >>> with tf.GradientTape() as tape, capture(blocks, tape=tape) as rec:
      ...     loss = tf.reduce_sum(objective.per_example_loss(y, model(x)))
      >>> g = tape.gradient(loss, rec.preactivations[0][0])       # ∂ℓ/∂z of the first block
    """
    recording = Recording(len(blocks))
    by_layer = {}
    for index, block in enumerate(blocks):
        by_layer.setdefault(id(block.layer), (block.layer, []))[1].append((index, block))
    saved = []
    try:
        for layer, entries in by_layer.values():
            saved.append((layer, "call" in layer.__dict__, layer.__dict__.get("call"),
                          getattr(layer, "activation", None), layer.trainable))
            object.__setattr__(layer, "call", _recording_call(layer, layer.call, entries, recording, tape))
        yield recording
    finally:
        for layer, had_own_call, own_call, activation, trainable in reversed(saved):
            if had_own_call:
                object.__setattr__(layer, "call", own_call)
            else:
                object.__delattr__(layer, "call")
            if hasattr(layer, "activation"):
                object.__setattr__(layer, "activation", activation)
            if layer.trainable != trainable:
                layer.trainable = trainable


class Recording:
    """What `capture` saw: per block, the list of layer inputs and pre-activation outputs (one per call)."""

    def __init__(self, num_blocks):
        self.inputs = [[] for _ in range(num_blocks)]
        self.preactivations = [[] for _ in range(num_blocks)]

    def flat_preactivations(self):
        return [z for calls in self.preactivations for z in calls]

    def check_called(self, blocks):
        unused = [b.name for b, calls in zip(blocks, self.inputs) if not calls]
        if unused:
            raise UnsupportedLayerError(
                f"Layers {unused} hold selected variables but were not called by the model's forward "
                "pass, so KFAC/EKFAC cannot see their inputs. Select only layers the model uses."
            )


def _recording_call(layer, original, entries, recording, tape):
    activation = getattr(layer, "activation", None)
    watch = tape.watch if tape is not None else (lambda t: None)

    def call(inputs, *args, **kwargs):
        def linear(x):  # the layer without its activation
            if activation is not None:
                object.__setattr__(layer, "activation", None)
            try:
                return original(x, *args, **kwargs)
            finally:
                if activation is not None:
                    object.__setattr__(layer, "activation", activation)

        if any(block.role != "call" for _, block in entries):
            u, z = _separable_parts(layer, inputs, watch)
            tensors = {"depthwise": (inputs, u), "pointwise": (u, z)}
        else:
            z = linear(inputs)
            tensors = {"call": (inputs, z)}
        watch(z)
        for index, block in entries:
            x_in, preactivation = tensors[block.role]
            if block.kind == "elementwise":
                x_in = block.features(linear, inputs)
            recording.inputs[index].append(x_in)
            recording.preactivations[index].append(preactivation)
        return activation(z) if activation is not None else z

    return call


def _separable_parts(layer, inputs, watch):
    """SeparableConv2D (channels last) as depthwise then pointwise: `(u, z)` before the activation."""
    x = tf.convert_to_tensor(inputs)
    u = tf.nn.depthwise_conv2d(x, tf.convert_to_tensor(layer.depthwise_kernel), strides=[1, *layer.strides, 1],
                               padding=layer.padding.upper(), dilations=layer.dilation_rate)
    watch(u)
    z = tf.nn.conv2d(u, tf.convert_to_tensor(layer.pointwise_kernel), strides=1, padding="VALID")
    if layer.bias is not None:
        z = z + tf.convert_to_tensor(layer.bias)
    return u, z
