"""`MinibatchCurvature`: curvature products of random minibatches, for stochastic solvers (LiSSA).

A stochastic solver asks its operator for minibatch products (`HessianOperator.minibatches(...)`)
and never sees the data: `matmul_rows(rows, step)` returns `H̃_step rᵢ` for each row, where `H̃_step`
is the (undamped) curvature of the minibatch drawn for `step`. Three ways to draw it:

  "all"          batch_size ≥ n: every `H̃` is the exact H of the whole data as one batch.
  "independent"  every step draws `batch_size` distinct examples uniformly, independently of the
                 other steps (seeded by (seed, step)), so averages over steps are unbiased; the
                 examples are held in memory.
  "epochs"       consecutive batches of a seeded reshuffle of the data, streamed (Koh & Liang's
                 scheme); consecutive batches are disjoint, hence correlated.
"""

import tensorflow as tf

from tf_influence import arguments

SAMPLING = ("independent", "shuffled_epochs")


class MinibatchCurvature:
    """Minibatch curvature products over a data set; `matmul_rows(rows, step)` is traceable.

    Args:
      dataset: the training data, a batched `tf.data.Dataset` of `(x, y, w)`.
      batch_matmul_rows: `fn(batch, rows) -> [k, p]`, the undamped curvature of one batch times rows.
      num_examples: n, the examples in `dataset`.
      batch_size: examples per minibatch (clipped to n).
      sampling: "independent" or "shuffled_epochs".
      seed: sampling seed.

    Attributes:
      source: "all", "independent" or "epochs" (see the module docstring).
      batch_size: the minibatch size used.

    Example:
      >>> minibatches = H.minibatches(batch_size=64, seed=0)
      >>> h_s = minibatches.matmul_rows(s, tf.constant(7, tf.int64))   # H̃_7 s
    """

    def __init__(self, dataset, batch_matmul_rows, *, num_examples, batch_size, sampling="independent", seed=0):
        self.batch_size = min(arguments.positive_int(batch_size, "batch_size"), num_examples)
        self.sampling = arguments.one_of(sampling, "sampling", SAMPLING)
        self.seed = arguments.integer(seed, "seed")
        self.num_examples = num_examples
        self._product = batch_matmul_rows
        if self.batch_size >= num_examples:
            self.source, self._data = "all", _all_examples(dataset, num_examples)
        elif sampling == "independent":
            self.source, self._data = "independent", _all_examples(dataset, num_examples)
        else:
            self.source = "epochs"
            self._data = iter(_shuffled_epochs(dataset, num_examples, self.batch_size, self.seed))

    def matmul_rows(self, rows, step):
        """`H̃_step rᵢ` for each row of `rows` `[k, p]` (undamped); `step` an int64 scalar tensor."""
        if self.source == "all":
            return self._product(self._data, rows)
        if self.source == "epochs":
            return self._product(self._data.get_next(), rows)
        # A uniformly random subset of distinct examples, fresh each step: the positions of the
        # batch_size largest of n seeded uniforms (O(n) per step).
        key = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        index = tf.math.top_k(tf.random.stateless_uniform([self.num_examples], key), k=self.batch_size,
                              sorted=False).indices
        return self._product(tf.nest.map_structure(lambda t: tf.gather(t, index), self._data), rows)


def _all_examples(dataset, n):
    """Every `(x, y, w)` example of the data set as one batch of tensors."""
    return dataset.unbatch().batch(n).get_single_element()


def _shuffled_epochs(dataset, n, batch_size, seed):
    """Seeded reshuffle of the examples, epoch after epoch, cut into batches of `batch_size`."""
    examples = dataset.unbatch()
    return (examples.shuffle(n, seed=int(seed), reshuffle_each_iteration=True).repeat()
            .batch(batch_size, drop_remainder=True).prefetch(2))
