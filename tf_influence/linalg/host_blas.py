"""Large eager float64 matrix products on the host's BLAS when no GPU is present.

TensorFlow multiplies float64 matrices on the CPU with Eigen's kernels (oneDNN serves float32 only),
at about half the speed of the BLAS that NumPy links: on the 2-core benchmark machine 29 vs
62 GFLOP/s for per-example gradients `[111, 301066]` times 1,000 test directions (EKFAC scoring of
the 301k-parameter MLP in benchmarks/peers.py). So eager float64 products on a machine without a
GPU go through NumPy; float32, GPUs and traced code stay in TensorFlow. The dense Gauss-Newton
builder (`curvature/dense.py`, `gemm="auto"`) makes the same choice for its `syrk` updates.
"""

import numpy as np
import tensorflow as tf


def prefers_host_blas(dtype):
    """True for eager float64 on a machine without a GPU: the host BLAS multiplies faster than TensorFlow
    (inside a traced function the product must stay a TensorFlow op)."""
    return tf.executing_eagerly() and tf.as_dtype(dtype) == tf.float64 and not tf.config.list_logical_devices("GPU")


def matmul_transposed(a, b):
    """`a bᵀ` for eager matrices `a` `[m, p]` and `b` `[k, p]`: a `[m, k]` tensor.

    Example:
      >>> matmul_transposed(gradients, directions)      # [m, k] dot products, NumPy BLAS on a CPU
    """
    if prefers_host_blas(a.dtype):
        return tf.constant(np.asarray(a) @ np.asarray(b).T)
    return tf.matmul(a, b, transpose_b=True)
