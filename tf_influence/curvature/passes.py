"""The compiled statistics passes of KFAC/EKFAC fitting, traced once per model and settings.

`fit_factors` runs one (KFAC) or two (EKFAC) passes over the data; each batch is one call of a
compiled function (`statistics.factor_sums` / `statistics.corrected_sum` of the rows of
`layer_rows.layer_rows`). Tracing those functions costs far more than running them on a small
model (on a digits MLP, 64-32-10 with 1,200 examples in one batch: about 2 s of CPU time to trace
both passes, 0.15 s to run them), so the compiled passes are shared: `fit_passes` returns the same
`FitPasses` for the same model, layer blocks, loss, `training` flag, settings and strategy, and a
second fit (a new `Influence`, a refit after the weights changed) traces nothing. The cache holds
the model weakly (an entry disappears with its model) and the passes never hold the objective
beyond a call, so nothing keeps a model alive.

Per pass, the batch statistics are summed on the device and checked for NaN/Inf once at the end
(a non-finite batch leaves the sum non-finite): no host synchronisation per batch.
"""

import contextlib
import dataclasses
import inspect
import weakref

import tensorflow as tf

from tf_influence import distribute as _distribute
from tf_influence.curvature import statistics as _statistics
from tf_influence.curvature.layer_rows import layer_rows
from tf_influence.errors import NotFiniteError

_CACHE = weakref.WeakKeyDictionary()  # model -> {key: FitPasses}


def fit_passes(objective, blocks, settings, *, strategy=None, num_targets):
    """The `FitPasses` for these blocks and settings, shared by every fit on the same model.

    Args:
      objective: the `Objective` (model, loss, `training` flag).
      blocks: the `LayerBlock`s of the selected variables (`capture.find_blocks`).
      settings: the `FactorSettings`, with `fisher` resolved.
      strategy: a `tf.distribute.Strategy` or None.
      num_targets: output targets per example (`targets.target_count`).

    Returns:
      A `FitPasses`; the same object for an equal key while the model lives.

    Example:
      >>> passes = fit_passes(problem.objective, blocks, settings, num_targets=10)
      >>> sums, total_weight, count = passes.first_pass(problem.objective, problem.batches)
    """
    settings = dataclasses.replace(settings, method="ekfac")  # both methods share the first pass
    return shared_for_model(
        _CACHE, objective, blocks, (settings, num_targets, None if strategy is None else id(strategy)),
        lambda: FitPasses(blocks, settings, strategy=strategy, num_targets=num_targets),
        valid=lambda passes: passes.strategy is strategy)


def shared_for_model(cache, objective, blocks, key, build, *, valid=None):
    """The object `build()` made for an equal key on the same model, or a new one (then cached).

    The key is `objective_key(objective)`, the selected variables of `blocks` and `key`; an entry is
    reused only if its `.blocks` are the same layers and variables (and `valid(entry)`, if given). When
    the objective has no safe key, `build()` serves this call only.

    Args:
      cache: a `weakref.WeakKeyDictionary` model -> {key: entry} (entries go with their model).
      objective: the `Objective` (its model is the cache key).
      blocks: the `LayerBlock`s the entry is built for.
      key: hashable settings the entry depends on.
      build: makes a new entry (with a `.blocks` attribute).
      valid: optional check of a found entry (e.g. the same strategy object).
    """
    loss_key = objective_key(objective)
    if loss_key is None:
        return build()
    key = (loss_key, tuple(id(v) for block in blocks for v in block.variables), key)
    entries = cache.setdefault(objective.model, {})
    entry = entries.get(key)
    if entry is None or not _same_blocks(entry.blocks, blocks) or (valid is not None and not valid(entry)):
        entry = entries[key] = build()
    return entry


def cached_passes(model):
    """The `FitPasses` cached for `model` (a list; empty when none), e.g. to read their trace counts."""
    return list(_CACHE.get(model, {}).values())


