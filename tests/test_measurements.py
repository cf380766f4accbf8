"""Measurements on the test side: scores against brute force, the sign against retraining, and the plumbing.

Brute force: the measurement's per-example gradients by an independent tape (formulas written out
here, not the library's), the dense Hessian of the objective by nested tapes, a dense solve, float64.
"""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, per_example_gradients, relative_error
from tf_influence import validation

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)
# A loss function, not a Keras Loss object: Loss.__call__ casts to the floatx of its construction time.
bce = functools.partial(keras.losses.binary_crossentropy, from_logits=True)
DAMPING = 0.5


def _flat_gradient(value_fn, variables):
    tf_vars = [v.value for v in variables]
    with tf.GradientTape() as tape:
        value = value_fn()
    return np.concatenate([g.numpy().ravel() for g in tape.gradient(value, tf_vars, unconnected_gradients="zero")])


# Independent definitions of the measurements of one example with logits z and label c.
REFERENCE = {
    "margin": lambda z, c: tf.math.log(tf.nn.softmax(z)[c]) - tf.math.log(1.0 - tf.nn.softmax(z)[c]),
    "logit": lambda z, c: z[c],
    "probability": lambda z, c: tf.exp(z[c]) / tf.reduce_sum(tf.exp(z)),
}


def _solved_train_gradients(model, loss, train):
    """`(H + λI)⁻¹ G_trainᵀ` `[p, n_train]` from the dense Hessian (nested tapes) and a dense solve."""
    p = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    h = dense_hessian(model, loss, *train) + DAMPING * np.eye(p)
    g_train = per_example_gradients(tfi.Objective(model, loss), model.trainable_variables, *train)
    return np.linalg.solve(h, g_train.T)


def _brute_force(model, test, measure, solved):
    """`∇m_test (H + λI)⁻¹ G_trainᵀ`: the predicted change of the measurement per unit removal weight."""
    g_test = np.stack([_flat_gradient(lambda i=i: measure(model(test[0][i:i + 1])[0], test[1][i]),
                                      model.trainable_variables) for i in range(len(test[1]))])
    return g_test @ solved


@pytest.fixture(scope="module")
def mlp_data():
    """A float64 tanh MLP on 30 training points, with its brute-force `(H + λI)⁻¹ G_trainᵀ` (shared)."""
    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    model = models.mlp()
    x, y = models.classification_data(np.random.default_rng(0), n=40)
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    yield model, train, test, _solved_train_gradients(model, sce, train)
    keras.backend.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


@pytest.mark.parametrize("kind", ["margin", "logit", "probability"])
def test_class_measurement_scores_equal_brute_force(mlp_data, kind):
    model, train, test, solved = mlp_data
    change = _brute_force(model, test, lambda z, c: REFERENCE[kind](z, int(c)), solved)
    inf = tfi.Influence(model, sce, train, method="direct", damping=DAMPING, progress=False, measurement=kind)
    # Higher is better for these: a helpful example's removal lowers the measurement, so score = −change.
    assert relative_error(inf.scores(test), -change) <= 1e-10
    assert relative_error(inf.predicted_change(test), change / 30) <= 1e-10
    top = inf.top_k(test, 3)
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(change, axis=1, kind="stable")[:, :3])


def test_margin_with_conjugate_gradient(mlp_data):
    model, train, test, solved = mlp_data
    change = _brute_force(model, test, lambda z, c: REFERENCE["margin"](z, int(c)), solved)
    inf = tfi.Influence(model, sce, train, method="cg", damping=DAMPING, tol=1e-12, progress=False,
                        measurement="margin")
    assert relative_error(inf.scores(test), -change) <= 1e-8


def test_margin_of_a_probability_model_equals_that_of_its_logits(mlp_data):
    """The margin is unchanged by a per-example shift of the logits, so log-probabilities give the same one."""
    model, train, test, _ = mlp_data
    probs = keras.Sequential([model, keras.layers.Softmax()])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    expected = tfi.Influence(model, sce, train, method="direct", damping=DAMPING, progress=False,
                             measurement="margin").scores(test)
    inf = tfi.Influence(probs, loss, train, method="direct", damping=DAMPING, progress=False, measurement="margin")
    assert relative_error(inf.scores(test), expected) <= 1e-8
    with pytest.raises(tfi.InputError, match="logits cannot be recovered from probabilities"):
        tfi.Influence(probs, loss, train, method="direct", damping=DAMPING, measurement="logit")


