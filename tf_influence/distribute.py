"""Data passes under a user's `tf.distribute.Strategy`: each batch split across replicas, sums reduced.

Every quantity the library computes from data is a sum over examples (weighted losses, their
gradients and curvature products, KFAC statistics) or a per-example row (scores, per-example
gradients). Both distribute the same way: each batch of the data set is cut into one contiguous
shard per replica (replica r of R gets examples `[⌊r·m/R⌋, ⌊(r+1)·m/R⌋)` of a batch of m), every
replica runs the per-batch function on its shard (`strategy.run`), and the results are summed
across replicas (`strategy.reduce(SUM)`). Per-example rows are padded with zeros to the batch's
length at their shard's offset before the sum, so they come back in the data's order, bit for bit
(adding zeros is exact). Weighted means stay exact: weighted sums and weights are reduced
separately and divided once, so partial last batches and empty shards (m < R) are fine. Only the
order of the float additions differs from a single-device pass.

Splitting each batch (rather than `strategy.experimental_distribute_dataset`) keeps one code path
for sums, for rows that must come back in order, and for the single minibatches of LiSSA, and
works inside the solvers' compiled loops. Every worker of a `MultiWorkerMirroredStrategy` must see
the same data in the same order (each reads every batch and computes only its own shards): give
every worker the same arrays, or the same unshuffled `tf.data` pipeline.

`Problem` resolves the strategy; the data passes of `HessianOperator`, `Influence` and `fit_factors` call these functions.

Example:
  >>> strategy = tf.distribute.MirroredStrategy()
  >>> with strategy.scope():
  ...     model = build_model()                 # MirroredVariables
  >>> H = tfi.HessianOperator(model, loss, (x, y), damping=1e-3, strategy=strategy)
  >>> x, info = tfi.solvers.cg(H, b)            # every product is one distributed pass
"""

import tensorflow as tf

from tf_influence.errors import InputError

_SUM = tf.distribute.ReduceOp.SUM


def resolve_strategy(strategy=None):
    """The strategy to distribute over, or None for the plain single-device code path.

    Args:
      strategy: a `tf.distribute.Strategy`, or None to use the strategy whose `scope()` is active
        (none outside every scope: the single-device path).

    Returns:
      The strategy, or None.

    Raises:
      InputError: `strategy` is not a `tf.distribute.Strategy`, or the call is made inside
        `strategy.run` (a replica context), where a data pass cannot be distributed again.

    Example:
      >>> with tf.distribute.MirroredStrategy().scope():
      ...     resolve_strategy() is tf.distribute.get_strategy()
      True
    """
    if strategy is None:
        if not tf.distribute.has_strategy():
            return None
        strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.Strategy):
        raise InputError(
            "strategy must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()) or None. "
            f"Received: {type(strategy).__name__}."
        )
    # Outside every scope the default strategy's replica context is current, so only a
    # non-default strategy's replica context (inside strategy.run) is refused.
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        raise InputError(
            "tf_influence was called inside strategy.run (a replica context). Call it outside "
            "strategy.run, e.g. inside `with strategy.scope():` or with strategy=...; the library "
            "splits the data across the replicas itself."
        )
    return strategy


def shard_bounds(n, replica_id, num_replicas):
    """`(start, stop)` of replica `replica_id`'s contiguous shard of a batch of `n` examples."""
    n = tf.cast(n, tf.int32)
    r = tf.cast(replica_id, tf.int32)
    return (r * n) // num_replicas, ((r + 1) * n) // num_replicas


def split_batch(strategy, batch):
    """The batch `(x, y, w)` as per-replica values: replica r holds its shard (see `shard_bounds`)."""
    n = _batch_size(batch)

    def value_fn(context):
        start, stop = shard_bounds(n, context.replica_id_in_sync_group, context.num_replicas_in_sync)
        return tf.nest.map_structure(lambda t: t[start:stop], batch)

    return strategy.experimental_distribute_values_from_function(value_fn)


