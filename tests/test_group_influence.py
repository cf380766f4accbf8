"""Group influence: the first order is the sum of the individual removals, the second order is Basu et al.'s
formula (checked against dense matrices), and both are compared with actually retraining without each group."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, per_example_gradients, relative_error
from tf_influence import validation

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
bce = functools.partial(keras.losses.binary_crossentropy, from_logits=True)


def _margin_gradients(model, x, y):
    """Gradients of `log p_c − log(1 − p_c)` per example, by a tape (independent of the library)."""
    tf_vars = [v.value for v in model.trainable_variables]
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            p = tf.nn.softmax(model(x[i:i + 1])[0])[int(y[i])]
            margin = tf.math.log(p) - tf.math.log(1.0 - p)
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(margin, tf_vars)]))
    return np.stack(rows)


def test_orders_against_the_sum_of_removals_and_dense_matrices(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=40)
    w = rng.uniform(0.5, 2.0, size=30)
    train, test = (x[:30], y[:30], w), (x[30:], y[30:])
    l2, damping = 0.05, 0.5
    inf = tfi.Influence(model, sce, train, method="direct", damping=damping, l2=l2, progress=False,
                        measurement="margin")
    groups = [[0, 1, 2], [5, 9, 11, 20, 29], list(range(10, 22))]
    result = inf.group_influence(test, groups)
    change = inf.predicted_change(test)
    for j, group in enumerate(groups):
        np.testing.assert_allclose(result.first_order[:, j], change[:, group].sum(axis=1), rtol=1e-12, atol=1e-15)

    h = dense_hessian(model, sce, x[:30], y[:30], w, l2=l2) + damping * np.eye(51)
    theta = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    g = per_example_gradients(tfi.Objective(model, sce), model.trainable_variables, x[:30], y[:30])
    m = _margin_gradients(model, *test)
    for j, group in enumerate(groups):
        p = w[group].sum() / w.sum()
        g_tilde = w[group] @ g[group] / w.sum() + p * l2 * theta  # the group's share of ∇(ℓ + Ω)
        a_tilde = p * dense_hessian(model, sce, x[group], y[group], w[group], l2=l2)  # its share of ∇²(ℓ + Ω)
        u = np.linalg.solve(h, g_tilde)
        step = (1 - 2 * p) / (1 - p) ** 2 * u + np.linalg.solve(h, a_tilde @ u) / (1 - p) ** 2
        assert relative_error(result.second_order[:, j], m @ step) <= 1e-10, j
        assert relative_error(result.regularization_term[:, j], p * l2 * m @ np.linalg.solve(h, theta)) <= 1e-10, j
    assert result.fractions == pytest.approx([w[g].sum() / w.sum() for g in groups])
    first_only = inf.group_influence(test, groups, order=1)
    assert first_only.second_order is None and np.array_equal(first_only.first_order, result.first_order)


@pytest.fixture(scope="module")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = StandardScaler().fit_transform(data.data)[order]
    y = data.target[order].astype("float64")[:, None]
    yield (x[:400], y[:400]), (x[400:405], y[400:405])
    keras.backend.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


def _groups(x, size, seed):
    """8 coherent groups (the `size` nearest neighbours of a random training point) and 4 random ones."""
    rng = np.random.default_rng(seed)
    coherent = [np.argsort(np.linalg.norm(x - x[rng.integers(len(x))], axis=1))[:size] for _ in range(8)]
    return coherent + [rng.choice(len(x), size, replace=False) for _ in range(4)]


def test_group_influence_tracks_leave_group_out_retraining(breast_cancer):
    """Logistic regression (l2 = 0.01), removing 1%, 10% and 25% of the training set."""
    train, test = breast_cancer
    n, l2 = len(train[1]), 0.01
    model = models.logistic_regression(train[0].shape[1])
    assert validation.fit_to_optimum(model, bce, train, l2=l2) < 1e-8
    inf = tfi.Influence(model, bce, train, l2=l2, method="direct", progress=False)
    retrain = validation.subset_retrainer(model, bce, train, test, l2=l2)
    base = retrain(np.arange(n))
    pearson = {}
    for size in (4, 40, 100):
        groups = _groups(train[0], size, seed=size)
        result = inf.group_influence(test, groups)
        actual = np.stack([retrain(np.setdiff1d(np.arange(n), g)) - base for g in groups], axis=1)
        predictions = {"first": result.first_order, "first+reg": result.first_order + result.regularization_term,
                       "second": result.second_order}
        pearson[size] = {k: float(np.corrcoef(v.ravel(), actual.ravel())[0, 1]) for k, v in predictions.items()}
        errors = {k: relative_error(v, actual) for k, v in predictions.items()}
        print(f"remove {size / n:.0%}: Pearson " + ", ".join(f"{k} {v:.4f}" for k, v in pearson[size].items())
              + "; relative error " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
        assert pearson[size]["second"] >= 0.98, pearson
        assert pearson[size]["second"] >= max(pearson[size]["first"], pearson[size]["first+reg"]), pearson
        assert errors["second"] < min(errors["first"], errors["first+reg"]), errors
    assert pearson[4]["first"] >= 0.9 and pearson[4]["first+reg"] >= 0.99 and pearson[4]["second"] >= 0.99, pearson


def test_bad_groups(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=20)
    inf = tfi.Influence(model, sce, (x, y), method="direct", damping=0.5, progress=False)
    test = (x[:2], y[:2])
    with pytest.raises(tfi.InputError, match=r"Group 1 must be a non-empty list of training indices in \[0, 20\)"):
        inf.group_influence(test, [[1, 2], [20]])
    with pytest.raises(tfi.InputError, match="lists an index more than once"):
        inf.group_influence(test, [[1, 1]])
    with pytest.raises(tfi.InputError, match="holds all of the training weight"):
        inf.group_influence(test, [list(range(20))])
    with pytest.raises(tfi.InputError, match="order must be 1 or 2"):
        inf.group_influence(test, [[1]], order=3)
    mask = np.zeros((2, 20), bool)
    mask[0, :3], mask[1, 5] = True, True
    by_mask = inf.group_influence(test, mask, order=1).first_order
    np.testing.assert_allclose(by_mask, inf.group_influence(test, [[0, 1, 2], [5]], order=1).first_order, rtol=1e-12)
    np.testing.assert_allclose(inf.group_influence(test, [0, 1, 2], order=1).first_order, by_mask[:, :1], rtol=1e-12)
    fd = tfi.Influence(model, sce, (x, y), method="cg", damping=0.5, mode="finite_difference", progress=False)
    with pytest.raises(tfi.InputError, match="mode='finite_difference' has none per batch"):
        fd.group_influence(test, [[1]])
