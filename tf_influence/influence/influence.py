"""`Influence`: which training examples made a prediction, and what removing one would change.

Definitions (Koh & Liang 2017), with R the mean training objective, H = ∇²R and λ the damping:

  score(z_test, zᵢ) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)

Up-weighting zᵢ by ε changes the test loss by −ε·score; removing zᵢ is up-weighting by −wᵢ/Σw
(−1/n without sample weights), so removal is predicted to change the test loss by
+score·wᵢ/Σw. **A positive score means the training example helped** the test prediction
(removing it raises the test loss); a negative score means it hurt.

The stages: a `Problem` (model, loss, data, variables) is validated once; the method asks a
`CurvatureSource` for the curvature it needs (nothing else is built) and prepares its reusable state
once per model weights; scoring multiplies training gradients with the prepared test directions.
"""

import hashlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence import distribute as _distribute
from tf_influence.errors import InputError
from tf_influence.influence import gradients as _gradients
from tf_influence.influence.topk import top_k as _top_k
from tf_influence.operators.source import CurvatureSource
from tf_influence.problem import Problem
from tf_influence.solvers.dispatch import make_solver
from tf_influence.solvers.method import Prepared

_SOLVE_CHUNK = 256


class Influence:
    """Influence of training examples on test predictions for a trained Keras model.

    Args:
      model: a trained, built Keras model (never modified).
      loss: a Keras loss, loss name or callable returning per-example losses.
      train: training data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset` (not
        shuffled between passes: scores are reported in the data's order).
      variables: parameters θ to take influence over: `None` (all trainable), layers, layer names
        or variables. `variables=model.layers[-1]` studies the last layer with the rest frozen.
      method: IHVP method name (`"direct"`, `"cg"`, `"lissa"`, `"scipy"`, `"ekfac"`, `"kfac"`,
        `"chain"`) or a method object such as `tfi.solvers.CG(tol=1e-8)`.
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
      on_unsafe_layers: `"raise"` (default), `"warn"` or `"ignore"` when a layer whose second
        derivatives stay wrong (`tf_influence.normalization.inexact_layers`) lies on the selected
        path of exact Hessian products (see `HessianOperator`).
      **method_options: options of the method (e.g. `tol`, `maxiter` for CG).

    Attributes:
      problem: the validated `tfi.Problem`; `space`: its flat parameter coordinates.
      solver: the method object; `method`: its name.
      source: the `CurvatureSource` the method takes its curvature from.
      last_solve_info: the `SolveInfo` of the latest solve.

    Example:
      >>> inf = tfi.Influence(model, "sparse_categorical_crossentropy", (x_train, y_train),
      ...                     method="cg", damping=1e-3)
      >>> scores = inf.scores((x_test, y_test))          # [n_test, n_train], positive = helpful
      >>> top = inf.top_k((x_test, y_test), k=5)
      >>> top.harmful_indices[0]                         # the 5 most harmful for test point 0
    """

    def __init__(self, model, loss, train, *, variables=None, method="cg", damping=0.0, l2=0.0,
                 curvature="hessian", batch_size=None, mode="forward_over_back", training=False,
                 progress=True, strategy=None, jit_compile=False, on_unsafe_layers="raise", **method_options):
        arguments.one_of(on_unsafe_layers, "on_unsafe_layers", ("raise", "warn", "ignore"))
        self.solver = make_solver(method, **method_options)
        self.problem = Problem(model, loss, train, variables, l2=l2, training=training, batch_size=batch_size,
                               strategy=strategy, name="train")
        self.source = CurvatureSource(self.problem, damping=damping, curvature=curvature, mode=mode,
                                      jit_compile=jit_compile, on_unsafe_layers=on_unsafe_layers)
        self.model = model
        self.objective = self.problem.objective
        self.space = self.problem.space
        self.method = self.solver.name
        self.progress = progress
        self.last_solve_info = None
        self.gradients = self._compiled(_gradients.per_example_gradients)
        self.gradient_dots = self._compiled(_gradients.gradient_dot)
        self._prepared = None
        self._cache = {}
        self._fingerprint = self.problem.fingerprint()
        if jit_compile:  # an option of the Hessian products: check now that XLA can compile them
            self.source.hessian()

    # -- Public API ---------------------------------------------------------------------------

    @property
    def damping(self):
        return self.source.damping

    @property
    def strategy(self):
        return self.problem.strategy

    @property
    def operator(self):
        """The exact `H + λI` as a `HessianOperator` (built on first access; EKFAC never needs it)."""
        return self.source.hessian()

    @property
    def n_train(self):
        return self.problem.num_examples

    def prepared(self):
        """The method's reusable state (`Prepared`) for the model's current weights, prepared once."""
        self.check_weights()
        if self._prepared is None:
            if callable(getattr(self.solver, "prepare", None)):
                self._prepared = self.solver.prepare(self.source)
            else:  # a user's method object with only solve(operator, rows)
                operator = self.source.hessian()
                self._prepared = Prepared(self.solver, operator, lambda rows: self.solver.solve(operator, rows))
        return self._prepared

    def inverse_hvp(self, vectors):
        """`(H + λI)⁻¹ v` for flat vectors `[p]` / `[k, p]` or a list shaped like the variables.

        Returns the result in the form it was given. Diagnostics go to `self.last_solve_info`.
        """
        as_list = isinstance(vectors, (list, tuple))
        flat = self.space.as_flat_vectors(vectors)
        solution = self.solve(flat)
        if as_list:
            parts = self.space.unflatten(solution)
            return parts if np.ndim(vectors[0]) > len(self.space.shapes[0]) else [p[0] for p in parts]
        return solution[0] if tf.convert_to_tensor(vectors).shape.rank == 1 else solution

    def solve(self, rows):
        """`(H + λI)⁻¹` on rows `[k, p]` with the prepared method; sets `last_solve_info`."""
        rows = tf.convert_to_tensor(rows, self.space.dtype)
        solution, info = self.prepared().solve(rows)
        self.last_solve_info = info
        return solution

    def test_dataset(self, test):
        """`test` as a validated dataset of `(x, y, w)` batches, batched like the training data."""
        return self.problem.batched(test, "test")

    def test_inverse_hvps(self, test):
        """`[n_test, p]`: `(H + λI)⁻¹ ∇ℓ(z_test)` for each test example, computed once and cached."""
        self.check_weights()
        keys, gradients = [], []
        for batch in self.test_dataset(test):
            batch_keys = _example_keys(batch)
            keys.extend(batch_keys)
            missing = [i for i, key in enumerate(batch_keys) if key not in self._cache]
            if missing:
                grads = self.gradients(batch).numpy()
                gradients.extend((batch_keys[i], grads[i]) for i in missing)
        pending = {}
        for key, grad in gradients:
            pending.setdefault(key, grad)
        items = list(pending.items())
        for start in range(0, len(items), _SOLVE_CHUNK):
            chunk = items[start:start + _SOLVE_CHUNK]
            solution = self.solve(tf.constant(np.stack([g for _, g in chunk]), self.space.dtype)).numpy()
            self._cache.update({key: row for (key, _), row in zip(chunk, solution)})
        return np.stack([self._cache[key] for key in keys])

    def scores(self, test):
        """`[n_test, n_train]` influence scores `∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)`; positive = helpful."""
        directions = tf.constant(self.test_inverse_hvps(test), self.space.dtype)
        columns = [self.gradient_dots(batch, directions).numpy()
                   for batch in self._progress(self.problem.dataset, "scoring")]
        return np.concatenate(columns, axis=0).T

    def predicted_loss_change(self, test):
        """`[n_test, n_train]`: predicted change of each test loss if that training point is removed.

        Equals `scores / n_train` without sample weights (`scores · wᵢ / Σw` with them).
        """
        weights = self.problem.weights()
        return self.scores(test) * (weights / weights.sum())[np.newaxis, :]

    def top_k(self, test, k):
        """The `k` most helpful and most harmful training examples for each test example (a `TopK`)."""
        n = self.n_train
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
            raise InputError(f"k must be an integer in [1, n_train={n}]. Received: k={k!r}.")
        return _top_k(self.scores(test), k)

    def self_influence(self):
        """`[n_train]`: `∇ℓ(zᵢ)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)` — large for atypical or mislabeled examples."""
        self.check_weights()
        values = []
        for batch in self._progress(self.problem.dataset, "self-influence"):
            grads = self.gradients(batch)
            solution = self.solve(grads)
            values.append(tf.reduce_sum(grads * solution, axis=1).numpy())
        return np.concatenate(values)

    def training_gradients(self, indices=None):
        """`[n, p]` per-example loss gradients of the training examples (all, or those in `indices`)."""
        n = self.n_train
        if indices is None:
            return np.concatenate([self.gradients(batch).numpy() for batch in iter(self.problem.dataset)])
        indices = np.atleast_1d(np.asarray(indices))
        if indices.dtype.kind not in "iu" or np.any(indices < 0) or np.any(indices >= n):
            raise InputError(f"indices must be integers in [0, {n}). Received: {indices.tolist()}.")
        grads = np.zeros((len(indices), self.space.size), self.space.dtype.as_numpy_dtype)
        offset = 0
        for batch in self.problem.dataset:
            size = int(tf.shape(batch[2])[0])
            inside = (indices >= offset) & (indices < offset + size)
            if inside.any():
                grads[inside] = self.gradients(batch).numpy()[indices[inside] - offset]
            offset += size
        return grads

    def parameter_change(self, indices):
        """`[len(indices), p]`: predicted `Δθ` when each listed training example is removed.

        `Δθ ≈ (wᵢ/Σw) (H + λI)⁻¹ ∇ℓ(zᵢ)` (first order); unflatten with `self.space.unflatten`.
        """
        indices = np.atleast_1d(np.asarray(indices))
        grads = self.training_gradients(indices)
        weights = self.problem.weights()
        solution = self.solve(tf.constant(grads)).numpy()
        return solution * (weights[indices] / weights.sum())[:, np.newaxis]

    def check_weights(self):
        """Drops cached solutions and prepared state (with a warning) if the model's weights changed."""
        fingerprint = self.problem.fingerprint()
        if fingerprint != self._fingerprint:
            warnings.warn("The model's weights changed since the inverse-HVPs were cached; recomputing.",
                          stacklevel=3)
            self._cache, self._prepared, self._fingerprint = {}, None, fingerprint
        return fingerprint

    # -- Internals ------------------------------------------------------------------------------

    def _compiled(self, fn):
        """`fn(objective, tf_vars, space, batch, *args)` over one batch, compiled, split across replicas."""
        problem = self.problem

        def per_batch(batch, *args):
            return fn(problem.objective, problem.tf_variables, problem.space, batch, *args)

        if problem.strategy is None:
            return tf.function(per_batch, reduce_retracing=True)
        return tf.function(lambda batch, *args: _distribute.batch_rows(problem.strategy, per_batch, batch, *args),
                           reduce_retracing=True)

    def _progress(self, dataset, label):
        cardinality = int(dataset.cardinality())
        bar = keras.utils.Progbar(cardinality if cardinality > 0 else None,
                                  verbose=1 if self.progress else 0, unit_name=label)
        for step, batch in enumerate(dataset):
            yield batch
            bar.update(step + 1)


def _example_keys(batch):
    x, y, _ = batch
    flat = [t.numpy() for t in tf.nest.flatten((x, y))]
    n = flat[0].shape[0]
    return [hashlib.sha1(b"".join(a[i].tobytes() for a in flat)).hexdigest() for i in range(n)]
