"""`export_saved_model`: freeze an `Influence` into a SavedModel that answers influence queries.

Signatures (inputs `x`, `y` shaped like one batch of the training data, any batch size):

  influence(x, y)        -> scores [batch, n_train] (= `Influence.scores`), predictions
  top_k(x, y, k)         -> helpful_indices, helpful_scores, harmful_indices, harmful_scores [batch, k]
  self_influence(x, y)   -> scores [batch]: g(x, y)ᵀ (H + λI)⁻¹ g(x, y), for screening new data
  serving_default(x)     -> predictions

Every signature computes the per-example loss gradients `g` of its batch in the graph, from the
stored model, and multiplies them by stored matrices. What is stored (`store=`), all as
`tf.Variable`s (never graph constants), with p selected parameters and n training examples:

  ============== ============================================ ========================= ================
  store          variables besides the model                  numbers                   self_influence
  ============== ============================================ ========================= ================
  "inverse"      `(H + λI)⁻¹` `[p, p]` (the method applied to  p² + n·p                  yes
                 the p unit vectors), training gradients
                 `G` `[n, p]`
  "factors"      EKFAC/KFAC per layer: `Q_A`, `Q_S`,           Σ(d_a² + d_g² + d_a·d_g)  yes
                 `1/(Λ + λ)`; training gradients `G` `[n, p]`  + n·p  (≈ p + n·p)
  "preconditioned" `S = (H + λI)⁻¹ Gᵀ` `[n, p]` only            n·p                       no (needs the
                                                                                         inverse)
  ============== ============================================ ========================= ================

Trade-off: "inverse" answers every signature for any method but grows as p², so it suits a
selected variable set of up to a few thousand parameters (e.g. `variables="head"`; guarded by
`max_parameters`). "factors" (EKFAC/KFAC only) is linear in p and gives the method's exact
numbers. "preconditioned" is the smallest for large p with other methods; a query is one matmul,
but `self_influence` of new points is not available (the signature is left out). The default
`store="auto"` picks "factors" for EKFAC/KFAC, else "inverse" up to `max_parameters`, and
otherwise refuses with these options. The n·p training-gradient term is in every form.

A string variable `settings` (JSON: method, store, damping, l2, curvature, variables, n_train,
parameters, input specs) records what the scores mean. The SavedModel needs only TensorFlow to
load (`tf.saved_model.load`, `saved_model_cli`, TF Serving); tf_influence is not imported.

Serving-time validation: the input signature fixes the feature shape and the dtypes (a wrong
width or label dtype is refused before anything runs); assertions refuse x/y batch mismatches,
non-finite features, integer labels outside `[0, classes)` and `k` outside `[1, n_train]`.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from tf_influence import scoring
from tf_influence.errors import InputError, ResourceError

DEFAULT_MAX_PARAMETERS = 8192
STORES = ("auto", "inverse", "factors", "preconditioned")
_FACTOR_METHODS = ("ekfac", "kfac")
_CHUNK = 256


def export_saved_model(influence, path, *, overwrite=False, store="auto", max_parameters=DEFAULT_MAX_PARAMETERS):
    """Writes a SavedModel with `influence`, `top_k`, `self_influence` and `serving_default` signatures.

    Args:
      influence: a `tfi.Influence` (one input tensor, one label tensor).
      path: target directory. Written atomically: into a temporary directory beside it, then
        renamed, so an interrupted export never leaves a half-written model at `path`.
      overwrite: replace an existing `path` (otherwise an existing path is an `InputError`).
      store: "auto", "inverse", "factors" or "preconditioned"; what each stores and costs is in
        the module docstring.
      max_parameters: the largest p for which the dense `[p, p]` inverse is stored
        (`ResourceError` above it).

    Returns:
      A dict: `path`, `bytes` (the artifact's size on disk), `store`, `signatures`, `parameters`
      (p), `n_train`, `arrays` (name -> shape of each stored matrix besides the model).

    Example:
      >>> inf = tfi.Influence(model, "sparse_categorical_crossentropy", (x, y), variables="head",
      ...                     method="direct", damping=1e-3)
      >>> tfi.export_saved_model(inf, "influence_model")["bytes"]
      2202405
      >>> scorer = tf.saved_model.load("influence_model")
      >>> scorer.signatures["influence"](x=x_test, y=y_test)["scores"]   # [n_test, n_train]
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path!r} already exists. Pass overwrite=True to replace it.")
    store = _choose_store(influence, store, max_parameters)
    x_spec, y_spec = _input_specs(influence)
    arrays = _stored_arrays(influence, store)
    module = _InfluenceModule(influence, store, arrays, x_spec, y_spec)
    signatures = {"influence": module.influence, "top_k": module.top_k, "serving_default": module.predict}
    if store != "preconditioned":
        signatures["self_influence"] = module.self_influence
    _write_atomically(module, path, signatures)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return {"path": path, "bytes": size, "store": store, "signatures": sorted(signatures),
            "parameters": influence.space.size, "n_train": module.n_train_value,
            "arrays": {name: list(np.shape(a)) for name, a in _flat_arrays(arrays).items()}}


