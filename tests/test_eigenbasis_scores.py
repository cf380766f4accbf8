"""KFAC/EKFAC scores taken in the factors' eigenbasis equal the solve route, and the route is taken only where
it is exact."""

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import models
from tf_influence.influence import eigenbasis_scores

CE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _positions_model():
    """Layers applied at several positions: a transposed convolution (its bias would be an elementwise block) and
    a Dense on a sequence."""
    image = keras.Input((3, 3, 1))
    h = keras.layers.Conv2DTranspose(2, 2, activation="tanh", use_bias=False, name="up")(image)  # [4, 4, 2]
    h = keras.layers.Reshape((4, 8))(h)
    h = keras.layers.Dense(3, activation="tanh", name="per_row")(h)  # 4 positions
    h = keras.layers.Flatten()(h)
    return keras.Model(image, keras.layers.Dense(3, name="head")(h))


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_eigenbasis_scores_equal_solve_and_jacobian_dots(float64, rng, method):
    model = _positions_model()
    x, y = rng.standard_normal((14, 3, 3, 1)), rng.integers(0, 3, 14)
    test = (x[:4] * 0.5, y[:4])
    make = {"ekfac": tfi.solvers.EKFAC, "kfac": tfi.solvers.KFAC}[method]
    influence = tfi.Influence(model, CE_LOGITS, (x, y), method=make(fisher="ggn"), damping=0.05, batch_size=6,
                              progress=False)
    assert eigenbasis_scores.eigenbasis_scores_for(influence.problem, influence.prepared()) is not None
    scores = influence.scores(test)
    reference = influence.test_inverse_hvps(test) @ influence.training_gradients().T
    assert np.max(np.abs(scores - reference)) <= 1e-12 * np.max(np.abs(reference))
    info = influence.last_solve_info
    assert info.method == method and info.extra["layers"] == ["up", "per_row", "head"]
    np.testing.assert_array_equal(influence.scores(test), scores)  # from the cached test rows


def test_eigenbasis_rows_are_cached_per_test_example(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=20)
    influence = tfi.Influence(model, CE_LOGITS, (x, y), method="ekfac", damping=0.1, batch_size=8, progress=False)
    scores = influence.scores((x[:5], y[:5]))
    functions = eigenbasis_scores.eigenbasis_scores_for(influence.problem, influence.prepared()).functions
    calls = []
    original = functions.rotated
    functions.rotated = lambda *args: calls.append(int(args[0].shape[0])) or original(*args)
    try:
        reordered = influence.scores((x[[4, 2]], y[[4, 2]]))  # cached test rows: only the training side runs
    finally:
        functions.rotated = original
    assert calls == [8, 8, 4]
    np.testing.assert_array_equal(reordered, scores[[4, 2]])


def test_other_solves_and_blocks_take_the_solve_route(float64, rng):
    x, y = models.classification_data(rng, n=20)
    model = models.mlp()

    def route(method, model=model, **options):
        influence = tfi.Influence(model, CE_LOGITS, (x, y), method=method, damping=0.1, progress=False, **options)
        return eigenbasis_scores.eigenbasis_scores_for(influence.problem, influence.prepared())

    assert route(tfi.solvers.EKFAC()) is not None
    assert route(tfi.solvers.EKFAC(residual_rows=2)) is None  # the solutions' residuals were asked for
    assert route(tfi.solvers.EKFAC(tol=1e-6)) is None  # refined by CG: not the factors' inverse
    normalized = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="hidden"),
                                   keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(3, name="head")])
    assert route(tfi.solvers.EKFAC(), model=normalized, variables=["hidden", "head"]) is not None
    assert route(tfi.solvers.EKFAC(), model=normalized) is None  # the norm's scale and offset: an elementwise block

    measured = tfi.Influence(model, CE_LOGITS, (x, y), method="ekfac", damping=0.1, measurement="margin",
                             progress=False)
    expected = measured.test_inverse_hvps((x[:3], y[:3])) @ measured.training_gradients().T
    np.testing.assert_allclose(measured.scores((x[:3], y[:3])), expected, rtol=1e-10,
                               atol=1e-12 * np.abs(expected).max())
