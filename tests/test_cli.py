"""`python -m tf_influence explain` on a saved Keras model and .npz data."""

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tf_influence.__main__ import main
from tests import models


@pytest.fixture
def saved(tmp_path, float64, rng):
    model = models.mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = models.classification_data(rng, n=30)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "train.npz", x=x[:24], y=y[:24])
    np.savez(tmp_path / "test.npz", x=x[24:], y=y[24:])
    return tmp_path, model, (x[:24], y[:24]), (x[24:], y[24:])


def test_explain_writes_the_library_scores(saved, capsys):
    path, model, train, test = saved
    out = path / "scores.npz"
    code = main(["explain", "--model", str(path / "model.keras"), "--train", str(path / "train.npz"),
                 "--test", str(path / "test.npz"), "--method", "direct", "--damping", "0.5",
                 "--top-k", "3", "--output", str(out), "--quiet"])
    assert code == 0
    inf = tfi.Influence(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), train,
                        method="direct", damping=0.5, progress=False)
    expected = inf.scores(test)
    with np.load(out) as result:
        np.testing.assert_allclose(result["scores"], expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(result["predicted_loss_change"], expected / 24, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(result["helpful_indices"], np.argsort(-expected, axis=1)[:, :3])
    assert "most helpful" in capsys.readouterr().out


def test_explain_bad_input_names_the_problem(saved):
    path, *_ = saved
    np.savez(path / "bad.npz", x=np.zeros((3, 4)))
    with pytest.raises(tfi.InputError, match="needs arrays 'x' and 'y'"):
        main(["explain", "--model", str(path / "model.keras"), "--train", str(path / "bad.npz"),
              "--test", str(path / "test.npz")])
    with pytest.raises(tfi.InputError, match="does not exist"):
        main(["explain", "--model", str(path / "model.keras"), "--train", str(path / "missing.npz"),
              "--test", str(path / "test.npz")])


def test_export_writes_a_servable_model(saved, capsys):
    import tensorflow as tf

    path, model, train, test = saved
    code = main(["export", "--model", str(path / "model.keras"), "--train", str(path / "train.npz"),
                 "--out", str(path / "exported"), "--method", "direct", "--damping", "0.5"])
    assert code == 0 and "signatures influence, top_k" in capsys.readouterr().out
    scorer = tf.saved_model.load(str(path / "exported"))
    scores = scorer.signatures["influence"](x=tf.constant(test[0]), y=tf.constant(test[1]))["scores"].numpy()
    inf = tfi.Influence(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), train,
                        method="direct", damping=0.5, progress=False)
    np.testing.assert_allclose(scores, inf.scores(test), rtol=1e-6, atol=1e-9)
    with pytest.raises(tfi.InputError, match="already exists"):
        main(["export", "--model", str(path / "model.keras"), "--train", str(path / "train.npz"),
              "--out", str(path / "exported")])
