"""The compiled KFAC/EKFAC fitting passes: shared across fits (no retracing), no model kept alive,
and batch statistics summed on the device equal to per-batch sums computed eagerly."""

import gc
import weakref

import keras
from keras.src.losses.losses import LossFunctionWrapper
import numpy as np
import pytest

import tf_influence as tfi
from tests import models
from tf_influence.curvature import fit_factors
from tf_influence.curvature import passes as _passes
from tf_influence.curvature import statistics as _statistics
from tf_influence.curvature.capture import find_blocks
from tf_influence.curvature.layer_rows import layer_rows


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(rng, n=30):
    return rng.standard_normal((n, 4)), rng.integers(0, 3, n), rng.uniform(0.5, 2.0, n)


def _traces(model):
    return sum(sum(p.traces.values()) for p in _passes.cached_passes(model))


def test_second_fit_on_the_same_model_traces_nothing(float64, rng):
    model = models.mlp()
    data = _data(rng)
    first = fit_factors(tfi.Problem(model, _ce(), data, batch_size=30), method="ekfac", fisher="ggn")
    traced = _traces(model)
    assert traced == 2  # one trace per pass
    # A new Problem with a new (equal) loss object, then KFAC (the same first pass): no new trace.
    second = fit_factors(tfi.Problem(model, _ce(), data, batch_size=30), method="ekfac", fisher="ggn")
    kfac = fit_factors(tfi.Problem(model, _ce(), data, batch_size=30), method="kfac", fisher="ggn")
    assert _traces(model) == traced
    for a, b in zip(first.layers, second.layers):
        np.testing.assert_array_equal(a.corrected.numpy(), b.corrected.numpy())
        np.testing.assert_array_equal(a.q_s.numpy(), b.q_s.numpy())
    assert kfac.layers[0].corrected is None


def test_a_different_loss_gets_its_own_passes(float64, rng):
    model = models.mlp()
    data = _data(rng)
    logits = fit_factors(tfi.Problem(model, _ce(), data), method="kfac", fisher="ggn")
    probabilities = fit_factors(
        tfi.Problem(model, keras.losses.SparseCategoricalCrossentropy(from_logits=False), data), method="kfac",
        fisher="ggn")
    assert len(_passes.cached_passes(model)) == 2
    assert not np.allclose(logits.layers[1].eig_s.numpy(), probabilities.layers[1].eig_s.numpy())


def test_user_functions_of_the_same_name_in_a_keras_wrapper_get_their_own_passes(float64, rng):
    """A Keras LossFunctionWrapper's config names its function only: two functions called `loss` differ."""
    def make(from_logits):
        def loss(y_true, y_pred):
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=from_logits)
        return LossFunctionWrapper(loss)  # what Keras wraps a loss function in (not exported publicly)

    model = models.mlp()
    data = _data(rng)
    logits = fit_factors(tfi.Problem(model, make(True), data), method="kfac", fisher="ggn")
    probabilities = fit_factors(tfi.Problem(model, make(False), data), method="kfac", fisher="ggn")
    assert len(_passes.cached_passes(model)) == 2
    assert not np.allclose(logits.layers[1].eig_s.numpy(), probabilities.layers[1].eig_s.numpy())


