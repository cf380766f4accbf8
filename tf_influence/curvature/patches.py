"""Geometry of the layers `capture` factors: convolution patches (KFC), transposed-convolution
gradient patches, channel order, and EinsumDense equations. Pure functions of a layer's
configuration and a tensor; no model state.

For a convolution with kernel `K` `[*k, c_in, c_out]`, the output at position t is
`z_t = K̃ᵀ a_t` with `a_t` the input patch under the kernel at t, flattened in the kernel's
`(*k, c_in)` order, so `∂ℓ/∂K = Σ_t a_t g_tᵀ` (Grosse & Martens 2016). A transposed convolution
is the adjoint of a convolution: `y = Aᵀ x` for `A = conv(·, K)` with the same strides, padding and
dilation, hence `⟨g, y⟩ = ⟨conv(g, K), x⟩` and `∂ℓ/∂K[k, f, c] = Σ_t x_t[c] · patch_t(g)[k, f]`:
the input pixels play the role of the positions, and the patches of the *output gradient* the
role of g (see docs/mathematics.md, "Kronecker factors of convolutions").
"""

import numpy as np
import tensorflow as tf


def channels_first(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def to_channels_last(layer, x):
    """`x` with its channel axis last (a no-op for channels_last layers)."""
    x = tf.convert_to_tensor(x)
    if channels_first(layer):
        x = tf.transpose(x, [0] + list(range(2, x.shape.rank)) + [1])
    return x


def patches(layer, x, *, transposed=False):
    """Patches `[N, positions, prod(k)·c]` of `x` (channels last) under the layer's kernel window.

    Ordered like the kernel reshaped to `[prod(k)·c, ...]` (kernel axes, then channels). With
    `transposed=True`, `x` is the output gradient of a transposed convolution and the windows are
    those of the convolution it is the adjoint of (one per input pixel).
    """
    x = to_channels_last(layer, x)
    kernel, strides, rates = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
    padding = layer.padding.upper()
    if len(kernel) == 3:
        if any(r != 1 for r in rates):
            raise ValueError("dilated 3-D windows are not supported")
        found = tf.extract_volume_patches(x, ksizes=[1, *kernel, 1], strides=[1, *strides, 1], padding=padding)
        return tf.reshape(found, [tf.shape(found)[0], -1, found.shape[-1]])
    if len(kernel) == 1:  # a 1-D window as a 2-D one of height 1
        if padding == "CAUSAL":
            x = tf.pad(x, [[0, 0], [(kernel[0] - 1) * rates[0], 0], [0, 0]])
            padding = "VALID"
        x = x[:, tf.newaxis]
        kernel, strides, rates = [1] + kernel, [1] + strides, [1] + rates
    found = tf.image.extract_patches(
        x, sizes=[1, *kernel, 1], strides=[1, *strides, 1], rates=[1, *rates, 1], padding=padding)
    return tf.reshape(found, [tf.shape(found)[0], -1, found.shape[-1]])


def einsum_split(layer):
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


def einsum_in_features(layer):
    contracted, _ = einsum_split(layer)
    return int(np.prod([int(d) for d in layer.kernel.shape[: len(contracted)]]))


def broadcast_shape(layer, param, rank):
    """How an elementwise parameter broadcasts against the layer's output of rank `rank`: a list of
    `rank` sizes, 1 on the axes it is shared over (the batch axis among them).

    Normalisation layers place their parameter on `layer.axis` (the channel axis for
    BatchNormalization and GroupNormalization); PReLU's alpha covers every axis after the batch one
    (size 1 where shared); a transposed convolution's bias sits on its channel axis.
    """
    shape = [1] * rank
    dims = [int(d) for d in param.shape]
    axis = getattr(layer, "axis", None)
    if axis is not None:
        axes = sorted(a % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis]))
        if len(axes) == len(dims):
            for a, d in zip(axes, dims):
                shape[a] = d
            return shape
        if len(dims) == 1 and len(axes) > 1:
            raise ValueError(f"a 1-D parameter over several axes {axes}")
    if len(dims) == rank - 1:
        return [1] + dims
    if len(dims) == 1:  # a channel vector (a transposed convolution's bias)
        shape[1 if channels_first(layer) else rank - 1] = dims[0]
        return shape
    raise ValueError(f"parameter of shape {dims} does not broadcast against outputs of rank {rank}")
