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

import dataclasses
import hashlib
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.data import Fingerprint, batch_count, dataset_of, first_batch
from tf_influence.errors import InputError, NotFiniteError
from tf_influence.influence import eigenbasis_scores as _eigenbasis
from tf_influence.influence import factored_scores as _factored
from tf_influence.influence import group as _group
from tf_influence.influence import per_layer as _per_layer
from tf_influence.influence.batch_functions import BatchFunctions
from tf_influence.influence.measurements import MeasuredObjective, resolve_measurement
from tf_influence.influence.topk import top_k as _top_k
from tf_influence.operators.source import CurvatureSource
from tf_influence.problem import Problem
from tf_influence.solvers.auto import Auto, SolveAnnouncer
from tf_influence.solvers.dispatch import make_solver
from tf_influence.solvers.info import SolveInfo
from tf_influence.solvers.method import Prepared

_SOLVE_CHUNK = 256
_ZERO_COLUMNS_WARNING = 0.1  # fraction of training examples with all-zero scores that is warned about


class Influence:
    """Influence of training examples on test predictions for a trained Keras model.

    Args:
      model: a trained, built Keras model (never modified).
      loss: a Keras loss, loss name or callable returning per-example losses.
      train: training data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset` (not
        shuffled between passes: scores are reported in the data's order).
      variables: parameters θ to take influence over: `None` (all trainable), layers, layer names
        or variables. `variables=model.layers[-1]` studies the last layer with the rest frozen.
      method: IHVP method name (`"auto"`, `"direct"`, `"cg"`, `"lissa"`, `"scipy"`, `"ekfac"`, `"kfac"`,
        `"chain"`) or a method object such as `tfi.solvers.CG(tol=1e-8)`. `"auto"` (default) picks the
        cheapest route that applies by a cost model and logs why (`plan()` shows the estimates).
      damping: λ ≥ 0; every method solves `(H + λI) x = b`. None (default): chosen from the
        curvature's spectrum, the smallest λ that makes `H + λI` positive definite with condition
        ≤ ~100 (`tf_influence.operators.damping`); `damping_choice`, `SolveInfo.extra["damping"]`,
        `["damping_source"]`, `["damping_reason"]` and the log say what was chosen and why.
      l2: extra `(l2/2)·‖θ‖²` in the objective (use the weight decay the model was trained with).
      curvature: `"hessian"` or `"gauss_newton"` (PSD; safer for non-convex models).
      batch_size: batch size for array data.
      mode: HVP mode (`"back_over_back"`, the default, `"forward_over_back"`, `"finite_difference"`).
      training: `training` flag the model is called with.
      progress: show progress bars on long loops (also the method's own, e.g. LiSSA's, unless its
        `progress` option was set).
      strategy: a `tf.distribute.Strategy` that every data pass (curvature products, gradients,
        scores) splits its batches across, or None for the strategy whose `scope()` is active
        (single device outside every scope). Results equal the single-device ones.
      jit_compile: compile each batch's curvature product with XLA (see `HessianOperator`);
        on CPU this roughly halves the product time of CNNs with max pooling.
      on_unsafe_layers: `"raise"` (default), `"warn"` or `"ignore"` when a layer whose second
        derivatives stay wrong (`tf_influence.normalization.inexact_layers`) lies on the selected
        path of exact Hessian products (see `HessianOperator`).
      loss_weights: for per-output losses of a multi-output model (`loss` a dict or list), their
        weights as in `model.compile(loss_weights=...)`.
      measurement: what is attributed on the test side: None (the loss), "margin", "logit",
        "probability", an output name, a `tfi.Measurement` or a function `fn(y_true, y_pred) ->
        [batch]` (see `tf_influence.influence.measurements`). Positive scores mean helpful either way.
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

    def __init__(self, model, loss, train, *, variables=None, method="auto", damping=None, l2=0.0,
                 curvature="hessian", batch_size=None, mode="back_over_back", training=False,
                 progress=True, strategy=None, jit_compile=False, on_unsafe_layers="raise", loss_weights=None,
                 measurement=None, **method_options):
        arguments.one_of(on_unsafe_layers, "on_unsafe_layers", ("raise", "warn", "ignore"))
        self.solver = make_solver(method, **method_options)
        if dataclasses.is_dataclass(self.solver) and getattr(self.solver, "progress", False) is None:
            self.solver = dataclasses.replace(self.solver, progress=bool(progress))  # the method's own not set
        self.problem = Problem(model, loss, train, variables, l2=l2, training=training, batch_size=batch_size,
                               strategy=strategy, loss_weights=loss_weights, name="train")
        self.source = CurvatureSource(self.problem, damping=damping, curvature=curvature, mode=mode,
                                      jit_compile=jit_compile, on_unsafe_layers=on_unsafe_layers)
        self.model = model
        self.objective = self.problem.objective
        self.space = self.problem.space
        self.method = self.solver.name
        self.progress = progress
        self.last_solve_info = None
        self.batch_functions = BatchFunctions(self.problem)  # compiled once, reused by every call
        self.gradients = self.batch_functions.gradients
        self.gradient_dots = self.batch_functions.gradient_dots
        self.measurement = resolve_measurement(measurement, self.objective)
        self.test_objective = (self.objective if self.measurement.is_loss
                               else MeasuredObjective(self.objective, self.measurement))
        self.test_gradients = (self.gradients if self.measurement.is_loss
                               else BatchFunctions(self.problem, objective=self.test_objective).gradients)
        self._prepared = None
        self._cache = {}  # {kind: {test example key: row}} (see _cached_rows)
        self._fingerprint = self.problem.fingerprint()
        if jit_compile:  # an option of the Hessian products: check now that XLA can compile them
            self.source.hessian()

    # -- Public API ---------------------------------------------------------------------------

    @property
    def damping(self):
        """λ. With `damping=None` it is chosen when the method is prepared (reading it prepares the method)."""
        if self.source.damping_choice is None:
            self.prepared()
        return self.source.damping

    @property
    def damping_choice(self):
        """The `DampingChoice` (value, source "given"/"lanczos"/"factors", reason); prepares the method if needed."""
        _ = self.damping  # resolves it
        return self.source.damping_choice

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

    def plan(self, n_test=None, *, self_influence=False):
        """The estimated time and memory of each route for this problem (`print` it for a table).

        Args:
          n_test: test points to plan for (default: the auto method's `n_test`, 100).
          self_influence: also plan for one solve per training example.

        Returns:
          A `tfi.solvers.plan.Plan`; `plan.chosen` is the route `method="auto"` takes (marked `*`).
        """
        solver = self.solver if isinstance(self.solver, Auto) else Auto()
        return solver.plan(self.source, n_test=n_test, self_influence=self_influence)

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
        self._record(info)
        return solution

    def test_batches(self, test):
        """`test` as validated `(x, y, w)` batches, batched like the training data (`Problem.batched`), for
        loops in Python (array data are sliced in memory: `data.ArrayBatches`)."""
        batches = self.problem.batched(test, "test")
        if not self.measurement.is_loss:
            self.test_objective.validate(first_batch(batches, "test"), "test")
        return batches

    def test_dataset(self, test):
        """`test` as a validated `tf.data.Dataset` of `(x, y, w)` batches, batched like the training data."""
        return dataset_of(self.test_batches(test))

    def test_inverse_hvps(self, test):
        """`[n_test, p]`: `(H + λI)⁻¹ ∇ℓ(z_test)` for each test example, computed once and cached.

        With a measurement m, `∇ℓ(z_test)` is `σ·∇m(z_test)` (σ = −1 when higher m is better).
        """
        def solve(gradients):
            return self.solve(tf.constant(gradients, self.space.dtype)).numpy()

        return self._cached_rows(test, "inverse_hvps", lambda batch: self.test_gradients(batch).numpy(), solve)

    def scores(self, test):
        """`[n_test, n_train]` influence scores `∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)`; positive = helpful."""
        prepared = self.prepared()
        eigenbasis = _eigenbasis.eigenbasis_scores_for(self.problem, prepared) if self.measurement.is_loss else None
        if eigenbasis is not None:  # KFAC/EKFAC: both sides rotated into the factors' eigenbasis, no solves
            start = time.perf_counter()
            rows = self._cached_rows(test, "eigenbasis", lambda batch: eigenbasis.test_rows(batch).numpy())
            self._record(prepared.info(start, len(rows)))
            directions, dots = rows, eigenbasis
        else:
            directions = tf.constant(self.test_inverse_hvps(test), self.space.dtype)
            dots = _factored.dots_for(self.problem, prepared) or self.gradient_dots  # KFAC/EKFAC: layer rows
        seen, columns = Fingerprint(), []
        for batch in self._progress(self.problem.batches, "scoring"):
            seen.update(batch)
            columns.append(dots(batch, directions).numpy())
        self.problem.check_data_unchanged(seen)
        return check_scores(np.concatenate(columns, axis=0).T)

    def predicted_change(self, test):
        """`[n_test, n_train]`: predicted change of each test measurement (default: the loss) if that
        training point is removed: `σ · scores · wᵢ / Σw` (`scores / n_train` for the loss, unweighted).
        """
        weights = self.problem.weights()
        return self.measurement.orientation * self.scores(test) * (weights / weights.sum())[np.newaxis, :]

    def predicted_loss_change(self, test):
        """`[n_test, n_train]`: predicted change of each test loss if that training point is removed.

        Equals `scores / n_train` without sample weights (`scores · wᵢ / Σw` with them).
        """
        if not self.measurement.is_loss:
            raise InputError(f"This Influence measures {self.measurement.name!r}, not the loss; use "
                             "predicted_change(test) for the predicted change of the measurement.")
        return self.predicted_change(test)

    def layer_scores(self, test):
        """`{layer name: [n_test, n_train]}`: `scores(test)` split by layer; the parts sum to the scores.

        See `tf_influence.influence.per_layer` for what each part means for each method.
        """
        return _per_layer.layer_scores(self, test)

    def group_influence(self, test, groups, *, order=2):
        """Predicted change of each test measurement when each group of training examples is removed.

        First order (the sum of the individual predicted changes) and, with `order=2`, Basu et al.'s
        second-order group influence; a `GroupInfluence` (see `tf_influence.influence.group`).
        """
        return _group.group_influence(self, test, groups, order=order)

    def top_k(self, test, k):
        """The `k` most helpful and most harmful training examples for each test example (a `TopK`)."""
        n = self.n_train
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
            raise InputError(f"k must be an integer in [1, n_train={n}]. Received: k={k!r}.")
        return _top_k(self.scores(test), k)

    def self_influence(self):
        """`[n_train]`: `∇ℓ(zᵢ)ᵀ (H + λI)⁻¹ ∇ℓ(zᵢ)` — large for atypical or mislabeled examples.

        With a factorised exact method (`direct`) these are the squared norms of `L⁻¹∇ℓ(zᵢ)`, one
        triangular solve per batch of training gradients; other methods solve for every example.
        """
        self.check_weights()
        prepared = self.prepared()
        forms = getattr(prepared, "quadratic_forms", None)  # a factorised exact route: no solves
        batches = self.problem.num_batches
        announcer = SolveAnnouncer(self.source, prepared.method, self.n_train, batches=max(batches, 1))
        values = []
        for batch in self._progress(self.problem.batches, "self-influence"):
            grads = self.gradients(batch)
            if forms is not None:
                values.append(np.asarray(forms(grads), self.space.dtype.as_numpy_dtype))
            else:
                solution = self.solve(grads)
                values.append(tf.reduce_sum(grads * solution, axis=1).numpy())
            announcer.batch_done()
        return np.concatenate(values)

    def training_gradients(self, indices=None):
        """`[n, p]` per-example loss gradients of the training examples (all, or those in `indices`)."""
        n = self.n_train
        if indices is None:
            return np.concatenate([self.gradients(batch).numpy() for batch in self.problem.batches])
        indices = np.atleast_1d(np.asarray(indices))
        if indices.dtype.kind not in "iu" or np.any(indices < 0) or np.any(indices >= n):
            raise InputError(f"indices must be integers in [0, {n}). Received: {indices.tolist()}.")
        grads = np.zeros((len(indices), self.space.size), self.space.dtype.as_numpy_dtype)
        offset = 0
        for batch in self.problem.batches:
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

    def clear_cache(self):
        """Forgets the cached test rows (inverse-HVPs), e.g. to time a computation again; keeps the prepared method."""
        self._cache = {}

    def check_weights(self):
        """Drops cached solutions and prepared state (with a warning) if the model's weights changed.

        The other inputs are fixed when the Influence is built; every full pass of `scores` also checks
        that the training data still are those of the first pass (`Problem.check_data_unchanged`).
        """
        fingerprint = self.problem.fingerprint()
        if fingerprint != self._fingerprint:
            warnings.warn("The model's weights changed since the inverse-HVPs were cached; recomputing.",
                          stacklevel=3)
            self._cache, self._prepared, self._fingerprint = {}, None, fingerprint
        return fingerprint

    # -- Internals ------------------------------------------------------------------------------

    def _record(self, info):
        """Keeps a solve's `SolveInfo` as `last_solve_info`, with how the damping was chosen."""
        choice = self.source.damping_choice
        if choice is not None and isinstance(info, SolveInfo):
            info = dataclasses.replace(info, extra={**info.extra, **choice.report()})
        self.last_solve_info = info

    def _cached_rows(self, test, kind, batch_rows, finish=None):
        """`[n_test, width]`: per test example, the row `finish(batch_rows(batch))` of `kind`, cached by example.

        `batch_rows(batch)` gives one row per example of a test batch (computed only for batches with
        uncached examples); `finish` maps stacked rows to results in chunks of `_SOLVE_CHUNK` (None: the
        rows themselves). Cached rows go when the model's weights change (`check_weights`).
        """
        self.check_weights()
        cache = self._cache.setdefault(kind, {})
        keys, pending = [], {}
        for batch in self.test_batches(test):
            batch_keys = _example_keys(batch)
            keys.extend(batch_keys)
            missing = [i for i, key in enumerate(batch_keys) if key not in cache and key not in pending]
            if missing:
                rows = batch_rows(batch)
                pending.update((batch_keys[i], rows[i]) for i in missing)
        if finish is None:
            cache.update(pending)
        else:
            items = list(pending.items())
            for start in range(0, len(items), _SOLVE_CHUNK):
                chunk = items[start:start + _SOLVE_CHUNK]
                cache.update(zip([key for key, _ in chunk], finish(np.stack([row for _, row in chunk]))))
        return np.stack([cache[key] for key in keys])

    def _progress(self, batches, label):
        count = batch_count(batches)
        bar = keras.utils.Progbar(count if count > 0 else None, verbose=1 if self.progress else 0, unit_name=label)
        for step, batch in enumerate(batches):
            yield batch
            bar.update(step + 1)


def check_scores(scores):
    """`scores` `[n_test, n_train]` after checks: NaN/Inf is an error; many all-zero columns are warned about."""
    finite = np.isfinite(scores)
    if not finite.all():
        columns = np.flatnonzero(~finite.all(axis=0))
        raise NotFiniteError(
            f"{int((~finite).sum())} influence scores are NaN/Inf (training examples {columns[:10].tolist()}"
            f"{' ...' if len(columns) > 10 else ''}): their loss or gradient overflowed. Check those examples, the "
            "model's weights (very large weights saturate and overflow the loss), or compute in float64.")
    zero = np.all(scores == 0, axis=0)
    if scores.shape[0] and zero.mean() >= _ZERO_COLUMNS_WARNING:
        warnings.warn(
            f"{int(zero.sum())} of {scores.shape[1]} training examples have a score of exactly 0 for every test "
            "point: their loss gradients are 0. With a cross-entropy loss this means saturated outputs (the "
            "probabilities round to 1, e.g. from very large weights), whose influence is lost to rounding; check "
            "the model, or compute in float64.", stacklevel=3)
    return scores


def _example_keys(batch):
    x, y, _ = batch
    flat = [t.numpy() for t in tf.nest.flatten((x, y))]
    n = flat[0].shape[0]
    return [hashlib.sha1(b"".join(a[i].tobytes() for a in flat)).hexdigest() for i in range(n)]
