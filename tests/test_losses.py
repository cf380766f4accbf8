"""Losses as Keras computes them: rank alignment, multi-output losses, and warnings where numbers would be wrong."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, relative_error
from tests.test_inputs import _assert_unchanged, _snapshot
from tf_influence.influence.influence import check_scores

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _reference_scores(model, loss_fn, train, test, damping):
    """`G_test (H + λI)⁻¹ G_trainᵀ` from nested tapes and an explicit per-example `loss_fn` (no library code)."""
    variables = [v.value for v in model.trainable_variables]

    def gradients(x, y):
        with tf.GradientTape() as tape:
            losses = loss_fn(y, model(x))
        jacobian = tape.jacobian(losses, variables)
        return np.concatenate([tf.reshape(j, [len(losses), -1]).numpy() for j in jacobian], axis=1)

    hessian = dense_hessian(model, loss_fn, *train)
    damped = hessian + damping * np.eye(len(hessian))
    return gradients(*test) @ np.linalg.solve(damped, gradients(*train).T)


def test_custom_loss_aligns_flat_labels_with_column_outputs_as_keras(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(1)])
    x, y = rng.standard_normal((30, 4)), rng.standard_normal(30)  # labels [n], outputs [n, 1]

    def squared(y_true, y_pred):
        return tf.square(y_true - y_pred)  # broadcasts [n] against [n, 1] to [n, n] unless aligned

    model.compile(loss=squared)
    keras_loss = model.evaluate(x, y, verbose=0, batch_size=30)
    objective = tfi.Objective(model, squared)
    np.testing.assert_allclose(np.mean(objective.per_example_loss(tf.constant(y), model(x))), keras_loss, rtol=1e-6)

    snapshot = _snapshot(model)
    inf = tfi.Influence(model, squared, (x[:24], y[:24]), method="direct", damping=0.5, progress=False)
    expected = _reference_scores(model, lambda t, p: tf.square(t[:, None] - p)[:, 0], (x[:24], y[:24]),
                                 (x[24:], y[24:]), 0.5)
    assert relative_error(inf.scores((x[24:], y[24:])), expected) <= 1e-8
    _assert_unchanged(model, snapshot)


def test_binary_crossentropy_by_name_takes_flat_labels(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    x = rng.standard_normal((20, 4))
    y = (rng.random(20) > 0.5).astype("float64")
    inf = tfi.Influence(model, "binary_crossentropy", (x, y), method="direct", damping=0.1, progress=False)
    column = tfi.Influence(model, "binary_crossentropy", (x, y[:, None]), method="direct", damping=0.1,
                           progress=False)
    np.testing.assert_allclose(inf.scores((x[:3], y[:3])), column.scores((x[:3], y[:3, None])), rtol=1e-12)
    expected = keras.losses.BinaryCrossentropy(reduction=None)(y[:, None], model(x)).numpy()
    np.testing.assert_allclose(inf.objective.per_example_loss(tf.constant(y), model(x)), expected, rtol=1e-12)


def _two_outputs():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, [keras.layers.Dense(3, name="cls")(hidden), keras.layers.Dense(1, name="reg")(hidden)])


def test_multi_output_losses_with_weights_as_model_compile(float64, rng):
    model = _two_outputs()
    x = rng.standard_normal((30, 4))
    y = {"cls": rng.integers(0, 3, 30), "reg": rng.standard_normal((30, 1))}
    losses, weights = {"cls": sce, "reg": "mse"}, {"cls": 1.0, "reg": 0.5}
    model.compile(loss=losses, loss_weights=weights)
    keras_loss = model.evaluate(x, y, verbose=0, batch_size=30, return_dict=True)["loss"]
    objective = tfi.Objective(model, losses, loss_weights=weights)
    assert "cls" in objective.loss_name and "0.5·reg: mse" in objective.loss_name
    np.testing.assert_allclose(np.mean(objective.per_example_loss(y, model(x))), keras_loss, rtol=1e-6)

    snapshot = _snapshot(model)
    train = (x[:24], {k: v[:24] for k, v in y.items()})
    test = (x[24:], {k: v[24:] for k, v in y.items()})
    inf = tfi.Influence(model, losses, train, loss_weights=weights, method="direct", damping=0.5, progress=False)

    def combined(labels, outputs):
        cls = keras.losses.sparse_categorical_crossentropy(labels["cls"], outputs[0], from_logits=True)
        return cls + 0.5 * tf.reduce_mean(tf.square(tf.cast(labels["reg"], tf.float64) - outputs[1]), axis=-1)

    expected = _reference_scores(model, combined, train, test, 0.5)
    assert relative_error(inf.scores(test), expected) <= 1e-8
    by_position = tfi.Influence(model, [sce, "mse"], (train[0], (train[1]["cls"], train[1]["reg"])),
                                loss_weights=[1.0, 0.5], method="direct", damping=0.5, progress=False)
    assert relative_error(by_position.scores((test[0], (test[1]["cls"], test[1]["reg"]))), expected) <= 1e-8
    _assert_unchanged(model, snapshot)


def test_multi_output_mistakes_say_how_to_combine(float64, rng):
    model = _two_outputs()
    x = rng.standard_normal((10, 4))
    y = {"cls": rng.integers(0, 3, 10), "reg": rng.standard_normal((10, 1))}
    with pytest.raises(tfi.InputError, match=r"one loss for one output.*2 outputs \['cls', 'reg'\].*loss=\{'cls': "
                                             r"\.\.\., 'reg': \.\.\.\}.*loss_weights"):
        tfi.Influence(model, sce, (x, y), damping=0.5, progress=False)
    with pytest.raises(tfi.InputError, match=r"outputs \['clas'\] that the model does not have.*\['cls', 'reg'\]"):
        tfi.Influence(model, {"clas": sce}, (x, y), damping=0.5, progress=False)
    with pytest.raises(tfi.InputError, match="loss_weights must match loss"):
        tfi.Influence(model, {"cls": sce, "reg": "mse"}, (x, y), loss_weights=[1.0, 2.0], damping=0.5, progress=False)
    with pytest.raises(tfi.InputError, match="loss_weights weigh the losses of a multi-output model"):
        tfi.Influence(models.mlp(), sce, (x, y["cls"]), loss_weights=[1.0], damping=0.5, progress=False)
    with pytest.raises(tfi.InputError, match="y is a single array.*one label array per output"):
        tfi.Influence(model, {"cls": sce, "reg": "mse"}, (x, y["cls"]), damping=0.5, progress=False)


def _our_warnings(record):
    return [str(w.message) for w in record if "tf_influence" in w.filename or "loss" in str(w.message)]


def test_probabilities_given_to_a_logits_loss_warn_and_the_reverse(float64, rng):
    x, y = models.classification_data(rng, n=12)
    softmax = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.warns(UserWarning, match=r"from_logits=True, but the model's outputs look like probabilities.*"
                                         r"softmax activation.*from_logits=False"):
        tfi.Influence(softmax, sce, (x, y), damping=0.5, progress=False)
    logits = models.mlp()
    with pytest.warns(UserWarning, match=r"expects probabilities \(from_logits=False.*look like logits.*"
                                         r"from_logits=True"):
        tfi.Influence(logits, "sparse_categorical_crossentropy", (x, y), damping=0.5, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        inf = tfi.Influence(logits, sce, (x, y), damping=0.5, progress=False)
        tfi.Influence(softmax, "sparse_categorical_crossentropy", (x, y), damping=0.5, progress=False)
    assert inf.problem.warnings == [] and not [m for m in _our_warnings(record) if "from_logits" in m]


def test_random_layers_in_training_mode_warn(float64, rng):
    x, y = models.classification_data(rng, n=12)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dropout(0.5, name="drop"), keras.layers.Dense(3)])
    snapshot = _snapshot(model)
    with pytest.warns(UserWarning, match=r"training=True and is random.*\['drop'\].*two identical runs.*"
                                         r"training=False"):
        tfi.Influence(model, sce, (x, y), training=True, damping=0.5, progress=False)
    inf = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", progress=False)
    assert inf.problem.warnings == []
    again = tfi.Influence(model, sce, (x, y), damping=0.5, method="direct", progress=False)
    np.testing.assert_array_equal(inf.scores((x[:2], y[:2])), again.scores((x[:2], y[:2])))
    _assert_unchanged(model, snapshot)


def test_saturated_outputs_warn_that_scores_are_lost(rng):
    keras.utils.set_random_seed(0)
    x, y = models.classification_data(rng, n=40)
    x = x.astype("float32")
    model = models.mlp()  # float32
    model.set_weights([300 * w for w in model.get_weights()])  # logits of several hundred: softmax saturates
    snapshot = _snapshot(model)
    with pytest.warns(UserWarning, match=r"loss of exactly 0.*saturated.*scores will be 0.*very large weights"):
        inf = tfi.Influence(model, sce, (x, y), damping=1.0, method="direct", on_indefinite="ignore",
                            progress=False)
    with pytest.warns(UserWarning, match=r"of 40 training examples have a score of exactly 0 for every test point"):
        scores = inf.scores((x[:5], y[:5]))
    assert np.mean(np.all(scores == 0, axis=0)) >= 0.1
    _assert_unchanged(model, snapshot)


def test_non_finite_scores_are_an_error():
    scores = np.ones((2, 5))
    scores[1, 3] = np.inf
    with pytest.raises(tfi.NotFiniteError, match=r"1 influence scores are NaN/Inf \(training examples \[3\]"):
        check_scores(scores)
    np.testing.assert_array_equal(check_scores(np.ones((2, 5))), np.ones((2, 5)))
