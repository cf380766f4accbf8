"""Layer-block-diagonal Kronecker eigenbasis products: what KFAC/EKFAC apply to flat parameter vectors.

A flat vector over the selected variables holds, for each factored block, its variables; the block
sees them as a gradient-shaped matrix `[d_a, d_g]` (or `[G, d_a, d_g]` for G independent groups, e.g.
the channels of a depthwise convolution). `split_layers` turns flat rows `[k, p]` into per-block
matrices `[k, (G,) d_a, d_g]`; `join_layers` is its inverse. The layouts (`LayerLayout`):

  * a kernel `[d_in, d_out]` (flattened) and optionally a bias `[d_out]`: the kernel rows, then the
    bias as one extra row (Dense, EinsumDense, convolutions, Embedding);
  * `transpose=True`: the kernel is stored as `[d_g, d_a]` (transposed convolutions);
  * `groups=G`: the kernel is stored as `[d_in, G, d_out]` and the bias as `[G, d_out]`; group g's
    matrix is `[kernel[:, g]; bias[g]]` (depthwise and grouped convolutions);
  * `parts=(i, j, ...)`: the variables concatenated and reshaped to `[d_a, d_g]` (exact blocks of
    small elementwise parameters: `[1, p]` dense, `[p, 1]` diagonal).

On a block's matrices `V`,

    eigenbasis_product(V, q_a, q_s, scale) = Q_A [(Q_Aᵀ V Q_S) ⊙ scale] Q_Sᵀ

with `scale = Λ + λ` for the curvature and `1 / (Λ + λ)` for its inverse (`q_a = None` for the
identity, e.g. an Embedding's diagonal input factor); grouped blocks carry a leading group axis
on `q_a`, `q_s` and `scale`. The EKFAC operator and the exported SavedModel both use these
functions, so they compute the same numbers.

Example:
  >>> layouts = [LayerLayout(kernel=0, bias=1, in_features=64, out_features=10)]
  >>> mats = split_layers(rows, sizes=[640, 10], layouts=layouts)            # [[k, 65, 10]]
  >>> out = join_layers([eigenbasis_product(m, q_a, q_s, s) for m in mats], [640, 10], layouts)
"""

import typing

import numpy as np
import tensorflow as tf

from tf_influence.linalg.host_blas import prefers_host_blas


class LayerLayout(typing.NamedTuple):
    """Where one block's variables sit among the flat vector's variables.

    Attributes:
      kernel: index of the kernel variable, or None when it is not selected.
      bias: index of the bias variable, or None.
      in_features: kernel rows `d_in` of one group (without the bias row); for `parts`, `d_a`.
      out_features: columns `d_g` of one group.
      groups: G independent groups (1: a plain matrix).
      transpose: the kernel is stored as `[d_g, d_a]`.
      parts: indices of variables concatenated into one `[in_features, out_features]` matrix.
    """

    kernel: typing.Optional[int]
    bias: typing.Optional[int]
    in_features: int
    out_features: int
    groups: int = 1
    transpose: bool = False
    parts: tuple = ()


def split_layers(rows, sizes, layouts):
    """Flat rows `[k, p]` -> per-block matrices `[k, (G,) d_a, d_g]` (kernel rows, then the bias row)."""
    parts = tf.split(rows, sizes, axis=-1)
    k = tf.shape(rows)[0]
    matrices = []
    for layout in layouts:
        d_in, d_out, groups = layout.in_features, layout.out_features, layout.groups
        if layout.parts:
            flat = tf.concat([parts[i] for i in layout.parts], axis=-1)
            matrices.append(tf.reshape(flat, [k, d_in, d_out]))
            continue
        pieces = []
        if layout.kernel is not None:
            kernel = parts[layout.kernel]
            if groups > 1:
                pieces.append(tf.transpose(tf.reshape(kernel, [k, d_in, groups, d_out]), [0, 2, 1, 3]))
            elif layout.transpose:
                pieces.append(tf.transpose(tf.reshape(kernel, [k, d_out, d_in]), [0, 2, 1]))
            else:
                pieces.append(tf.reshape(kernel, [k, d_in, d_out]))
        if layout.bias is not None:
            shape = [k, groups, 1, d_out] if groups > 1 else [k, 1, d_out]
            pieces.append(tf.reshape(parts[layout.bias], shape))
        matrices.append(tf.concat(pieces, axis=-2))
    return matrices


def join_layers(matrices, sizes, layouts):
    """Per-block matrices `[k, (G,) d_a, d_g]` -> flat rows `[k, p]` (the inverse of `split_layers`)."""
    parts = [None] * len(sizes)
    for layout, m in zip(layouts, matrices):
        k = tf.shape(m)[0]
        if layout.parts:
            pieces = tf.split(tf.reshape(m, [k, -1]), [sizes[i] for i in layout.parts], axis=-1)
            for i, piece in zip(layout.parts, pieces):
                parts[i] = piece
            continue
        if layout.kernel is not None:
            kernel = m[..., : layout.in_features, :]
            if layout.groups > 1:
                kernel = tf.transpose(kernel, [0, 2, 1, 3])
            elif layout.transpose:
                kernel = tf.transpose(kernel, [0, 2, 1])
            parts[layout.kernel] = tf.reshape(kernel, [k, -1])
        if layout.bias is not None:
            parts[layout.bias] = tf.reshape(m[..., -1, :], [k, -1])
    return tf.concat(parts, axis=-1)


def eigenbasis_product(matrices, q_a, q_s, scale):
    """`Q_A [(Q_Aᵀ V Q_S) ⊙ scale] Q_Sᵀ` for each `V` in `matrices` `[k, (G,) d_a, d_g]`; `q_a=None`: identity.

    Grouped blocks (`q_s` of rank 3, `[G, d_g, d_g]`) apply each group's factors to its matrix.
    """
    if q_s.shape.rank == 3:
        projected = matrices if q_a is None else tf.einsum("gka,ngkl->ngal", q_a, matrices)
        projected = tf.einsum("ngal,glb->ngab", projected, q_s) * scale
        back = tf.einsum("ngab,glb->ngal", projected, q_s)
        return back if q_a is None else tf.einsum("gka,ngal->ngkl", q_a, back)
    if prefers_host_blas(matrices.dtype):  # ~2x faster (linalg/host_blas.py)
        return tf.constant(_host_eigenbasis_product(*(None if t is None else np.asarray(t)
                                                      for t in (matrices, q_a, q_s, scale))))
    projected = matrices if q_a is None else tf.einsum("ka,nkl->nal", q_a, matrices)
    projected = tf.einsum("nal,lb->nab", projected, q_s) * scale
    back = tf.einsum("nab,lb->nal", projected, q_s)
    return back if q_a is None else tf.einsum("ka,nal->nkl", q_a, back)


def _host_eigenbasis_product(v, q_a, q_s, scale):
    """`eigenbasis_product` of one group in NumPy: the right factors as one `[k·d_a, d_g]` matrix product."""
    k, d_a, d_g = v.shape
    w = (v.reshape(-1, d_g) @ q_s).reshape(k, d_a, d_g)
    w = (w if q_a is None else np.matmul(q_a.T, w)) * scale
    w = w if q_a is None else np.matmul(q_a, w)
    return (w.reshape(-1, d_g) @ q_s.T).reshape(k, d_a, d_g)
