"""Training and test data as batched `tf.data.Dataset`s of `(x, y, w)` triples.

Users pass either a tuple of arrays `(x, y)` / `(x, y, w)` (x may be a list or dict of arrays for
multi-input models) or a batched `tf.data.Dataset` yielding such tuples, of known or unknown
cardinality and with a partial last batch. Inside the library everything is a dataset of
`(x, y, w)` with `w` a float vector (ones when the user gave no weights), so weighted means are
exact sums `Σ wᵢ ℓᵢ / Σ wᵢ`, independent of how the data is batched. Loops in Python read arrays
through `ArrayBatches` (`as_batches`), the same batches without a tf.data pipeline.

Influence scores are indexed by each example's position in the data, and every method reads the
data several times, so a dataset must yield the same examples in the same order on every pass and
must end: an infinite dataset (`.repeat()`) and one whose first batches differ between two passes
(`.shuffle()` reshuffling each iteration, random augmentation) are refused when they are given.
A Python list of numbers (or of lists of numbers) is one array; a list of arrays is the inputs of
a multi-input model.
"""

import hashlib
import itertools
import numbers

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError

DEFAULT_BATCH_SIZE = 256
ORDER_CHECK_BATCHES = 2  # batches compared between two passes to detect a reshuffling dataset


def as_dataset(data, *, batch_size=None, name="data"):
    """Returns `data` as a batched `tf.data.Dataset` of `(x, y, w)` triples.

    Args:
      data: a tuple `(x, y)` or `(x, y, w)` of arrays (x may be a list/tuple/dict of arrays), or a
        batched `tf.data.Dataset` whose elements are such tuples.
      batch_size: batch size used when `data` holds arrays (default 256). Ignored for datasets,
        which keep their own batching.
      name: what to call the data in error messages (e.g. "train", "test").

    Returns:
      A `tf.data.Dataset` of `(x, y, w)`, `w` of dtype float32 or float64 (ones if not given).

    Example:
      >>> ds = as_dataset((np.zeros((10, 3)), np.ones(10)), batch_size=4)
      >>> [int(w.shape[0]) for _, _, w in ds]
      [4, 4, 2]
    """
    return dataset_of(as_batches(data, batch_size=batch_size, name=name))


def dataset_of(batches):
    """The `tf.data.Dataset` of `as_batches`' result: an `ArrayBatches`' dataset, or the dataset itself."""
    return batches.dataset if isinstance(batches, ArrayBatches) else batches


def as_batches(data, *, batch_size=None, name="data"):
    """`data` checked as by `as_dataset`, as an iterable of `(x, y, w)` batches for loops in Python.

    Arrays become an `ArrayBatches` (sliced in memory, no tf.data pipeline to build and tear down on
    every pass); a dataset is returned checked, as `as_dataset` returns it.

    Example:
      >>> batches = as_batches((np.zeros((10, 3)), np.ones(10)), batch_size=4)
      >>> [int(w.shape[0]) for _, _, w in batches], batch_count(batches)
      ([4, 4, 2], 3)
    """
    if isinstance(data, ArrayBatches):  # checked already, batched as it is
        return data
    if isinstance(data, tf.data.Dataset):
        return _from_dataset(data, name)
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return _from_arrays(data, batch_size, name)
    raise InputError(
        f"{name} must be a tuple (x, y) or (x, y, w) of arrays, or a batched tf.data.Dataset "
        f"yielding such tuples. Received: {type(data).__name__}"
        + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
        + "."
    )


def batch_count(batches):
    """The number of batches of an `ArrayBatches` or dataset; 0 or less when a dataset does not know it."""
    if isinstance(batches, ArrayBatches):
        return len(batches)
    return int(batches.cardinality())