def test_binary_margin_and_one_hot_labels(float64, rng):
    x = rng.standard_normal((36, 4))
    y = (x @ np.array([1.0, -1.0, 0.5, 0.0]) + rng.standard_normal(36) > 0).astype("float64")[:, None]
    model = models.mlp(hidden=5, classes=1)
    train, test = (x[:28], y[:28]), (x[28:], y[28:])
    change = _brute_force(model, test, lambda z, c: (2.0 * float(c[0]) - 1.0) * z[0],
                          _solved_train_gradients(model, bce, train))
    inf = tfi.Influence(model, bce, train, method="direct", damping=DAMPING, progress=False, measurement="margin")
    assert relative_error(inf.predicted_change(test), change / 28) <= 1e-10

    three = models.mlp()
    labels = rng.integers(0, 3, size=36)
    one_hot = np.eye(3)[labels]
    cce = keras.losses.CategoricalCrossentropy(from_logits=True)
    sparse = tfi.Influence(three, sce, (x[:28], labels[:28]), method="direct", damping=DAMPING, progress=False,
                           measurement="margin").scores((x[28:], labels[28:]))
    dense = tfi.Influence(three, cce, (x[:28], one_hot[:28]), method="direct", damping=DAMPING, progress=False,
                          measurement="margin").scores((x[28:], one_hot[28:]))
    assert relative_error(dense, sparse) <= 1e-10


def test_output_name_and_functions_on_a_two_output_model(float64, rng):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3, name="cls")(hidden), keras.layers.Dense(1, name="reg")(hidden)])

    def loss(y, outputs):
        return sce(y[0], outputs[0]) + tf.reduce_mean((y[1] - outputs[1]) ** 2, axis=-1)

    x, labels = models.classification_data(rng, n=36)
    targets = rng.standard_normal((36, 1))
    train, test = (x[:28], (labels[:28], targets[:28])), (x[28:], (labels[28:], targets[28:]))
    for measurement, reference in [
            ("reg", lambda out, i: out[1][0, 0]),
            (tfi.measurements.margin(output="cls", from_logits=True),
             lambda out, i: REFERENCE["margin"](out[0][0], int(labels[28 + i])))]:
        h = dense_hessian(model, loss, *train) + DAMPING * np.eye(sum(int(np.prod(v.shape)) for v in
                                                                      model.trainable_variables))
        g_train = per_example_gradients(tfi.Objective(model, loss), model.trainable_variables, *train)
        g_test = np.stack([_flat_gradient(lambda i=i: reference(model(x[28 + i:29 + i]), i), model.trainable_variables)
                           for i in range(8)])
        inf = tfi.Influence(model, loss, train, method="direct", damping=DAMPING, progress=False,
                            measurement=measurement)
        assert relative_error(inf.predicted_change(test), g_test @ np.linalg.solve(h, g_train.T) / 28) <= 1e-10

    # A loss-like function: a positive score means the example lowered it, so score = +change.
    squared = tfi.Measurement(lambda y, out: (out[1][:, 0] - y[1][:, 0]) ** 2, name="squared error",
                              higher_is_better=False)
    inf = tfi.Influence(model, loss, train, method="direct", damping=DAMPING, progress=False, measurement=squared)
    change = inf.predicted_change(test) * 28
    assert relative_error(inf.scores(test), change) <= 1e-14 and np.abs(change).max() > 0
    with pytest.raises(tfi.InputError, match=r"Unknown measurement 'nope'.*\['cls', 'reg'\]"):
        tfi.Influence(model, loss, train, measurement="nope")
    with pytest.raises(tfi.InputError, match="choose one with output=NAME"):
        tfi.Influence(model, loss, train, measurement=tfi.measurements.margin(from_logits=True)).scores(test)


