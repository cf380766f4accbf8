"""Dense linear-algebra kernels in the style of `tf.linalg`, independent of models and data.

  block_tridiagonal.py  `block_tridiagonal_solve`
  riccati.py            products and the backward Riccati factorisation of a chain Hessian
  kronecker.py          layer-block-diagonal Kronecker eigenbasis products (KFAC/EKFAC)
  lanczos.py            `extreme_eigenvalues` of a self-adjoint operator
"""

from tf_influence.linalg.block_tridiagonal import block_tridiagonal_solve
from tf_influence.linalg.kronecker import LayerLayout, eigenbasis_product, join_layers, split_layers
from tf_influence.linalg.lanczos import SpectrumEstimate, extreme_eigenvalues
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
    "LayerLayout",
    "SpectrumEstimate",
    "block_tridiagonal_solve",
    "chain_factor_solve",
    "chain_factorize",
    "chain_matmul",
    "eigenbasis_product",
    "extreme_eigenvalues",
    "join_layers",
    "split_layers",
]
