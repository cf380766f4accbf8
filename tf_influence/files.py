"""Atomic writes: a file or directory appears at its path complete, or not at all.

Everything the library writes (score matrices, their progress files, exported SavedModels) is written
to a temporary name beside the target, then renamed (`os.replace` is atomic on one file system). An
existing directory replaced with `overwrite` is kept until the new one is in place, and put back if
the rename fails.

Before anything is computed, `check_target` checks the target itself: its folder exists and is
writable, a file is not a directory (and the reverse), and an existing target is replaced only if
it is a previous output of the library. Its errors name the target, never a temporary file.

Example:
  >>> check_target("out/scores.npy", "score_to_file path")
  >>> atomic_save_npy("scores.ihvp.npy", array)
  >>> atomic_write_dir("model_dir", lambda tmp: tf.saved_model.save(module, tmp), overwrite=True)
"""

import json
import os
import shutil
import tempfile

import numpy as np

from tf_influence.errors import InputError


def check_target(path, what, *, directory=False, replaceable=None, overwrite=False, create_folder=False):
    """Refuses a target that cannot or must not be written, before anything is computed.

    Args:
      path: the file (or, with `directory=True`, the directory) to write.
      what: how to name it in messages, e.g. "score_to_file path".
      directory: the target is a directory (an export) rather than a file.
      replaceable: `fn(path) -> bool`, True when an existing target is a previous output of the
        library. Anything else that exists is never replaced.
      overwrite: for directories, replace a previous output only when True.
      create_folder: a missing parent folder will be created (then its nearest existing ancestor
        must be writable) instead of being an error.

    Returns:
      `path` as a string.

    Raises:
      InputError: naming `what` and `path`: missing or unwritable folder, a directory where a
        file is expected (or the reverse), or an existing target that may not be replaced.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.isdir(existing):
        if not create_folder or os.path.exists(existing):
            kind = "is a file, not a folder" if os.path.exists(existing) else "does not exist"
            raise InputError(f"{what} {path!r}: the folder {existing!r} {kind}. Create the folder first, or choose "
                             "another path.")
        existing = os.path.dirname(existing)
    check_writable_folder(existing, path, what)
    if not os.path.lexists(path):
        return path
    if directory and not os.path.isdir(path):
        raise InputError(f"{what} {path!r} is an existing file; the output is a directory. Choose a new path.")
    if not directory and os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a directory; expected a file name, e.g. "
                         f"{os.path.join(path, os.path.basename(path) or 'out')!r}.")
    ours = replaceable is not None and replaceable(path)
    if not ours:
        raise InputError(f"{what} {path!r} already exists and is not a previous output of tf_influence; it is never "
                         "replaced. Choose another path, or move it away.")
    if directory and not overwrite:
        raise InputError(f"{what} {path!r} already exists. Pass overwrite=True to replace it (it is a previous "
                         "output of tf_influence).")
    return path


def check_writable_folder(folder, path, what):
    """Raises InputError naming `what` and `path` when a file cannot be created in `folder`."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"{what} {path!r}: cannot write in the folder {folder!r} ({e.strerror or e}). Choose a "
                         "writable folder.") from None


def atomic_save_npy(path, array):
    """Writes `array` to the `.npy` file `path` atomically."""
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def atomic_write_json(path, value):
    """Writes `value` as JSON to `path` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def atomic_write_dir(path, write, *, overwrite=False):
    """Calls `write(staging_dir)` on a new temporary directory beside `path`, then renames it to `path`.

    Args:
      path: the target directory.
      write: a function filling the (existing, empty) directory it receives.
      overwrite: replace an existing `path`; the previous content is restored if the swap fails.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tfi_staging_", dir=parent)
    try:
        write(staging)
        if not os.path.exists(path):
            os.rename(staging, path)
            return
        if not overwrite:
            raise FileExistsError(path)
        backup = tempfile.mkdtemp(prefix=".tfi_old_", dir=parent)
        os.rename(path, os.path.join(backup, "old"))
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(os.path.join(backup, "old"), path)  # put the previous content back
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
