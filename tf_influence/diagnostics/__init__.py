"""Diagnostics: is a curvature product right (`check_hvp`)?"""

from tf_influence.diagnostics.check_hvp import HVPCheck, check_hvp

__all__ = ["HVPCheck", "check_hvp"]
