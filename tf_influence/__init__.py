"""tf_influence: influence functions and inverse-Hessian-vector products for TensorFlow / Keras."""

from tf_influence.checks import HVPCheck, check_hvp
from tf_influence.data import as_dataset
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
from tf_influence.influence import Influence, TopK
from tf_influence.objective import Objective
from tf_influence.operators import HessianOperator
from tf_influence.params import ParameterSpace, select_variables
from tf_influence.solvers.dispatch import inverse_hvp
from tf_influence.spectrum import SpectrumEstimate, extreme_eigenvalues
from tf_influence.streaming import score_to_file
from tf_influence import solvers, validation  # noqa: E402  (namespaces: tfi.solvers.CG, tfi.validation)

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "HVPCheck",
    "HessianOperator",
    "Influence",
    "InfluenceError",
    "InputError",
    "NegativeCurvatureError",
    "NotFiniteError",
    "Objective",
    "ParameterSpace",
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
    "score_to_file",
    "select_variables",
    "solvers",
    "validation",
]
