"""Exception types raised by tf_influence.

Every error names what was wrong, the value received, what was expected and the fix.
Errors about user input also subclass `ValueError`, so `except ValueError` keeps working.
"""


class InfluenceError(Exception):
    """Base class of every error raised by tf_influence."""


class InputError(InfluenceError, ValueError):
    """A model, loss, data set, variable selection or option is not usable as given."""


class UnsupportedLayerError(InputError):
    """A layer in the selected path cannot be handled by the requested method."""


class SecondDerivativeError(UnsupportedLayerError):
    """A layer makes TensorFlow's second derivatives wrong (e.g. LayerNormalization)."""


class NotFiniteError(InfluenceError, ArithmeticError):
    """A loss, gradient or curvature product contains NaN or Inf."""


class NegativeCurvatureError(InfluenceError, ArithmeticError):
    """A solver met a direction of zero or negative curvature (pᵀ(H + λI)p ≤ 0)."""


class DivergenceError(InfluenceError, ArithmeticError):
    """An iterative method diverged (its iterate grew without bound or became NaN)."""


class ResourceError(InfluenceError, MemoryError):
    """A requested computation would need more memory than is reasonable."""
