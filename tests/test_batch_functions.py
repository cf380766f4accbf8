"""Scoring by per-example gradients x all test directions equals forward-mode scoring; no retracing."""

import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import per_example_gradients, relative_error
from tf_influence.influence import gradients as _gradients
from tf_influence.influence.batch_functions import BatchFunctions, dot_route

SCRIPT = pathlib.Path(__file__).resolve().parent / "scripts" / "no_retracing.py"
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def model_and_data(float64, rng):
    model = models.mlp(d=4, hidden=5, classes=3)
    x, y = models.classification_data(rng, n=43, d=4)  # batches of 10: a partial last batch of 3
    x_test, y_test = models.classification_data(rng, n=7, d=4)
    return model, (x, y), (x_test, y_test)


def test_gradient_dots_by_gradients_equal_forward_mode_products(model_and_data):
    model, train, test = model_and_data
    inf = tfi.Influence(model, LOSS, train, damping=1.0, batch_size=10, progress=False)
    problem = inf.problem
    directions = tf.constant(np.random.default_rng(1).standard_normal((6, problem.space.size)))
    assert dot_route(6) == "gradients" and dot_route(1) == "forward"
    sliced = BatchFunctions(problem, memory_budget=3 * problem.space.size * 8)  # slices of 3 examples
    for batch in problem.dataset:
        forward = _gradients.gradient_dot(problem.objective, problem.tf_variables, problem.space, batch, directions)
        by_gradients = inf.gradient_dots(batch, directions)
        gradients = per_example_gradients(problem.objective, problem.variables, batch[0], batch[1])
        reference = gradients @ directions.numpy().T
        assert relative_error(by_gradients, forward) <= 1e-10
        assert relative_error(by_gradients, reference) <= 1e-10
        assert relative_error(sliced.gradient_dots(batch, directions), forward) <= 1e-10
        assert relative_error(inf.gradient_dots(batch, directions[:2]), forward[:, :2]) <= 1e-10  # forward route


def test_scores_equal_the_forward_mode_scores(model_and_data):
    model, train, test = model_and_data
    inf = tfi.Influence(model, LOSS, train, damping=1.0, batch_size=10, progress=False)
    scores = inf.scores(test)  # 7 test points: the gradients route
    directions = tf.constant(inf.test_inverse_hvps(test))
    problem = inf.problem
    forward = np.concatenate([_gradients.gradient_dot(problem.objective, problem.tf_variables, problem.space, batch,
                                                      directions).numpy() for batch in problem.dataset]).T
    assert scores.shape == (7, 43)
    assert relative_error(scores, forward) <= 1e-10


def test_readme_paths_never_retrace():
    """The README's calls (scores, top_k, self_influence, inverse_hvp), repeated, with a partial last batch,
    in a fresh process: no retracing warning, and each per-batch function traced once."""
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("RETRACING")], result.stdout
    assert "TRACES {'gradients': 1, 'forward_dots': 1}" in lines, result.stdout