class ArrayBatches:
    """In-memory `(x, y, w)` arrays served in batches, in order, without a tf.data pipeline.

    A loop in Python over a `tf.data.Dataset` builds an iterator and tears it down on every pass
    (about 1.5-5 ms on a 2-core machine, more than a whole pass of a small model); slicing tensors
    already in memory costs microseconds per batch. The arrays are copied into tensors once, kept
    on the host (as a dataset's are): changing the caller's arrays later changes nothing here.

    Args:
      arrays: `(x, y, w)`, checked (`as_batches`); x may be a tuple or dict of arrays.
      batch_size: examples per batch; the last batch may be smaller.

    Attributes:
      num_examples, batch_size; `element_spec`: the `(x, y, w)` spec with the batch axis unknown, as
      a batched dataset's; `dataset`: the same batches as a `tf.data.Dataset` of the same tensors,
      built on first use (for compiled passes that take a dataset).

    Example:
      >>> batches = ArrayBatches((np.zeros((10, 3)), np.ones(10), np.ones(10)), batch_size=4)
      >>> [int(w.shape[0]) for _, _, w in batches], len(batches)
      ([4, 4, 2], 3)
    """

    def __init__(self, arrays, batch_size):
        with tf.device("CPU:0"):
            self.tensors = tf.nest.map_structure(tf.convert_to_tensor, arrays)
        self.batch_size = int(batch_size)
        self.num_examples = int(tf.nest.flatten(self.tensors)[0].shape[0])
        self.element_spec = tf.nest.map_structure(
            lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), self.tensors)
        self._dataset = None

    def __len__(self):
        return -(-self.num_examples // self.batch_size)

    def __iter__(self):
        for start in range(0, self.num_examples, self.batch_size):
            with tf.device("CPU:0"):
                batch = tf.nest.map_structure(lambda t: t[start:start + self.batch_size], self.tensors)  # noqa: B023
            yield batch

    @property
    def dataset(self):
        if self._dataset is None:
            with tf.init_scope():  # eager even when first read inside a traced function: the dataset outlives it
                self._dataset = tf.data.Dataset.from_tensor_slices(self.tensors).batch(self.batch_size)
        return self._dataset


def num_examples(data):
    """Number of examples in `data` (arrays or dataset), counting partial batches exactly."""
    if isinstance(data, (tuple, list)) and not isinstance(data, tf.data.Dataset):
        return _length(data[1], "y")
    total = 0
    for _, y, *_ in data:
        total += int(tf.shape(tf.nest.flatten(y)[0])[0])
    return total


def _length(array, what):
    flat = tf.nest.flatten(array)
    if not flat:
        raise InputError(f"{what} is empty: expected at least one array. Received: {array!r}.")
    return int(np.shape(flat[0])[0]) if np.ndim(flat[0]) else 0


class Fingerprint:
    """A streamed SHA-256 of examples, fed batch by batch (`update`), independent of the batching.

    It covers the dtype, the shape after the batch axis and the values of every tensor (x, y, w)
    of every example, in order. `sizes` records the batch sizes seen.

    Example:
      >>> digest = Fingerprint()
      >>> for batch in dataset: digest.update(batch)
      >>> digest.hexdigest()
    """

    def __init__(self):
        self._digests = []
        self.sizes = []

    def update(self, batch):
        flat = tf.nest.flatten(batch)
        if not self._digests:
            self._digests = [hashlib.sha256(f"{t.dtype.name}{t.shape[1:]}".encode()) for t in flat]
        for digest, t in zip(self._digests, flat):
            values = t.numpy()
            if values.dtype == object:  # strings: length-prefixed bytes
                for item in values.ravel():
                    digest.update(len(item).to_bytes(8, "little") + item)
            else:
                digest.update(np.ascontiguousarray(values).tobytes())
        self.sizes.append(int(tf.shape(flat[0])[0]) if flat and flat[0].shape.rank else 1)

    def hexdigest(self):
        return hashlib.sha256("".join(d.hexdigest() for d in self._digests).encode()).hexdigest()


def fingerprint(dataset, *, batches=None, with_sizes=False):
    """The `Fingerprint` of a dataset's examples (all, or the first `batches` batches): one streamed pass.

    The same examples batched differently give the same fingerprint.

    Returns:
      The hex digest, or `(digest, batch_sizes)` with `with_sizes=True`.

    Example:
      >>> fingerprint(as_dataset((x, y), batch_size=4)) == fingerprint(as_dataset((x, y), batch_size=7))
      True
    """
    digest = Fingerprint()
    for batch in (dataset if batches is None else itertools.islice(dataset, batches)):
        digest.update(batch)
    return (digest.hexdigest(), digest.sizes) if with_sizes else digest.hexdigest()


def _from_arrays(data, batch_size, name):
    x, y = _plain_lists_as_arrays(data[0]), _plain_lists_as_arrays(data[1])
    w = data[2] if len(data) == 3 else None
    lengths = {"x": [np.shape(a)[0] if np.ndim(a) else None for a in tf.nest.flatten(x)],
               "y": [np.shape(a)[0] if np.ndim(a) else None for a in tf.nest.flatten(y)]}
    if w is not None:
        lengths["w"] = [np.shape(w)[0] if np.ndim(w) else None]
    sizes = {n for ls in lengths.values() for n in ls}
    if None in sizes:
        part = "x" if None in lengths["x"] else "y" if None in lengths["y"] else "w"
        raise InputError(
            f"{name}: every array needs a leading example axis, but {part} holds a scalar. x, y and w must be "
            "arrays with one entry per example (a list of arrays in x means one array per input of a "
            "multi-input model). Received: "
            + ", ".join(f"{k}: {_kind(v)}" for k, v in (("x", data[0]), ("y", data[1]))) + ".")
    if len(sizes) != 1:
        raise InputError(
            f"{name}: x, y (and w) must have the same number of examples (first axis). "
            f"Received lengths {lengths}."
        )
    (n,) = sizes
    if n == 0:
        raise InputError(f"{name} is empty (0 examples): influence needs at least one example.")
    for part, arrays in (("x", x), ("y", y)):
        for a in tf.nest.flatten(arrays):
            a = np.asarray(a)
            if a.dtype.kind not in "biuf":
                raise InputError(
                    f"{name}: {part} must be numeric. Received dtype {a.dtype}; encode strings or "
                    "objects as numbers first."
                )
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                bad = int(np.sum(~np.isfinite(a)))
                raise InputError(
                    f"{name}: {part} contains {bad} NaN/Inf value(s). Clean or impute them before "
                    "computing influence."
                )
    if w is None:
        w = np.ones(n, dtype=_float_dtype_of(x))
    else:
        w = np.asarray(w)
        if w.ndim != 1 or w.dtype.kind not in "biuf" or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise InputError(
                f"{name}: sample weights must be a finite, non-negative vector of shape [{n}]. "
                f"Received shape {w.shape}, dtype {w.dtype}."
            )
        if not np.any(w > 0):
            raise InputError(f"{name}: every sample weight is zero; the mean objective is undefined.")
        w = w.astype(_float_dtype_of(x))
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}.")
    x = _lists_to_tuples(tf.nest.map_structure(np.asarray, x))
    y = _lists_to_tuples(tf.nest.map_structure(np.asarray, y))
    return ArrayBatches((x, y, w), batch_size)


