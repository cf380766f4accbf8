"""Influence scores against brute force, leave-one-out retraining, and invariances."""

import functools

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import relative_error
from tf_influence import validation

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
bce = keras.losses.BinaryCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def breast_cancer(breast_cancer_optimum):
    """Logistic regression at its optimum on breast cancer (conftest.py fits it once), built in float64
    once for the module: no test changes its weights (leave_one_out and subset_retrainer restore them,
    which test_linear_datamodeling_score checks). Tests using it also take `float64`.

    With weaker regularisation the most influential points move the optimum far enough for
    second-order effects to show: l2=0.01 gives Pearson 0.963 / 0.988 / 0.992 on test points 0-2."""
    train, test, l2, weights = breast_cancer_optimum
    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model = models.logistic_regression(train[0].shape[1])
    finally:
        keras.backend.set_floatx(old_floatx)
        keras.config.set_dtype_policy(old_policy)
    model.set_weights(weights)
    return model, l2, train, test


@pytest.fixture(scope="module")
def leave_one_out_runs():
    """Retrainings shared by the methods' tests: {sorted removed indices: LeaveOneOutResult}."""
    return {}


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_predicted_loss_change_matches_leave_one_out(float64, breast_cancer, leave_one_out_runs, method):
    """The 50 examples of largest predicted change, removed one at a time and retrained. When another
    method's test already retrained without the same 50 examples, its actual changes are reused (the
    retraining does not depend on the method) and correlated here with this method's predictions,
    by the formulas of validation.leave_one_out."""
    model, l2, train, test = breast_cancer
    inf = tfi.Influence(model, bce, train, l2=l2, method=method, progress=False)
    test_point = (test[0][:1], test[1][:1])
    predicted = inf.predicted_loss_change(test_point)
    top50 = np.argsort(-np.abs(predicted[0]))[:50]
    key = tuple(sorted(top50.tolist()))
    if key in leave_one_out_runs:
        done = leave_one_out_runs[key]
        column = {int(i): j for j, i in enumerate(done.indices)}
        actual = done.actual[:, [column[int(i)] for i in top50]]
        result = validation.LeaveOneOutResult(
            top50, actual, predicted[:, top50], float(np.corrcoef(predicted[:, top50].ravel(), actual.ravel())[0, 1]),
            float(scipy.stats.spearmanr(predicted[:, top50].ravel(), actual.ravel()).statistic),
            done.max_gradient_norm)
    else:
        result = validation.leave_one_out(model, bce, train, test_point, top50,
                                          predicted=predicted[:, top50], l2=l2)
        leave_one_out_runs[key] = result
    assert result.max_gradient_norm < 1e-7
    assert result.pearson >= 0.99, result.pearson
    assert result.spearman >= 0.95, result.spearman


def _brute_force_scores(model, loss, train, test, damping, variables):
    tf_vars = [v.value for v in variables]
    op = tfi.HessianOperator(model, loss, train, variables, damping=damping)
    dense = op.to_dense().numpy()

    def grads(x, y):
        rows = []
        for i in range(len(y)):
            with tf.GradientTape() as tape:
                loss_i = loss(y[i:i + 1], model(x[i:i + 1]))[0]
            rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss_i, tf_vars)]))
        return np.stack(rows)

    return grads(*test) @ np.linalg.solve(dense, grads(*train).T), dense


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_scores_equal_brute_force(float64, rng, method):
    model = models.mlp()
    x, y = models.classification_data(rng, n=40)
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    expected, _ = _brute_force_scores(model, sce, train, test, 0.5, model.trainable_variables)
    options = {"tol": 1e-10} if method == "cg" else {}
    inf = tfi.Influence(model, sce, train, method=method, damping=0.5, progress=False, **options)
    scores = inf.scores(test)
    assert scores.shape == (10, 30)
    assert relative_error(scores, expected) <= 1e-6
    np.testing.assert_allclose(inf.predicted_loss_change(test), scores / 30, rtol=1e-12)
    self_expected = np.diag(_brute_force_scores(model, sce, train, train, 0.5, model.trainable_variables)[0])
    assert relative_error(inf.self_influence(), self_expected) <= 1e-6