def _choose_store(influence, store, max_parameters):
    if store not in STORES:
        raise InputError(f"store must be one of {STORES}. Received: store={store!r}.")
    method, p = influence.method, influence.space.size
    if store == "factors" and method not in _FACTOR_METHODS:
        raise InputError(
            f"store='factors' stores EKFAC/KFAC factors; this Influence uses method={method!r}. "
            "Use method='ekfac' or 'kfac', or store='inverse' / 'preconditioned'.")
    if store == "auto":
        if method in _FACTOR_METHODS:
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


def _stored_arrays(influence, store):
    """The matrices the signatures multiply by (numpy / tf tensors), by store."""
    gradients = np.concatenate([influence._gradients(batch).numpy()  # noqa: SLF001 - [batch, p]
                                for batch in iter(influence.operator.dataset)])
    if store == "preconditioned":
        return {"preconditioned": _solve_rows(influence, gradients)}
    if store == "inverse":
        inverse = _solve_rows(influence, np.eye(influence.space.size, dtype=gradients.dtype))
        # The exact inverse is symmetric; iterative solves are so to their tolerance.
        return {"inverse": 0.5 * (inverse + inverse.T), "train_gradients": gradients}
    return {"factors": _factor_arrays(influence), "train_gradients": gradients}


def _solve_rows(influence, rows):
    return np.concatenate([influence.inverse_hvp(tf.constant(rows[i:i + _CHUNK])).numpy()
                           for i in range(0, len(rows), _CHUNK)])


def _factor_arrays(influence):
    """Per layer: `q_a` (or None), `q_s`, `scale = 1/(Λ + λ)`, and how its variables sit in the flat vector."""
    operator = influence.solver.inverse_operator(influence.operator)
    factors = operator.factors
    if factors.space.sizes != influence.space.sizes or (
            [id(v) for v in factors.variables] != [id(v) for v in influence.operator.selected_variables]):
        raise InputError("The EKFAC factors were fitted for other variables than the Influence's; refit them.")
    index = {id(v): i for i, v in enumerate(factors.variables)}
    layers = []
    for block, layer, values, damping in zip(factors.blocks, factors.layers, operator.eigenvalues,
                                             operator.dampings):
        layers.append({
            "q_a": None if layer.q_a is None else layer.q_a.numpy(),
            "q_s": layer.q_s.numpy(),
            "scale": (1.0 / (values + damping)).numpy(),
            "kernel": None if block.kernel is None else index[id(block.kernel)],
            "bias": None if block.bias is None else index[id(block.bias)],
            "in_features": block.in_features,
            "out_features": block.out_features,
        })
    covered = {i for layer in layers for i in (layer["kernel"], layer["bias"]) if i is not None}
    if covered != set(range(len(factors.variables))):
        raise InputError("The EKFAC factors do not cover every selected variable; use store='inverse'.")
    return layers


def _flat_arrays(arrays):
    flat = {k: v for k, v in arrays.items() if k != "factors"}
    for i, layer in enumerate(arrays.get("factors", [])):
        flat.update({f"layer{i}_{k}": layer[k] for k in ("q_a", "q_s", "scale") if layer[k] is not None})
    return flat


