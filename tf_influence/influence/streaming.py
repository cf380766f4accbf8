"""`score_to_file`: the `[n_test, n_train]` score matrix written to disk batch by batch, resumable.

For training sets too large to score in one sitting. Memory stays bounded by one training batch
(the scores go straight into a `.npy` memmap); progress is saved after every batch, so a run that
is interrupted (Ctrl-C, a pre-empted machine) resumes where it stopped when called again.

Files next to `path` (e.g. `scores.npy`):
  scores.npy              the matrix (float64), valid for the batches recorded as done
  scores.npy.ihvp.npy     the test inverse-HVPs `[n_test, p]` (computed once, reused on resume)
  scores.npy.progress.json  fingerprint of the run (weights, training data, test data, settings) and batches done

A run is resumed only when everything the scores depend on is unchanged: the model's weights, the
training data as batched (a streamed hash over every batch: corrected labels of the same shape
count), the test data, and the settings (loss, l2, training flag, variables, method and its
options, damping, curvature, mode). Otherwise the error says which of them changed.
"""

import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_influence.data import Fingerprint
from tf_influence.data import fingerprint as data_fingerprint
from tf_influence.errors import InputError
from tf_influence.files import atomic_save_npy, atomic_write_json, check_target


def score_to_file(influence, test, path, *, resume=True, progress=None):
    """Writes `influence.scores(test)` to the `.npy` file `path`, one training batch at a time.

    Args:
      influence: a `tfi.Influence`.
      test: test data, arrays or tf.data (as for `Influence.scores`).
      path: output `.npy` file. Its folder must exist and be writable; an existing file there is
        replaced only if it is a previous output of `score_to_file` (it has its progress file).
      resume: continue an interrupted run for the same model weights, training data, test data
        and settings (refused with an error naming what differs); `False` starts over.
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
    check_target(path, "score_to_file path", replaceable=lambda _: _read_state(state_path) is not None)
    for companion in (state_path, ihvp_path):  # the library's own names: never a user's file
        check_target(companion, "score_to_file progress file", replaceable=lambda _: True)
    test_batches = influence.test_batches(test)
    parts = _fingerprints(influence, test_batches)
    fingerprint = _combined(parts)
    state = _read_state(state_path)
    if state is not None and resume and state["fingerprint"] != fingerprint:
        changed = [name for name, value in parts.items() if state.get("parts", {}).get(name) != value]
        raise InputError(
            f"{path!r} holds a run for other {', '.join(changed) or 'inputs'} than this call's; it cannot be resumed "
            "(its scores would be stale or mixed). Pass resume=False to start over, or another path.")
    n_train = influence.n_train
    if state is not None and resume and os.path.exists(path) and os.path.exists(ihvp_path):
        directions = np.load(ihvp_path)
        scores = np.lib.format.open_memmap(path, mode="r+")
        done = state["batches_done"]
    else:
        directions = influence.test_inverse_hvps(test_batches)
        atomic_save_npy(ihvp_path, directions)
        _write_state(state_path, fingerprint, 0, False, parts=parts)  # first: `path` is then known to be ours
        scores = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(len(directions), n_train))
        done = 0
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
    seen = Fingerprint() if done == 0 else None  # a full pass: check that it read the data of the others
    for step, batch in enumerate(train.skip(done), start=done):
        if seen is not None:
            seen.update(batch)
        columns = influence.gradient_dots(batch, directions_tensor).numpy()  # [batch, n_test]
        scores[:, offset:offset + len(columns)] = columns.T
        scores.flush()
        offset += len(columns)
        _write_state(state_path, fingerprint, step + 1, False, parts=parts)
        bar.update(step + 1)
    if offset != n_train:
        raise InputError(f"Scored {offset} training examples but the data holds {n_train}; was it changed?")
    if seen is not None:
        influence.problem.check_data_unchanged(seen)
    _write_state(state_path, fingerprint, _read_state(state_path)["batches_done"], True, parts=parts,
                 seconds=time.perf_counter() - started)
    del scores
    return np.load(path, mmap_mode="r")


def _offset_after(train, batches):
    """Training examples in the first `batches` batches (reads only their weights)."""
    if batches == 0:
        return 0
    return sum(int(tf.shape(w)[0]) for _, _, w in train.take(batches))


def _fingerprints(influence, test_batches):
    """Hashes of everything the scores depend on, by name (the names appear in the refusal message)."""
    source = influence.source
    settings = (influence.method, repr(influence.solver), repr(source.requested_damping), source.curvature,
                repr(influence.measurement),
                repr(sorted(source.hessian_options.items())), influence.problem.settings_fingerprint())
    return {
        "model weights": influence.check_weights(),  # (also refreshes stale caches)
        "training data": influence.problem.data_fingerprint(),
        "batching": hashlib.sha256(repr(influence.problem.batch_sizes()).encode()).hexdigest(),
        "test data": data_fingerprint(test_batches),
        "settings": hashlib.sha256(repr(settings).encode()).hexdigest(),
    }


def _combined(parts):
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()


def _read_state(state_path):
    """The progress record, or None when there is none (or the file is not one of ours)."""
    if not os.path.isfile(state_path):
        return None
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and {"fingerprint", "batches_done"} <= set(state) else None


def _write_state(state_path, fingerprint, batches_done, complete, **extra):
    atomic_write_json(state_path, {"fingerprint": fingerprint, "batches_done": batches_done, "complete": complete,
                                   **extra})
