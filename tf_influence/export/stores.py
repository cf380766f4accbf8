"""What an exported scorer stores besides the model, by strategy, and how it preconditions a gradient.

Three strategies (`store=`), with p selected parameters and n training examples:

  "inverse"         `(H + λI)⁻¹` `[p, p]` (the method applied to the p unit vectors) and the training
                    gradients `G` `[n, p]`: every signature, any method; grows as p².
  "factors"         the EKFAC/KFAC eigenbases `Q_A`, `Q_S` and `1/(Λ + λ)` per layer, and `G`: linear
                    in p, the method's exact numbers (factored methods only).
  "preconditioned"  `S = (H + λI)⁻¹ Gᵀ` `[n, p]` only: the smallest for large p, but a new point's
                    own gradient cannot be preconditioned, so there is no `self_influence`.

`choose_store` picks one (or refuses), `stored_arrays` computes its matrices with the Influence's
prepared method, and `precondition` applies a stored inverse to gradients inside the exported graph
(with the same Kronecker functions as `EKFACOperator`).
"""

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.errors import InputError, ResourceError
from tf_influence.linalg.kronecker import LayerLayout, eigenbasis_product, join_layers, split_layers

DEFAULT_MAX_PARAMETERS = 8192
STORES = ("auto", "inverse", "factors", "preconditioned")
_CHUNK = 256


def choose_store(influence, store, max_parameters):
    """The store to use: `store` checked against the method and `max_parameters`, or the "auto" choice."""
    arguments.one_of(store, "store", STORES)
    factored, p = getattr(influence.prepared().method, "factored", False), influence.space.size  # auto: its route's
    if store == "factors" and not factored:
        raise InputError(
            f"store='factors' stores EKFAC/KFAC factors; this Influence uses method={influence.method!r}. "
            "Use method='ekfac' or 'kfac', or store='inverse' / 'preconditioned'.")
    if store == "auto":
        if factored:
            return "factors"
        store = "inverse"
    if store == "inverse" and p > max_parameters:
        mib = p * p * influence.space.dtype.size / 2**20
        raise ResourceError(
            f"store='inverse' keeps a dense {p}x{p} inverse ({mib:.0f} MiB); the limit is "
            f"max_parameters={max_parameters}. Select fewer variables (e.g. variables='head'), use "
            "store='preconditioned' (n_train x p, no self_influence signature), method='ekfac' "
            "(store='factors'), or raise max_parameters.")
    return store


def stored_arrays(influence, store):
    """The matrices the signatures multiply by, by store: a dict of NumPy arrays (and the layer list)."""
    gradients = influence.training_gradients()
    if store == "preconditioned":
        return {"preconditioned": _solve_rows(influence, gradients)}
    if store == "inverse":
        inverse = _solve_rows(influence, np.eye(influence.space.size, dtype=gradients.dtype))
        # The exact inverse is symmetric; iterative solves are so to their tolerance.
        return {"inverse": 0.5 * (inverse + inverse.T), "train_gradients": gradients}
    return {"factors": _factor_arrays(influence), "train_gradients": gradients}


def flat_arrays(arrays):
    """The stored arrays by variable name (factors as `layer{i}_q_a`, `layer{i}_q_s`, `layer{i}_scale`)."""
    flat = {k: v for k, v in arrays.items() if k != "factors"}
    for i, layer in enumerate(arrays.get("factors", [])):
        flat.update({f"layer{i}_{k}": layer[k] for k in ("q_a", "q_s", "scale") if layer[k] is not None})
    return flat


def precondition(stored, store, layers, sizes, g, dtype):
    """`(H + λI)⁻¹ g` for rows `g` `[k, p]` from the stored variables (inside the exported graph)."""
    if store == "inverse":
        return tf.matmul(g, stored["inverse"])
    compute = stored["layer0_q_s"].dtype
    matrices = split_layers(tf.cast(g, compute), sizes, [layer["layout"] for layer in layers])
    solved = [eigenbasis_product(m, stored.get(f"layer{i}_q_a"), stored[f"layer{i}_q_s"], stored[f"layer{i}_scale"])
              for i, m in enumerate(matrices)]
    return tf.cast(join_layers(solved, sizes, [layer["layout"] for layer in layers]), dtype)


def _solve_rows(influence, rows):
    return np.concatenate([influence.inverse_hvp(tf.constant(rows[i:i + _CHUNK])).numpy()
                           for i in range(0, len(rows), _CHUNK)])


def _factor_arrays(influence):
    """Per layer: `q_a` (or None), `q_s`, `scale = 1/(Λ + λ)`, and its `LayerLayout` in the flat vector."""
    inverse = influence.prepared().inverse
    factors = inverse.factors
    if [id(v) for v in factors.variables] != [id(v) for v in influence.problem.variables]:
        raise InputError("The EKFAC factors were fitted for other variables than the Influence's; refit them.")
    layouts = inverse.layouts
    covered = {i for layout in layouts for i in (layout.kernel, layout.bias, *layout.parts) if i is not None}
    if covered != set(range(len(factors.variables))):
        raise InputError("The EKFAC factors do not cover every selected variable; use store='inverse'.")
    return [{"q_a": None if layer.q_a is None else layer.q_a.numpy(), "q_s": layer.q_s.numpy(),
             "scale": scale.numpy(), "layout": LayerLayout(*layout)}
            for layer, scale, layout in zip(factors.layers, inverse.scales(inverse=True), layouts)]
