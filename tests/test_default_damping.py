"""`damping=None` (the default): λ chosen from the curvature's spectrum, the same for every method, and reported."""

import logging

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, relative_error
from tests.test_inputs import _assert_unchanged, _snapshot
from tf_influence.operators.damping import RELATIVE_MARGIN

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _rule(eigenvalues):
    return max(0.0, RELATIVE_MARGIN * eigenvalues[-1] - eigenvalues[0])


def test_chosen_damping_follows_the_rule_on_the_exact_spectrum(float64, rng):
    model = models.mlp(hidden=8)  # tanh: an indefinite Hessian, p = 67 > the 30 Lanczos steps
    x, y = models.classification_data(rng, n=40)
    eigenvalues = np.linalg.eigvalsh(dense_hessian(model, lambda t, p: sce(t, p), x, y))
    assert eigenvalues[0] < 0
    operator = tfi.HessianOperator(model, sce, (x, y), damping=None)
    choice = operator.damping_choice
    assert choice.source == "lanczos" and "λ_max" in choice.reason
    np.testing.assert_allclose(operator.damping, _rule(eigenvalues), rtol=1e-6)
    damped = np.linalg.eigvalsh(operator.to_dense().numpy())
    assert damped[0] >= RELATIVE_MARGIN * eigenvalues[-1] * (1 - 1e-6)  # positive definite, condition ≤ ~100


def test_a_well_conditioned_convex_problem_is_not_damped(float64, rng):
    model = models.logistic_regression(4)
    x = rng.standard_normal((30, 4))
    y = (rng.random((30, 1)) > 0.5).astype("float64")
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    inf = tfi.Influence(model, loss, (x, y), l2=1.0, method="direct", progress=False)
    assert inf.damping == 0.0 and inf.damping_choice.source == "lanczos" and "no damping" in inf.damping_choice.reason
    exact = tfi.Influence(model, loss, (x, y), l2=1.0, method="direct", damping=0.0, progress=False)
    np.testing.assert_allclose(inf.scores((x[:3], y[:3])), exact.scores((x[:3], y[:3])), rtol=1e-10)


def test_every_method_uses_the_same_chosen_lambda(float64, rng, caplog):
    model = models.mlp(hidden=8)
    x, y = models.classification_data(rng, n=40)
    train, test = (x[:32], y[:32]), (x[32:], y[32:])
    with caplog.at_level(logging.INFO, logger="tf_influence.operators.damping"):
        direct = tfi.Influence(model, sce, train, method="direct", progress=False)
        expected = direct.scores(test)
    assert "damping=None -> λ=" in caplog.text
    info = direct.last_solve_info.extra
    assert info["damping"] == direct.damping > 0 and info["damping_source"] == "lanczos"
    assert "λ_min" in info["damping_reason"]
    methods = [("cg", dict(tol=1e-10)), ("chain", {}), ("lissa", dict(recursion_depth=5, batch_size=None))]
    for method, options in methods:
        inf = tfi.Influence(model, sce, train, method=method, progress=False, **options)
        scores = inf.scores(test)
        extra = inf.last_solve_info.extra
        assert inf.damping == pytest.approx(direct.damping, rel=1e-9), method
        assert extra["damping"] == pytest.approx(direct.damping, rel=1e-9) and extra["damping_source"] == "lanczos"
        if method == "lissa":  # d = λ / scale: the same system (H + λI) x = b
            assert extra["d"] * extra["scale"] == pytest.approx(direct.damping, rel=1e-9)
        else:
            assert relative_error(scores, expected) <= 1e-6, method


def test_default_call_succeeds_on_a_relu_mlp_and_a_batchnorm_cnn(rng):
    keras.utils.set_random_seed(0)
    x = rng.standard_normal((48, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, 48)
    mlp = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(3)])
    cnn = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, padding="same"),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.MaxPooling2D(2),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    for model in (mlp, cnn):
        model.compile("adam", sce)
        model.fit(x, y, epochs=3, verbose=0)
        snapshot = _snapshot(model)
        inf = tfi.Influence(model, sce, (x[:40], y[:40]), progress=False)  # the default call
        scores = inf.scores((x[40:], y[40:]))
        assert scores.shape == (8, 40) and np.all(np.isfinite(scores))
        assert inf.last_solve_info.converged and inf.damping > 0 and inf.damping_choice.source == "lanczos"
        reference = tfi.Influence(model, sce, (x[:40], y[:40]), method="direct", damping=inf.damping, progress=False)
        assert relative_error(scores, reference.scores((x[40:], y[40:]))) <= 1e-3
        _assert_unchanged(model, snapshot)


def test_ekfac_takes_its_damping_from_its_factors_without_exact_products(float64, rng):
    model = models.own_layer_norm_mlp(hidden=6)
    x, y = models.classification_data(rng, n=30)
    with pytest.raises(tfi.SecondDerivativeError):  # no exact Hessian products, so no Lanczos
        tfi.HessianOperator(model, sce, (x, y), variables=["hidden", "head"])
    inf = tfi.Influence(model, sce, (x, y), variables=["hidden", "head"], method="ekfac", l2=0.01, progress=False)
    inf.scores((x[:2], y[:2]))
    assert inf.source.built == ["ekfac"]
    eigenvalues = np.concatenate([np.ravel(e) for e in inf.prepared().inverse.factors.eigenvalues()]) + 0.01
    assert inf.damping_choice.source == "factors" and "EKFAC" in inf.damping_choice.reason
    np.testing.assert_allclose(inf.damping, _rule(np.sort(eigenvalues)), rtol=1e-9)
    assert inf.last_solve_info.extra["damping_source"] == "factors"
    assert inf.prepared().inverse.damping == pytest.approx(inf.damping + 0.01)
