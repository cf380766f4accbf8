"""Curvature operators: one `tf.linalg.LinearOperator` per file, on one shared rows base (`rows.py`).

  HessianOperator   `H + λI` (Hessian or Gauss-Newton) of a problem, products by data passes
  EKFACOperator     `C + λI`, the KFAC/EKFAC approximation, with a cheap exact inverse
  ChainHessian      `H + λI` of a Dense chain, exact products and solves in linear time
  CurvatureSource   builds the operators a method asks for, once
"""

from tf_influence.operators.chain import ChainHessian
from tf_influence.operators.ekfac import EKFACOperator
from tf_influence.operators.hessian import MAX_DENSE_SIZE, HessianOperator
from tf_influence.operators.minibatch import MinibatchCurvature
from tf_influence.operators.rows import RowsOperator, matmul_rows
from tf_influence.operators.source import CurvatureSource

__all__ = [
    "MAX_DENSE_SIZE",
    "ChainHessian",
    "CurvatureSource",
    "EKFACOperator",
    "HessianOperator",
    "MinibatchCurvature",
    "RowsOperator",
    "matmul_rows",
]
