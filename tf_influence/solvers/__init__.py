"""Inverse-Hessian-vector product solvers: one module per method, one entry point each.

Every solver solves `(H + λI) x = b` for an operator that already includes λ and returns
`(x, SolveInfo)`. `inverse_hvp` dispatches by name; the method objects (`Direct`, `CG`, `LiSSA`,
`ScipyNCG`, `EKFAC`, `KFAC`, `Chain`) carry settings for the influence API; `SOLVERS` maps names to them.
"""

from tf_influence.solvers.cg import cg
from tf_influence.solvers.direct import direct
from tf_influence.solvers.chain import Chain, chain_solve
from tf_influence.solvers.dispatch import CG, SOLVERS, Direct, LiSSA, ScipyNCG, inverse_hvp, make_solver
from tf_influence.solvers.ekfac import EKFAC, KFAC
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.lissa import lissa
from tf_influence.solvers.scipy_ncg import scipy_ncg

__all__ = [
    "CG",
    "Chain",
    "EKFAC",
    "KFAC",
    "Direct",
    "LiSSA",
    "SOLVERS",
    "ScipyNCG",
    "SolveInfo",
    "cg",
    "chain_solve",
    "direct",
    "inverse_hvp",
    "lissa",
    "make_solver",
    "scipy_ncg",
]