class _InfluenceModule(tf.Module):
    """The exported object: the model's variables, the stored matrices, `settings`, and the signatures."""

    def __init__(self, influence, store, arrays, x_spec, y_spec):
        super().__init__(name="tf_influence_scorer")
        # Keras 3 variables are saved through this list (as keras.export does); holding the model
        # alone leaves them out of the object graph that TF1-style loaders (saved_model_cli run) read.
        self.model_variables = [getattr(v, "value", v) for v in influence.model.variables]
        self.stored = {name: tf.Variable(a, trainable=False, name=name) for name, a in _flat_arrays(arrays).items()}
        self.n_train_value = int(next(iter(v for k, v in self.stored.items() if k in
                                           ("train_gradients", "preconditioned"))).shape[0])
        self.n_train = tf.Variable(self.n_train_value, trainable=False, dtype=tf.int32, name="n_train")
        self.settings = tf.Variable(json.dumps(_settings(influence, store, x_spec, y_spec, self.n_train_value)),
                                    trainable=False, name="settings")
        objective, space, dtype = influence.objective, influence.space, influence.space.dtype
        tf_vars = influence._tf_vars  # noqa: SLF001 - the selected variables as tf.Variables
        classes = _label_classes(influence, y_spec)
        layers = arrays.get("factors")

        def validated_x(x):
            checks = [_assert_shape(x, x_spec)]
            if x.dtype.is_floating:
                checks.append(tf.debugging.assert_all_finite(x, "x holds NaN or Inf values"))
            with tf.control_dependencies(checks):  # everything computed from x runs after the checks
                return tf.identity(x)

        def gradients(x, y):
            checks = [_assert_shape(y, y_spec), tf.debugging.assert_equal(
                tf.shape(x)[0], tf.shape(y)[0], message="x and y must hold the same number of examples")]
            if classes is not None:
                checks.append(tf.debugging.assert_non_negative(y, message="labels y must be ≥ 0"))
                checks.append(tf.debugging.assert_less(
                    y, tf.constant(classes, y.dtype), message=f"labels y must be < {classes} (the model's classes)"))
            with tf.control_dependencies(checks):
                x, y = validated_x(x), tf.identity(y)
            weights = tf.ones(tf.shape(y)[:1], dtype)
            return tf.cast(scoring.per_example_gradients(objective, tf_vars, space, (x, y, weights)), dtype)

        def precondition(g):
            if store == "inverse":
                return tf.matmul(g, self.stored["inverse"])
            return tf.cast(_apply_factors(self.stored, layers, space.sizes, g), dtype)

        def scores(x, y):
            g = gradients(x, y)
            if store == "preconditioned":
                return tf.matmul(g, self.stored["preconditioned"], transpose_b=True)
            return tf.matmul(precondition(g), self.stored["train_gradients"], transpose_b=True)

        def influence_fn(x, y):
            return {"scores": scores(x, y), "predictions": objective.outputs(validated_x(x))}

        def top_k_fn(x, y, k):
            with tf.control_dependencies([
                    tf.debugging.assert_positive(k, message="k must be ≥ 1"),
                    tf.debugging.assert_less_equal(k, self.n_train, message="k must be ≤ n_train (training examples)")]):
                s = scores(x, y)
            helpful, harmful = tf.math.top_k(s, k), tf.math.top_k(-s, k)
            return {"helpful_indices": helpful.indices, "helpful_scores": helpful.values,
                    "harmful_indices": harmful.indices, "harmful_scores": -harmful.values}

        def self_influence_fn(x, y):
            g = gradients(x, y)
            return {"scores": tf.reduce_sum(precondition(g) * g, axis=1)}

        def predict_fn(x):
            return {"predictions": objective.outputs(validated_x(x))}

        k_spec = tf.TensorSpec([], tf.int32, name="k")
        self.influence = tf.function(influence_fn, input_signature=[x_spec, y_spec])
        self.top_k = tf.function(top_k_fn, input_signature=[x_spec, y_spec, k_spec])
        if store != "preconditioned":  # S alone cannot precondition a new point's gradient
            self.self_influence = tf.function(self_influence_fn, input_signature=[x_spec, y_spec])
        self.predict = tf.function(predict_fn, input_signature=[x_spec])


