"""Inverse-Hessian-vector product solvers: one module per method, each with its function and its method class.

Every solver solves `(H + λI) x = b` for an operator that already includes λ and returns
`(x, SolveInfo)`. The method objects (`Auto`, the default, which picks one of the others by cost;
`Direct`, `CG`, `LiSSA`, `ScipyNCG`, `EKFAC`, `KFAC`, `Chain`) carry settings and `prepare` the
reusable state of a method (see `tf_influence.solvers.method`); `SOLVERS` maps names to them and
`inverse_hvp` dispatches by name.
"""

from tf_influence.solvers.auto import Auto
from tf_influence.solvers.block_cg import block_cg
from tf_influence.solvers.cg import CG, cg
from tf_influence.solvers.chain import Chain, chain_solve
from tf_influence.solvers.direct import Direct, direct
from tf_influence.solvers.dispatch import SOLVERS, inverse_hvp, make_solver
from tf_influence.solvers.ekfac import EKFAC, KFAC
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.lissa import LiSSA, lissa
from tf_influence.solvers.method import Method, Prepared
from tf_influence.solvers.plan import plan_routes
from tf_influence.solvers.scipy_ncg import ScipyNCG, scipy_ncg

__all__ = [
    "Auto",
    "CG",
    "Chain",
    "Direct",
    "EKFAC",
    "KFAC",
    "LiSSA",
    "Method",
    "Prepared",
    "SOLVERS",
    "ScipyNCG",
    "SolveInfo",
    "block_cg",
    "cg",
    "chain_solve",
    "direct",
    "inverse_hvp",
    "lissa",
    "make_solver",
    "plan_routes",
    "scipy_ncg",
]
