"""Layer capture without hooks: each layer's inputs and pre-activation outputs during a forward pass.

Keras has no forward/backward hooks. `capture(blocks)` temporarily replaces `layer.call` on each
layer instance by a wrapper that runs the original `call` with the layer's activation switched off,
records the input `x` and the pre-activation output `z`, and applies the activation itself. The
caller differentiates a loss with respect to the recorded `z` (a `GradientTape` can differentiate
with respect to any tensor it recorded) to get `g = ∂ℓ/∂z`. Every change is undone when the context
exits, also when an exception escapes.

For every supported layer, the weight gradient factors exactly as

    ∂ℓ/∂W = Σ_t a_t g_tᵀ        (a: input rows with a 1 appended for the bias, g: output rows)

summed over the layer's "positions" t: 1 for a Dense layer on vectors, the time steps of a Dense
layer on sequences, the output pixels of a convolution (a_t: the input patch, as in KFC), the
tokens of an Embedding (a_t: the one-hot token), and repeated calls of a shared layer.

`LayerBlock` describes one such layer (which selected variables it holds, how to turn a recorded
input and output into the rows `a` `[N, T, d_a]` and `g` `[N, T, d_g]`); `find_blocks` builds them
for a model and a variable selection and refuses layers it cannot factor.
"""

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from tf_influence.errors import UnsupportedLayerError
from tf_influence.layers import leaf_layers

SUPPORTED_LAYERS = ("Dense", "EinsumDense", "Conv1D", "Conv2D", "Embedding")


@dataclasses.dataclass(eq=False)
class LayerBlock:
    """One layer whose selected weights have a Kronecker-factored gradient `Σ_t a_t g_tᵀ`.

    Attributes:
      layer: the Keras layer.
      kind: "dense" (Dense, EinsumDense), "conv" (Conv1D, Conv2D) or "embedding".
      kernel: the selected kernel variable, or None when only the bias is selected.
      bias: the selected bias variable, or None.
      in_features: rows of the kernel seen as a matrix `[d_in, d_out]` (the vocabulary size for
        an Embedding).
      out_features: columns `d_out` of that matrix.
    """

    layer: object
    kind: str
    kernel: object
    bias: object
    in_features: int
    out_features: int

    @property
    def name(self):
        return self.layer.name

    @property
    def variables(self):
        return [v for v in (self.kernel, self.bias) if v is not None]

    @property
    def a_size(self):
        """`d_a`: kernel rows (if the kernel is selected) plus 1 for the bias (if selected)."""
        return (self.in_features if self.kernel is not None else 0) + (self.bias is not None)

    @property
    def diagonal_inputs(self):
        """True for an Embedding: `a` is one-hot, so `E[a aᵀ]` is diagonal and stays implicit."""
        return self.kind == "embedding"

    def input_rows(self, inputs):
        """`a` rows `[N, T, d_a]` from one recorded layer input (int token ids `[N, T]` for embeddings)."""
        if self.kind == "embedding":
            ids = tf.cast(inputs, tf.int32)
            return tf.reshape(ids, [tf.shape(ids)[0], -1])
        if self.kind == "conv":
            rows = _conv_patches(self.layer, inputs)
        else:
            rows = tf.convert_to_tensor(inputs)
            if self.layer.__class__.__name__ == "EinsumDense":
                rows = _einsum_input_rows(self.layer, rows)
            rows = tf.reshape(rows, [tf.shape(rows)[0], -1, self.in_features])
        ones = tf.ones_like(rows[..., :1])
        if self.kernel is None:
            rows = rows[..., :0]
        if self.bias is not None:
            rows = tf.concat([rows, ones], axis=-1)
        return rows

    def output_rows(self, outputs):
        """`g` rows `[N, T, d_g]` from a pre-activation output (or its gradient) of the same shape."""
        outputs = tf.convert_to_tensor(outputs)
        if self.kind == "conv" and _channels_first(self.layer):
            outputs = tf.transpose(outputs, [0] + list(range(2, outputs.shape.rank)) + [1])
        return tf.reshape(outputs, [tf.shape(outputs)[0], -1, self.out_features])

    def weight_gradients(self, a, g):
        """`Σ_n Σ_t a gᵀ` split back into variable-shaped gradients (kernel, bias), for checks."""
        a = tf.cast(a, g.dtype) if not self.diagonal_inputs else tf.one_hot(a, self.in_features, dtype=g.dtype)
        matrix = tf.einsum("ntk,ntl->kl", a, g)
        grads = []
        if self.kernel is not None:
            grads.append(tf.reshape(matrix[: self.in_features], self.kernel.shape))
        if self.bias is not None:
            grads.append(tf.reshape(matrix[-1], self.bias.shape))
        return grads