class FitPasses:
    """The compiled per-batch statistics of both passes, for one set of blocks and settings.

    Args:
      blocks, settings, strategy, num_targets: as for `fit_passes`.

    Attributes:
      traces: how many times each pass was traced (`{"first": n, "second": n}`), for tests and profiling.
    """

    def __init__(self, blocks, settings, *, strategy=None, num_targets):
        self.blocks = list(blocks)
        self.settings = settings
        self.dtype = tf.as_dtype(settings.dtype)
        self.strategy = strategy
        self.num_targets = num_targets
        self.traces = {"first": 0, "second": 0}
        self._objective = None  # set only during a pass: the cache must not keep the model alive
        if strategy is None:
            first, second = self._first_fn, self._second_fn
        else:  # each batch split across replicas, statistics summed
            def first(x, y, w, step):
                return _distribute.batch_sum(strategy, lambda shard, step: self._first_fn(*shard, step), (x, y, w),
                                             step)

            def second(x, y, w, step, bases):
                return _distribute.batch_sum(
                    strategy, lambda shard, step, bases: self._second_fn(*shard, step, bases), (x, y, w), step, bases)
        self._first = tf.function(first, reduce_retracing=True, autograph=False)
        self._second = tf.function(second, reduce_retracing=True, autograph=False)

    def first_pass(self, objective, batches):
        """`(sums, total_weight, count)` over the `(x, y, w)` batches (a dataset or `data.ArrayBatches`): per block
        `(A_sum, S_sum)`, `Σ w` (float) and the examples seen."""
        sums, total_weight, count = None, 0.0, 0
        with self._using(objective):
            for step, (x, y, w) in enumerate(batches):
                batch_sums, weight = self._first(x, y, w, tf.constant(step, tf.int64))
                sums = batch_sums if sums is None else tf.nest.map_structure(tf.add, sums, batch_sums)
                total_weight += weight
                count += int(w.shape[0]) if w.shape[0] is not None else int(tf.shape(w)[0])
        check_finite(sums, "first")
        return [tuple(s) for s in sums], float(total_weight), count

    def second_pass(self, objective, batches, layers):
        """Per block, `Σ_i w_i Σ_s c_s (Q_Aᵀ G_is Q_S)²` over the data (divide by `Σ w`)."""
        bases = [(layer.q_a if layer.q_a is not None else tf.zeros([0, 0], self.dtype), layer.q_s)
                 for layer in layers]
        total = None
        with self._using(objective):
            for step, (x, y, w) in enumerate(batches):
                batch_sums = self._second(x, y, w, tf.constant(step, tf.int64), bases)
                total = batch_sums if total is None else [t + b for t, b in zip(total, batch_sums)]
        check_finite(total, "second")
        return total

    @contextlib.contextmanager
    def _using(self, objective):
        self._objective = objective
        try:
            yield
        finally:
            self._objective = None

    def _rows(self, x, y, step):
        seed = tf.stack([tf.cast(self.settings.seed, tf.int64), step])
        return layer_rows(self._objective, self.blocks, x, y, fisher=self.settings.fisher,
                          num_samples=self.settings.num_samples, seed=seed, dtype=self.dtype,
                          whole_batch_targets=self.strategy is not None, num_targets=self.num_targets)

    def _first_fn(self, x, y, w, step):
        self.traces["first"] += 1  # Python side effect: runs once per trace
        w = tf.cast(w, self.dtype)
        sums = [_statistics.factor_sums(block, a, gs, w, weight_sharing=self.settings.weight_sharing)
                for block, (a, gs) in zip(self.blocks, self._rows(x, y, step))]
        return sums, tf.reduce_sum(w)

    def _second_fn(self, x, y, w, step, bases):
        self.traces["second"] += 1
        w = tf.cast(w, self.dtype)
        return [_statistics.corrected_sum(block, a, q_a, q_s, gs, w)
                for block, (a, gs), (q_a, q_s) in zip(self.blocks, self._rows(x, y, step), bases)]


def check_finite(sums, which):
    """Raises `NotFiniteError` if any tensor of the nest `sums` holds NaN/Inf (one host synchronisation)."""
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(sums)]
    if flags and not bool(tf.reduce_all(tf.stack(flags))):
        raise NotFiniteError(
            f"NaN/Inf in the layer inputs or pre-activation gradients during the {which} pass of "
            "factor fitting. Check the data for NaN/Inf, the loss for non-differentiable points "
            "(e.g. sqrt or log at 0), and the model weights for divergence."
        )


def _same_blocks(cached, blocks):
    return len(cached) == len(blocks) and all(
        a.layer is b.layer and a.kind == b.kind and [id(v) for v in a.variables] == [id(v) for v in b.variables]
        for a, b in zip(cached, blocks))


def objective_key(objective):
    """A hashable key equal for objectives whose per-example losses and outputs are computed alike (the
    model is the cache's own key), or None when none can be made safely.

    It is `Objective.compiled_key()` (the one description of what a traced graph depends on: the loss
    by name or Keras config where that describes it, else by identity; the training flag, ...), with
    the objects known only by identity held by weak reference, so that the key keeps nothing alive
    and a dead object's reused `id()` never matches.
    """
    identity, options = objective.compiled_key()
    others = identity[1:]  # identity[0] is the model
    if any(inspect.ismethod(o) for o in others):  # a bound method is a new object on every access
        return None
    try:
        key = (options, tuple(weakref.ref(o) for o in others))
        hash(key)
    except TypeError:  # not weak-referenceable, or not hashable
        return None
    return key
