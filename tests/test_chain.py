"""method="chain": exact solves, inertia and HVPs of Dense chains against dense float64 Hessians."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tests.helpers import dense_hessian, relative_error

import tf_influence as tfi
from tf_influence.errors import InputError, NegativeCurvatureError, ResourceError, UnsupportedLayerError
from tf_influence.curvature.chain_plan import CLOSED_FORMS
from tf_influence.operators.chain import ChainHessian
from tf_influence.solvers.chain import Chain, chain_solve

LOGITS = dict(sparse=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              ce=lambda: keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
              bce=lambda: keras.losses.BinaryCrossentropy(from_logits=True))


def _chain(depth, *, inputs=3, width=2, outputs=3, activation="tanh", bias=True, final=None, name="chain"):
    """`depth` Dense layers; `activation` may be a list cycled over the hidden layers."""
    acts = activation if isinstance(activation, list) else [activation]
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation=acts[i % len(acts)], use_bias=bias) for i in range(depth - 1)]
    layers.append(keras.layers.Dense(outputs, activation=final, use_bias=bias, name="head"))
    return keras.Sequential(layers, name=name)


def _data(rng, n, loss, *, inputs=3, outputs=3):
    x = rng.standard_normal((n, inputs))
    if loss in ("sparse", "sparse_probs"):
        return x, rng.integers(0, outputs, size=n)
    if loss in ("ce", "ce_probs"):
        return x, np.eye(outputs)[rng.integers(0, outputs, size=n)]
    if loss in ("bce", "bce_probs"):
        return x, rng.integers(0, 2, size=(n, outputs)).astype(np.float64)
    return x, rng.standard_normal((n, outputs))


def _loss(kind):
    if kind in LOGITS:
        return LOGITS[kind]()
    return {"sparse_probs": "sparse_categorical_crossentropy", "ce_probs": "categorical_crossentropy",
            "bce_probs": "binary_crossentropy", "mse": "mse"}[kind]


def _loss_fn(loss):
    return loss.call if hasattr(loss, "call") else keras.losses.get(loss)


def _final(kind):
    return {"sparse_probs": "softmax", "ce_probs": "softmax", "bce_probs": "sigmoid"}.get(kind)


def _nested_tape_hessian(model, loss_fn, x, y):
    """Dense Hessian of the mean loss by nested GradientTapes (the jacobian of the gradient as a loop over its
    entries: on deep chains much quicker to trace than a pfor-vectorised one)."""
    tf_vars = [v.value for v in model.trainable_variables]
    x, y = tf.constant(x), tf.constant(y)

    @tf.function
    def hessian():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean(loss_fn(y, model(x, training=False)))
            grads = inner.gradient(loss, tf_vars)
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
        blocks = outer.jacobian(flat, tf_vars, experimental_use_pfor=False)
        return tf.concat([tf.reshape(b, [flat.shape[0], -1]) for b in blocks], 1)

    h = hessian().numpy()
    return 0.5 * (h + h.T)


# depth, n, activations, loss, bias: every depth × batch size, several activations, all losses, ± bias.
CASES = [
    (2, 1, "tanh", "sparse", True),
    (2, 8, "sigmoid", "bce_probs", False),
    (2, 8, "softplus", "ce_probs", True),
    (8, 1, "gelu", "sparse_probs", False),
    (8, 8, "softplus", "mse", True),
    (8, 8, ["elu", "silu", "linear", "tanh"], "bce", True),
    (8, 8, "mish", "ce", False),          # no closed form: autodiff of the activation
    (24, 8, "tanh", "sparse", True),
    (24, 1, "sigmoid", "mse", False),
    (24, 8, ["softplus", "tanh"], "bce_probs", True),
]


@pytest.mark.parametrize("depth, n, activation, loss_kind, bias", CASES,
                         ids=[f"L{c[0]}-n{c[1]}-{c[2] if isinstance(c[2], str) else 'mixed'}-{c[3]}-"
                              f"{'bias' if c[4] else 'nobias'}" for c in CASES])
def test_chain_solve_matches_dense_solve(float64, depth, n, activation, loss_kind, bias):
    rng = np.random.default_rng(depth * 100 + n)
    model = _chain(depth, activation=activation, bias=bias, final=_final(loss_kind))
    x, y = _data(rng, n, loss_kind)
    loss = _loss(loss_kind)
    dense = _nested_tape_hessian(model, _loss_fn(loss), x, y)
    damping = 0.05
    matrix = dense + damping * np.eye(len(dense))
    eigenvalues = np.linalg.eigvalsh(matrix)
    assert np.abs(eigenvalues).max() / np.abs(eigenvalues).min() < 1e6  # a meaningful comparison
    b = rng.standard_normal((3, len(dense)))
    x_chain, info = chain_solve(model, loss, (x, y), b, damping=damping, on_indefinite="ignore")
    expected = tf.transpose(tf.linalg.solve(tf.constant(matrix), tf.constant(b.T))).numpy()
    err = relative_error(x_chain.numpy(), expected)
    assert err <= 1e-8, err
    assert info.method == "chain" and info.converged and info.residual <= 1e-10
    assert info.extra["inertia"] == int(np.sum(eigenvalues < 0))


def test_single_vector_and_variable_shaped_right_hand_sides(float64):
    rng = np.random.default_rng(1)
    model = _chain(3)
    x, y = _data(rng, 4, "sparse")
    loss = LOGITS["sparse"]()
    dense = dense_hessian(model, loss.call, x, y) + 0.1 * np.eye(model.count_params())
    g = rng.standard_normal(model.count_params())
    x_flat, _ = chain_solve(model, loss, (x, y), g, damping=0.1, on_indefinite="ignore")
    assert x_flat.shape == (model.count_params(),)
    assert relative_error(x_flat.numpy(), np.linalg.solve(dense, g)) <= 1e-10
    parts = tfi.ParameterSpace(model.trainable_variables).unflatten(g)
    x_rows, _ = chain_solve(model, loss, (x, y), parts, damping=0.1, on_indefinite="ignore")
    assert relative_error(x_rows.numpy()[0], x_flat.numpy()) <= 1e-14


def test_method_object_with_weights_l2_and_regularizers(float64):
    rng = np.random.default_rng(2)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2, activation="softplus", kernel_regularizer=keras.regularizers.L2(0.03)),
        keras.layers.Dense(2, activation="tanh", bias_regularizer=keras.regularizers.L1L2(l2=0.02)),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(3, activation="softmax"),
    ])
    x, y = _data(rng, 6, "sparse")
    w = rng.uniform(0.2, 2.0, size=6)
    operator = tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y, w), batch_size=4,
                                   damping=0.01, l2=0.005)
    dense = dense_hessian(model, keras.losses.get("sparse_categorical_crossentropy"), x, y, w, l2=0.005)
    b = rng.standard_normal((2, model.count_params()))
    method = Chain(on_indefinite="ignore")
    assert method.name == "chain"
    x_chain, info = method.solve(operator, b)
    expected = np.linalg.solve(dense + 0.01 * np.eye(len(dense)), b.T).T
    assert relative_error(x_chain.numpy(), expected) <= 1e-8
    assert info.extra["inertia"] == int(np.sum(np.linalg.eigvalsh(dense + 0.01 * np.eye(len(dense))) < 0))
    assert info.extra["examples"] == 6


def test_inertia_counts_negative_eigenvalues_below_and_above_the_most_negative(float64):
    rng = np.random.default_rng(3)
    model = _chain(4, activation="tanh", width=3)
    for v in model.trainable_variables:  # larger weights: a clearly indefinite Hessian
        v.assign(2.0 * v)
    x, y = _data(rng, 5, "sparse")
    loss = LOGITS["sparse"]()
    dense = _nested_tape_hessian(model, loss.call, x, y)
    eigenvalues = np.linalg.eigvalsh(dense)
    negative = eigenvalues[eigenvalues < -1e-6 * np.abs(eigenvalues).max()]
    assert len(negative) >= 3
    # Damping between consecutive negative eigenvalues (below |λ_min|), and above |λ_min|.
    dampings = [-(negative[j] + negative[j + 1]) / 2 for j in range(len(negative) - 1)] + [-2 * negative[0]]
    for damping in dampings:
        expected = int(np.sum(np.linalg.eigvalsh(dense + damping * np.eye(len(dense))) < 0))
        hessian = ChainHessian(model, loss, (x, y), damping=damping)
        assert hessian.inertia == expected, (damping, hessian.inertia, expected)
    assert expected == 0 and dampings[0] < -negative[0]


@pytest.mark.parametrize("loss_kind, activation, curvature", [
    ("sparse", "tanh", "hessian"), ("ce_probs", "gelu", "hessian"), ("bce", "softplus", "hessian"),
    ("mse", "sigmoid", "hessian"), ("bce", "tanh", "gauss_newton"), ("mse", "silu", "gauss_newton"),
])
def test_chain_hvp_equals_autodiff_hvp(float64, loss_kind, activation, curvature):
    rng = np.random.default_rng(4)
    model = _chain(6, activation=activation, width=3, final=_final(loss_kind))
    x, y = _data(rng, 5, loss_kind)
    loss = _loss(loss_kind)
    chain = ChainHessian(model, loss, (x, y), damping=0.3, curvature=curvature)
    autodiff = tfi.HessianOperator(model, loss, (x, y), batch_size=5, damping=0.3, curvature=curvature)
    v = rng.standard_normal((model.count_params(), 2))
    err = relative_error(chain.matmul(v).numpy(), autodiff.matmul(v).numpy())
    assert err <= 1e-10, err
    if curvature == "hessian":
        dense = _nested_tape_hessian(model, _loss_fn(loss), x, y) + 0.3 * np.eye(model.count_params())
        assert relative_error(chain.matmul(v).numpy(), dense @ v) <= 1e-10
    else:
        assert chain.is_positive_definite and chain.inertia == 0


def test_hint_is_honest_for_the_hessian(float64):
    rng = np.random.default_rng(5)
    model = _chain(3)
    chain = ChainHessian(model, LOGITS["sparse"](), _data(rng, 4, "sparse"), damping=1.0)
    assert chain.is_self_adjoint and chain.is_positive_definite is None
    assert chain.shape == (model.count_params(), model.count_params())


@pytest.mark.parametrize("select", ["trailing_layers", "kernels_only", "middle_layer"])
def test_variable_subsets_match_the_dense_subset_hessian(float64, select):
    rng = np.random.default_rng(6)
    model = _chain(5, activation="softplus", width=3)
    dense_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    variables = {"trailing_layers": dense_layers[-2:],
                 "kernels_only": [layer.kernel for layer in dense_layers],
                 "middle_layer": [dense_layers[2].bias, dense_layers[1]]}[select]
    x, y = _data(rng, 4, "mse")
    operator = tfi.HessianOperator(model, "mse", (x, y), variables=variables, damping=0.02)
    chosen = tfi.select_variables(model, variables)
    dense = dense_hessian(model, keras.losses.get("mse"), x, y, variables=chosen) + 0.02 * np.eye(operator.shape[0])
    b = rng.standard_normal((2, operator.shape[0]))
    x_chain, _ = Chain(on_indefinite="ignore").solve(operator, b)
    assert relative_error(x_chain.numpy(), np.linalg.solve(dense, b.T).T) <= 1e-10


def test_frozen_front_and_functional_chain(float64):
    rng = np.random.default_rng(7)
    inputs = keras.Input((4, 2))
    h = keras.layers.Conv1D(2, 2, activation="tanh", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(3, activation="sigmoid", name="d1")(h)
    outputs = keras.layers.Dense(2, name="d2")(keras.layers.Activation("softplus")(h))
    model = keras.Model(inputs, outputs)
    x, y = rng.standard_normal((5, 4, 2)), rng.standard_normal((5, 2))
    variables = ["d1", "d2"]
    chosen = tfi.select_variables(model, variables)
    p = sum(int(np.prod(v.shape)) for v in chosen)
    assert p == 29 < model.count_params()
    dense = dense_hessian(model, keras.losses.get("mse"), x, y, variables=chosen) + 0.01 * np.eye(p)
    b = rng.standard_normal(p)
    x_chain, info = chain_solve(model, "mse", (x, y), b, variables=variables, damping=0.01, on_indefinite="ignore")
    assert relative_error(x_chain.numpy(), np.linalg.solve(dense, b)) <= 1e-10
    with pytest.raises(UnsupportedLayerError, match=r"Layer 'conv' \(Conv1D\) is not supported by method='chain'"):
        chain_solve(model, "mse", (x, y), np.ones(model.count_params()))


def test_float32_model_is_solved_in_float64(rng):
    # dtype given explicitly: Keras caches its global dtype policy, so floatx alone may not apply.
    model = keras.Sequential([keras.Input((3,), dtype="float32"), keras.layers.Dense(2, "tanh", dtype="float32"),
                              keras.layers.Dense(2, "tanh", dtype="float32"), keras.layers.Dense(3, dtype="float32")])
    x, y = _data(rng, 4, "sparse")
    operator = tfi.HessianOperator(model, LOGITS["sparse"](), (x.astype(np.float32), y), damping=0.5)
    b = rng.standard_normal((1, operator.shape[0])).astype(np.float32)
    x_chain, info = Chain(on_indefinite="ignore").solve(operator, b)
    assert x_chain.dtype == tf.float32
    dense = operator.to_dense().numpy().astype(np.float64)
    assert relative_error(x_chain.numpy(), np.linalg.solve(dense, b[0].astype(np.float64))) <= 1e-5


def test_activation_closed_forms_equal_autodiff(float64):
    u = tf.constant(np.linspace(-3.1, 2.9, 31), tf.float64)
    for name, closed in CLOSED_FORMS.items():
        fn = keras.activations.get(name)
        with tf.GradientTape() as outer:
            outer.watch(u)
            with tf.GradientTape() as inner:
                inner.watch(u)
                value = fn(u)
            first = inner.gradient(value, u)
        second = outer.gradient(first, u, unconnected_gradients="zero")
        for got, want in zip(closed(u), (value, first, second)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-14, atol=1e-15, err_msg=name)


# -- Errors --------------------------------------------------------------------------------------

def test_unsupported_layer_is_named(float64):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh"),
                              keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(2)])
    with pytest.raises(UnsupportedLayerError,
                       match=r"Layer 'norm' \(LayerNormalization\) is not supported .* Supported: Dense"):
        ChainHessian(model, "mse", (np.ones((2, 3)), np.ones((2, 2))))


def test_non_elementwise_hidden_activation_is_refused(float64):
    model = _chain(3, activation="softmax")
    with pytest.raises(UnsupportedLayerError, match=r"activation 'softmax' is not elementwise"):
        ChainHessian(model, "mse", (np.ones((2, 3)), np.ones((2, 3))))


def test_branching_model_is_refused(float64):
    inputs = keras.Input((3,))
    shared = keras.layers.Dense(3, activation="tanh", name="shared")
    model = keras.Model(inputs, keras.layers.Dense(2)(shared(shared(inputs))))
    with pytest.raises(UnsupportedLayerError, match="differs from model\\(x\\).*not a plain chain"):
        ChainHessian(model, "mse", (np.ones((2, 3)), np.ones((2, 2))))


def test_probability_loss_without_softmax_output_is_refused(float64):
    model = _chain(2)
    with pytest.raises(UnsupportedLayerError,
                       match="needs a softmax output activation; layer 'head' ends with 'linear'"):
        ChainHessian(model, "sparse_categorical_crossentropy", (np.ones((2, 3)), np.array([0, 1])))


def test_custom_loss_is_refused(float64):
    def my_loss(y_true, y_pred):
        return tf.reduce_sum(tf.abs(y_true - y_pred), axis=-1)

    with pytest.raises(InputError, match=r"needs a loss it knows in closed form.*Received 'my_loss'"):
        ChainHessian(_chain(2), my_loss, (np.ones((2, 3)), np.ones((2, 3))))


def test_l1_regularizer_is_refused(float64):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer="l1", name="d")])
    with pytest.raises(UnsupportedLayerError,
                       match=r"Layer 'd' has kernel_regularizer=L1.*L2 weight regularisers only"):
        ChainHessian(model, "mse", (np.ones((2, 3)), np.ones((2, 2))))


def test_relu_warns_and_singular_system_reports_inertia(float64):
    model = _chain(3, activation="relu", width=3)
    model.layers[0].bias.assign([-100.0, 0.0, 0.0])  # unit 0 of the first layer is dead on every example
    x, y = _data(np.random.default_rng(8), 4, "mse")
    with pytest.warns(UserWarning, match="'relu', whose second derivative is zero almost everywhere"):
        hessian = ChainHessian(model, "mse", (x, y))
    with pytest.raises(NegativeCurvatureError,
                       match=r"singular to working precision.*Inertia so far: \d+ negative.*damping="):
        hessian.solvevec(np.ones(model.count_params()))
    dense = dense_hessian(model, keras.losses.get("mse"), x, y) + 0.1 * np.eye(model.count_params())
    b = np.ones(model.count_params())
    with pytest.warns(UserWarning, match="relu"):
        _, info = chain_solve(model, "mse", (x, y), b, damping=0.1, on_indefinite="ignore")
    assert info.extra["inertia"] == int(np.sum(np.linalg.eigvalsh(dense) < 0))


def test_indefinite_system_warns_or_raises(float64):
    rng = np.random.default_rng(9)
    model = _chain(3, width=3)
    for v in model.trainable_variables:
        v.assign(3.0 * v)
    x, y = _data(rng, 4, "sparse")
    b = np.ones(model.count_params())
    with pytest.raises(NegativeCurvatureError, match=r"has \d+ negative eigenvalue\(s\).*Raise damping"):
        chain_solve(model, LOGITS["sparse"](), (x, y), b, damping=1e-3, on_indefinite="raise")
    with pytest.warns(UserWarning, match=r"negative eigenvalue\(s\)"):
        chain_solve(model, LOGITS["sparse"](), (x, y), b, damping=1e-3)


def test_memory_explosion_is_refused_with_the_estimate(float64):
    model = _chain(4, inputs=16, width=16)
    x, y = np.zeros((2000, 16)), np.zeros(2000, dtype=np.int64)
    with pytest.raises(ResourceError, match=r"would need about [\d.]+ GiB for n=2000 examples and 4 Dense layers"):
        ChainHessian(model, LOGITS["sparse"](), (x, y))


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=-1.0), r"damping must be a finite number ≥ 0. Received: damping=-1.0"),
    (dict(curvature="fisher"), r"curvature must be one of \('hessian', 'gauss_newton'\). Received: curvature='fisher'"),
    (dict(on_indefinite="maybe"), r"on_indefinite must be one of .* Received: on_indefinite='maybe'"),
])
def test_bad_options_are_refused(float64, kwargs, match):
    with pytest.raises(InputError, match=match):
        chain_solve(_chain(2), "mse", (np.ones((2, 3)), np.ones((2, 3))), np.ones(17), **kwargs)


def test_method_object_validates_its_inputs(float64):
    with pytest.raises(InputError, match=r"on_indefinite must be one of .* Received: on_indefinite='never'"):
        Chain(on_indefinite="never")
    with pytest.raises(InputError, match=r"chain solver's blocks are computed from a model and its data, but this "
                                         r"operator \(LinearOperatorIdentity\) has none"):
        Chain().solve(tf.linalg.LinearOperatorIdentity(3, dtype=tf.float64), np.ones((1, 3)))
    operator = tfi.HessianOperator(_chain(2), "mse", (np.ones((2, 3)), np.ones((2, 3))), damping=1.0)
    with pytest.raises(InputError, match=r"b must have shape \[p\] or \[k, p\] with p = 17. Received \(1, 16\)"):
        Chain().solve(operator, np.ones(16))
    single, _ = Chain().solve(operator, np.ones(17))  # one vector [p] is solved like one row
    rows, _ = Chain().solve(operator, np.ones((1, 17)))
    np.testing.assert_allclose(single.numpy(), rows.numpy()[0], rtol=1e-12)


def test_tf_keras_model_matches_the_autodiff_operator():
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([
        tf_keras.Input((3,), dtype="float64"),
        tf_keras.layers.Dense(3, activation="tanh", kernel_regularizer=tf_keras.regularizers.L2(0.01), dtype="float64"),
        tf_keras.layers.Dense(2, activation="softmax", dtype="float64")])
    rng = np.random.default_rng(10)
    data = (rng.standard_normal((5, 3)), rng.integers(0, 2, 5))
    chain = ChainHessian(model, "sparse_categorical_crossentropy", data, damping=0.1)
    autodiff = tfi.HessianOperator(model, "sparse_categorical_crossentropy", data, damping=0.1)
    assert relative_error(chain.to_dense().numpy(), autodiff.to_dense().numpy()) <= 1e-12