def find_blocks(model, variables):
    """The `LayerBlock`s holding the selected variables, in model order.

    Args:
      model: a Keras model (Sequential, Functional, subclassed; nested models are searched).
      variables: the selected variables (e.g. from `tfi.select_variables`).

    Returns:
      A list of `LayerBlock`, one per layer holding selected variables.

    Raises:
      UnsupportedLayerError: when a selected variable belongs to a layer that cannot be factored
        (its type is not one of Dense, EinsumDense reducing to a matmul, Conv1D, Conv2D,
        Embedding; or it uses LoRA, grouped convolutions, quantisation), listing every such layer.

    Example:
      >>> blocks = find_blocks(model, select_variables(model))
      >>> [b.name for b in blocks]
      ['dense', 'dense_1']
    """
    selected = {id(v) for v in variables}
    blocks, problems, covered = [], [], set()
    for layer in leaf_layers(model):
        mine = [v for v in layer.trainable_weights if id(v) in selected and id(v) not in covered]
        if not mine:
            continue
        covered.update(id(v) for v in mine)
        reason = _unsupported_reason(layer, mine)
        if reason:
            problems.append(f"{layer.name!r} ({type(layer).__name__}: {reason})")
            continue
        blocks.append(_make_block(layer, mine))
    missing = [getattr(v, "path", v.name) for v in variables if id(v) not in covered]
    if missing:
        problems.append(f"variables not owned by any layer: {missing}")
    if problems:
        raise UnsupportedLayerError(
            "KFAC/EKFAC needs every selected variable to sit in a Dense, EinsumDense (matmul form), "
            f"Conv1D, Conv2D or Embedding layer. Unsupported: {'; '.join(problems)}. Fix: select "
            "only supported layers (e.g. variables=[...] naming them), or use another method "
            "(method='cg' or 'direct')."
        )
    return blocks


@contextlib.contextmanager
def capture(blocks, *, tape=None):
    """Records each block's inputs and pre-activation outputs during forward passes.

    Args:
      blocks: `LayerBlock`s from `find_blocks`.
      tape: optional `GradientTape` that should watch the recorded pre-activations.

    Yields:
      A `Recording`: `recording.inputs[i]` and `recording.preactivations[i]` list, per call of
      block i's layer, its input and pre-activation output.

    Example:
      >>> with tf.GradientTape() as tape, capture(blocks, tape=tape) as rec:
      ...     loss = tf.reduce_sum(objective.per_example_loss(y, model(x)))
      >>> g = tape.gradient(loss, rec.preactivations[0][0])       # ∂ℓ/∂z of the first layer
    """
    recording = Recording(len(blocks))
    saved = []
    try:
        for index, block in enumerate(blocks):
            layer = block.layer
            saved.append((layer, "call" in layer.__dict__, layer.__dict__.get("call"),
                          getattr(layer, "activation", None), layer.trainable))
            object.__setattr__(layer, "call", _recording_call(layer, layer.call, recording, index, tape))
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


def _recording_call(layer, original, recording, index, tape):
    activation = getattr(layer, "activation", None)

    def call(inputs, *args, **kwargs):
        if activation is not None:
            object.__setattr__(layer, "activation", None)
        try:
            z = original(inputs, *args, **kwargs)
        finally:
            if activation is not None:
                object.__setattr__(layer, "activation", activation)
        if tape is not None:
            tape.watch(z)
        recording.inputs[index].append(inputs)
        recording.preactivations[index].append(z)
        return activation(z) if activation is not None else z

    return call