def batch_sum(strategy, per_batch_fn, batch, *args):
    """`Σ_replicas per_batch_fn(shard, *args)` for one batch `(x, y, w)`, reduced on every worker.

    Args:
      strategy: a `tf.distribute.Strategy`.
      per_batch_fn: `fn(shard, *args)` returning a nest of tensors that are sums over the shard's
        examples (it must accept a shard with no examples and then return zeros).
      batch: a batch `(x, y, w)` of tensors (the same on every worker).
      *args: tensors passed unchanged to every replica.

    Returns:
      The nest of summed tensors.

    Example:
      >>> total_weight = batch_sum(strategy, lambda shard: tf.reduce_sum(shard[2]), batch)
    """
    per_replica = strategy.run(per_batch_fn, args=(split_batch(strategy, batch),) + tuple(args))
    return tf.nest.map_structure(lambda v: strategy.reduce(_SUM, v, axis=None), per_replica)


def batch_rows(strategy, per_batch_fn, batch, *args):
    """Per-example rows `per_batch_fn(shard, *args)` of every shard, reassembled in the batch's order.

    Args:
      strategy: a `tf.distribute.Strategy`.
      per_batch_fn: `fn(shard, *args)` returning a tensor `[m_shard, ...]`, one row per example.
      batch: a batch `(x, y, w)` of tensors (the same on every worker).
      *args: tensors passed unchanged to every replica.

    Returns:
      `[m, ...]`: row i is example i's row, exactly as its replica computed it.

    Example:
      >>> losses = batch_rows(strategy, lambda s: objective.per_example_loss(s[1], model(s[0])), batch)
    """
    n = _batch_size(batch)

    def padded(shard, *inner_args):
        context = tf.distribute.get_replica_context()
        start, stop = shard_bounds(n, context.replica_id_in_sync_group, context.num_replicas_in_sync)
        rows = per_batch_fn(shard, *inner_args)
        return tf.pad(rows, [[start, n - stop]] + [[0, 0]] * (rows.shape.rank - 1))

    return batch_sum(strategy, padded, batch, *args)


def replica_sum(strategy, dataset, per_batch_fn, initial, *args):
    """`Σ_batches Σ_replicas per_batch_fn(shard, *args)` over a data set; trace it in `tf.function`.

    Args:
      strategy: a `tf.distribute.Strategy`.
      dataset: a batched `tf.data.Dataset` of `(x, y, w)` (not distributed: every batch is split here).
      per_batch_fn: as for `batch_sum`.
      initial: a nest of zeros shaped and typed like `per_batch_fn`'s result.
      *args: tensors passed unchanged to every replica.

    Returns:
      The nest of sums over every example of the data set.

    Example:
      >>> @tf.function
      ... def total_weight():
      ...     return replica_sum(strategy, dataset, lambda s: tf.reduce_sum(s[2]), tf.constant(0.0))
    """
    total = initial
    # An iterator, not the dataset: AutoGraph turns `for b in dataset` into a dataset reduce that
    # TF re-instantiates and re-optimises on every call (see HessianOperator._data_pass_fn).
    for batch in iter(dataset):
        part = batch_sum(strategy, per_batch_fn, batch, *args)
        total = tf.nest.map_structure(lambda t, p: t + tf.cast(p, t.dtype), total, part)
    return total


def gather_batch(tensor):
    """In a replica function: `(whole, start, stop)`, the whole batch's `tensor` gathered from every
    replica's shard (in replica order, i.e. the batch's order) and this replica's rows in it."""
    context = tf.distribute.get_replica_context()
    whole = context.all_gather(tensor, axis=0)
    whole = tf.ensure_shape(whole, [None] + tensor.shape[1:])  # all_gather drops the static feature dims
    start, stop = shard_bounds(tf.shape(whole)[0], context.replica_id_in_sync_group,
                               context.num_replicas_in_sync)
    return whole, start, stop


def _batch_size(batch):
    return tf.shape(batch[2])[0]
