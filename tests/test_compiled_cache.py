"""Compiled functions are shared by every object built for the same model, loss, variables and options.

A second `Influence` on the same model traces none of the shared functions (curvature products,
per-example gradients and dots, the dense builder), reads the variables when it runs (retraining is
seen), never shares with another model, loss or variable selection, and the cache keeps no model alive.
Every result is checked against a dense float64 solve with a Hessian from nested tapes.
"""

import collections
import functools
import gc
import importlib
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import compiled
from tests import helpers, models

DAMPING = 2.0


def _sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # a fresh object every time


def _data(rng, n=24, d=4):
    return models.classification_data(rng, n=n, d=d)


def _exact_scores(model, train, test, damping, variables=None, loss=None):
    """`g_test (H + λI)⁻¹ g_trainᵀ` with H by nested tapes and a dense solve."""
    loss = loss or _sce()
    variables = list(variables if variables is not None else model.trainable_variables)
    h = helpers.dense_hessian(model, loss, *train, variables=variables)
    objective = tfi.Objective(model, loss)
    g_train = helpers.per_example_gradients(objective, variables, *train)
    g_test = helpers.per_example_gradients(objective, variables, *test)
    return g_test @ np.linalg.solve(h + damping * np.eye(len(h)), g_train.T), g_train, h


def _solver(method):
    if method == "lissa":  # full-batch products, scale above λ_max(H + λI): converges geometrically
        return tfi.solvers.LiSSA(scale=5.0, batch_size=None, recursion_depth=60, progress=False)
    if method == "cg":
        return tfi.solvers.CG(tol=1e-10)
    return method


def _influence(model, train, method, damping=DAMPING, **options):
    return tfi.Influence(model, options.pop("loss", None) or _sce(), train, method=_solver(method),
                         damping=damping, batch_size=10, progress=False, **options)


@pytest.mark.parametrize("method", ["direct", "cg", "lissa"])
def test_second_influence_traces_no_shared_function(float64, rng, method):
    model = models.mlp()
    train, test = _data(rng), _data(rng, n=5)
    first = _influence(model, train, method)
    first.scores(test)
    first.self_influence()
    before = compiled.trace_count()
    second = _influence(model, train, method, damping=2 * DAMPING)  # another damping, a fresh loss object
    scores, self_influence = second.scores(test), second.self_influence()
    assert compiled.trace_count() == before
    exact, g_train, h = _exact_scores(model, train, test, 2 * DAMPING)
    tolerance = 1e-6 if method == "lissa" else 1e-9
    assert helpers.relative_error(scores, exact) < tolerance
    exact_self = np.einsum("ij,ji->i", g_train, np.linalg.solve(h + 2 * DAMPING * np.eye(len(h)), g_train.T))
    assert helpers.relative_error(self_influence, exact_self) < tolerance


