"""Hessian-vector products against dense Hessians from nested tapes (float64)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, relative_error

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
bce = functools.partial(keras.losses.binary_crossentropy, from_logits=True)


def _case(name, rng):
    x, y = models.classification_data(rng, n=30)
    if name == "logistic":
        return models.logistic_regression(), bce, x, (y > 0).astype("float64")[:, None]
    if name == "mlp_tanh":
        return models.mlp(activation="tanh"), sce, x, y
    if name == "cnn":
        return models.small_cnn(), sce, rng.standard_normal((30, 6, 6, 1)), y
    if name == "two_inputs":
        return models.two_input_functional(), sce, [x[:, :3], x[:, 2:]], y % 2
    if name == "subclassed":
        model = models.Subclassed()
        model(x[:2])
        return model, sce, x, y
    if name == "regularized":
        return models.mlp(kernel_regularizer=keras.regularizers.L2(0.05)), sce, x, y
    raise KeyError(name)


CASES = ["logistic", "mlp_tanh", "cnn", "two_inputs", "subclassed", "regularized"]


@pytest.mark.parametrize("name", CASES)
def test_hvp_equals_dense_hessian(name, float64, rng):
    model, loss, x, y = _case(name, rng)
    H = dense_hessian(model, loss, x, y, l2=0.01)
    op = tfi.HessianOperator(model, loss, (x, y), l2=0.01, batch_size=7)
    v = rng.standard_normal((3, op.space.size))
    for mode in ("forward_over_back", "back_over_back"):
        got = op.with_options(mode=mode).matmul_rows(v).numpy()
        assert relative_error(got, v @ H) <= 1e-8, mode
    assert relative_error(op.to_dense().numpy(), H) <= 1e-8


def test_logistic_regression_closed_form(float64, rng):
    n, d, l2 = 40, 4, 0.1
    x = rng.standard_normal((n, d))
    y = (rng.random(n) < 0.5).astype("float64")[:, None]
    model = models.logistic_regression(d)
    model.layers[0].kernel.assign(rng.standard_normal((d, 1)))
    op = tfi.HessianOperator(model, keras.losses.BinaryCrossentropy(from_logits=True), (x, y), l2=l2)
    X = np.hstack([x, np.ones((n, 1))])  # kernel first, then bias
    p = 1 / (1 + np.exp(-(model(x).numpy()[:, 0])))
    closed = X.T @ np.diag(p * (1 - p)) @ X / n + l2 * np.eye(d + 1)
    assert relative_error(op.to_dense().numpy(), closed) <= 1e-10


def test_modes_agree_and_finite_difference(float64, rng):
    model, loss, x, y = _case("mlp_tanh", rng)
    op = tfi.HessianOperator(model, loss, (x, y), batch_size=8)
    v = rng.standard_normal((2, op.space.size))
    bob = op.matmul_rows(v).numpy()  # the default mode
    fob = op.with_options(mode="forward_over_back").matmul_rows(v).numpy()
    fd = op.with_options(mode="finite_difference").matmul_rows(v).numpy()
    assert relative_error(bob, fob) <= 1e-10
    assert relative_error(fd, fob) <= 1e-4
    report = tfi.check_hvp(op)
    assert report.ok and report.max_relative_error <= 1e-4


def test_many_vectors_in_one_pass_match_single(float64, rng):
    model, loss, x, y = _case("mlp_tanh", rng)
    op = tfi.HessianOperator(model, loss, (x, y), batch_size=8)
    v = rng.standard_normal((7, op.space.size))  # k > 4 takes the tf.map_fn path
    together = op.matmul_rows(v).numpy()
    single = np.stack([op.matvec(tf.constant(r)).numpy() for r in v])
    assert relative_error(together, single) <= 1e-12


def test_gauss_newton_matches_brute_force(float64, rng):
    model, loss, x, y = _case("mlp_tanh", rng)
    op = tfi.HessianOperator(model, loss, (x, y), curvature="gauss_newton", batch_size=9)
    tf_vars = [v.value for v in model.trainable_variables]
    n = len(y)
    G = 0
    for i in range(n):
        with tf.GradientTape() as tape:
            out = model(x[i:i + 1])
        J = tape.jacobian(out, tf_vars)
        J = np.concatenate([j.numpy().reshape(out.shape[-1], -1) for j in J], axis=1)
        p = tf.nn.softmax(out).numpy()[0]
        G = G + J.T @ (np.diag(p) - np.outer(p, p)) @ J / n
    dense = op.to_dense().numpy()
    assert relative_error(dense, G) <= 1e-10
    assert np.linalg.eigvalsh(dense).min() >= -1e-12


def test_gauss_newton_equals_hessian_for_linear_model(float64, rng):
    model, loss, x, y = _case("logistic", rng)
    h = tfi.HessianOperator(model, loss, (x, y)).to_dense().numpy()
    g = tfi.HessianOperator(model, loss, (x, y), curvature="gauss_newton").to_dense().numpy()
    assert relative_error(g, h) <= 1e-12


def test_embedding_gradients_are_densified(float64, rng):
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(7, 2),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    x = rng.integers(0, 7, size=(20, 3)).astype("int32")
    y = rng.integers(0, 2, size=20)
    op = tfi.HessianOperator(model, sce, (x, y), batch_size=6)
    H = dense_hessian(model, sce, x, y)
    assert relative_error(op.to_dense().numpy(), H) <= 1e-8


def test_damping_adds_lambda_v(float64, rng):
    model, loss, x, y = _case("mlp_tanh", rng)
    op = tfi.HessianOperator(model, loss, (x, y))
    damped = op.with_options(damping=0.3)
    v = rng.standard_normal((1, op.space.size))
    assert relative_error(damped.matmul_rows(v) - op.matmul_rows(v), 0.3 * v) <= 1e-12


def test_jit_compile_gives_same_products(float64, rng):
    model, loss, x, y = _case("mlp_tanh", rng)
    op = tfi.HessianOperator(model, loss, (x, y), batch_size=10)
    v = rng.standard_normal((2, op.space.size))
    assert relative_error(op.with_options(jit_compile=True).matmul_rows(v), op.matmul_rows(v)) <= 1e-10


def test_tf_keras_model(rng):
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(4, activation="tanh", input_shape=(4,), dtype="float64"),
                                 tf_keras.layers.Dense(3, dtype="float64")])
    x, y = models.classification_data(rng, n=25)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    op = tfi.HessianOperator(model, loss, (x, y), batch_size=10)
    sce_tf_keras = lambda yt, yp: tf_keras.losses.sparse_categorical_crossentropy(yt, yp, from_logits=True)  # noqa: E731
    H = dense_hessian(model, sce_tf_keras, x, y)
    assert relative_error(op.to_dense().numpy(), H) <= 1e-8
    by_name = tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y))  # tf-keras losses.get
    with pytest.raises(AssertionError):  # from_logits=False differs: the name really was resolved
        np.testing.assert_allclose(by_name.to_dense().numpy(), H)
