"""Inverse-Hessian-vector product solvers: one module per method, one entry point each."""

from tf_influence.solvers.info import SolveInfo

__all__ = ["SolveInfo"]