def test_cached_passes_do_not_keep_the_model_alive(float64, rng):
    def fit():
        model = models.mlp()
        fit_factors(tfi.Problem(model, _ce(), _data(rng)), method="ekfac", fisher="ggn")
        assert _passes.cached_passes(model)
        return weakref.ref(model)

    ref = fit()
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("fisher", ["ggn", "true"])
def test_summed_passes_equal_eager_per_batch_sums(float64, rng, fisher):
    model = models.mlp()
    x, y, w = _data(rng, n=23)
    problem = tfi.Problem(model, _ce(), (x, y, w), batch_size=5)  # 5 batches, the last one partial
    blocks = find_blocks(model, problem.variables)
    num_targets = 3 if fisher == "ggn" else 1
    settings = tfi.curvature.FactorSettings(fisher=fisher)
    passes = _passes.fit_passes(problem.objective, blocks, settings, num_targets=num_targets)
    sums, total_weight, count = passes.first_pass(problem.objective, problem.dataset)
    expected = [[0.0, 0.0] for _ in blocks]
    for step, (xb, yb, wb) in enumerate(problem.dataset):
        rows = layer_rows(problem.objective, blocks, xb, yb, fisher=fisher, seed=np.array([0, step]),
                          num_targets=num_targets)
        for i, (block, (a, gs)) in enumerate(zip(blocks, rows)):
            a_sum, s_sum = _statistics.factor_sums(block, a, gs, wb)
            expected[i] = [expected[i][0] + a_sum.numpy(), expected[i][1] + s_sum.numpy()]
    assert count == 23
    assert abs(total_weight - w.sum()) <= 1e-12 * w.sum()
    for (a_sum, s_sum), (a_ref, s_ref) in zip(sums, expected):
        for got, ref in ((a_sum, a_ref), (s_sum, s_ref)):
            assert np.max(np.abs(got.numpy() - ref)) <= 1e-12 * np.max(np.abs(ref))


def test_second_ekfac_scores_call_traces_nothing(float64, rng):
    from tf_influence.influence import factored_scores
    from tf_influence.operators import EKFACOperator

    model = models.mlp()
    x, y, _ = _data(rng)
    factors = fit_factors(tfi.Problem(model, _ce(), (x, y)), method="ekfac", fisher="ggn")
    operator = EKFACOperator(factors, damping=0.1)
    g_test = rng.standard_normal((5, factors.space.size))
    first = factored_scores.ekfac_scores(operator, g_test, (x, y), batch_size=10)
    functions = factored_scores.score_functions(factors.objective, factors.blocks, operator.compute_dtype)
    traced = dict(functions.traces)
    assert traced == {"rows": 1, "scores": 1}
    other = tfi.Objective(model, _ce())  # a new objective with an equal loss shares the functions
    second = factored_scores.ekfac_scores(operator, g_test, (x, y), objective=other, batch_size=10)
    assert functions.traces == traced
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("build", ["mlp", "small_cnn"])
def test_influence_scores_from_layer_rows_equal_jacobian_gradient_dots(float64, rng, build):
    from tf_influence.influence import eigenbasis_scores, factored_scores

    model = getattr(models, build)()
    shape = tuple(model.inputs[0].shape[1:])
    x, y = rng.standard_normal((12,) + shape), rng.integers(0, 3, 12)
    test = (x[:3] + 0.1, y[:3])
    influence = tfi.Influence(model, _ce(), (x, y), method=tfi.solvers.EKFAC(fisher="ggn"), damping=0.1,
                              batch_size=5, progress=False)
    scores = influence.scores(test)  # in the factors' eigenbasis, no solves
    directions = influence.test_inverse_hvps(test)  # the EKFAC solve
    reference = directions @ influence.training_gradients().T  # per-example jacobians
    assert np.max(np.abs(scores - reference)) <= 1e-12 * np.max(np.abs(reference))
    dots = factored_scores.dots_for(influence.problem, influence.prepared())  # gradients from layer rows
    from_rows = np.concatenate([dots(batch, directions).numpy() for batch in influence.problem.dataset]).T
    assert np.max(np.abs(from_rows - reference)) <= 1e-12 * np.max(np.abs(reference))
    functions = eigenbasis_scores.eigenbasis_scores_for(influence.problem, influence.prepared()).functions
    traced = dict(functions.traces)
    assert traced["rotated"] >= 1
    again = tfi.Influence(model, _ce(), (x, y), method=tfi.solvers.EKFAC(fisher="ggn"), damping=0.1, batch_size=5,
                          progress=False)
    np.testing.assert_allclose(again.scores(test), scores, rtol=1e-12, atol=0)
    assert functions.traces == traced  # the second Influence reuses the compiled rotation