def _assert_shape(tensor, spec):
    """Checks rank and known dimensions after the batch axis (loaded signatures check dtypes only)."""
    dims = spec.shape.as_list()
    known = [i for i, d in enumerate(dims) if i > 0 and d is not None]
    shape = tf.shape(tensor)
    ok = tf.cond(tf.equal(tf.size(shape), len(dims)),
                 lambda: tf.reduce_all(tf.equal(tf.gather(shape, tf.constant(known, tf.int32)),
                                                         tf.constant([dims[i] for i in known], tf.int32))),
                 lambda: tf.constant(False))
    text = ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(dims))
    return tf.debugging.Assert(ok, [f"{spec.name} must have shape [{text}]; received shape", shape])


def _apply_factors(stored, layers, sizes, g):
    """`(C + λI)⁻¹` on rows `g` `[k, p]` from the stored factors (as `EKFACOperator.apply_rows`)."""
    compute = stored["layer0_q_s"].dtype
    parts = tf.split(tf.cast(g, compute), sizes, axis=-1)
    out = [None] * len(sizes)
    k = tf.shape(g)[0]
    for i, layer in enumerate(layers):
        pieces = []
        if layer["kernel"] is not None:
            pieces.append(tf.reshape(parts[layer["kernel"]], [k, layer["in_features"], layer["out_features"]]))
        if layer["bias"] is not None:
            pieces.append(tf.reshape(parts[layer["bias"]], [k, 1, layer["out_features"]]))
        m = tf.concat(pieces, axis=1)
        q_a, q_s = stored.get(f"layer{i}_q_a"), stored[f"layer{i}_q_s"]
        projected = m if q_a is None else tf.einsum("ka,nkl->nal", q_a, m)
        projected = tf.einsum("nal,lb->nab", projected, q_s) * stored[f"layer{i}_scale"]
        back = tf.einsum("nab,lb->nal", projected, q_s)
        back = back if q_a is None else tf.einsum("ka,nal->nkl", q_a, back)
        if layer["kernel"] is not None:
            out[layer["kernel"]] = tf.reshape(back[:, :layer["in_features"]], [k, -1])
        if layer["bias"] is not None:
            out[layer["bias"]] = back[:, -1]
    return tf.concat(out, axis=-1)


def _input_specs(influence):
    x, y, _ = next(iter(influence.operator.dataset))
    if isinstance(x, (tuple, list, dict)) or isinstance(y, (tuple, list, dict)):
        raise InputError(
            "export_saved_model supports models with one input tensor and one label tensor. Received "
            f"x of type {type(x).__name__} and y of type {type(y).__name__}.")
    return (tf.TensorSpec([None, *x.shape[1:]], x.dtype, name="x"),
            tf.TensorSpec([None, *y.shape[1:]], y.dtype, name="y"))


def _label_classes(influence, y_spec):
    """The class count when `y` holds integer class ids (sparse labels), else None."""
    x, _, _ = next(iter(influence.operator.dataset))
    outputs = influence.objective.outputs(x[:1])
    if not y_spec.dtype.is_integer or not isinstance(outputs, tf.Tensor) or outputs.shape.rank is None:
        return None
    classes = outputs.shape[-1]
    sparse = y_spec.shape.rank == outputs.shape.rank - 1 or (
        y_spec.shape.rank == outputs.shape.rank and y_spec.shape[-1] == 1)
    return int(classes) if sparse and classes is not None and classes > 1 else None


def _settings(influence, store, x_spec, y_spec, n_train):
    op = influence.operator
    return {
        "method": influence.method, "store": store,
        "damping": op.damping if isinstance(op.damping, str) else float(op.damping),
        "l2": float(influence.objective.l2), "curvature": getattr(op, "curvature", None),
        "variables": [v.path if hasattr(v, "path") else v.name for v in op.selected_variables],
        "parameters": influence.space.size, "n_train": n_train,
        "x": {"shape": x_spec.shape.as_list(), "dtype": x_spec.dtype.name},
        "y": {"shape": y_spec.shape.as_list(), "dtype": y_spec.dtype.name},
        "sign": "positive score = the training example helped (removal raises the test loss by score/n)",
    }


def _write_atomically(module, path, signatures):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tfi_export_", dir=parent)
    try:
        tf.saved_model.save(module, staging, signatures=signatures)
        if not os.path.exists(path):
            os.rename(staging, path)
            return
        backup = tempfile.mkdtemp(prefix=".tfi_old_", dir=parent)
        os.rename(path, os.path.join(backup, "old"))
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(os.path.join(backup, "old"), path)  # put the previous model back
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
