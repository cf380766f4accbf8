"""Layer capture and KFAC/EKFAC curvature factors (see DESIGN.md, "EKFAC").

Pipeline: `find_blocks` + `capture` (capture.py) -> `fit_factors` (factors.py, with the output
targets of targets.py) -> `EKFACOperator` (operator.py) -> `ekfac_scores` (scores.py);
`save_factors` / `load_factors` (storage.py).
"""

from tf_influence.curvature.capture import LayerBlock, Recording, capture, find_blocks
from tf_influence.curvature.factors import FactorSettings, Factors, LayerFactors, fit_factors, layer_rows
from tf_influence.curvature.operator import EKFACOperator
from tf_influence.curvature.scores import ekfac_scores
from tf_influence.curvature.storage import load_factors, model_fingerprint, save_factors

__all__ = [
    "EKFACOperator",
    "FactorSettings",
    "Factors",
    "LayerBlock",
    "LayerFactors",
    "Recording",
    "capture",
    "ekfac_scores",
    "find_blocks",
    "fit_factors",
    "layer_rows",
    "load_factors",
    "model_fingerprint",
    "save_factors",
]
