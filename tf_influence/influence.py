"""`Influence`: which training examples made a prediction, and what removing one would change.

Definitions (Koh & Liang 2017), with R the mean training objective, H = ∇²R and λ the damping:

  score(z_test, zᵢ) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)

Up-weighting zᵢ by ε changes the test loss by −ε·score; removing zᵢ is up-weighting by −wᵢ/Σw
(−1/n without sample weights), so removal is predicted to change the test loss by
+score·wᵢ/Σw. **A positive score means the training example helped** the test prediction
(removing it raises the test loss); a negative score means it hurt.
"""

import dataclasses
import hashlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_influence import distribute as _distribute
from tf_influence import scoring
from tf_influence.data import as_dataset, first_batch
from tf_influence.errors import InputError
from tf_influence.operators import HessianOperator
from tf_influence.params import tf_variables
from tf_influence.solvers.dispatch import make_solver

_SOLVE_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class TopK:
    """Most helpful (largest score) and most harmful (smallest score) training examples per test point.

    Each array is `[n_test, k]`; indices point into the training data in its original order.
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


class Influence:
    """Influence of training examples on test predictions for a trained Keras model.

    Args:
      model: a trained, built Keras model (never modified).
      loss: a Keras loss, loss name or callable returning per-example losses.
      train: training data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset` (not
        shuffled between passes: scores are reported in the data's order).
      variables: parameters θ to take influence over: `None` (all trainable), layers, layer names
        or variables. `variables=model.layers[-1]` studies the last layer with the rest frozen.
      method: IHVP method name (`"direct"`, `"cg"`, `"lissa"`, `"scipy"`, ...) or a method object
        such as `tfi.solvers.CG(tol=1e-8)`.
      damping: λ ≥ 0; every method solves `(H + λI) x = b`.
      l2: extra `(l2/2)·‖θ‖²` in the objective (use the weight decay the model was trained with).
      curvature: `"hessian"` or `"gauss_newton"` (PSD; safer for non-convex models).
      batch_size: batch size for array data.
      mode: HVP mode (`"forward_over_back"`, `"back_over_back"`, `"finite_difference"`).
      training: `training` flag the model is called with.
      progress: show progress bars on long loops.
      strategy: a `tf.distribute.Strategy` that every data pass (curvature products, gradients,
        scores) splits its batches across, or None for the strategy whose `scope()` is active
        (single device outside every scope). Results equal the single-device ones.
      jit_compile: compile each batch's curvature product with XLA (see `HessianOperator`);
        on CPU this roughly halves the product time of CNNs with max pooling.
      **method_options: options of the method (e.g. `tol`, `maxiter` for CG).

    Example:
      >>> inf = tfi.Influence(model, "sparse_categorical_crossentropy", (x_train, y_train),
      ...                     method="cg", damping=1e-3)
      >>> scores = inf.scores((x_test, y_test))          # [n_test, n_train], positive = helpful
      >>> top = inf.top_k((x_test, y_test), k=5)
      >>> top.harmful_indices[0]                         # the 5 most harmful for test point 0
    """

    def __init__(self, model, loss, train, *, variables=None, method="cg", damping=0.0, l2=0.0,
                 curvature="hessian", batch_size=None, mode="forward_over_back", training=False,
                 progress=True, strategy=None, jit_compile=False, **method_options):
        self.solver = make_solver(method, **method_options)
        self.operator = HessianOperator(model, loss, train, variables, damping=damping, l2=l2,
                                        curvature=curvature, mode=mode, batch_size=batch_size,
                                        training=training, strategy=strategy,
                                        jit_compile=jit_compile)
        self.model = model
        self.objective = self.operator.objective
        self.space = self.operator.space
        self.method = self.solver.name
        self.batch_size = batch_size
        self.progress = progress
        self.last_solve_info = None
        self._train = self.operator.dataset
        self._tf_vars = tf_variables(self.operator.selected_variables)
        self._gradients = tf.function(self._gradients_fn, reduce_retracing=True)
        self._dots = tf.function(self._dots_fn, reduce_retracing=True)
        self.strategy = self.operator.strategy
        if self.strategy is not None:  # each batch split across replicas, rows back in order
            self._gradients = tf.function(
                lambda batch: _distribute.batch_rows(self.strategy, self._gradients_fn, batch),
                reduce_retracing=True)
            self._dots = tf.function(
                lambda batch, directions: _distribute.batch_rows(self.strategy, self._dots_fn, batch, directions),
                reduce_retracing=True)
        self._train_weights = None
        self._reset_cache()

    # -- Public API ---------------------------------------------------------------------------

    @property
    def damping(self):
        return self.operator.damping

    @property
    def n_train(self):
        return len(self._weights())

    def inverse_hvp(self, vectors):
        """`(H + λI)⁻¹ v` for flat vectors `[p]` / `[k, p]` or a list shaped like the variables.

        Returns the result in the form it was given. Diagnostics go to `self.last_solve_info`.
        """
        as_list = isinstance(vectors, (list, tuple))
        flat = self.space.as_flat_vectors(vectors)
        solution = self._solve(flat)
        if as_list:
            parts = self.space.unflatten(solution)
            return parts if np.ndim(vectors[0]) > len(self.space.shapes[0]) else [p[0] for p in parts]
        return solution[0] if tf.convert_to_tensor(vectors).shape.rank == 1 else solution

    def test_inverse_hvps(self, test):
        """`[n_test, p]`: `(H + λI)⁻¹ ∇ℓ(z_test)` for each test example, computed once and cached."""
        self._check_fingerprint()
        keys, gradients = [], []
        for batch in self._dataset(test, "test"):
            batch_keys = _example_keys(batch)
            keys.extend(batch_keys)
            missing = [i for i, key in enumerate(batch_keys) if key not in self._cache]
            if missing:
                grads = self._gradients(batch).numpy()
                gradients.extend((batch_keys[i], grads[i]) for i in missing)
        pending = {}
        for key, grad in gradients:
            pending.setdefault(key, grad)
        items = list(pending.items())
        for start in range(0, len(items), _SOLVE_CHUNK):
            chunk = items[start:start + _SOLVE_CHUNK]
            solution = self._solve(tf.constant(np.stack([g for _, g in chunk]), self.space.dtype)).numpy()
            self._cache.update({key: row for (key, _), row in zip(chunk, solution)})
        return np.stack([self._cache[key] for key in keys])

    def scores(self, test):
        """`[n_test, n_train]` influence scores `∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)`; positive = helpful."""
        directions = tf.constant(self.test_inverse_hvps(test), self.space.dtype)
        columns = [self._dots(batch, directions).numpy() for batch in self._progress(self._train, "scoring")]
        return np.concatenate(columns, axis=0).T

    def predicted_loss_change(self, test):
        """`[n_test, n_train]`: predicted change of each test loss if that training point is removed.

        Equals `scores / n_train` without sample weights (`scores · wᵢ / Σw` with them).
        """
        weights = self._weights()
        return self.scores(test) * (weights / weights.sum())[np.newaxis, :]

    def top_k(self, test, k):
        """The `k` most helpful and most harmful training examples for each test example."""
        n = self.n_train
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise InputError(f"k must be an integer in [1, n_train={n}]. Received: k={k!r}.")
        scores = self.scores(test)
        helpful = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        harmful = np.argsort(scores, axis=1, kind="stable")[:, :k]
        return TopK(helpful, np.take_along_axis(scores, helpful, 1),
                    harmful, np.take_along_axis(scores, harmful, 1))

    def self_influence(self):
        """`[n_train]`: `∇ℓ(zᵢ)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)` — large for atypical or mislabeled examples."""
        self._check_fingerprint()
        values = []
        for batch in self._progress(self._train, "self-influence"):
            grads = self._gradients(batch)
            solution = self._solve(grads)
            values.append(tf.reduce_sum(grads * solution, axis=1).numpy())
        return np.concatenate(values)

    def parameter_change(self, indices):
        """`[len(indices), p]`: predicted `Δθ` when each listed training example is removed.

        `Δθ ≈ (wᵢ/Σw) (H + λI)⁻¹ ∇ℓ(zᵢ)` (first order); unflatten with `self.space.unflatten`.
        """
        indices = np.atleast_1d(np.asarray(indices))
        n = self.n_train
        if indices.dtype.kind not in "iu" or np.any(indices < 0) or np.any(indices >= n):
            raise InputError(f"indices must be integers in [0, {n}). Received: {indices.tolist()}.")
        grads = np.zeros((len(indices), self.space.size), self.space.dtype.as_numpy_dtype)
        offset = 0
        for batch in self._train:
            size = int(tf.shape(batch[2])[0])
            inside = (indices >= offset) & (indices < offset + size)
            if inside.any():
                batch_grads = self._gradients(batch).numpy()
                grads[inside] = batch_grads[indices[inside] - offset]
            offset += size
        weights = self._weights()
        solution = self._solve(tf.constant(grads)).numpy()
        return solution * (weights[indices] / weights.sum())[:, np.newaxis]

    # -- Internals ------------------------------------------------------------------------------

    def _gradients_fn(self, batch):
        return scoring.per_example_gradients(self.objective, self._tf_vars, self.space, batch)

    def _dots_fn(self, batch, directions):
        return scoring.gradient_dot(self.objective, self._tf_vars, self.space, batch, directions)

    def _solve(self, rows):
        rows = tf.convert_to_tensor(rows, self.space.dtype)
        solution, info = self.solver.solve(self._solve_operator(), rows)
        self.last_solve_info = info
        return solution

    def _solve_operator(self):
        if self.method == "direct":
            if self._dense is None:
                self._dense = tf.linalg.LinearOperatorFullMatrix(
                    self.operator.to_dense(), is_self_adjoint=True, is_square=True)
            return self._dense
        return self.operator

    def _dataset(self, data, name):
        dataset = as_dataset(data, batch_size=self.batch_size, name=name)
        self.objective.validate(first_batch(dataset, name), name)
        return dataset

    def _weights(self):
        if self._train_weights is None:
            self._train_weights = np.concatenate([w.numpy() for _, _, w in self._train]).astype(np.float64)
        return self._train_weights

    def _progress(self, dataset, label):
        cardinality = int(dataset.cardinality())
        bar = keras.utils.Progbar(cardinality if cardinality > 0 else None,
                                  verbose=1 if self.progress else 0, unit_name=label)
        for step, batch in enumerate(dataset):
            yield batch
            bar.update(step + 1)

    def _reset_cache(self):
        self._cache = {}
        self._dense = None
        self._fingerprint = _fingerprint(self._tf_vars)

    def _check_fingerprint(self):
        if _fingerprint(self._tf_vars) != self._fingerprint:
            warnings.warn("The model's weights changed since the inverse-HVPs were cached; recomputing.",
                          stacklevel=3)
            self._reset_cache()


def _example_keys(batch):
    x, y, _ = batch
    flat = [t.numpy() for t in tf.nest.flatten((x, y))]
    n = flat[0].shape[0]
    return [hashlib.sha1(b"".join(a[i].tobytes() for a in flat)).hexdigest() for i in range(n)]


def _fingerprint(tf_vars):
    digest = hashlib.sha1()
    for v in tf_vars:
        digest.update(v.numpy().tobytes())
    return digest.hexdigest()