def _plain_lists_as_arrays(value):
    """A Python list/tuple holding only numbers (or lists of numbers) as one NumPy array."""
    if isinstance(value, (list, tuple)) and value and _only_numbers(value):
        return np.asarray(value)
    return value


def _only_numbers(value):
    if isinstance(value, (list, tuple)):
        return all(_only_numbers(v) for v in value)
    return isinstance(value, numbers.Number) or isinstance(value, np.generic)


def _kind(value):
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} {type(value[0]).__name__ if value else 'items'}"
    return f"{type(value).__name__} of shape {np.shape(value)}"


def _lists_to_tuples(structure):
    # tf.data reads a Python list as one tensor; a tuple keeps multi-input x as separate arrays.
    if isinstance(structure, list):
        return tuple(_lists_to_tuples(s) for s in structure)
    if isinstance(structure, dict):
        return {k: _lists_to_tuples(v) for k, v in structure.items()}
    return structure


def _float_dtype_of(x):
    for a in tf.nest.flatten(x):
        if np.asarray(a).dtype == np.float64:
            return np.float64
    return np.float32


def _from_dataset(dataset, name):
    if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise InputError(
            f"{name}: the dataset is infinite (e.g. dataset.repeat() without a count). Influence reads every "
            "example once per pass, several times, and would never finish a pass. Remove .repeat(), or keep "
            "one epoch, e.g. dataset.take(number_of_batches).")
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise InputError(
            f"{name}: the dataset must yield tuples (x, y) or (x, y, w). Received elements with "
            f"spec {spec}. Use dataset.map(lambda ...: (x, y)) to reshape them."
        )
    y_spec = tf.nest.flatten(spec[1])[0]
    if y_spec.shape.rank == 0:
        raise InputError(
            f"{name}: the dataset yields single examples (labels of rank 0); it must be batched. "
            "Call dataset.batch(batch_size) first."
        )
    check_fixed_order(dataset, name)
    if len(spec) == 3:
        return dataset.map(lambda x, y, w: (x, y, tf.reshape(w, [-1])))

    def add_weights(x, y):
        dtype = tf.float64 if any(s.dtype == tf.float64 for s in tf.nest.flatten(spec[0])) else tf.float32
        n = tf.shape(tf.nest.flatten(y)[0])[0]
        return x, y, tf.ones([n], dtype)

    return dataset.map(add_weights)


