"""Layer-block-diagonal Kronecker eigenbasis products: what KFAC/EKFAC apply to flat parameter vectors.

A flat vector over the selected variables holds, for each factored layer, a kernel `[d_in, d_out]`
(flattened) and optionally a bias `[d_out]`. `split_layers` turns flat rows `[k, p]` into per-layer
gradient-shaped matrices `[k, d_a, d_g]` (the kernel rows, then the bias as one extra row);
`join_layers` is its inverse. On a layer's matrices `V`,

    eigenbasis_product(V, q_a, q_s, scale) = Q_A [(Q_Aᵀ V Q_S) ⊙ scale] Q_Sᵀ

with `scale = Λ + λ` for the curvature and `1 / (Λ + λ)` for its inverse (`q_a = None` for the
identity, e.g. an Embedding's diagonal input factor). The EKFAC operator and the exported
SavedModel both use these functions, so they compute the same numbers.

Example:
  >>> layouts = [LayerLayout(kernel=0, bias=1, in_features=64, out_features=10)]
  >>> mats = split_layers(rows, sizes=[640, 10], layouts=layouts)            # [[k, 65, 10]]
  >>> out = join_layers([eigenbasis_product(m, q_a, q_s, s) for m in mats], [640, 10], layouts)
"""

import typing

import tensorflow as tf


class LayerLayout(typing.NamedTuple):
    """Where one layer's kernel and bias sit among the flat vector's variables.

    Attributes:
      kernel: index of the kernel variable, or None when it is not selected.
      bias: index of the bias variable, or None.
      in_features: rows of the kernel seen as a matrix `[d_in, d_out]`.
      out_features: its columns `d_out`.
    """

    kernel: typing.Optional[int]
    bias: typing.Optional[int]
    in_features: int
    out_features: int


def split_layers(rows, sizes, layouts):
    """Flat rows `[k, p]` -> per-layer matrices `[k, d_a, d_g]` (kernel rows, then the bias row)."""
    parts = tf.split(rows, sizes, axis=-1)
    k = tf.shape(rows)[0]
    matrices = []
    for layout in layouts:
        pieces = []
        if layout.kernel is not None:
            pieces.append(tf.reshape(parts[layout.kernel], [k, layout.in_features, layout.out_features]))
        if layout.bias is not None:
            pieces.append(tf.reshape(parts[layout.bias], [k, 1, layout.out_features]))
        matrices.append(tf.concat(pieces, axis=1))
    return matrices


def join_layers(matrices, sizes, layouts):
    """Per-layer matrices `[k, d_a, d_g]` -> flat rows `[k, p]` (the inverse of `split_layers`)."""
    parts = [None] * len(sizes)
    for layout, m in zip(layouts, matrices):
        k = tf.shape(m)[0]
        if layout.kernel is not None:
            parts[layout.kernel] = tf.reshape(m[:, : layout.in_features], [k, -1])
        if layout.bias is not None:
            parts[layout.bias] = m[:, -1]
    return tf.concat(parts, axis=-1)


def eigenbasis_product(matrices, q_a, q_s, scale):
    """`Q_A [(Q_Aᵀ V Q_S) ⊙ scale] Q_Sᵀ` for each `V` in `matrices` `[k, d_a, d_g]`; `q_a=None`: identity."""
    projected = matrices if q_a is None else tf.einsum("ka,nkl->nal", q_a, matrices)
    projected = tf.einsum("nal,lb->nab", projected, q_s) * scale
    back = tf.einsum("nab,lb->nal", projected, q_s)
    return back if q_a is None else tf.einsum("ka,nal->nkl", q_a, back)
