"""Per-layer scores: they sum to the scores, and equal the split of a dense reference (EKFAC: its layer blocks)."""

import functools

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, per_example_gradients, relative_error
from tf_influence.influence.per_layer import layer_slices

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
LAYERS = {"hidden": slice(0, 30), "head": slice(30, 51)}  # models.mlp(): kernel 4x6 + bias 6, kernel 6x3 + bias 3


@pytest.fixture
def problem(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=40)
    objective = tfi.Objective(model, sce)
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    gradients = (per_example_gradients(objective, model.trainable_variables, *train),
                 per_example_gradients(objective, model.trainable_variables, *test))
    return model, train, test, gradients


def test_direct_layer_scores_sum_to_the_scores_and_split_the_dense_solution(problem):
    model, train, test, (g_train, g_test) = problem
    inf = tfi.Influence(model, sce, train, method="direct", damping=0.5, progress=False)
    parts = inf.layer_scores(test)
    assert list(parts) == ["hidden", "head"]
    assert relative_error(sum(parts.values()), inf.scores(test)) <= 1e-12
    solution = np.linalg.solve(dense_hessian(model, sce, *train) + 0.5 * np.eye(51), g_test.T).T
    for name, coordinates in LAYERS.items():
        expected = solution[:, coordinates] @ g_train[:, coordinates].T
        assert relative_error(parts[name], expected) <= 1e-10, name
    # Any method, any measurement: the parts are the same dot products, grouped.
    cg = tfi.Influence(model, sce, train, method="cg", damping=0.5, progress=False, measurement="margin")
    assert relative_error(sum(cg.layer_scores(test).values()), cg.scores(test)) <= 1e-12


def test_ekfac_layer_scores_are_its_layer_blocks(problem):
    model, train, test, (g_train, g_test) = problem
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # EKFAC samples labels for a known loss
    inf = tfi.Influence(model, loss, train, method="ekfac", damping=0.1, progress=False)
    parts = inf.layer_scores(test)
    inverse = inf.solve(np.eye(51)).numpy()  # the dense (C + λI)⁻¹
    assert np.abs(inverse[LAYERS["hidden"], LAYERS["head"]]).max() <= 1e-14 * np.abs(inverse).max()
    for name, block in LAYERS.items():
        expected = g_test[:, block] @ inverse[block, block] @ g_train[:, block].T
        assert relative_error(parts[name], expected) <= 1e-10, name
    assert relative_error(sum(parts.values()), inf.scores(test)) <= 1e-12


def test_layer_names_are_unique_and_in_variable_order(float64, rng):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")], name="inner")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense"), inner])
    x, y = rng.standard_normal((8, 4)), rng.integers(0, 2, size=8)
    slices = layer_slices(tfi.Problem(model, sce, (x, y)))
    assert slices == {"dense": [(0, 12), (12, 15)], "dense#2": [(15, 21), (21, 23)]}
