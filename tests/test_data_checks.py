"""Data that would silently give wrong scores is refused up front: infinite and reshuffling datasets; lists work."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.test_inputs import _assert_unchanged, _snapshot
from tf_influence.data import fingerprint

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def problem(float64, rng):
    x, y = models.classification_data(rng, n=24)
    return models.mlp(), x, y


def test_infinite_dataset_is_refused_before_any_pass(problem):
    model, x, y = problem
    snapshot = _snapshot(model)
    repeated = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(tfi.InputError, match=r"train: the dataset is infinite.*repeat\(\).*take\("):
        tfi.Influence(model, sce, repeated, damping=0.5, progress=False)
    inf = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", progress=False)
    with pytest.raises(tfi.InputError, match="test: the dataset is infinite"):
        inf.scores(tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(2).repeat())
    _assert_unchanged(model, snapshot)


def test_reshuffling_dataset_is_refused_and_a_fixed_shuffle_is_scored_in_its_order(problem):
    model, x, y = problem
    base = tf.data.Dataset.from_tensor_slices((x, y))
    reshuffling = base.shuffle(24, seed=1).batch(8)  # a new order on every pass
    with pytest.raises(tfi.InputError, match=r"different data on every pass.*Refused.*reshuffle_each_iteration=False"):
        tfi.Influence(model, sce, reshuffling, damping=0.5, progress=False)
    inf = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", progress=False)
    with pytest.raises(tfi.InputError, match="test: the dataset yields different data on every pass"):
        inf.scores(base.shuffle(24, seed=2).batch(8))

    # Shuffled once: the order is fixed, and the scores follow it.
    fixed = base.shuffle(24, seed=1, reshuffle_each_iteration=False).batch(8)
    order = np.concatenate([y_batch.numpy() for _, y_batch in fixed])
    shuffled_x = np.concatenate([x_batch.numpy() for x_batch, _ in fixed])
    permutation = [int(np.flatnonzero(np.all(x == row, axis=1))[0]) for row in shuffled_x]
    np.testing.assert_array_equal(order, y[permutation])
    scored = tfi.Influence(model, sce, fixed, damping=0.5, method="direct", progress=False).scores((x[:3], y[:3]))
    np.testing.assert_allclose(scored, inf.scores((x[:3], y[:3]))[:, permutation], rtol=1e-10, atol=1e-12)


def test_random_augmentation_is_refused(problem):
    model, x, y = problem
    noise = np.random.default_rng(5)

    def augmented():  # fresh noise on every pass, as an augmenting input pipeline gives
        for start in range(0, 24, 8):
            yield x[start:start + 8] + noise.normal(size=(8, 4)), y[start:start + 8]

    spec = (tf.TensorSpec([None, 4], tf.float64), tf.TensorSpec([None], tf.int64))
    with pytest.raises(tfi.InputError, match="different data on every pass.*random augmentation"):
        tfi.Influence(model, sce, tf.data.Dataset.from_generator(augmented, output_signature=spec), damping=0.5,
                      progress=False)


def test_python_lists_are_arrays(problem):
    model, x, y = problem
    expected = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", progress=False)
    lists = tfi.Influence(model, sce, (x.tolist(), y.tolist()), damping=0.5, method="direct", progress=False)
    np.testing.assert_allclose(lists.scores((x[:2].tolist(), y[:2].tolist())), expected.scores((x[:2], y[:2])),
                               rtol=1e-12)
    with pytest.raises(tfi.InputError, match=r"y holds a scalar.*one entry per example.*y: int"):
        tfi.Influence(model, sce, (x, 3), damping=0.5, progress=False)


def test_fingerprint_covers_every_example_but_not_the_batching(problem):
    _, x, y = problem
    base = fingerprint(tfi.as_dataset((x, y), batch_size=5))
    assert fingerprint(tfi.as_dataset((x, y), batch_size=7)) == base
    corrected = y.copy()
    corrected[-1] = (corrected[-1] + 1) % 3
    assert fingerprint(tfi.as_dataset((x, corrected), batch_size=5)) != base
    assert fingerprint(tfi.as_dataset((x[::-1], y[::-1]), batch_size=5)) != base
    assert fingerprint(tfi.as_dataset((x, y, np.full(24, 2.0)), batch_size=5)) != base


def test_training_data_changed_behind_the_dataset_is_refused(problem):
    model, x, y = problem
    labels = list(y)

    def examples():  # reads the Python list on every pass, as a generator-backed dataset does
        for start in range(0, 24, 8):
            yield x[start:start + 8], np.array(labels[start:start + 8])

    spec = (tf.TensorSpec([None, 4], tf.float64), tf.TensorSpec([None], tf.int64))
    inf = tfi.Influence(model, sce, tf.data.Dataset.from_generator(examples, output_signature=spec), damping=0.5,
                        method="direct", progress=False)
    expected = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", progress=False).scores((x[:2], y[:2]))
    np.testing.assert_allclose(inf.scores((x[:2], y[:2])), expected, rtol=1e-12)
    labels[20] = (labels[20] + 1) % 3  # the user corrects a label behind the dataset
    with pytest.raises(tfi.InputError, match="training data changed between two passes.*new Influence"):
        inf.scores((x[:2], y[:2]))


@pytest.mark.parametrize("inputs", ["one", "tuple", "dict"])
def test_array_batches_are_the_datasets_batches(inputs, rng):
    """Loops in Python read arrays through `ArrayBatches`: the same batches (values, dtypes, structure, partial last
    batch) and element spec as the `tf.data.Dataset` the compiled passes read, and a copy of the caller's arrays."""
    from tf_influence.data import ArrayBatches, as_batches, as_dataset, batch_count

    x = rng.standard_normal((10, 3))
    x = {"one": x, "tuple": [x, rng.standard_normal((10, 2, 2)).astype("float32")],
         "dict": {"a": x, "b": rng.integers(0, 5, (10, 1))}}[inputs]
    y = rng.integers(0, 3, 10)
    batches = as_batches((x, y), batch_size=4)
    dataset = as_dataset((x, y), batch_size=4)
    assert isinstance(batches, ArrayBatches) and isinstance(dataset, tf.data.Dataset)
    assert batches.element_spec == dataset.element_spec and batches.dataset.element_spec == dataset.element_spec
    assert batch_count(batches) == batch_count(dataset) == 3
    pairs = list(zip(batches, dataset, strict=True))
    assert [int(w.shape[0]) for _, _, w in batches] == [4, 4, 2]
    for ours, theirs in pairs:
        tf.nest.assert_same_structure(ours, theirs)
        for a, b in zip(tf.nest.flatten(ours), tf.nest.flatten(theirs)):
            assert a.dtype == b.dtype and np.array_equal(a.numpy(), b.numpy())
    given = float(tf.nest.flatten(x)[0][0, 0])
    tf.nest.flatten(x)[0][0, 0] = 1e6  # the caller changes its array afterwards: the batches keep the data given
    assert float(tf.nest.flatten(next(iter(batches))[0])[0][0, 0]) == given
    assert as_batches(batches) is batches


def test_test_dataset_stays_a_dataset_of_the_test_batches(problem):
    model, x, y = problem
    inf = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", batch_size=8, progress=False)
    dataset, batches = inf.test_dataset((x[:10], y[:10])), inf.test_batches((x[:10], y[:10]))
    assert isinstance(dataset, tf.data.Dataset)
    assert [b[0].numpy().tolist() for b in dataset] == [b[0].numpy().tolist() for b in batches]
    assert [int(b[2].shape[0]) for b in batches] == [8, 2]
