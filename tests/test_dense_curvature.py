"""Dense Hessian and Gauss-Newton matrices (tf_influence/curvature/dense.py) against nested-tape references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_influence as tfi
from tf_influence.curvature.dense import (
    dense_curvature,
    dense_gauss_newton,
    dense_hessian,
    dense_regularizer_hessian,
)
from tf_influence.data import as_dataset
from tf_influence.objective import Objective
from tf_influence.params import ParameterSpace, select_variables, tf_variables
from tests.helpers import dense_hessian as reference_hessian
from tests.helpers import relative_error
from tests.models import logistic_regression, mlp, small_cnn, two_input_functional

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
bce = keras.losses.BinaryCrossentropy(from_logits=True)
mse = keras.losses.MeanSquaredError()


def embedding_model():
    return keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(7, 2),
                             keras.layers.Flatten(), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(3)])


def _case(name, rng, n=23):
    """Model, loss, x, y; n is not a multiple of the test batch size, so the last batch is partial."""
    if name == "logistic":
        return logistic_regression(), bce, rng.standard_normal((n, 4)), rng.integers(0, 2, (n, 1)).astype("float64")
    if name == "mlp":
        return mlp(), sce, rng.standard_normal((n, 4)), rng.integers(0, 3, n)
    if name == "cnn":
        return small_cnn(), sce, rng.standard_normal((n, 6, 6, 1)), rng.integers(0, 3, n)
    if name == "two_input":
        x = (rng.standard_normal((n, 3)), rng.standard_normal((n, 2)))
        return two_input_functional(), mse, x, rng.standard_normal((n, 2))
    if name == "regularized":
        model = mlp(kernel_regularizer=keras.regularizers.L2(0.05), bias_regularizer=keras.regularizers.L1L2(0, 0.02))
        return model, sce, rng.standard_normal((n, 4)), rng.integers(0, 3, n)
    if name == "embedding":
        return embedding_model(), sce, rng.integers(0, 7, (n, 3)).astype("int32"), rng.integers(0, 3, n)
    raise ValueError(name)


CASES = ("logistic", "mlp", "cnn", "two_input", "regularized", "embedding")


def _pieces(model, loss, data, variables=None, l2=0.0, batch_size=8):
    objective = Objective(model, loss, l2=l2)
    selected = select_variables(model, variables)
    dataset = as_dataset(data, batch_size=batch_size)
    return objective, tf_variables(selected), selected, ParameterSpace(selected), dataset


def _weights(rng, n):
    # Dyadic values: as_dataset stores weights in float32 when x is an integer array (Embedding).
    w = rng.integers(1, 16, n) / 8.0
    w[1] = 0.0
    return w


def reference_gauss_newton(model, loss_fn, x, y, w, variables):
    """Σ wᵢ Jᵢᵀ Mᵢ Jᵢ / Σ wᵢ from tape jacobians (no pfor) and per-example output Hessians."""
    tf_vars = tf_variables(variables)
    n = len(tf.nest.flatten(y)[0])
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=False)
    J = tape.jacobian(out, tf_vars, unconnected_gradients="zero", experimental_use_pfor=False)
    J = np.concatenate([tf.convert_to_tensor(j).numpy().reshape(n, -1, int(np.prod(v.shape)))
                        for j, v in zip(J, tf_vars)], axis=2)                      # [n, c, p]
    G = 0.0
    for i in range(n):
        f = tf.Variable(out[i:i + 1])
        yi = tf.nest.map_structure(lambda t, i=i: t[i:i + 1], y)
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                li = tf.reduce_sum(loss_fn(yi, f))
            g = inner.gradient(li, f)
        M = outer.jacobian(g, f, experimental_use_pfor=False).numpy().reshape(J.shape[1], J.shape[1])
        G = G + w[i] * J[i].T @ M @ J[i]
    return G / np.sum(w)


@pytest.mark.parametrize("name", CASES)
def test_dense_hessian_matches_nested_tapes(float64, rng, name):
    model, loss, x, y = _case(name, rng)
    w = _weights(rng, len(y))
    objective, tf_vars, selected, space, ds = _pieces(model, loss, (x, y, w), l2=0.3)
    H = dense_hessian(objective, tf_vars, space, ds) + dense_regularizer_hessian(objective, tf_vars, selected, space)
    assert H.dtype == tf.float64 and H.shape == (space.size, space.size)
    assert relative_error(H, reference_hessian(model, loss.call, x, y, w, l2=0.3)) <= 1e-10


@pytest.mark.parametrize("name", CASES)
def test_dense_gauss_newton_matches_references(float64, rng, name):
    model, loss, x, y = _case(name, rng)
    w = _weights(rng, len(y))
    objective, tf_vars, selected, space, ds = _pieces(model, loss, (x, y, w))
    G = dense_gauss_newton(objective, tf_vars, space, ds, gemm="blas").numpy()
    assert relative_error(G, reference_gauss_newton(model, loss.call, x, y, w, selected)) <= 1e-10
    assert np.linalg.eigvalsh(G).min() >= -1e-12 * np.abs(G).max()   # convex losses: PSD


@pytest.mark.parametrize("name", ["cnn"])
def test_gemm_backends_agree(float64, rng, name):
    model, loss, x, y = _case(name, rng)
    objective, tf_vars, _, space, ds = _pieces(model, loss, (x, y, _weights(rng, len(y))))
    G = dense_gauss_newton(objective, tf_vars, space, ds, gemm="blas")
    assert relative_error(dense_gauss_newton(objective, tf_vars, space, ds, gemm="tensorflow"), G) <= 1e-13


def test_gauss_newton_with_indefinite_output_hessian(float64, rng):
    """A loss that is not convex in the outputs (and a negative sample weight): signed factors stay exact."""
    model, _, x, _ = _case("mlp", rng)
    y = rng.standard_normal((len(x), 3))

    def wavy(y_true, y_pred):
        return tf.reduce_sum(tf.sin(2.0 * y_pred) * y_true + 0.1 * y_pred ** 2, axis=-1)

    w = _weights(rng, len(x))
    objective, tf_vars, selected, space, _ = _pieces(model, wavy, (x, y, w))
    w[2] = -0.5
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)   # as_dataset refuses negative weights
    G = dense_gauss_newton(objective, tf_vars, space, ds).numpy()
    ref = reference_gauss_newton(model, wavy, x, y, w, selected)
    assert np.linalg.eigvalsh(ref).min() < -1e-3 * np.abs(ref).max()   # really indefinite
    assert relative_error(G, ref) <= 1e-10
    op = tfi.HessianOperator(model, objective, ds, curvature="gauss_newton")
    assert relative_error(G, _by_products(op)) <= 1e-10


def test_gauss_newton_equals_hessian_for_logistic_regression(float64, rng):
    model, loss, x, y = _case("logistic", rng)
    objective, tf_vars, _, space, ds = _pieces(model, loss, (x, y))
    G = dense_gauss_newton(objective, tf_vars, space, ds)
    assert relative_error(G, dense_hessian(objective, tf_vars, space, ds)) <= 1e-12


@pytest.mark.parametrize("variables", ["head", "frozen_hidden"])
def test_variable_subsets(float64, rng, variables):
    model, loss, x, y = _case("mlp", rng)
    if variables == "frozen_hidden":
        model.get_layer("hidden").trainable = False
        selection = None
    else:
        selection = "head"
    objective, tf_vars, selected, space, ds = _pieces(model, loss, (x, y), variables=selection)
    assert space.size == 6 * 3 + 3
    H = dense_hessian(objective, tf_vars, space, ds)
    assert relative_error(H, reference_hessian(model, loss.call, x, y, variables=selected)) <= 1e-10
    G = dense_gauss_newton(objective, tf_vars, space, ds).numpy()
    assert relative_error(G, reference_gauss_newton(model, loss.call, x, y, np.ones(len(y)), selected)) <= 1e-10
    assert model.get_layer("hidden").trainable == (variables == "head")   # the model is untouched


def test_two_output_model(float64, rng):
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh")(inp)
    model = keras.Model(inp, [keras.layers.Dense(2, name="a")(h), keras.layers.Dense(3, name="b")(h)])
    x = rng.standard_normal((13, 3))
    y = (rng.standard_normal((13, 2)), rng.integers(0, 3, 13))

    def loss(y_true, y_pred):
        return mse.call(y_true[0], y_pred[0]) + sce.call(y_true[1], y_pred[1])

    objective, tf_vars, _, space, ds = _pieces(model, loss, (x, y), batch_size=5)
    H = dense_hessian(objective, tf_vars, space, ds)
    assert relative_error(H, reference_hessian(model, loss, x, y)) <= 1e-10
    G = dense_gauss_newton(objective, tf_vars, space, ds).numpy()
    op = tfi.HessianOperator(model, objective, (x, y), curvature="gauss_newton", batch_size=5)
    assert relative_error(G, _by_products(op)) <= 1e-10


def test_batch_size_chunk_size_and_memory_budget_invariance(float64, rng):
    model, loss, x, y = _case("mlp", rng, n=31)
    w = _weights(rng, len(y))
    objective, tf_vars, _, space, ds = _pieces(model, loss, (x, y, w), batch_size=31)
    _, _, _, _, small = _pieces(model, loss, (x, y, w), batch_size=4)
    H = dense_hessian(objective, tf_vars, space, ds).numpy()
    assert relative_error(dense_hessian(objective, tf_vars, space, small, chunk_size=7), H) <= 1e-13
    G = dense_gauss_newton(objective, tf_vars, space, ds).numpy()
    # a budget of one example per sub-batch
    assert relative_error(dense_gauss_newton(objective, tf_vars, space, small, memory_budget=1), G) <= 1e-13


def test_float32_model_matches_its_float64_copy(rng):
    keras.utils.set_random_seed(0)
    model32 = mlp()
    old = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model64 = mlp()
    finally:
        keras.backend.set_floatx(old[0])
        keras.config.set_dtype_policy(old[1])
    model64.set_weights([w.astype("float64") for w in model32.get_weights()])
    x, y = rng.standard_normal((29, 4)), rng.integers(0, 3, 29)
    results = {}
    for model, dtype in ((model32, "float32"), (model64, "float64")):
        objective, tf_vars, _, space, ds = _pieces(model, sce, (x.astype(dtype), y))
        results[dtype] = (dense_hessian(objective, tf_vars, space, ds),
                          dense_gauss_newton(objective, tf_vars, space, ds))
    for h32, h64 in zip(results["float32"], results["float64"]):
        assert h32.dtype == tf.float64   # float32 curvature, accumulated in float64
        assert relative_error(h32, h64) <= 1e-5


def test_regularizer_hessian_without_regularizers_is_l2_identity(float64, rng):
    model, loss, x, y = _case("mlp", rng)
    objective, tf_vars, selected, space, _ = _pieces(model, loss, (x, y), l2=0.7)
    R = dense_regularizer_hessian(objective, tf_vars, selected, space, chunk_size=5).numpy()
    np.testing.assert_allclose(R, 0.7 * np.eye(space.size), rtol=0, atol=1e-15)


def _by_products(operator):
    """The operator's matrix from its products with the unit vectors (`curvature.products`, not `dense.py`)."""
    return operator.matmul_rows(tf.eye(operator.size, dtype=operator.dtype)).numpy()


