"""tf_influence: influence functions and inverse-Hessian-vector products for TensorFlow / Keras.

The stages, each a package or module that only uses the ones before it (README, "Architecture"):
problem (model + loss + data + variables) -> curvature (derivative calculus) -> operators ->
solvers -> influence (scores) -> export (SavedModel); diagnostics and validation on the side.
"""

from tf_influence import solvers, validation
from tf_influence.data import as_dataset
from tf_influence.diagnostics import HVPCheck, check_hvp
from tf_influence.errors import (
    DivergenceError,
    InfluenceError,
    InputError,
    NegativeCurvatureError,
    NotFiniteError,
    ResourceError,
    SecondDerivativeError,
    UnsupportedLayerError,
)
from tf_influence.export import export_saved_model
from tf_influence.influence import GroupInfluence, Influence, Measurement, TopK, measurements, score_to_file
from tf_influence.linalg import SpectrumEstimate, extreme_eigenvalues
from tf_influence.objective import Objective
from tf_influence.operators import ChainHessian, CurvatureSource, EKFACOperator, HessianOperator
from tf_influence.params import ParameterSpace, select_variables
from tf_influence.problem import Problem
from tf_influence.solvers.dispatch import inverse_hvp

__version__ = "0.2.0"

__all__ = [
    "ChainHessian",
    "CurvatureSource",
    "DivergenceError",
    "EKFACOperator",
    "GroupInfluence",
    "HVPCheck",
    "HessianOperator",
    "Influence",
    "InfluenceError",
    "InputError",
    "Measurement",
    "NegativeCurvatureError",
    "NotFiniteError",
    "Objective",
    "ParameterSpace",
    "Problem",
    "ResourceError",
    "SecondDerivativeError",
    "SpectrumEstimate",
    "TopK",
    "UnsupportedLayerError",
    "as_dataset",
    "check_hvp",
    "export_saved_model",
    "extreme_eigenvalues",
    "inverse_hvp",
    "measurements",
    "score_to_file",
    "select_variables",
    "solvers",
    "validation",
]
