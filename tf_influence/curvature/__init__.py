"""Layer capture and KFAC/EKFAC curvature factors (see DESIGN.md, "EKFAC")."""

from tf_influence.curvature.capture import LayerBlock, Recording, capture, find_blocks
from tf_influence.curvature.factors import FactorSettings, Factors, LayerFactors, fit_factors
from tf_influence.curvature.operator import EKFACOperator

__all__ = [
    "EKFACOperator",
    "FactorSettings",
    "Factors",
    "LayerBlock",
    "LayerFactors",
    "Recording",
    "capture",
    "find_blocks",
    "fit_factors",
]