def check_fixed_order(dataset, name="data", *, batches=ORDER_CHECK_BATCHES):
    """Refuses a dataset whose first `batches` batches differ between two passes (reshuffled or random).

    Raises:
      InputError: the two passes differ; the message says what usually causes it and the fix.
    """
    if fingerprint(dataset, batches=batches) != fingerprint(dataset, batches=batches):
        raise InputError(
            f"{name}: the dataset yields different data on every pass: its first {batches} batches differ between "
            "two iterations (dataset.shuffle() reshuffles on each iteration by default; random augmentation in "
            "a map does the same). Influence scores are indexed by each example's position, and every method "
            "reads the data several times, so the scores would belong to other examples than those at their "
            "index. Refused (the data is not materialised in some order). Shuffle once, with "
            "dataset.shuffle(buffer, seed=0, reshuffle_each_iteration=False), remove the shuffle, or pass "
            "arrays (x, y).")


def first_batch(dataset, name="data"):
    """The first `(x, y, w)` batch of a dataset; raises a clear error if the dataset is empty."""
    try:
        return next(iter(dataset))  # a third of the time of iterating `dataset.take(1)` (~6 vs ~14 ms)
    except StopIteration:
        raise InputError(
            f"{name} is empty: the dataset yielded no batch. Influence needs at least one example.") from None


def tile_batch(x, copies):
    """`x` (a tensor or a nest of tensors with a leading batch axis) repeated `copies` times along axis 0.

    Example:
      >>> tile_batch(tf.constant([[1.], [2.]]), 3)[:, 0].numpy()
      array([1., 2., 1., 2., 1., 2.], dtype=float32)
    """
    if copies == 1:
        return x

    def tile(t):
        t = tf.convert_to_tensor(t)
        return tf.tile(t, tf.concat([[copies], tf.ones([t.shape.rank - 1], tf.int32)], 0))

    return tf.nest.map_structure(tile, x)


def batch_spec(dataset):
    """The `(x, y, w)` element spec of `dataset` with the batch dimension relaxed to None.

    An input signature for compiled per-batch functions: every batch, the partial last one and
    batches of other data (test points, random minibatches) included, then shares one trace.
    """
    def relax(spec):
        if isinstance(spec, tf.TensorSpec) and spec.shape.rank:
            return tf.TensorSpec([None] + spec.shape[1:].as_list(), spec.dtype)
        return spec

    return tf.nest.map_structure(relax, dataset.element_spec)
