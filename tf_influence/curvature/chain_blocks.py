"""Closed-form derivative blocks of the chain solver's stages and loss (see docs/mathematics.md).

For a stage `z_out = σ(z_in W + b)` with output adjoint `c_out`, `stage_blocks` returns the
first-order blocks `Dx = ∂z_out/∂x`, `Dz = ∂z_out/∂z_in` and the second-order blocks `Fxx`, `Fzx`,
`Fzz` of `φ = c_outᵀ z_out`, laid out over the n examples of the batch (state size n·width);
`loss_terms` gives the loss, its gradient and its Hessian blocks at the last state. These are the
`ChainBlocks` that `tf_influence.linalg.riccati` multiplies and factorises.
"""

import tensorflow as tf

from tf_influence.errors import UnsupportedLayerError

# -- Loss blocks at the last state -------------------------------------------------------------

def loss_terms(spec, z, y, coeff):
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


def block_diagonal(blocks):
    """`[n, c, c]` -> the `[n·c, n·c]` block-diagonal matrix."""
    n, c = int(blocks.shape[0]), int(blocks.shape[1])
    eye = tf.eye(n, dtype=blocks.dtype)
    return tf.reshape(tf.einsum("iab,iq->iaqb", blocks, eye), [n * c, n * c])


# -- Per-stage closed-form blocks --------------------------------------------------------------

def stage_blocks(stage, z_in, derivs, c_out, kernel, bias, *, first, hessian):
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


def l2_coefficient(regularizer, variable, layer, what):
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