def test_scores_on_a_variable_subset(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=40)
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    head = model.layers[-1].trainable_variables
    expected, _ = _brute_force_scores(model, sce, train, test, 0.1, head)
    inf = tfi.Influence(model, sce, train, variables="head", method="direct", damping=0.1, progress=False)
    assert relative_error(inf.scores(test), expected) <= 1e-8


def _max_pooling_cnn(dtype):
    return keras.Sequential([keras.Input((6, 6, 1)),
                             keras.layers.Conv2D(2, 3, activation="tanh", dtype=dtype),
                             keras.layers.MaxPooling2D(2, dtype=dtype), keras.layers.Flatten(dtype=dtype),
                             keras.layers.Dense(3, dtype=dtype)])


def test_jit_compile_through_max_pooling_gives_the_same_scores(rng):
    # float32: XLA on CPU has no float64 kernel for the second derivative of max pooling.
    model = _max_pooling_cnn("float32")
    x = rng.standard_normal((30, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=30)
    train, test = (x[:24], y[:24]), (x[24:], y[24:])
    options = dict(method="direct", damping=5.0, batch_size=8, progress=False)
    plain = tfi.Influence(model, sce, train, **options).scores(test)
    xla = tfi.Influence(model, sce, train, jit_compile=True, **options)
    assert xla.operator.jit_compile
    assert relative_error(xla.scores(test), plain) <= 1e-5


def test_jit_compile_refuses_an_op_xla_cannot_compile(float64, rng):
    model = _max_pooling_cnn("float64")
    x, y = rng.standard_normal((8, 6, 6, 1)), rng.integers(0, 3, size=8)
    with pytest.raises(tfi.InputError, match="XLA cannot compile.*MaxPoolGradGrad.*jit_compile=False"):
        tfi.Influence(model, sce, (x, y), jit_compile=True, progress=False)


def test_top_k_orders_scores(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=40)
    inf = tfi.Influence(model, sce, (x[:30], y[:30]), method="direct", damping=0.5, progress=False)
    scores = inf.scores((x[30:], y[30:]))
    top = inf.top_k((x[30:], y[30:]), k=4)
    for t in range(10):
        np.testing.assert_array_equal(top.helpful_indices[t], np.argsort(-scores[t])[:4])
        np.testing.assert_array_equal(top.harmful_indices[t], np.argsort(scores[t])[:4])
        assert np.all(np.diff(top.helpful_scores[t]) <= 0) and np.all(np.diff(top.harmful_scores[t]) >= 0)


def test_batch_size_and_format_invariance(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=45)
    train, test = (x[:37], y[:37]), (x[37:], y[37:])
    reference = tfi.Influence(model, sce, train, method="direct", damping=0.3, batch_size=64,
                              progress=False).scores(test)
    small = tfi.Influence(model, sce, train, method="direct", damping=0.3, batch_size=5, progress=False)
    assert relative_error(small.scores(test), reference) <= 1e-10
    ds_train = tf.data.Dataset.from_tensor_slices(train).batch(8).filter(lambda a, b: True)
    ds_test = tf.data.Dataset.from_tensor_slices(test).batch(3)
    from_data = tfi.Influence(model, sce, ds_train, method="direct", damping=0.3, progress=False)
    assert relative_error(from_data.scores(ds_test), reference) <= 1e-10


def test_inverse_hvps_are_cached_and_refreshed_when_weights_change(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=30)
    inf = tfi.Influence(model, sce, (x[:25], y[:25]), method="cg", damping=0.5, progress=False)
    calls = []
    solve = inf.solve
    inf.solve = lambda rows: calls.append(int(rows.shape[0])) or solve(rows)
    first = inf.test_inverse_hvps((x[25:], y[25:]))
    again = inf.test_inverse_hvps((x[24:], y[24:]))  # one new example, five cached
    assert calls == [5, 1]
    np.testing.assert_array_equal(again[1:], first)
    model.layers[0].bias.assign(model.layers[0].bias + 0.1)
    with pytest.warns(UserWarning, match="weights changed"):
        changed = inf.test_inverse_hvps((x[25:], y[25:]))
    assert calls == [5, 1, 5] and relative_error(changed, first) > 1e-6


def test_inverse_hvp_forms_and_parameter_change(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=30)
    inf = tfi.Influence(model, sce, (x, y), method="direct", damping=0.5, progress=False)
    dense = inf.operator.to_dense().numpy()
    v = rng.standard_normal(inf.space.size)
    flat = inf.inverse_hvp(tf.constant(v)).numpy()
    assert relative_error(flat, np.linalg.solve(dense, v)) <= 1e-10
    as_list = inf.inverse_hvp(inf.space.unflatten(tf.constant(v)))
    assert [tuple(t.shape) for t in as_list] == inf.space.shapes
    assert relative_error(inf.space.flatten(as_list).numpy(), flat) <= 1e-12
    grads = np.stack([_single_gradient(model, x[i:i + 1], y[i:i + 1]) for i in (3, 7)])
    expected = np.linalg.solve(dense, grads.T).T / 30
    assert relative_error(inf.parameter_change([3, 7]), expected) <= 1e-10


def _single_gradient(model, x, y):
    with tf.GradientTape() as tape:
        loss = sce(y, model(x))[0]
    return np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)])


