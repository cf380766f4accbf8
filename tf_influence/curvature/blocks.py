"""`LayerBlock`: one group of selected variables whose per-example gradient KFAC/EKFAC factor.

Every block turns what `capture` recorded during a forward pass (a layer input, a pre-activation
output and its gradient) into rows `a` `[N, T, (G,) d_a]` and `g` `[N, T, (G,) d_g]` with

    per-example gradient of the block = Σ_t a_t g_tᵀ        (per group, for grouped blocks)

summed over the positions t and over repeated calls of a shared layer. The kinds:

  dense        Dense, EinsumDense (matmul form), the pointwise part of SeparableConv2D:
               a = input rows with a 1 appended for the bias, g = output gradient rows (per position)
  conv         Conv1D/2D/3D, grouped convolutions, DepthwiseConv1D/2D, the depthwise part of
               SeparableConv2D: a = input patches (+1), g = output gradient per position; G groups
               (groups, or the input channels of a depthwise kernel) give G independent Kroneckers
  transposed   Conv1D/2D/3DTranspose kernels: a = input pixel, g = patch of the output gradient
  embedding    a = the token id (one-hot, kept as ids), g = gradient of the embedding output
  elementwise  small elementwise parameters (normalisation scale/offset, PReLU alpha, a transposed
               convolution's bias): exact per-example gradients G_i (no Kronecker approximation);
               their curvature block is dense `[p, p]` (a = 1, g = G_i) up to `DENSE_LIMIT`
               parameters and diagonal beyond (`diagonal=True`)

The mathematics is in docs/mathematics.md ("Kronecker factors of convolutions", "Exact blocks").
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_influence.curvature import patches as _patches
from tf_influence.linalg.kronecker import LayerLayout, join_layers
from tf_influence.params import tf_variables

DENSE_LIMIT = 1024  # elementwise blocks up to this many parameters keep their dense exact block
KINDS = ("dense", "conv", "transposed", "embedding", "elementwise")
OFFSETS = ("bias", "beta")  # elementwise parameters that are added: their feature is 1


@dataclasses.dataclass(eq=False)
class LayerBlock:
    """One block of selected variables with a Kronecker-factored (or exact) per-example gradient.

    Attributes:
      layer: the Keras layer.
      kind: one of `KINDS` (see the module docstring).
      kernel: the selected kernel variable, or None.
      bias: the selected bias variable, or None.
      in_features: kernel rows `d_in` per group (vocabulary size for an Embedding, input channels
        of a transposed convolution, the parameter count p of a diagonal elementwise block).
      out_features: columns `d_g` per group (p for a dense elementwise block).
      groups: G independent groups (depthwise / grouped convolutions), else 1.
      params: the variables of an elementwise block, in flat order.
      diagonal: an elementwise block kept diagonal (more than `DENSE_LIMIT` parameters).
      role: which of a layer's recorded tensors the block uses: "call" (layer input, pre-activation
        output), or "depthwise" / "pointwise" for the two kernels of a separable convolution.
    """

    layer: object
    kind: str
    kernel: object
    bias: object
    in_features: int
    out_features: int
    groups: int = 1
    params: tuple = ()
    diagonal: bool = False
    role: str = "call"

    @property
    def name(self):
        return self.layer.name

    @property
    def variables(self):
        if self.kind == "elementwise":
            return list(self.params)
        return [v for v in (self.kernel, self.bias) if v is not None]

    @property
    def a_size(self):
        """`d_a`: kernel rows (if the kernel is selected) plus 1 for the bias (if selected)."""
        if self.kind == "elementwise":
            return self.in_features
        return (self.in_features if self.kernel is not None else 0) + (self.bias is not None)

    @property
    def diagonal_inputs(self):
        """True when `A` is diagonal and `Q_A` the identity: Embedding ids, diagonal elementwise blocks."""
        return self.kind == "embedding" or self.diagonal

    def layout(self, index):
        """The block's `LayerLayout`, with `index` mapping `id(variable)` to its position in the flat vector."""
        pick = lambda v: None if v is None else index[id(v)]  # noqa: E731
        if self.kind == "elementwise":
            return LayerLayout(None, None, self.in_features, self.out_features,
                               parts=tuple(index[id(v)] for v in self.params))
        return LayerLayout(pick(self.kernel), pick(self.bias), self.in_features, self.out_features,
                           groups=self.groups, transpose=self.kind == "transposed")

    def input_rows(self, inputs):
        """`a` rows `[N, T, (G,) d_a]` from one recorded layer input (int token ids `[N, T]` for embeddings;
        elementwise blocks have none: their `a` is 1)."""
        if self.kind == "embedding":
            ids = tf.cast(inputs, tf.int32)
            return tf.reshape(ids, [tf.shape(ids)[0], -1])
        if self.kind == "elementwise":
            raise ValueError("elementwise blocks have a = 1; their rows come from output_rows (see layer_rows)")
        if self.kind == "transposed":
            x = _patches.to_channels_last(self.layer, inputs)
            return tf.reshape(x, [tf.shape(x)[0], -1, self.in_features])
        if self.kind == "conv":
            rows = _patches.patches(self.layer, inputs)
            if self.groups > 1:  # [N, T, k·c_in] -> [N, T, G, k·c_in/G] in the kernel's (k, c_in/G) order
                window = rows.shape[-1] // int(_channels(self.layer, inputs))
                rows = tf.reshape(rows, [tf.shape(rows)[0], -1, window, self.groups, self.in_features // window])
                rows = tf.reshape(tf.transpose(rows, [0, 1, 3, 2, 4]),
                                  [tf.shape(rows)[0], -1, self.groups, self.in_features])
        else:
            rows = tf.convert_to_tensor(inputs)
            rows = tf.reshape(rows, [tf.shape(rows)[0], -1, self.in_features])
        ones = tf.ones_like(rows[..., :1])
        if self.kernel is None:
            rows = rows[..., :0]
        if self.bias is not None:
            rows = tf.concat([rows, ones], axis=-1)
        return rows

    def output_rows(self, gradient, inputs=None):
        """`g` rows `[N, T, (G,) d_g]` from the gradient of a recorded pre-activation output.

        Elementwise blocks need the recorded `inputs` (the features `∂z/∂p` of each parameter) and
        return the exact per-example gradients `[N, 1, p]`.
        """
        gradient = tf.convert_to_tensor(gradient)
        n = tf.shape(gradient)[0]
        if self.kind == "elementwise":
            return tf.reshape(self.per_example_gradients(gradient, inputs), [n, 1, -1])
        if self.kind == "transposed":
            return _patches.patches(self.layer, gradient, transposed=True)
        if self.kind == "conv":
            gradient = _patches.to_channels_last(self.layer, gradient)
        if self.groups > 1:
            return tf.reshape(gradient, [n, -1, self.groups, self.out_features])
        return tf.reshape(gradient, [n, -1, self.out_features])

    def per_example_gradients(self, gradient, features):
        """`[N, p]`: each example's gradient of the elementwise parameters, `Σ_e g_e ∂z_e/∂p`."""
        rank = gradient.shape.rank
        columns = []
        for param, feature in zip(self.params, features):
            product = gradient if feature is None else gradient * tf.cast(feature, gradient.dtype)
            shape = _patches.broadcast_shape(self.layer, param, rank)
            summed = tf.reduce_sum(product, axis=[i for i in range(1, rank) if shape[i] == 1])
            columns.append(tf.reshape(summed, [tf.shape(gradient)[0], -1]))
        return tf.concat(columns, axis=-1)

    def features(self, call, inputs):
        """Per parameter, `∂z/∂p` broadcast over the output (None for an offset: 1), by forward-mode
        differentiation of `call(inputs)` along a tangent of ones (each output element depends on
        one entry of an elementwise parameter, so this jvp is exactly its derivative)."""
        found = []
        for param in self.params:
            if any(param is getattr(self.layer, name, None) for name in OFFSETS):
                found.append(None)
                continue
            variable = tf_variables([param])[0]
            with tf.autodiff.ForwardAccumulator([variable], [tf.ones_like(variable)]) as acc:
                z = call(inputs)
            found.append(tf.stop_gradient(acc.jvp(z, unconnected_gradients=tf.UnconnectedGradients.ZERO)))
        return found

    def weight_gradients(self, a, g):
        """`Σ_n Σ_t a gᵀ` split back into variable-shaped gradients (in `variables` order), for checks."""
        if self.diagonal_inputs and self.kind == "embedding":
            a = tf.one_hot(a, self.in_features, dtype=g.dtype)
        a = tf.cast(a, g.dtype)
        if self.kind == "elementwise":
            matrix = tf.reshape(tf.reduce_sum(g, axis=[0, 1]), [self.in_features, self.out_features])
        elif self.groups > 1:
            matrix = tf.einsum("ntgk,ntgl->gkl", a, g)
        else:
            matrix = tf.einsum("ntk,ntl->kl", a, g)
        variables = self.variables
        index = {id(v): i for i, v in enumerate(variables)}
        sizes = [int(np.prod(v.shape)) for v in variables]
        flat = join_layers([matrix[tf.newaxis]], sizes, [self.layout(index)])[0]
        return [tf.reshape(part, v.shape) for part, v in zip(tf.split(flat, sizes), variables)]


def _channels(layer, inputs):
    x = tf.convert_to_tensor(inputs)
    return x.shape[1] if _patches.channels_first(layer) else x.shape[-1]