def test_margin_sign_matches_leave_one_out_retraining(float64, breast_cancer_optimum):
    """Removing a training point and retraining moves the test margin as `predicted_change` says (logistic
    regression at its l2 = 0.1 optimum, fitted once per session in conftest.py)."""
    train, test, l2, weights = breast_cancer_optimum
    assert l2 == 0.1
    model = models.logistic_regression(train[0].shape[1])
    model.set_weights(weights)
    test = (test[0][:3], test[1][:3])
    inf = tfi.Influence(model, bce, train, l2=0.1, method="direct", progress=False, measurement="margin")
    predicted = inf.predicted_change(test)
    top = np.argsort(-np.abs(predicted).max(axis=0))[:12]
    result = validation.leave_one_out(model, bce, train, test, top, predicted=predicted[:, top], l2=0.1,
                                      measurement="margin")
    print(f"margin, leave-one-out vs predicted: Pearson {result.pearson:.4f}, Spearman {result.spearman:.4f}")
    assert result.pearson >= 0.99, result.pearson
    big = np.abs(predicted[:, top]) > 0.1 * np.abs(predicted[:, top]).max()
    assert np.all(np.sign(result.actual[big]) == np.sign(predicted[:, top][big]))


def test_measurement_reaches_streaming_and_export(mlp_data, tmp_path):
    model, train, test, _ = mlp_data
    inf = tfi.Influence(model, sce, train, method="direct", damping=DAMPING, progress=False, measurement="margin")
    expected = inf.scores(test)
    np.testing.assert_allclose(tfi.score_to_file(inf, test, tmp_path / "scores.npy"), expected, rtol=1e-12)
    loss_inf = tfi.Influence(model, sce, train, method="direct", damping=DAMPING, progress=False)
    with pytest.raises(tfi.InputError, match="cannot be resumed"):  # another measurement is another run
        tfi.score_to_file(loss_inf, test, tmp_path / "scores.npy")
    with pytest.raises(tfi.InputError, match="use predicted_change"):
        inf.predicted_loss_change(test)

    tfi.export_saved_model(inf, tmp_path / "exported")
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    out = loaded.signatures["influence"](x=tf.constant(test[0]), y=tf.constant(test[1]))
    np.testing.assert_allclose(out["scores"].numpy(), expected, rtol=1e-8, atol=1e-12)
    logits = model(test[0]).numpy()
    margins = [float(REFERENCE["margin"](tf.constant(z), int(c))) for z, c in zip(logits, test[1])]
    np.testing.assert_allclose(out["measurement"].numpy(), margins, rtol=1e-10)
    settings = json.loads(loaded.settings.numpy())
    assert settings["measurement"] == "margin" and settings["higher_is_better"]


def test_cli_measurement_flag(tmp_path, float64, rng, capsys):
    from tf_influence.__main__ import main

    model = models.mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    x, y = models.classification_data(rng, n=30)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "train.npz", x=x[:24], y=y[:24])
    np.savez(tmp_path / "test.npz", x=x[24:], y=y[24:])
    args = ["explain", "--model", str(tmp_path / "model.keras"), "--train", str(tmp_path / "train.npz"), "--test",
            str(tmp_path / "test.npz"), "--output", str(tmp_path / "out.npz"), "--quiet", "--method", "direct",
            "--damping", "0.5"]
    assert main([*args, "--measurement", "margin"]) == 0
    inf = tfi.Influence(model, loss, (x[:24], y[:24]), method="direct", damping=0.5, progress=False,
                        measurement="margin")
    with np.load(tmp_path / "out.npz") as result:
        np.testing.assert_allclose(result["scores"], inf.scores((x[24:], y[24:])), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(result["predicted_change"], inf.predicted_change((x[24:], y[24:])), rtol=1e-6,
                                   atol=1e-9)
        assert "predicted_loss_change" not in result.files
        assert json.loads(str(result["settings"]))["measurement"] == "margin"
    with pytest.raises(SystemExit):
        main([*args, "--measurement", "nope"])
    assert "error: --measurement nope: Unknown measurement 'nope'" in capsys.readouterr().err


def test_bad_measurements(mlp_data):
    model, train, test, _ = mlp_data

    def custom_loss(y, out):
        return sce(y, out)

    with pytest.raises(tfi.InputError, match=r"does not say \(no from_logits\).*margin\(from_logits=True\)"):
        tfi.Influence(model, custom_loss, train, measurement="margin")
    inf = tfi.Influence(model, custom_loss, train, method="direct", damping=DAMPING, progress=False,
                        measurement=tfi.measurements.margin(from_logits=True))
    assert inf.scores(test).shape == (10, 30)
    with pytest.raises(tfi.InputError, match=r"returned shape \(\) on test; expected one value per example"):
        tfi.Influence(model, sce, train, measurement=lambda y, out: tf.reduce_sum(out)).scores(test)
    with pytest.raises(tfi.InputError, match="measurement must be None, a name"):
        tfi.Influence(model, sce, train, measurement=3)
