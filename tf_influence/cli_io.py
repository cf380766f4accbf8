"""Files and Python objects named on the command line, checked before any computation.

Every check raises `InputError` with a message that starts with the flag and the path, says what
the file is, what was expected and the fix. `python -m tf_influence` prints that message as one
line; the same functions serve anyone who scripts around the CLI.

  check_input_file   exists, is a file
  load_data          an .npz holding numeric arrays x, y (and w), checked by `tfi.as_dataset`
  check_model_file   a readable Keras model file (.keras zip or legacy .h5), not just "exists"
  load_model         `keras.models.load_model` with custom objects; failures name what is missing
  import_object      `module:name` or `path/to/file.py:name` -> the Python object
  check_output_file  the folder exists and is writable; an existing file is replaced only if it
                     is a previous output (or overwrite=True), never if it is one of the inputs
  check_output_dir   the same for a SavedModel directory
  write_npz          atomic: a temporary file beside the target, then renamed over it
"""

import importlib
import importlib.util
import json
import os
import sys
import tempfile
import warnings
import zipfile
import zlib

import numpy as np

from tf_influence.data import as_dataset
from tf_influence.errors import InputError
from tf_influence.export.saved_model import is_influence_export
from tf_influence.files import check_writable_folder

_NPY_MAGIC = b"\x93NUMPY"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_NPZ_FIX = "save it with np.savez(path, x=x, y=y) (optionally w=sample_weights)"


def check_input_file(path, flag):
    """Returns `path` if it names an existing, readable file; else `InputError` naming `flag`."""
    if not os.path.exists(path):
        raise InputError(f"{flag} {path!r} does not exist (working directory: {os.getcwd()!r}). "
                         "Check the path.")
    if os.path.isdir(path):
        what = "a TensorFlow SavedModel directory" if _is_saved_model(path) else "a directory"
        raise InputError(f"{flag} {path!r} is {what}; expected a file.")
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path!r} is not readable (permission denied). Fix its permissions.")
    return path