def test_self_influence_finds_flipped_labels():
    from tf_influence.demo import load_digits_with_flipped_labels, train_classifier

    x, y, _, _, flipped = load_digits_with_flipped_labels(n_train=600, seed=1)
    model = train_classifier(x, y, epochs=60, seed=1)
    inf = tfi.Influence(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y),
                        variables="head", method="direct", damping=1e-3, progress=False)
    top_decile = np.argsort(-inf.self_influence())[: len(y) // 10]
    found = len(np.intersect1d(top_decile, flipped))
    assert found >= 0.5 * len(flipped), f"{found} of {len(flipped)} flipped labels in the top 10%"


def test_bad_inputs(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=30)
    inf = tfi.Influence(model, sce, (x, y), method="direct", damping=0.5, progress=False)
    with pytest.raises(tfi.InputError, match="could not be called on test"):
        inf.scores((x[:, :3], y))
    with pytest.raises(tfi.InputError, match=r"k must be an integer in \[1, n_train=30\]. Received: k=31"):
        inf.top_k((x[:2], y[:2]), k=31)
    with pytest.raises(tfi.InputError, match="Unknown method 'newton'"):
        tfi.Influence(model, sce, (x, y), method="newton")
    with pytest.raises(tfi.InputError, match="indices must be integers"):
        inf.parameter_change([30])


def test_linear_datamodeling_score(float64, breast_cancer):
    model, l2, train, test = breast_cancer
    inf = tfi.Influence(model, bce, train, l2=l2, method="direct", progress=False)
    test_points = (test[0][:5], test[1][:5])
    attributions = inf.predicted_loss_change(test_points)
    original = [v.numpy() for v in model.trainable_variables]
    retrain = validation.subset_retrainer(model, bce, train, test_points, l2=l2)

    lds = validation.linear_datamodeling_score(attributions, retrain, num_subsets=20, fraction=0.95)
    shuffled = validation.linear_datamodeling_score(
        np.random.default_rng(1).permuted(attributions, axis=1), retrain, num_subsets=20, fraction=0.95)
    assert lds.score >= 0.8, lds.score
    assert abs(shuffled.score) < lds.score - 0.4
    for v, value in zip(model.trainable_variables, original):
        np.testing.assert_array_equal(v.numpy(), value)


def test_ekfac_never_builds_a_hessian_operator(float64, rng):
    """A method builds only the curvature it needs. EKFAC needs no second derivatives, so a model whose
    Hessian products TensorFlow gets wrong (LayerNormalization after the first selected layer) works
    with it, while a method that needs exact Hessian products refuses the model. (A subclass with its own
    call: tf_influence makes plain LayerNormalization exact, not formulas it cannot see.)"""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="hidden"),
                              models.OwnLayerNormalization(center=False, scale=False, name="norm"),
                              keras.layers.Dense(3, name="head")])
    x, y = models.classification_data(rng, n=30)
    train, test = (x[:25], y[:25]), (x[25:], y[25:])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(tfi.SecondDerivativeError, match="norm"):
        tfi.Influence(model, loss, train, method="cg", damping=0.1, progress=False).scores(test)
    inf = tfi.Influence(model, loss, train, method="ekfac", damping=0.1, progress=False)
    scores = inf.scores(test)
    assert scores.shape == (5, 25) and np.all(np.isfinite(scores))
    assert inf.source.built == ["ekfac"]
