"""`export_saved_model`: freeze an `Influence` into a SavedModel that answers influence queries.

Signatures (inputs `x`, `y` shaped like one batch of the training data, any batch size):

  influence(x, y)        -> scores [batch, n_train] (= `Influence.scores`), predictions, and
                            measurement [batch] when the Influence has a measurement (margin, ...)
  top_k(x, y, k)         -> helpful_indices, helpful_scores, harmful_indices, harmful_scores [batch, k]
  self_influence(x, y)   -> scores [batch]: g(x, y)ᵀ (H + λI)⁻¹ g(x, y), for screening new data
  serving_default(x)     -> predictions

Every signature computes the per-example loss gradients `g` of its batch in the graph, from the
stored model, and multiplies them by stored matrices. With a measurement m (`Influence(measurement=
...)`), `influence` and `top_k` take the test gradients of `σ·m` instead (the measurement is traced
into the graph; `self_influence` stays that of the loss). What is stored (`store=`), all as
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

A string variable `settings` (JSON: method, store, damping and how it was chosen, l2, curvature,
variables, n_train, parameters, input specs, fingerprints of the weights and the training data)
records what the scores mean; the same JSON is written beside the SavedModel as
`tf_influence_export.json`, which marks the directory as an export that `overwrite=True` may
replace. The SavedModel needs only TensorFlow to load (`tf.saved_model.load`, `saved_model_cli`,
TF Serving); tf_influence is not imported.

Serving-time validation: the input signature fixes the feature shape and the dtypes (a wrong
width or label dtype is refused before anything runs); assertions refuse x/y batch mismatches,
non-finite features, integer labels outside `[0, classes)` and `k` outside `[1, n_train]`.
"""

import json
import os

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.export.stores import DEFAULT_MAX_PARAMETERS, choose_store, flat_arrays, precondition, stored_arrays
from tf_influence.files import atomic_write_dir, check_target
from tf_influence.influence import gradients as _gradients

MARKER = "tf_influence_export.json"  # the export's settings, beside the SavedModel: marks it as ours


def export_saved_model(influence, path, *, overwrite=False, store="auto", max_parameters=DEFAULT_MAX_PARAMETERS):
    """Writes a SavedModel with `influence`, `top_k`, `self_influence` and `serving_default` signatures.

    Args:
      influence: a `tfi.Influence` (one input tensor, one label tensor).
      path: target directory (missing parent folders are created). Checked before anything is
        computed, then written atomically: into a temporary directory beside it, then renamed,
        so an interrupted export never leaves a half-written model at `path`.
      overwrite: replace an existing `path` that is a previous export of tf_influence (anything
        else that exists, a file or another directory, is never replaced: `InputError`).
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
    path = check_target(path, "export path", directory=True, replaceable=is_influence_export, overwrite=overwrite,
                        create_folder=True)
    store = choose_store(influence, store, max_parameters)
    x_spec, y_spec = _input_specs(influence)
    arrays = stored_arrays(influence, store)
    module = _InfluenceModule(influence, store, arrays, x_spec, y_spec)
    signatures = {"influence": module.influence, "top_k": module.top_k, "serving_default": module.predict}
    if store != "preconditioned":
        signatures["self_influence"] = module.self_influence

    def write(staging):
        tf.saved_model.save(module, staging, signatures=signatures)
        with open(os.path.join(staging, MARKER), "w") as f:
            f.write(module.settings.numpy().decode())

    atomic_write_dir(path, write, overwrite=overwrite)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return {"path": path, "bytes": size, "store": store, "signatures": sorted(signatures),
            "parameters": influence.space.size, "n_train": module.n_train_value,
            "arrays": {name: list(np.shape(a)) for name, a in flat_arrays(arrays).items()}}


def is_influence_export(path):
    """True when the directory `path` is a SavedModel written by `export_saved_model` (which `overwrite` may replace).

    Recognised by the settings file it writes beside the SavedModel, or (exports from earlier
    versions) by its `influence` and `top_k` signatures.
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        return False
    if os.path.isfile(os.path.join(path, MARKER)):
        return True
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
    except Exception:  # noqa: BLE001 - not a readable SavedModel: not ours
        return False
    return any({"influence", "top_k"} <= set(graph.signature_def) for graph in proto.meta_graphs)


