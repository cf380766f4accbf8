"""Saving and loading fitted factors, with the settings that produced them.

A saved directory holds `factors.npz` (the eigenvectors and eigenvalues) and `settings.json`
(method, fisher, seed, dtype, loss name, the selected variables' names and shapes, the layers, an
optional damping, and fingerprints of the weights and of the training examples they were fitted
on). `load_factors` refuses a directory fitted on another model, another variable selection, other
weights or (when `data` is given) other training data, since the curvature would silently be wrong
for them; `EKFAC(factors=...)` refuses factors fitted on other weights or data than its problem's.
Both files are written atomically, and a directory holding other files of the same names is refused.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from tf_influence.curvature.capture import find_blocks
from tf_influence.curvature.factors import FactorSettings, Factors, LayerFactors
from tf_influence.data import as_dataset
from tf_influence.data import fingerprint as data_fingerprint
from tf_influence.errors import InputError
from tf_influence.files import atomic_write_json, check_target
from tf_influence.params import select_variables
from tf_influence.problem import model_fingerprint

FORMAT_VERSION = 1
_SETTINGS, _ARRAYS = "settings.json", "factors.npz"


def save_factors(factors, directory, *, damping=None):
    """Writes `factors` (and optionally the damping to use with them) to `directory`.

    Args:
      factors: fitted `Factors`.
      directory: a directory path (created if missing); factors saved there before are replaced,
        other files named `settings.json` / `factors.npz` are refused.
      damping: optional damping (a number or "heuristic") stored with the settings.

    Example:
      >>> save_factors(factors, "ekfac_factors", damping=1e-3)
      >>> factors, damping = load_factors("ekfac_factors", model)
    """
    directory = os.fspath(directory)
    ours = lambda _: _is_saved_factors(directory)  # noqa: E731
    check_target(directory, "save_factors directory", directory=True, replaceable=lambda _: True, overwrite=True,
                 create_folder=True)
    for name in (_SETTINGS, _ARRAYS):
        check_target(os.path.join(directory, name), "save_factors file", replaceable=ours, create_folder=True)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for i, layer in enumerate(factors.layers):
        for field in dataclasses.fields(layer):
            value = getattr(layer, field.name)
            if value is not None:
                arrays[f"{i}/{field.name}"] = np.asarray(value)
    settings = dict(
        format_version=FORMAT_VERSION,
        settings=dataclasses.asdict(factors.settings),
        loss=str(factors.objective.loss_name) if factors.objective is not None else None,
        damping=damping,
        variables=[dict(name=_name(v), shape=[int(d) for d in v.shape]) for v in factors.variables],
        layers=[_layer_record(b) for b in factors.blocks],
        fingerprint=factors.model_fingerprint or model_fingerprint(factors.model),
        data_fingerprint=factors.data_fingerprint,
        num_examples=factors.num_examples,
        total_weight=factors.total_weight,
    )
    staging = os.path.join(directory, ".tmp." + _ARRAYS)
    np.savez(staging, **arrays)
    os.replace(staging, os.path.join(directory, _ARRAYS))
    atomic_write_json(os.path.join(directory, _SETTINGS), settings)


def _is_saved_factors(directory):
    try:
        with open(os.path.join(directory, _SETTINGS)) as f:
            return "format_version" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def load_factors(directory, model, variables=None, *, objective=None, data=None):
    """Loads factors saved by `save_factors` for `model`, refusing a mismatched model.

    Args:
      directory: what `save_factors` wrote.
      model: the model the factors are for (same architecture and weights).
      variables: the same variable selection as at fitting time (None: all trainable).
      objective: optional `Objective` to attach (needed only to refit or score training data).
      data: optional training data (arrays or a dataset); if given, it must be the data the factors
        were fitted on (same examples in the same order; the batching does not matter).

    Returns:
      `(factors, damping)`: the `Factors` and the damping saved with them (None if none was).

    Raises:
      InputError: missing files, or a different variable selection, layer structure, or weights
        than the factors were fitted on (the message says which and how to fix it).
    """
    settings_path, arrays_path = (os.path.join(directory, n) for n in (_SETTINGS, _ARRAYS))
    if not (os.path.exists(settings_path) and os.path.exists(arrays_path)):
        raise InputError(
            f"No saved factors in {directory!r}: expected {_SETTINGS} and {_ARRAYS} written by "
            "save_factors().")
    with open(settings_path) as f:
        saved = json.load(f)
    if saved.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{directory!r} has factor format {saved.get('format_version')!r}; this version reads "
            f"format {FORMAT_VERSION}. Refit and save the factors again.")
    variables = select_variables(model, variables)
    current = [dict(name=_name(v), shape=[int(d) for d in v.shape]) for v in variables]
    if [v["shape"] for v in current] != [v["shape"] for v in saved["variables"]]:
        raise InputError(
            f"The factors in {directory!r} were fitted for variables "
            f"{[(v['name'], v['shape']) for v in saved['variables']]}, but this model and selection "
            f"give {[(v['name'], v['shape']) for v in current]}. Pass the same model and variables "
            "as when fitting, or refit the factors.")
    blocks = find_blocks(model, variables)
    layers = [_layer_record(b) for b in blocks]
    if [_structure(r) for r in layers] != [_structure(r) for r in saved["layers"]]:
        raise InputError(
            f"The factors in {directory!r} were fitted for layers {saved['layers']}, but this model "
            f"has {layers}. Use the model the factors were fitted on, or refit them.")
    fingerprint = model_fingerprint(model)
    if fingerprint != saved["fingerprint"]:
        raise InputError(
            f"The model's weights differ from those the factors in {directory!r} were fitted on "
            f"(fingerprint {fingerprint[:12]} vs saved {saved['fingerprint'][:12]}): the curvature "
            "would be stale. Load the weights used at fitting time, or refit the factors.")
    saved_data = saved.get("data_fingerprint")
    if data is not None:
        current = data_fingerprint(as_dataset(data, name="data"))
        if saved_data is None or current != saved_data:
            raise InputError(
                f"The training data differ from those the factors in {directory!r} were fitted on (fingerprint "
                f"{current[:12]} vs saved {str(saved_data)[:12]}): the curvature would be stale. Pass the data used "
                "at fitting time, or refit the factors.")
    settings = FactorSettings(**saved["settings"])
    dtype = tf.as_dtype(settings.dtype)
    with np.load(arrays_path) as arrays:
        layer_factors = []
        for i in range(len(blocks)):
            fields = {f.name: (tf.constant(arrays[f"{i}/{f.name}"], dtype) if f"{i}/{f.name}" in arrays else None)
                      for f in dataclasses.fields(LayerFactors)}
            layer_factors.append(LayerFactors(**fields))
    factors = Factors(settings, model, variables, blocks, layer_factors, objective=objective,
                      num_examples=saved["num_examples"], total_weight=saved["total_weight"],
                      model_fingerprint=saved["fingerprint"], data_fingerprint=saved_data)
    return factors, saved.get("damping")


def _name(variable):
    return getattr(variable, "path", None) or variable.name


def _layer_record(block):
    return dict(name=block.name, kind=block.kind, in_features=block.in_features,
                out_features=block.out_features, kernel=block.kernel is not None, bias=block.bias is not None,
                groups=block.groups, diagonal=block.diagonal, role=block.role,
                params=[_name(v) for v in block.params])


def _structure(record):
    defaults = dict(groups=1, diagonal=False, role="call", params=[])
    return tuple(str(record.get(k, defaults.get(k))) for k in
                 ("kind", "in_features", "out_features", "kernel", "bias", "groups", "diagonal", "role")) + (
        len(record.get("params", [])),)
