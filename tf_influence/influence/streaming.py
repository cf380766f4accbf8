"""`score_to_file`: the `[n_test, n_train]` score matrix written to disk batch by batch, resumable.

For training sets too large to score in one sitting. Memory stays bounded by one training batch
(the scores go straight into a `.npy` memmap); progress is saved after every batch, so a run that
is interrupted (Ctrl-C, a pre-empted machine) resumes where it stopped when called again.

Files next to `path` (e.g. `scores.npy`):
  scores.npy              the matrix (float64), valid for the batches recorded as done
  scores.npy.ihvp.npy     the test inverse-HVPs `[n_test, p]` (computed once, reused on resume)
  scores.npy.progress.json  fingerprint of the run (weights, test data, settings) and batches done
"""

import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.files import atomic_save_npy, atomic_write_json


def score_to_file(influence, test, path, *, resume=True, progress=None):
    """Writes `influence.scores(test)` to the `.npy` file `path`, one training batch at a time.

    Args:
      influence: a `tfi.Influence`.
      test: test data, arrays or tf.data (as for `Influence.scores`).
      path: output `.npy` file.
      resume: continue an interrupted run for the same model weights, test data and settings
        (refused with an error if they differ); `False` starts over.
      progress: show a progress bar with an ETA (default: `influence.progress`).

    Returns:
      The scores as a read-only `np.memmap` `[n_test, n_train]` (positive = helpful), of the
      Influence's measurement (the loss by default).

    Example:
      >>> scores = tfi.score_to_file(inf, (x_test, y_test), "scores.npy")   # Ctrl-C, then again:
      >>> scores = tfi.score_to_file(inf, (x_test, y_test), "scores.npy")   # resumes
      >>> scores[0].argmax()
    """
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise InputError(f"path must end with '.npy' (a NumPy file). Received {path!r}.")
    state_path, ihvp_path = path + ".progress.json", path + ".ihvp.npy"
    dataset = influence.test_dataset(test)
    fingerprint = _fingerprint(influence, dataset)
    state = _read_state(state_path)
    if state is not None and resume and state["fingerprint"] != fingerprint:
        raise InputError(
            f"{path!r} holds a run for other model weights, test data or settings; it cannot be resumed. "
            "Pass resume=False to start over, or another path.")
    n_train = influence.n_train
    if state is not None and resume and os.path.exists(path) and os.path.exists(ihvp_path):
        directions = np.load(ihvp_path)
        scores = np.lib.format.open_memmap(path, mode="r+")
        done = state["batches_done"]
    else:
        directions = influence.test_inverse_hvps(dataset)
        atomic_save_npy(ihvp_path, directions)
        scores = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(len(directions), n_train))
        done = 0
        _write_state(state_path, fingerprint, 0, False)
    if scores.shape != (len(directions), n_train):
        raise InputError(f"{path!r} has shape {scores.shape}; expected {(len(directions), n_train)}.")

    directions_tensor = tf.constant(directions, influence.space.dtype)
    train = influence.problem.dataset
    cardinality = int(train.cardinality())
    show = influence.progress if progress is None else progress
    bar = keras.utils.Progbar(cardinality if cardinality > 0 else None, verbose=1 if show else 0,
                              unit_name="batch")
    offset = _offset_after(train, done)
    started = time.perf_counter()
    for step, batch in enumerate(train.skip(done), start=done):
        columns = influence.gradient_dots(batch, directions_tensor).numpy()  # [batch, n_test]
        scores[:, offset:offset + len(columns)] = columns.T
        scores.flush()
        offset += len(columns)
        _write_state(state_path, fingerprint, step + 1, False)
        bar.update(step + 1)
    if offset != n_train:
        raise InputError(f"Scored {offset} training examples but the data holds {n_train}; was it changed?")
    _write_state(state_path, fingerprint, _read_state(state_path)["batches_done"], True,
                 seconds=time.perf_counter() - started)
    del scores
    return np.load(path, mmap_mode="r")


def _offset_after(train, batches):
    """Training examples in the first `batches` batches (reads only their weights)."""
    if batches == 0:
        return 0
    return sum(int(tf.shape(w)[0]) for _, _, w in train.take(batches))


def _fingerprint(influence, test_dataset):
    digest = hashlib.sha1()
    digest.update(influence.check_weights().encode())  # the model weights (refreshes stale caches)
    settings = (influence.method, influence.damping, influence.objective.l2, influence.source.curvature,
                influence.space.size, influence.n_train, repr(influence.solver), repr(influence.measurement))
    digest.update(repr(settings).encode())
    for x, y, _ in test_dataset:
        for t in tf.nest.flatten((x, y)):
            digest.update(np.ascontiguousarray(t.numpy()).tobytes())
    return digest.hexdigest()


def _read_state(state_path):
    if not os.path.exists(state_path):
        return None
    with open(state_path) as f:
        return json.load(f)


def _write_state(state_path, fingerprint, batches_done, complete, **extra):
    atomic_write_json(state_path, {"fingerprint": fingerprint, "batches_done": batches_done, "complete": complete,
                                   **extra})
