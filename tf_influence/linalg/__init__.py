"""Dense linear-algebra kernels in the style of `tf.linalg`."""

from tf_influence.linalg.block_tridiagonal import block_tridiagonal_solve
from tf_influence.linalg.riccati import (
    ChainBlocks,
    ChainFactorization,
    chain_factor_solve,
    chain_factorize,
    chain_matmul,
)

__all__ = [
    "ChainBlocks",
    "ChainFactorization",
    "block_tridiagonal_solve",
    "chain_factor_solve",
    "chain_factorize",
    "chain_matmul",
]