def describe_file(path):
    """A short phrase for what a file is, from its first bytes ("a text file", "a NumPy .npy file", ...)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(_NPY_MAGIC):
        return "a NumPy .npy file (one array, not an .npz archive)"
    if head.startswith(_HDF5_MAGIC):
        return "an HDF5 file"
    if head.startswith(_ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if "config.json" in names:
            return "a Keras .keras model"
        if names and all(n.endswith(".npy") for n in names):
            return "an .npz data archive"
        return f"a zip archive holding {names[:5]}"
    if head[:1] == b"\x80":
        return "a Python pickle"
    try:
        head.decode("utf-8")
        return "a text file" if b"\x00" not in head else "a binary file of unknown format"
    except UnicodeDecodeError:
        return "a binary file of unknown format"


def load_data(path, flag):
    """Loads `(x, y)` or `(x, y, w)` from an .npz file, refusing anything else with the reason.

    Args:
      path: the .npz file.
      flag: the command-line flag, for messages (e.g. "--train").

    Returns:
      A tuple of numpy arrays `(x, y)` or `(x, y, w)`, checked by `tfi.as_dataset` (numeric,
      finite, same number of examples, at least one example, valid weights).

    Example:
      >>> x, y = load_data("test.npz", "--test")
    """
    check_input_file(path, flag)
    what = describe_file(path)
    if what != "an .npz data archive":
        raise InputError(f"{flag} {path!r} is {what}; expected an .npz archive holding arrays 'x' and 'y': "
                         f"{_NPZ_FIX}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            missing = [k for k in ("x", "y") if k not in names]
            if missing:
                raise InputError(f"{flag} {path!r} needs arrays 'x' and 'y'; it has {names} (missing {missing}): "
                                 f"{_NPZ_FIX}.")
            arrays = {}
            for key in ("x", "y", "w"):
                if key in names:
                    arrays[key] = _read_member(data, key, flag, path)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise InputError(f"{flag} {path!r} is a damaged .npz archive ({type(e).__name__}: {e}); "
                         "write it again.") from e
    parts = tuple(arrays[k] for k in ("x", "y", "w") if k in arrays)
    as_dataset(parts, name=f"{flag} {path!r}")  # the library's own checks, so the CLI and API agree
    return parts


def _read_member(data, key, flag, path):
    try:
        array = data[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise InputError(f"{flag} {path!r}: array {key!r} holds Python objects (dtype object), which are not "
                             "loaded (unsafe, and not numbers); save numeric arrays, e.g. "
                             f"np.asarray({key}, dtype='float32').") from e
        raise InputError(f"{flag} {path!r}: array {key!r} is damaged ({e}); write the file again.") from e
    if array.ndim == 0:
        raise InputError(f"{flag} {path!r}: array {key!r} is a scalar; expected one row per example "
                         "(a leading example axis).")
    return array


def check_model_file(path, flag="--model"):
    """Refuses a missing, damaged or non-Keras model file with what it is; returns `path`.

    A `.keras` file must be a readable zip archive with `config.json`; `.h5`/`.hdf5` an HDF5 file.
    """
    check_input_file(path, flag)
    suffix = os.path.splitext(path)[1].lower()
    what = describe_file(path)
    if suffix not in _MODEL_SUFFIXES:
        raise InputError(f"{flag} {path!r} is {what} with suffix {suffix or '(none)'!r}; expected a Keras model "
                         "saved with model.save('model.keras') (or a legacy .h5 file).")
    if what == "a damaged zip archive":
        raise InputError(f"{flag} {path!r} is a damaged model file (a zip archive that cannot be read, e.g. "
                         "truncated by an interrupted copy); save or copy the model again.")
    if suffix == ".keras":
        if what != "a Keras .keras model":
            raise InputError(f"{flag} {path!r} is {what}, not a Keras model: a .keras file is a zip archive with "
                             "config.json. Save the model again with model.save('model.keras').")
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                problem = f"its member {bad!r} is corrupt" if bad else None
                json.loads(archive.read("config.json"))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise InputError(f"{flag} {path!r} is a damaged .keras file ({problem}); save the model again.")
    elif what != "an HDF5 file":
        raise InputError(f"{flag} {path!r} is {what}, not a Keras model: a {suffix} model is an HDF5 file. "
                         "Save the model again with model.save('model.keras').")
    return path


def load_model(path, *, custom_objects=None, compile=True, flag="--model"):
    """`keras.models.load_model` after `check_model_file`; a failure names the missing custom objects.

    Args:
      path: the model file.
      custom_objects: name -> class or function, for custom losses and layers.
      compile: restore the compiled loss (False when the loss is given on the command line).
      flag: the flag, for messages.

    Returns:
      The Keras model.
    """
    import keras

    check_model_file(path, flag)
    try:
        with warnings.catch_warnings():  # the optimizer is not used; its restore warning is noise here
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return keras.models.load_model(path, custom_objects=custom_objects or {}, compile=compile)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a model it cannot rebuild
        raise InputError(_load_failure(path, e, custom_objects or {}, compile, flag)) from e


def _load_failure(path, error, custom_objects, compile, flag):
    config = _keras_config(path)
    fixes = []
    loss = _custom_name(config.get("compile_config", {}).get("loss")) if compile else None
    if loss and loss not in custom_objects:
        fixes.append(f"it was compiled with the custom loss {loss!r}; pass --loss module:{loss} "
                     f"(or --loss path/to/file.py:{loss}) so that its code can be imported")
    layers = sorted({n for n in _custom_names(config.get("config")) if n not in custom_objects})
    if layers:
        fixes.append(f"it uses the custom objects {layers}; pass --custom-objects module:NAME for each")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if fixes:
        return f"{flag} {path!r} cannot be loaded without its code: " + "; ".join(fixes) + "."
    return (f"{flag} {path!r} could not be loaded by Keras ({type(error).__name__}: {first_line}). If it was "
            "compiled with a custom loss, pass --loss module:function; if it uses custom layers or functions, "
            "--custom-objects module:NAME. Run with --debug for the traceback.")


def _keras_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError):
        return {}  # legacy .h5: no config to inspect


def _custom_name(entry):
    """The name of a serialized object that is neither built into Keras nor a Keras function, else None."""
    if not isinstance(entry, dict) or "class_name" not in entry:
        return None
    module = str(entry.get("module") or "")
    if entry["class_name"] == "function":
        import keras

        name = str(entry.get("config"))
        try:
            return None if module.startswith("keras") or keras.losses.get(name) is not None else name
        except (ValueError, TypeError):
            return name
    return None if module.startswith("keras") else str(entry["class_name"])


def _custom_names(config):
    if isinstance(config, dict):
        own = _custom_name(config)
        found = [own] if own else []
        for value in config.values():
            found.extend(_custom_names(value))
        return found
    if isinstance(config, list):
        return [n for item in config for n in _custom_names(item)]
    return []


def import_object(spec, flag):
    """The Python object named by `module:name` or `path/to/file.py:name`.

    Example:
      >>> import_object("my_losses:focal", "--loss")            # my_losses.py on sys.path or in the cwd
      >>> import_object("code/losses.py:focal", "--loss")
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise InputError(f"{flag} {spec!r} is not of the form module:name or path/to/file.py:name "
                         "(e.g. my_losses:focal).")
    try:
        if source.endswith(".py"):
            check_input_file(source, flag)
            module_name = "_tfi_cli_" + os.path.splitext(os.path.basename(source))[0]
            module_spec = importlib.util.spec_from_file_location(module_name, source)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # as `import` does; dataclasses and pickle look it up there
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does, so ./my_losses.py is found
            module = importlib.import_module(source)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - an error inside the user's module is the user's to fix
        raise InputError(f"{flag} {spec!r}: importing {source!r} failed ({type(e).__name__}: {e}). Check the "
                         "module name and that its folder is the working directory or on PYTHONPATH.") from e
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:10]
        raise InputError(f"{flag} {spec!r}: {source!r} has no attribute {name!r} (it has {public}).")
    return getattr(module, name)


