"""`export_saved_model`: freeze an `Influence` into a SavedModel that answers influence queries.

What is stored (all as `tf.Variable`s, none as graph constants):

  * the model's variables (its forward pass is traced into every signature);
  * `inverse`: the method's `(H + λI)⁻¹` over the selected parameters as a dense `[p, p]` matrix,
    built by applying the chosen method (direct, cg, ekfac, ...) to the p unit vectors;
  * `train_gradients`: the per-example training-loss gradients `[n_train, p]`.

A query for a batch of test points computes their per-example loss gradients `G` in the graph and
returns `G · inverse · train_gradientsᵀ`: the same numbers as `Influence.scores` (to the method's
accuracy; for EKFAC/direct exactly up to rounding). The trade-off: the artifact holds
`p² + n_train·p` numbers, so this form suits a selected variable set of up to a few thousand
parameters (e.g. `variables="head"`); `max_parameters` guards the size. Storing preconditioned
training gradients instead would drop the `p²` term but could not answer `self_influence` for new
points.

Signatures (inputs `x`, `y` shaped like the training data, with a batch axis of any size):

  influence(x, y)        -> scores [batch, n_train], predictions
  top_k(x, y, k)         -> helpful_indices, helpful_scores, harmful_indices, harmful_scores [batch, k]
  self_influence(x, y)   -> scores [batch]
  serving_default(x)     -> predictions

The SavedModel needs only TensorFlow to load (`tf.saved_model.load`, `saved_model_cli`, TF Serving).
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from tf_influence import scoring
from tf_influence.errors import InputError, ResourceError

DEFAULT_MAX_PARAMETERS = 8192


class _InfluenceModule(tf.Module):
    """The exported object: the model, the stored inverse and training gradients, and signatures."""

    def __init__(self, influence, inverse, train_gradients, x_spec, y_spec):
        super().__init__(name="tf_influence_scorer")
        # Keras 3 variables are saved through these lists (as keras.export does); holding the model
        # alone leaves them out of the object graph that TF1-style loaders (saved_model_cli run) read.
        self.variables_ = [getattr(v, "value", v) for v in influence.model.variables]
        self.inverse = tf.Variable(inverse, trainable=False, name="inverse")
        self.train_gradients = tf.Variable(train_gradients, trainable=False, name="train_gradients")
        self.n_train = tf.Variable(int(train_gradients.shape[0]), trainable=False, dtype=tf.int32, name="n_train")
        objective, space = influence.objective, influence.space
        tf_vars = influence._tf_vars  # noqa: SLF001 - the selected variables as tf.Variables
        dtype = self.inverse.dtype

        def gradients(x, y):
            weights = tf.ones(tf.shape(tf.nest.flatten(y)[0])[:1], dtype)
            return tf.cast(scoring.per_example_gradients(objective, tf_vars, space, (x, y, weights)), dtype)

        def scores(x, y):
            g = gradients(x, y)
            return tf.matmul(tf.matmul(g, self.inverse), self.train_gradients, transpose_b=True), g

        def influence_fn(x, y):
            s, _ = scores(x, y)
            return {"scores": s, "predictions": objective.outputs(x)}

        def top_k_fn(x, y, k):
            tf.debugging.assert_positive(k, message="k must be ≥ 1")
            tf.debugging.assert_less_equal(k, self.n_train, message="k must be ≤ n_train")
            s, _ = scores(x, y)
            helpful = tf.math.top_k(s, k)
            harmful = tf.math.top_k(-s, k)
            return {"helpful_indices": helpful.indices, "helpful_scores": helpful.values,
                    "harmful_indices": harmful.indices, "harmful_scores": -harmful.values}

        def self_influence_fn(x, y):
            g = gradients(x, y)
            return {"scores": tf.reduce_sum(tf.matmul(g, self.inverse) * g, axis=1)}

        def predict_fn(x):
            return {"predictions": objective.outputs(x)}

        k_spec = tf.TensorSpec([], tf.int32, name="k")
        self.influence = tf.function(influence_fn, input_signature=[x_spec, y_spec])
        self.top_k = tf.function(top_k_fn, input_signature=[x_spec, y_spec, k_spec])
        self.self_influence = tf.function(self_influence_fn, input_signature=[x_spec, y_spec])
        self.predict = tf.function(predict_fn, input_signature=[x_spec])


def export_saved_model(influence, path, *, overwrite=False, max_parameters=DEFAULT_MAX_PARAMETERS):
    """Writes a SavedModel with `influence`, `top_k`, `self_influence` and `serving_default` signatures.

    Args:
      influence: a `tfi.Influence` (any method; its inverse is materialised as described in the
        module docstring).
      path: target directory. Written atomically: into a temporary directory beside it, then
        renamed, so an interrupted export never leaves a half-written model at `path`.
      overwrite: replace an existing `path` (otherwise an existing path is an error).
      max_parameters: refuse (ResourceError) when more parameters are selected.

    Returns:
      A dict with `path`, `bytes` (the artifact's size on disk), `parameters`, `n_train`.

    Example:
      >>> inf = tfi.Influence(model, "sparse_categorical_crossentropy", (x, y), variables="head",
      ...                     method="direct", damping=1e-3)
      >>> tfi.export_saved_model(inf, "influence_model")
      >>> scorer = tf.saved_model.load("influence_model")
      >>> scorer.signatures["influence"](x=x_test, y=y_test)["scores"]
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path!r} already exists. Pass overwrite=True to replace it.")
    p = influence.space.size
    if p > max_parameters:
        raise ResourceError(
            f"The export stores a dense {p}x{p} inverse ({p * p * 8 / 2**20:.0f} MiB in float64); the limit "
            f"is max_parameters={max_parameters}. Select fewer variables (e.g. variables='head') or raise "
            "max_parameters.")
    x_spec, y_spec = _input_specs(influence)
    dtype = influence.space.dtype
    identity = tf.eye(p, dtype=dtype)
    inverse = influence.inverse_hvp(identity).numpy()
    inverse = 0.5 * (inverse + inverse.T)  # the exact inverse is symmetric; iterative solves nearly so
    train_gradients = np.concatenate([influence._gradients(batch).numpy()  # noqa: SLF001
                                      for batch in influence.operator.dataset])
    module = _InfluenceModule(influence, inverse, train_gradients, x_spec, y_spec)
    signatures = {
        "influence": module.influence,
        "top_k": module.top_k,
        "self_influence": module.self_influence,
        "serving_default": module.predict,
    }
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tfi_export_", dir=parent)
    try:
        tf.saved_model.save(module, staging, signatures=signatures)
        if os.path.exists(path):
            backup = tempfile.mkdtemp(prefix=".tfi_old_", dir=parent)
            os.rename(path, os.path.join(backup, "old"))
            os.rename(staging, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return {"path": path, "bytes": size, "parameters": p, "n_train": int(train_gradients.shape[0])}


def _input_specs(influence):
    x, y, _ = next(iter(influence.operator.dataset))
    if isinstance(x, (tuple, list, dict)) or isinstance(y, (tuple, list, dict)):
        raise InputError("export_saved_model supports models with one input tensor and one label tensor.")
    return (tf.TensorSpec([None, *x.shape[1:]], x.dtype, name="x"),
            tf.TensorSpec([None, *y.shape[1:]], y.dtype, name="y"))
