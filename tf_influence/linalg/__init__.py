"""Dense linear-algebra kernels in the style of `tf.linalg`."""

from tf_influence.linalg.block_tridiagonal import block_tridiagonal_solve

__all__ = ["block_tridiagonal_solve"]
