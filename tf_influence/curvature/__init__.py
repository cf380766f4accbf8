"""Derivative calculus of the training objective: the pieces the curvature operators are built from.

  products.py     curvature-vector products of one batch (Hessian three ways, Gauss-Newton)
  capture.py      layer inputs / pre-activation gradients without hooks (`find_blocks`, `capture`)
  targets.py      output-space vectors for Fisher / Gauss-Newton statistics (sampled labels, exact GGN)
  layer_rows.py   layer inputs and pre-activation gradients for all targets, one batched back-propagation
  factors.py      KFAC/EKFAC factors fitted over the data (`fit_factors`)
  passes.py       their compiled statistics passes, traced once per model and settings (`fit_passes`)
  cross_factors.py  neighbouring layers' Kronecker factors for block-tridiagonal KFAC
  storage.py      saving and loading factors with the settings and weights they belong to
  chain_plan.py   a Dense chain as stages; chain_blocks.py: their closed-form derivative blocks

The mathematics is in docs/mathematics.md.
"""

from tf_influence.curvature.capture import LayerBlock, Recording, capture, find_blocks
from tf_influence.curvature.cross_factors import CrossFactors, fit_cross_factors
from tf_influence.curvature.factors import FactorSettings, Factors, LayerFactors, fit_factors
from tf_influence.curvature.layer_rows import layer_rows
from tf_influence.curvature.storage import load_factors, save_factors
from tf_influence.data import tile_batch

__all__ = [
    "CrossFactors",
    "FactorSettings",
    "Factors",
    "LayerBlock",
    "LayerFactors",
    "Recording",
    "capture",
    "find_blocks",
    "fit_cross_factors",
    "fit_factors",
    "layer_rows",
    "load_factors",
    "save_factors",
    "tile_batch",
]