class _InfluenceModule(tf.Module):
    """The exported object: the model's variables, the stored matrices, `settings`, and the signatures."""

    def __init__(self, influence, store, arrays, x_spec, y_spec):
        super().__init__(name="tf_influence_scorer")
        # Keras 3 variables are saved through this list (as keras.export does); holding the model
        # alone leaves them out of the object graph that TF1-style loaders (saved_model_cli run) read.
        self.model_variables = [getattr(v, "value", v) for v in influence.model.variables]
        self.stored = {name: tf.Variable(a, trainable=False, name=name) for name, a in flat_arrays(arrays).items()}
        self.n_train_value = int(next(iter(v for k, v in self.stored.items() if k in
                                           ("train_gradients", "preconditioned"))).shape[0])
        self.n_train = tf.Variable(self.n_train_value, trainable=False, dtype=tf.int32, name="n_train")
        self.settings = tf.Variable(json.dumps(_settings(influence, store, x_spec, y_spec, self.n_train_value)),
                                    trainable=False, name="settings")
        objective, space, dtype = influence.objective, influence.space, influence.space.dtype
        tf_vars = influence.problem.tf_variables
        classes = _label_classes(influence, y_spec)
        layers = arrays.get("factors")

        def validated_x(x):
            checks = [_assert_shape(x, x_spec)]
            if x.dtype.is_floating:
                checks.append(tf.debugging.assert_all_finite(x, "x holds NaN or Inf values"))
            with tf.control_dependencies(checks):  # everything computed from x runs after the checks
                return tf.identity(x)

        def gradients(x, y, objective=objective):
            checks = [_assert_shape(y, y_spec), tf.debugging.assert_equal(
                tf.shape(x)[0], tf.shape(y)[0], message="x and y must hold the same number of examples")]
            if classes is not None:
                checks.append(tf.debugging.assert_non_negative(y, message="labels y must be ≥ 0"))
                checks.append(tf.debugging.assert_less(
                    y, tf.constant(classes, y.dtype), message=f"labels y must be < {classes} (the model's classes)"))
            with tf.control_dependencies(checks):
                x, y = validated_x(x), tf.identity(y)
            weights = tf.ones(tf.shape(y)[:1], dtype)
            return tf.cast(_gradients.per_example_gradients(objective, tf_vars, space, (x, y, weights)), dtype)

        def preconditioned(g):
            return precondition(self.stored, store, layers, space.sizes, g, dtype)

        def scores(x, y):
            g = gradients(x, y, influence.test_objective)
            if store == "preconditioned":
                return tf.matmul(g, self.stored["preconditioned"], transpose_b=True)
            return tf.matmul(preconditioned(g), self.stored["train_gradients"], transpose_b=True)

        def influence_fn(x, y):
            result = {"scores": scores(x, y), "predictions": objective.outputs(validated_x(x))}
            if not influence.measurement.is_loss:
                result["measurement"] = influence.measurement(y, result["predictions"])
            return result

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
            return {"scores": tf.reduce_sum(preconditioned(g) * g, axis=1)}

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


def _input_specs(influence):
    x, y, _ = influence.problem.first_batch
    if isinstance(x, (tuple, list, dict)) or isinstance(y, (tuple, list, dict)):
        raise InputError(
            "export_saved_model supports models with one input tensor and one label tensor. Received "
            f"x of type {type(x).__name__} and y of type {type(y).__name__}.")
    return (tf.TensorSpec([None, *x.shape[1:]], x.dtype, name="x"),
            tf.TensorSpec([None, *y.shape[1:]], y.dtype, name="y"))


def _label_classes(influence, y_spec):
    """The class count when `y` holds integer class ids (sparse labels), else None."""
    x, _, _ = influence.problem.first_batch
    outputs = influence.objective.outputs(x[:1])
    if not y_spec.dtype.is_integer or not isinstance(outputs, tf.Tensor) or outputs.shape.rank is None:
        return None
    classes = outputs.shape[-1]
    sparse = y_spec.shape.rank == outputs.shape.rank - 1 or (
        y_spec.shape.rank == outputs.shape.rank and y_spec.shape[-1] == 1)
    return int(classes) if sparse and classes is not None and classes > 1 else None


def _settings(influence, store, x_spec, y_spec, n_train):
    damping = influence.damping
    choice = influence.damping_choice
    return {
        "method": influence.method, "store": store,
        "damping": damping if isinstance(damping, str) else float(damping),
        "damping_source": choice.source, "damping_reason": choice.reason,
        "model_fingerprint": influence.problem.fingerprint(), "data_fingerprint": influence.problem.data_fingerprint(),
        "l2": float(influence.objective.l2), "curvature": influence.source.curvature,
        "variables": [v.path if hasattr(v, "path") else v.name for v in influence.problem.variables],
        "parameters": influence.space.size, "n_train": n_train,
        "x": {"shape": x_spec.shape.as_list(), "dtype": x_spec.dtype.name},
        "y": {"shape": y_spec.shape.as_list(), "dtype": y_spec.dtype.name},
        "measurement": influence.measurement.name, "higher_is_better": influence.measurement.higher_is_better,
        "sign": ("positive score = the training example helped (removal raises the test loss by score/n)"
                 if influence.measurement.is_loss else
                 f"positive score = the training example helped: removal changes {influence.measurement.name} by "
                 f"{'-' if influence.measurement.higher_is_better else '+'}score/n"),
    }
