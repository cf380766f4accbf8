"""Bad input gets a clear error naming the problem and the fix; the user's model is left unchanged."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)


@pytest.fixture
def problem(float64, rng):
    x, y = models.classification_data(rng, n=20)
    return models.mlp(), x, y


def _snapshot(model):
    return ([v.numpy().copy() for v in model.weights], [l.trainable for l in model.layers],
            [l.call for l in model.layers])


def _assert_unchanged(model, snapshot):
    weights, flags, calls = snapshot
    for v, before in zip(model.weights, weights):
        np.testing.assert_array_equal(v.numpy(), before)
    assert [l.trainable for l in model.layers] == flags
    assert [l.call for l in model.layers] == calls


def test_model_without_trainable_variables(problem):
    model, x, y = problem
    model.trainable = False
    with pytest.raises(tfi.InputError, match="no trainable variables"):
        tfi.HessianOperator(model, sce, (x, y))


def test_variable_not_in_model(problem):
    model, x, y = problem
    other = models.mlp()
    with pytest.raises(tfi.InputError, match="not a trainable variable of model"):
        tfi.HessianOperator(model, sce, (x, y), variables=[other.layers[0].kernel])
    with pytest.raises(tfi.InputError, match="No layer named 'nope'"):
        tfi.HessianOperator(model, sce, (x, y), variables="nope")
    with pytest.raises(tfi.InputError, match="variables must be None, a layer"):
        tfi.HessianOperator(model, sce, (x, y), variables=3.5)


def test_mismatched_lengths(problem):
    model, x, y = problem
    with pytest.raises(tfi.InputError, match=r"same number of examples.*'x': \[20\], 'y': \[19\]"):
        tfi.HessianOperator(model, sce, (x, y[:-1]))
    with pytest.raises(tfi.InputError, match=r"'w': \[5\]"):
        tfi.HessianOperator(model, sce, (x, y, np.ones(5)))
    with pytest.raises(tfi.InputError, match="sample weights must be a finite, non-negative"):
        tfi.HessianOperator(model, sce, (x, y, -np.ones(20)))


def test_labels_of_wrong_dtype_or_shape(problem):
    model, x, y = problem
    with pytest.raises(tfi.InputError, match="integer class labels"):
        tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y + 0.5))
    with pytest.raises(tfi.InputError, match=r"labels must lie in \[0, 3\)"):
        tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y + 3))
    with pytest.raises(tfi.InputError, match="one-hot labels shaped like the output"):
        tfi.HessianOperator(model, "categorical_crossentropy", (x, y))
    with pytest.raises(tfi.InputError, match="must be numeric"):
        tfi.HessianOperator(model, sce, (x, np.array(["a"] * 20)))
    with pytest.raises(tfi.InputError, match="could not be called"):
        tfi.HessianOperator(model, sce, (x[:, :2], y))


def test_empty_data(problem):
    model, x, y = problem
    with pytest.raises(tfi.InputError, match="empty"):
        tfi.HessianOperator(model, sce, (x[:0], y[:0]))
    empty = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).take(0)
    with pytest.raises(tfi.InputError, match="empty"):
        tfi.HessianOperator(model, sce, empty)


def test_unbatched_dataset(problem):
    model, x, y = problem
    with pytest.raises(tfi.InputError, match="must be batched"):
        tfi.HessianOperator(model, sce, tf.data.Dataset.from_tensor_slices((x, y)))


def test_nan_in_inputs_or_loss(problem):
    model, x, y = problem
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(tfi.InputError, match="1 NaN/Inf"):
        tfi.HessianOperator(model, sce, (bad, y))
    with pytest.raises(tfi.NotFiniteError, match="NaN/Inf"):
        tfi.HessianOperator(model, sce, tf.data.Dataset.from_tensor_slices((bad, y)).batch(20))
    snapshot = _snapshot(model)
    model.layers[0].kernel.assign(np.full(model.layers[0].kernel.shape, np.inf))
    with pytest.raises(tfi.NotFiniteError, match="loss is NaN/Inf"):
        tfi.HessianOperator(model, sce, (x, y))
    model.layers[0].kernel.assign(snapshot[0][0])


def test_scalar_loss_is_refused(problem):
    model, x, y = problem
    with pytest.raises(tfi.InputError, match="returned a scalar"):
        tfi.HessianOperator(model, lambda yt, yp: tf.reduce_mean(sce(yt, yp)), (x, y))


def test_unknown_options(problem):
    model, x, y = problem
    with pytest.raises(tfi.InputError, match=r"mode must be one of \(.*\). Received: mode='fast'"):
        tfi.HessianOperator(model, sce, (x, y), mode="fast")
    with pytest.raises(tfi.InputError, match="curvature must be one of .*Received: curvature='fisher'"):
        tfi.HessianOperator(model, sce, (x, y), curvature="fisher")
    with pytest.raises(tfi.InputError, match="damping must be"):
        tfi.HessianOperator(model, sce, (x, y), damping=-1)
    with pytest.raises(tfi.InputError, match="Unknown loss name"):
        tfi.HessianOperator(model, "not_a_loss", (x, y))
    with pytest.raises(tfi.InputError, match="not built"):
        tfi.HessianOperator(keras.Sequential([keras.layers.Dense(2)]), sce, (x, y))


def test_model_unchanged_after_every_mode(problem, rng):
    model, x, y = problem
    snapshot = _snapshot(model)
    op = tfi.HessianOperator(model, sce, (x, y))
    v = rng.standard_normal((2, op.space.size))
    for mode in ("forward_over_back", "back_over_back", "finite_difference"):
        op.with_options(mode=mode).matmul_rows(v)
    op.with_options(curvature="gauss_newton").matmul_rows(v)
    _assert_unchanged(model, snapshot)


def test_finite_difference_leaves_the_model_unchanged_when_a_pass_fails(problem, rng):
    """Keras 3: θ ± r·v are evaluated without assigning the variables, so an error mid-pass leaves the
    model as it was; tf-keras (which assigns them, eagerly) restores them in a `finally`."""
    model, x, y = problem
    snapshot = _snapshot(model)
    calls = []

    def failing_loss(y_true, y_pred):  # fails when the minus side of the difference is traced
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("interrupted")
        return sce(y_true, y_pred)

    op = tfi.HessianOperator(model, failing_loss, (x, y), mode="finite_difference")
    with pytest.raises(RuntimeError, match="interrupted"):
        op.matmul_rows(rng.standard_normal((1, op.space.size)))
    _assert_unchanged(model, snapshot)

    tf_keras = pytest.importorskip("tf_keras")
    legacy = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,), dtype="float64")])
    before = [w.copy() for w in legacy.get_weights()]
    op = tfi.HessianOperator(legacy, "mse", (x, rng.standard_normal((20, 3))), mode="finite_difference")

    def failing_gradient():
        raise RuntimeError("interrupted")

    op.gradient = failing_gradient
    with pytest.raises(RuntimeError, match="interrupted"):
        op.matmul_rows(rng.standard_normal((1, op.space.size)))
    for w, b in zip(legacy.get_weights(), before):
        np.testing.assert_array_equal(w, b)