def check_output_file(path, flag, *, overwrite=False, inputs=(), suffix=None, is_previous_output=None):
    """Refuses an output path that cannot or should not be written, before anything is computed.

    Args:
      path: the file to write.
      flag: the flag, for messages.
      overwrite: replace any existing file (never a directory or an input).
      inputs: paths of the input files, which are never replaced.
      suffix: the required suffix (e.g. ".npz"), or None.
      is_previous_output: `fn(path) -> bool`; an existing file for which it is True is replaced
        without `overwrite`.

    Returns:
      `path`.
    """
    _check_folder(path, flag)
    if os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a directory; expected a file name, e.g. "
                         f"{os.path.join(path, 'out' + (suffix or ''))!r}.")
    if suffix and not path.lower().endswith(suffix):
        raise InputError(f"{flag} {path!r} must end in {suffix!r}; e.g. {flag} {os.path.splitext(path)[0]}{suffix}.")
    if not os.path.exists(path):
        return path
    for other in inputs:
        if os.path.exists(other) and os.path.samefile(path, other):
            raise InputError(f"{flag} {path!r} is also an input ({other!r}); writing it would destroy that "
                             "input. Choose another output file.")
    if overwrite or (is_previous_output is not None and is_previous_output(path)):
        return path
    raise InputError(f"{flag} {path!r} already exists and is not an earlier output of this command "
                     f"(it is {describe_file(path)}). Pass --overwrite to replace it, or choose another name.")


def check_output_dir(path, flag, *, overwrite=False):
    """Refuses a SavedModel directory that cannot be written, or an existing path to keep.

    An existing path is replaced only with `overwrite=True`, and then only if it is an earlier export
    of tf_influence (never a file, another directory or another SavedModel, which `--overwrite` would delete).
    """
    _check_folder(path, flag)
    if not os.path.exists(path):
        return path
    if not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is an existing file ({describe_file(path)}); the export is a "
                         "directory. Choose a new path.")
    if not overwrite:
        raise InputError(f"{flag} {path!r} already exists. Pass --overwrite to replace it, or choose a new path.")
    if not is_influence_export(path):
        what = ("a SavedModel not written by tf_influence" if _is_saved_model(path) else
                "a directory that is not a SavedModel")
        raise InputError(f"{flag} {path!r} is {what}; --overwrite replaces only an earlier export of tf_influence. "
                         "Choose a new path.")
    return path


def _check_folder(path, flag):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path!r}: the folder {folder!r} does not exist. Create it first "
                         f"(mkdir -p {folder}) or choose another path.")
    check_writable_folder(folder, path, flag)


def _is_saved_model(path):
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def npz_keys(path):
    """The array names in an .npz file, or None if it is not a readable .npz archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if not names or not all(n.endswith(".npy") for n in names):
        return None
    return {n[:-4] for n in names}


def write_npz(path, arrays):
    """Writes `arrays` (name -> array) to the .npz `path` atomically (no half-written file on failure)."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(prefix=".tfi_", suffix=".npz", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
