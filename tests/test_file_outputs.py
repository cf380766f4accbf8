"""Files the library writes: the target is checked first, errors name it, and nothing else is ever replaced."""

import os
import tempfile

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import models

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def influence(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=26)
    inf = tfi.Influence(model, sce, (x[:20], y[:20]), method="direct", damping=0.5, curvature="gauss_newton",
                        batch_size=5, progress=False)
    return inf, (x[20:], y[20:])


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in (a chmod 555 folder; as root, which ignores modes, /sys)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (str(folder), "/sys"):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            yield candidate
            folder.chmod(0o755)
            return
    folder.chmod(0o755)
    pytest.skip("no folder here refuses new files")


def _listing(folder):
    return sorted(os.listdir(folder))


def test_score_to_file_checks_its_target_first(influence, tmp_path, read_only_folder):
    inf, test = influence
    calls = []
    inf.test_inverse_hvps = lambda data: calls.append(1)  # nothing may be computed before the checks
    missing = tmp_path / "missing" / "scores.npy"
    with pytest.raises(tfi.InputError, match=rf"score_to_file path '{missing}': the folder .*missing' does not exist"):
        tfi.score_to_file(inf, test, missing)
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(tfi.InputError, match=r"score_to_file path '.*folder.npy' is a directory"):
        tfi.score_to_file(inf, test, tmp_path / "folder.npy")
    target = os.path.join(read_only_folder, "scores.npy")
    with pytest.raises(tfi.InputError, match=rf"score_to_file path '{target}': cannot write in the folder"):
        tfi.score_to_file(inf, test, target)
    foreign = tmp_path / "mine.npy"
    np.save(foreign, np.arange(3))
    with pytest.raises(tfi.InputError, match=r"'.*mine.npy' already exists and is not a previous output"):
        tfi.score_to_file(inf, test, foreign)
    np.testing.assert_array_equal(np.load(foreign), np.arange(3))  # the user's file is untouched
    assert calls == [] and _listing(tmp_path) == ["folder.npy", "mine.npy", "read_only"]


def test_score_to_file_replaces_its_own_output(influence, tmp_path):
    inf, test = influence
    path = tmp_path / "scores.npy"
    first = np.array(tfi.score_to_file(inf, test, path))
    again = tfi.score_to_file(inf, test, path, resume=False)
    np.testing.assert_array_equal(again, first)
    assert _listing(tmp_path) == ["scores.npy", "scores.npy.ihvp.npy", "scores.npy.progress.json"]


def test_export_checks_its_target_and_overwrites_only_its_own_exports(influence, tmp_path, read_only_folder):
    inf, _ = influence
    target = os.path.join(read_only_folder, "model")
    with pytest.raises(tfi.InputError, match=rf"export path '{target}': cannot write in the folder"):
        tfi.export_saved_model(inf, target)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(tfi.InputError, match=r"'.*notes.txt' is an existing file; the output is a directory"):
        tfi.export_saved_model(inf, a_file, overwrite=True)
    assert a_file.read_text() == "keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(tfi.InputError, match=r"'.*other' already exists and is not a previous output of tf_influence"):
        tfi.export_saved_model(inf, other, overwrite=True)
    assert _listing(other) == ["data.csv"]

    exported = tmp_path / "exported"
    tfi.export_saved_model(inf, exported)
    with pytest.raises(tfi.InputError, match="already exists. Pass overwrite=True"):
        tfi.export_saved_model(inf, exported)
    tfi.export_saved_model(inf, exported, overwrite=True)  # an earlier export is replaced
    assert tfi.export.is_influence_export(exported) and not tfi.export.is_influence_export(other)
    assert _listing(tmp_path) == ["exported", "notes.txt", "other", "read_only"]
