"""A transformer classifier and a BatchNorm ResNet block, end to end (float64).

Exact influence (`curvature="hessian"`) through LayerNormalization, attention and training-mode
BatchNormalization equals the hand-derived dense solve of the plain-TF twins (tests/architecture_twins.py:
nested-tape Hessian, per-example gradients); EKFAC covers every trainable variable, and its Pearson
correlation with the direct Gauss-Newton solve is logged. Bad input: a layer the capture cannot see
is named, and the model is left as it was.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import architecture_twins as twins
from tests.helpers import relative_error
from tf_influence.layers import walk_layers

_log = logging.getLogger(__name__)
CE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N_TRAIN, N_TEST = 24, 4


def _setup(kind, rng):
    if kind == "transformer":
        model, logits, training = twins.transformer(), twins.transformer_logits, False
        x = rng.integers(0, twins.VOCAB, (N_TRAIN + N_TEST, twins.LENGTH)).astype(np.int32)
    else:
        model, logits, training = twins.resnet_block(), twins.resnet_logits, True
        x = rng.standard_normal((N_TRAIN + N_TEST, 5, 5, 2))
    y = rng.integers(0, twins.CLASSES, N_TRAIN + N_TEST)
    model.compile(keras.optimizers.Adam(0.02), CE_LOGITS)
    model.fit(x[:N_TRAIN], y[:N_TRAIN], batch_size=N_TRAIN, epochs=20, verbose=0, shuffle=False)
    train, test = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    return model, twins.Twin(logits, model), train, test, training


@pytest.fixture(scope="module", params=["transformer", "resnet_block"])
def architecture(request):
    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    yield (request.param, *_setup(request.param, np.random.default_rng(0)))
    keras.backend.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


def _influence(model, train, training, method, **options):
    # One batch: training-mode BatchNormalization's statistics are those of the whole training set,
    # as in the twin (test points form their own batch, as in Influence.test_dataset).
    return tfi.Influence(model, CE_LOGITS, train, method=method, training=training, batch_size=N_TRAIN,
                         progress=False, **options)


def test_exact_influence_equals_the_twins_dense_solve(architecture):
    name, model, twin, train, test, training = architecture
    np.testing.assert_allclose(twin.logits(twin.params(twin.theta), tf.constant(train[0])).numpy(),
                               model(train[0], training=training).numpy(), rtol=1e-10, atol=1e-12)
    hessian = twin.hessian(*train)
    smallest = float(np.linalg.eigvalsh(hessian)[0])
    damping = max(0.0, -smallest) + 0.05
    g_train, g_test = twin.per_example_gradients(*train), twin.per_example_gradients(*test)
    expected = g_test @ np.linalg.solve(hessian + damping * np.eye(len(hessian)), g_train.T)
    # CG on the same exact products is checked against dense solves in tests/test_layer_zoo.py.
    error = relative_error(_influence(model, train, training, "direct", damping=damping).scores(test), expected)
    _log.info("%s (p=%d, λ_min(H)=%.3g, damping %.3g): exact influence vs the twin's dense solve, relative error %.2e",
              name, len(hessian), smallest, damping, error)
    assert error <= 1e-6, error


def test_ekfac_covers_every_variable_and_tracks_the_gauss_newton_solve(architecture):
    name, model, _, train, test, training = architecture
    damping = 0.1
    direct = _influence(model, train, training, "direct", damping=damping, curvature="gauss_newton").scores(test)
    pearson = {}
    for method, fisher in (("ekfac", "ggn"), ("ekfac", "true"), ("kfac", "ggn")):
        influence = _influence(model, train, training, method, damping=damping, curvature="gauss_newton",
                               fisher=fisher)
        scores = influence.scores(test)
        factors = influence.prepared().inverse.factors
        assert {id(v) for b in factors.blocks for v in b.variables} == {id(v) for v in model.trainable_variables}
        assert "hessian" not in influence.source.built
        pearson[method, fisher] = float(np.corrcoef(scores.ravel(), direct.ravel())[0, 1])
    _log.info("%s: blocks %s", name, factors.describe())
    _log.info("%s: Pearson of the scores vs the direct Gauss-Newton solve at damping %g: %s", name, damping, pearson)
    assert min(pearson.values()) > 0.5, pearson  # a floor against broken factors, not a quality target


class _Gate(keras.layers.Layer):
    """A custom block: a Dense sublayer (capturable) and its own weight (not)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.Dense(4, name="proj")

    def build(self, shape):
        self.proj.build(shape)
        self.gate = self.add_weight(shape=(4,), initializer="ones", name="gate")

    def call(self, x):
        return self.proj(x) * self.gate


def test_a_layer_the_capture_cannot_see_is_named_and_the_model_is_unchanged(float64, rng):
    inputs = keras.Input((3,))
    gate = _Gate(name="gated")
    normalized = keras.layers.LayerNormalization(name="norm")(gate(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(normalized))
    x, y = rng.standard_normal((12, 3)), rng.integers(0, 2, 12)
    layers = list(walk_layers(model, include_root=True))
    before = ([w.copy() for w in model.get_weights()], [vars(layer).get("call") for layer in layers],
              [layer.trainable for layer in layers])
    with pytest.raises(tfi.UnsupportedLayerError, match=r"'gated' \(_Gate: layer type not supported\).*"
                                                        r"method='direct'.*variables=\[.*'head'.*\]"):
        _ = tfi.Influence(model, CE_LOGITS, (x, y), method="ekfac", damping=0.1, progress=False).scores((x[:2], y[:2]))
    after = (model.get_weights(), [vars(layer).get("call") for layer in layers], [layer.trainable for layer in layers])
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1] == after[1] and before[2] == after[2]
    selected = ["proj", "norm", "head"]  # the fix the message names works
    scores = tfi.Influence(model, CE_LOGITS, (x, y), method="ekfac", damping=0.1, variables=selected,
                           progress=False).scores((x[:2], y[:2]))
    assert np.all(np.isfinite(scores))
