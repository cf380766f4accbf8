"""Per-layer influence scores: the score matrix split by the layer the parameters belong to.

With `s = (H + λI)⁻¹ ∇m(z_test)` the method's solution for a test point (σ included, see
`measurements`), every score is a dot product, and a dot product splits over any partition of the
parameters into layers l (docs/mathematics.md, "Per-layer scores"):

    score(z_test, zᵢ) = ⟨s, gᵢ⟩ = Σ_l ⟨s_l, gᵢ,l⟩

So the parts sum to the total for EVERY method, to rounding (they are the same numbers, grouped
differently). What a part means depends on the method:

  - EKFAC / KFAC: `(C + λI)⁻¹` is block-diagonal by layer, so `s_l = (C_l + λI)⁻¹ ∇m_l` and each part
    `∇m_lᵀ (C_l + λI)⁻¹ gᵢ,l` is that layer's own influence, computed from its block alone.
  - direct, cg, chain, lissa, scipy (the full `H + λI`): `s_l` depends on the test gradient of every
    layer through the Hessian's off-diagonal blocks. A part is the share of the score carried by
    layer l's training gradient; it is not the influence one would get by selecting layer l alone
    (`variables=layer`, which uses only the block `H_ll`). Parts can have either sign.

Cost: one scoring pass per layer (each pass costs as much as `Influence.scores`).
"""

import numpy as np
import tensorflow as tf

from tf_influence.layers import owning_layers


def layer_slices(problem):
    """`{layer name: [(start, stop), ...]}`: the flat coordinates of each layer's selected variables.

    Layers are named by `layer.name` (a repeated name gets a `#2`, `#3` suffix); a variable that no layer
    owns is its own group, named by its path. Order: the variables' order.
    """
    owners = owning_layers(problem.model, problem.variables)
    slices, names_by_layer, offset = {}, {}, 0
    for variable, size in zip(problem.variables, problem.space.sizes):
        layer = owners.get(id(variable))
        key = id(layer) if layer is not None else id(variable)
        if key not in names_by_layer:
            base = layer.name if layer is not None else (getattr(variable, "path", None) or variable.name)
            name, count = base, 1
            while name in slices:
                count += 1
                name = f"{base}#{count}"
            names_by_layer[key] = name
            slices[name] = []
        slices[names_by_layer[key]].append((offset, offset + size))
        offset += size
    return slices


def layer_scores(influence, test):
    """`{layer name: [n_test, n_train]}` parts of `influence.scores(test)`, summing to it.

    Args:
      influence: a `tfi.Influence`.
      test: test data, as for `Influence.scores`.

    Returns:
      A dict from layer name (model order) to float64 score matrices; positive = helpful.

    Example:
      >>> parts = inf.layer_scores((x_test, y_test))
      >>> {name: float(np.abs(s).sum()) for name, s in parts.items()}   # which layers carry the influence
    """
    directions = influence.test_inverse_hvps(test)
    result = {}
    for name, ranges in layer_slices(influence.problem).items():
        mask = np.zeros(directions.shape[1], dtype=bool)
        for start, stop in ranges:
            mask[start:stop] = True
        masked = tf.constant(np.where(mask[np.newaxis, :], directions, 0.0), influence.space.dtype)
        columns = [influence.gradient_dots(batch, masked).numpy() for batch in influence.problem.batches]
        result[name] = np.concatenate(columns, axis=0).T.astype(np.float64)
    return result