def _unsupported_reason(layer, mine):
    kind = type(layer).__name__
    if kind not in SUPPORTED_LAYERS:
        return "layer type not supported"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None) or getattr(layer.dtype_policy, "quantization_mode", None):
        return "quantised"
    if any(v is not getattr(layer, "kernel", None) and v is not getattr(layer, "bias", None)
           and v is not getattr(layer, "embeddings", None) for v in mine):
        return "holds extra variables"
    if kind in ("Conv1D", "Conv2D"):
        if getattr(layer, "groups", 1) != 1:
            return f"grouped convolution (groups={layer.groups})"
        if kind == "Conv2D" and layer.padding == "causal":
            return "causal padding"
    if kind == "EinsumDense":
        try:
            _einsum_split(layer)
        except ValueError as e:
            return str(e)
    return None


def _make_block(layer, mine):
    kind = type(layer).__name__
    ids = {id(v) for v in mine}
    pick = lambda v: v if v is not None and id(v) in ids else None  # noqa: E731
    if kind == "Embedding":
        vocab, dim = (int(d) for d in layer.embeddings.shape)
        return LayerBlock(layer, "embedding", pick(layer.embeddings), None, vocab, dim)
    kernel_shape = [int(d) for d in layer.kernel.shape]
    if kind == "EinsumDense":
        contracted, _ = _einsum_split(layer)
        d_in = int(np.prod(kernel_shape[: len(contracted)]))
    else:
        d_in = int(np.prod(kernel_shape[:-1]))  # Dense [in, out]; Conv [*k, c_in, out]
    d_out = int(np.prod(kernel_shape)) // d_in
    block_kind = "conv" if kind.startswith("Conv") else "dense"
    return LayerBlock(layer, block_kind, pick(layer.kernel), pick(getattr(layer, "bias", None)), d_in, d_out)


def _channels_first(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def _conv_patches(layer, inputs):
    """Input patches `[N, positions, k·c_in]`, ordered like the kernel reshaped to `[k·c_in, c_out]`."""
    x = tf.convert_to_tensor(inputs)
    if _channels_first(layer):
        x = tf.transpose(x, [0] + list(range(2, x.shape.rank)) + [1])
    kernel, strides, rates = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
    padding = layer.padding.upper()
    if len(kernel) == 1:  # Conv1D as a Conv2D of height 1
        if padding == "CAUSAL":
            x = tf.pad(x, [[0, 0], [(kernel[0] - 1) * rates[0], 0], [0, 0]])
            padding = "VALID"
        x = x[:, tf.newaxis]
        kernel, strides, rates = [1] + kernel, [1] + strides, [1] + rates
    patches = tf.image.extract_patches(
        x, sizes=[1, *kernel, 1], strides=[1, *strides, 1], rates=[1, *rates, 1], padding=padding)
    return tf.reshape(patches, [tf.shape(patches)[0], -1, patches.shape[-1]])


def _einsum_split(layer):
    """`(contracted, kept)` letters when `layer.equation` is `<lead><c>,<c><o>-><lead><o>`."""
    equation = layer.equation.replace("...", "0")
    try:
        inputs, output = equation.split("->")
        x_spec, k_spec = inputs.split(",")
    except ValueError:
        raise ValueError(f"equation {layer.equation!r} not understood") from None
    n_contracted = len(set(x_spec) & set(k_spec))
    contracted, kept = k_spec[:n_contracted], k_spec[n_contracted:]
    lead = x_spec[: len(x_spec) - n_contracted]
    if (not contracted or not lead or x_spec[len(lead):] != contracted or output != lead + kept
            or set(kept) & set(lead)):
        raise ValueError(f"equation {layer.equation!r} is not a matmul over the trailing input axes")
    bias = getattr(layer, "bias", None)
    if bias is not None:
        kernel_out = [int(d) for d in layer.kernel.shape[n_contracted:]]
        if int(np.prod(bias.shape)) != int(np.prod(kernel_out)):
            raise ValueError(f"bias over only some output axes (bias_axes={layer.bias_axes!r})")
    return contracted, kept


def _einsum_input_rows(layer, x):
    contracted, _ = _einsum_split(layer)
    d_in = int(np.prod([int(d) for d in layer.kernel.shape[: len(contracted)]]))
    return tf.reshape(x, [tf.shape(x)[0], -1, d_in])