@pytest.mark.parametrize("name", ["mlp", "cnn", "regularized"])
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_operator_to_dense_equals_nested_tapes(float64, rng, name, curvature):
    """HessianOperator.to_dense() (the fast builder: data + ∇²Ω + l2 + λI) against nested tapes."""
    model, loss, x, y = _case(name, rng)
    w = _weights(rng, len(y))
    op = tfi.HessianOperator(model, loss, (x, y, w), damping=0.3, l2=0.2, curvature=curvature, batch_size=8)
    if curvature == "hessian":
        expected = reference_hessian(model, loss.call, x, y, w, l2=0.2)
    else:
        selected = select_variables(model, None)
        regularizer = reference_hessian(model, lambda y, f: 0.0 * tf.reduce_sum(f, axis=-1), x, y, l2=0.2)
        expected = reference_gauss_newton(model, loss.call, x, y, w, selected) + regularizer
    expected = expected + 0.3 * np.eye(op.size)
    A = op.to_dense()
    assert A.dtype == tf.float64
    assert relative_error(A, expected) <= 1e-10
    assert relative_error(op.dense_matrix(), expected) <= 1e-10


def test_bad_options_are_refused(float64, rng):
    model, loss, x, y = _case("mlp", rng)
    objective, tf_vars, _, space, ds = _pieces(model, loss, (x, y))
    with pytest.raises(ValueError, match="gemm must be one of .* Received: gemm='mkl'"):
        dense_gauss_newton(objective, tf_vars, space, ds, gemm="mkl")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer.* Received: chunk_size=0"):
        dense_hessian(objective, tf_vars, space, ds, chunk_size=0)
    with pytest.raises(ValueError, match="curvature must be one of .* Received: curvature='fisher'"):
        dense_curvature(objective, tf_vars, tf_vars, space, ds, curvature="fisher")
    with pytest.raises(ValueError, match="damping must be a finite number ≥ 0. Received: damping=-1"):
        dense_curvature(objective, tf_vars, tf_vars, space, ds, damping=-1.0)
    zero = tf.data.Dataset.from_tensor_slices((x, y, np.zeros(len(y)))).batch(8)   # as_dataset refuses it
    with pytest.raises(ValueError, match="total sample weight is 0.0"):
        dense_hessian(objective, tf_vars, space, zero)
    with pytest.raises(ValueError, match="total sample weight is 0.0"):
        dense_gauss_newton(objective, tf_vars, space, zero)