@pytest.mark.parametrize("solver", ["cg", "block_cg"])
def test_cg_loop_is_shared_by_operators_with_other_data_and_damping(float64, rng, solver, monkeypatch):
    model = models.mlp()
    module = importlib.import_module(f"tf_influence.solvers.{solver}")
    traced = collections.Counter()

    def counting(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            traced[name] += 1  # runs once per trace
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(module, "_loop", counting("loop", module._loop))
    monkeypatch.setattr(tfi.HessianOperator, "_data_pass_fn", counting("pass", tfi.HessianOperator._data_pass_fn))
    first_train, other_train = _data(rng), _data(rng, n=31)  # other examples, another partial last batch
    b = rng.standard_normal((3, sum(int(np.prod(v.shape)) for v in model.trainable_variables)))
    module.__dict__[solver](tfi.HessianOperator(model, _sce(), first_train, damping=DAMPING, batch_size=10), b,
                            tol=1e-10)
    assert traced == {"loop": 1, "pass": 1}
    operator = tfi.HessianOperator(model, _sce(), other_train, damping=3.0, batch_size=10)
    x, _ = module.__dict__[solver](operator, b, tol=1e-10)
    assert traced == {"loop": 1, "pass": 1}  # the second operator traces neither
    h = helpers.dense_hessian(model, _sce(), *other_train)
    assert helpers.relative_error(x.numpy(), np.linalg.solve(h + 3.0 * np.eye(len(h)), b.T).T) < 1e-9


def test_loss_name_resolved_afresh_shares_functions(float64, rng):
    model = models.mlp()
    train, test = _data(rng), _data(rng, n=3)
    loss = keras.losses.SparseCategoricalCrossentropy()  # probabilities: softmax on the head
    model = keras.Sequential([*model.layers[:-1], keras.layers.Dense(3, activation="softmax", name="probs")])
    model.build((None, 4))
    _influence(model, train, "cg", loss="sparse_categorical_crossentropy", damping=2.0).scores(test)
    before = compiled.trace_count()
    scores = _influence(model, train, "cg", loss="sparse_categorical_crossentropy", damping=2.0).scores(test)
    assert compiled.trace_count() == before
    assert helpers.relative_error(scores, _exact_scores(model, train, test, 2.0, loss=loss)[0]) < 1e-9


def test_other_variables_loss_or_mode_get_their_own_functions(float64, rng):
    model = models.mlp()
    train, test = _data(rng), _data(rng, n=4)
    _influence(model, train, "cg", damping=2.0).scores(test)

    before = compiled.trace_count()
    head = _influence(model, train, "cg", damping=2.0, variables="head").scores(test)
    assert compiled.trace_count() > before  # another selection of variables: traced for it
    exact_head = _exact_scores(model, train, test, 2.0, variables=model.get_layer("head").trainable_variables)[0]
    assert helpers.relative_error(head, exact_head) < 1e-9

    def squared_logits(y, logits):  # another loss, known only by identity
        return tf.reduce_sum(tf.square(logits - tf.one_hot(tf.cast(y, tf.int32), 3, dtype=logits.dtype)), axis=-1)

    before = compiled.trace_count()
    other = _influence(model, train, "cg", damping=2.0, loss=squared_logits).scores(test)
    assert compiled.trace_count() > before
    assert helpers.relative_error(other, _exact_scores(model, train, test, 2.0, loss=squared_logits)[0]) < 1e-9

    before = compiled.trace_count()
    back = _influence(model, train, "cg", damping=2.0, mode="forward_over_back").scores(test)  # not the default
    assert compiled.trace_count() > before
    assert helpers.relative_error(back, _exact_scores(model, train, test, 2.0)[0]) < 1e-9


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_new_weights_are_read_without_retracing(float64, rng, method):
    model = models.mlp()
    train, test = _data(rng), _data(rng, n=4)
    old = _influence(model, train, method).scores(test)
    for variable in model.trainable_variables:  # "retraining"
        variable.assign(variable + 0.3 * rng.standard_normal(variable.shape))
    before = compiled.trace_count()
    new = _influence(model, train, method).scores(test)
    assert compiled.trace_count() == before
    exact = _exact_scores(model, train, test, DAMPING)[0]
    assert helpers.relative_error(new, exact) < 1e-9
    assert helpers.relative_error(old, exact) > 1e-3  # the weights did change the scores


def test_another_model_of_the_same_architecture_is_not_shared(float64, rng):
    train, test = _data(rng), _data(rng, n=4)
    first = models.mlp()
    _influence(first, train, "direct").scores(test)
    second = models.mlp()  # same layers and shapes, other weights and variables
    before = compiled.trace_count()
    scores = _influence(second, train, "direct").scores(test)
    assert compiled.trace_count() > before
    assert helpers.relative_error(scores, _exact_scores(second, train, test, DAMPING)[0]) < 1e-9


def test_cache_keeps_no_model_alive(float64, rng):
    train, test = _data(rng), _data(rng, n=3)

    def run():
        model = models.mlp()
        influence = _influence(model, train, "cg")
        influence.scores(test)
        return weakref.ref(model), weakref.ref(influence)

    model_ref, influence_ref = run()
    gc.collect()
    assert influence_ref() is None
    assert model_ref() is None
