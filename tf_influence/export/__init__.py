"""Serving: an `Influence` frozen into a SavedModel with influence signatures.

  saved_model.py  `export_saved_model`: the exported module, its signatures and serving-time checks
  stores.py       what is stored besides the model ("inverse", "factors", "preconditioned")
"""

from tf_influence.export.saved_model import export_saved_model, is_influence_export
from tf_influence.export.stores import DEFAULT_MAX_PARAMETERS, STORES

__all__ = ["DEFAULT_MAX_PARAMETERS", "STORES", "export_saved_model", "is_influence_export"]
