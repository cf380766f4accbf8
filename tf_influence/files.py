"""Atomic writes: a file or directory appears at its path complete, or not at all.

Everything the library writes (score matrices, their progress files, exported SavedModels) is written
to a temporary name beside the target, then renamed (`os.replace` is atomic on one file system). An
existing directory replaced with `overwrite` is kept until the new one is in place, and put back if
the rename fails.

Example:
  >>> atomic_save_npy("scores.ihvp.npy", array)
  >>> atomic_write_dir("model_dir", lambda tmp: tf.saved_model.save(module, tmp), overwrite=True)
"""

import json
import os
import shutil
import tempfile

import numpy as np


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
