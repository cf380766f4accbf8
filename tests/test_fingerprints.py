"""Saved and given EKFAC factors carry the weights and training data they were fitted on, and refuse others."""

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import models
from tf_influence.curvature import fit_factors, load_factors, save_factors

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def fitted(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=30)
    factors = fit_factors(tfi.Problem(model, sce, (x, y), batch_size=10), method="ekfac", fisher="ggn")
    return model, x, y, factors


def _relabelled(y):
    corrected = y.copy()
    corrected[4] = (corrected[4] + 1) % 3
    return corrected


def test_saved_factors_refuse_other_training_data_and_later_weights(fitted, tmp_path):
    model, x, y, factors = fitted
    save_factors(factors, tmp_path / "f")
    loaded, _ = load_factors(tmp_path / "f", model, data=(x, y))
    assert loaded.data_fingerprint == factors.data_fingerprint and loaded.model_fingerprint == factors.model_fingerprint
    load_factors(tmp_path / "f", model, data=tfi.as_dataset((x, y), batch_size=7))  # batching does not matter
    with pytest.raises(tfi.InputError, match="training data differ from those the factors .* were fitted on"):
        load_factors(tmp_path / "f", model, data=(x, _relabelled(y)))

    # Saved after the weights changed: the record is of the weights they were fitted on.
    original = model.get_weights()
    model.set_weights([w * 1.01 for w in original])
    save_factors(factors, tmp_path / "g")
    with pytest.raises(tfi.InputError, match="weights differ from those the factors"):
        load_factors(tmp_path / "g", model)
    model.set_weights(original)
    load_factors(tmp_path / "g", model)


def test_given_factors_are_refused_for_other_weights_or_data(fitted):
    model, x, y, factors = fitted
    method = tfi.solvers.EKFAC(factors=factors)
    given = tfi.Influence(model, sce, (x, y), method=method, damping=0.1, batch_size=10, progress=False)
    fresh = tfi.Influence(model, sce, (x, y), method="ekfac", fisher="ggn", damping=0.1, batch_size=10,
                          progress=False)
    np.testing.assert_allclose(given.scores((x[:2], y[:2])), fresh.scores((x[:2], y[:2])), rtol=1e-10)
    relabelled = tfi.Influence(model, sce, (x, _relabelled(y)), method=method, damping=0.1, progress=False)
    with pytest.raises(tfi.InputError, match="fitted on other training data than this problem's.*Refit"):
        relabelled.scores((x[:2], y[:2]))
    model.layers[0].bias.assign(model.layers[0].bias + 0.1)
    moved = tfi.Influence(model, sce, (x, y), method=method, damping=0.1, progress=False)
    with pytest.raises(tfi.InputError, match="fitted on other model weights than this problem's"):
        moved.scores((x[:2], y[:2]))


def test_save_factors_never_replaces_other_files(fitted, tmp_path):
    _, _, _, factors = fitted
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "settings.json").write_text('{"learning_rate": 0.1}')
    with pytest.raises(tfi.InputError, match=r"save_factors file '.*settings.json' already exists and is not a "
                                             "previous output"):
        save_factors(factors, folder)
    assert (folder / "settings.json").read_text() == '{"learning_rate": 0.1}' and sorted(
        p.name for p in folder.iterdir()) == ["settings.json"]
    save_factors(factors, tmp_path / "f")
    save_factors(factors, tmp_path / "f")  # its own earlier output is replaced
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["factors.npz", "settings.json"]
