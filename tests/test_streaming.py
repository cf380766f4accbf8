"""Scores written to disk batch by batch: resumable after an interruption, bounded memory."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import models
from tests.helpers import script_environment

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def influence(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=50)
    inf = tfi.Influence(model, sce, (x[:43], y[:43]), method="direct", damping=0.5,
                        curvature="gauss_newton", batch_size=5, progress=False)
    return inf, (x[43:], y[43:])


def test_interrupted_run_resumes_to_the_uninterrupted_matrix(influence, tmp_path):
    inf, test = influence
    expected = inf.scores(test)
    path = tmp_path / "scores.npy"
    dots, calls = inf.gradient_dots, []

    def interrupted(batch, directions):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return dots(batch, directions)

    inf.gradient_dots = interrupted
    with pytest.raises(KeyboardInterrupt):
        tfi.score_to_file(inf, test, path)
    state = json.loads((tmp_path / "scores.npy.progress.json").read_text())
    assert state["batches_done"] == 3 and not state["complete"]

    inf.gradient_dots = lambda batch, directions: calls.append(1) or dots(batch, directions)
    inf.test_inverse_hvps = lambda data: pytest.fail("a resumed run must reuse the saved test IHVPs")
    calls.clear()
    scores = tfi.score_to_file(inf, test, path)
    assert len(calls) == 9 - 3  # 43 examples in batches of 5: 9 batches, 3 were done
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-15)
    assert json.loads((tmp_path / "scores.npy.progress.json").read_text())["complete"]


def test_resume_with_other_weights_is_refused(influence, tmp_path):
    inf, test = influence
    path = tmp_path / "scores.npy"
    tfi.score_to_file(inf, test, path)
    inf.model.layers[0].bias.assign(inf.model.layers[0].bias + 0.1)
    with pytest.warns(UserWarning, match="weights changed"), pytest.raises(tfi.InputError, match="cannot be resumed"):
        tfi.score_to_file(inf, test, path)
    fresh = tfi.score_to_file(inf, test, path, resume=False)
    np.testing.assert_allclose(fresh, inf.scores(test), rtol=1e-12, atol=1e-15)
    with pytest.raises(tfi.InputError, match="must end with '.npy'"):
        tfi.score_to_file(inf, test, tmp_path / "scores.csv")


MEMORY_SCRIPT = pathlib.Path(__file__).resolve().parent / "scripts" / "streaming_memory.py"


def test_peak_memory_does_not_grow_with_n_train(tmp_path):
    """Both sizes run at once in their own processes (each samples its own resident set, so running
    side by side changes no peak, and the second core is used while each imports TensorFlow). Output goes
    to files: a full pipe would stall the process not yet read."""
    procs = {}
    for n in (10_000, 50_000):
        with open(tmp_path / f"{n}.out", "w") as out, open(tmp_path / f"{n}.err", "w") as err:
            procs[n] = subprocess.Popen([sys.executable, str(MEMORY_SCRIPT), str(n), str(tmp_path / f"s{n}.npy")],
                                        stdout=out, stderr=err, text=True, env=script_environment())
    peaks = {}
    try:
        for n, proc in procs.items():
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{n}.err").read_text()[-3000:]
            peaks[n] = int((tmp_path / f"{n}.out").read_text().strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"peak RSS while scoring (bytes): {peaks}")
    assert peaks[50_000] < 1.2 * peaks[10_000], peaks


def test_resume_after_the_training_data_changed_is_refused(influence, tmp_path):
    inf, test = influence
    path = tmp_path / "scores.npy"
    x, y = (np.concatenate([b.numpy() for b in parts]) for parts in zip(*[(bx, by) for bx, by, _ in
                                                                          inf.problem.dataset]))
    tfi.score_to_file(inf, test, path)
    corrected = y.copy()
    corrected[7] = (corrected[7] + 1) % 3  # a corrected label: same shapes, other scores
    relabelled = tfi.Influence(inf.model, sce, (x, corrected), method="direct", damping=0.5,
                               curvature="gauss_newton", batch_size=5, progress=False)
    before = np.array(np.load(path))
    with pytest.raises(tfi.InputError, match=r"holds a run for other training data than this call's; it cannot be "
                                             r"resumed.*resume=False"):
        tfi.score_to_file(relabelled, test, path)
    np.testing.assert_array_equal(np.load(path), before)  # the earlier run is left as it was
    rebatched = tfi.Influence(inf.model, sce, (x, y), method="direct", damping=0.5, curvature="gauss_newton",
                              batch_size=4, progress=False)
    with pytest.raises(tfi.InputError, match="other batching than this call's"):
        tfi.score_to_file(rebatched, test, path)
    fresh = tfi.score_to_file(relabelled, test, path, resume=False)
    np.testing.assert_allclose(fresh, relabelled.scores(test), rtol=1e-12, atol=1e-15)
