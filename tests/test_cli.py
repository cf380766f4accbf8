"""`python -m tf_influence`: results equal the library's, and every user error is one line, exit 2.

Most tests call `main([...])` in-process; one subprocess test checks the real exit status and that
no traceback is printed. Tests of refused inputs also check that nothing was written and that the
input files are unchanged.
"""

import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests import cli_losses, models
from tf_influence import __main__ as cli
from tf_influence.__main__ import main

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def saved(tmp_path, float64, rng):
    model = models.mlp()
    model.compile(loss=SCE)
    x, y = models.classification_data(rng, n=30)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "train.npz", x=x[:24], y=y[:24])
    np.savez(tmp_path / "test.npz", x=x[24:], y=y[24:])
    return tmp_path, model, (x[:24], y[:24]), (x[24:], y[24:])


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if the model is loaded or anything is computed (checks must come first)."""

    def started(*args, **kwargs):
        raise AssertionError("the computation started before the inputs and outputs were checked")

    monkeypatch.setattr(cli, "_influence", started)
    from tf_influence import demo

    monkeypatch.setattr(demo, "run", started)


def _explain_args(path, *extra, train="train.npz", test="test.npz", model="model.keras", output="scores.npz"):
    return ["explain", "--model", str(path / model), "--train", str(path / train), "--test", str(path / test),
            "--output", str(path / output), "--quiet", *extra]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _user_error(argv, capsys):
    """Runs main(argv), expects a user error, returns its one-line message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _refused(argv, capsys, folder, *words):
    """A user error whose message has `words`; no file appears in `folder` and none changes."""
    before = _digests(folder)
    message = _user_error(argv, capsys)
    for word in words:
        assert word in message, message
    assert _digests(folder) == before
    return message


# -- Results ---------------------------------------------------------------------------------------


def test_explain_writes_the_library_scores_and_replaces_its_own_output(saved, capsys):
    path, model, train, test = saved
    out = path / "scores.npz"
    assert main(_explain_args(path, "--method", "direct", "--damping", "0.5", "--top-k", "3")) == 0
    inf = tfi.Influence(model, SCE, train, method="direct", damping=0.5, progress=False)
    expected = inf.scores(test)
    with np.load(out) as result:
        np.testing.assert_allclose(result["scores"], expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(result["predicted_loss_change"], expected / 24, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(result["helpful_indices"], np.argsort(-expected, axis=1)[:, :3])
        np.testing.assert_array_equal(result["harmful_indices"], np.argsort(expected, axis=1)[:, :3])
        assert json.loads(str(result["settings"]))["damping"] == 0.5
    assert "most helpful" in capsys.readouterr().out
    # An earlier output of this command is replaced without --overwrite.
    assert main(_explain_args(path, "--method", "direct", "--damping", "2.0")) == 0
    with np.load(out) as result:
        assert json.loads(str(result["settings"]))["damping"] == 2.0
        assert not np.allclose(result["scores"], expected)


def test_export_writes_a_servable_model(saved, capsys):
    import tensorflow as tf

    path, model, train, test = saved
    code = main(["export", "--model", str(path / "model.keras"), "--train", str(path / "train.npz"),
                 "--out", str(path / "exported"), "--method", "direct", "--damping", "0.5"])
    assert code == 0 and "signatures influence, top_k" in capsys.readouterr().out
    scorer = tf.saved_model.load(str(path / "exported"))
    scores = scorer.signatures["influence"](x=tf.constant(test[0]), y=tf.constant(test[1]))["scores"].numpy()
    inf = tfi.Influence(model, SCE, train, method="direct", damping=0.5, progress=False)
    np.testing.assert_allclose(scores, inf.scores(test), rtol=1e-6, atol=1e-9)
    _user_error(["export", "--model", str(path / "model.keras"), "--train", str(path / "train.npz"),
                 "--out", str(path / "exported")], capsys)


def test_custom_loss_model_round_trip(tmp_path, float64, rng, capsys):
    model = models.mlp()
    model.compile(loss=cli_losses.focal)
    x, y = models.classification_data(rng, n=30)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "train.npz", x=x[:24], y=y[:24])
    np.savez(tmp_path / "test.npz", x=x[24:], y=y[24:])
    message = _refused(_explain_args(tmp_path, "--method", "direct", "--damping", "0.5"), capsys, tmp_path,
                       "custom loss 'focal'", "--loss module:focal")
    assert "could not be loaded by Keras" not in message
    (tmp_path / "scores.npz").write_text("an unrelated file that --overwrite replaces")
    assert main(_explain_args(tmp_path, "--loss", "tests.cli_losses:focal", "--method", "direct", "--damping", "0.5",
                              "--curvature", "gauss_newton", "--overwrite")) == 0
    inf = tfi.Influence(model, cli_losses.focal, (x[:24], y[:24]), method="direct", damping=0.5,
                        curvature="gauss_newton", progress=False)
    with np.load(tmp_path / "scores.npz") as result:
        np.testing.assert_allclose(result["scores"], inf.scores((x[24:], y[24:])), rtol=1e-6, atol=1e-9)
        assert json.loads(str(result["settings"]))["curvature"] == "gauss_newton"


def test_uncompiled_model_needs_loss(tmp_path, float64, rng, capsys):
    models.mlp().save(tmp_path / "model.keras")
    x, y = models.classification_data(rng, n=10)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    _refused(_explain_args(tmp_path, "--damping", "0.5"), capsys, tmp_path,
             "--model", "without a compiled loss", "--loss NAME", "--loss module:function")


def test_custom_layer_loads_with_custom_objects(tmp_path, float64, rng, capsys):
    model = keras.Sequential([keras.Input((4,)), cli_losses.Scale(), keras.layers.Dense(3, name="head")])
    model.compile(loss=SCE)
    x, y = models.classification_data(rng, n=20)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "train.npz", x=x[:16], y=y[:16])
    np.savez(tmp_path / "test.npz", x=x[16:], y=y[16:])
    args = _explain_args(tmp_path, "--method", "direct", "--damping", "0.5")
    _refused(args, capsys, tmp_path, "cannot be loaded without its code", "'Scale'", "--custom-objects")
    assert main(args + ["--custom-objects", "tests.cli_losses:Scale"]) == 0
    expected = tfi.Influence(model, SCE, (x[:16], y[:16]), method="direct", damping=0.5, progress=False)
    with np.load(tmp_path / "scores.npz") as result:
        np.testing.assert_allclose(result["scores"], expected.scores((x[16:], y[16:])), rtol=1e-6, atol=1e-9)


def test_default_damping_is_chosen_by_the_library(saved, capsys):
    path, model, train, test = saved
    assert main(_explain_args(path, "--method", "direct")) == 0
    expected = tfi.Influence(model, SCE, train, method="direct", damping=None, progress=False).scores(test)
    with np.load(path / "scores.npz") as result:
        np.testing.assert_allclose(result["scores"], expected, rtol=1e-6, atol=1e-9)


# -- How errors are reported -----------------------------------------------------------------------


def test_debug_shows_the_traceback(saved):
    path, *_ = saved
    with pytest.raises(tfi.InputError, match="does not exist"):
        main(_explain_args(path, "--debug", train="missing.npz"))


def test_internal_errors_are_not_swallowed(saved, monkeypatch):
    path, *_ = saved

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug inside tf_influence")

    monkeypatch.setattr(tfi, "Influence", bug)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(_explain_args(path, "--damping", "0.5"))
    assert not (path / "scores.npz").exists()


def test_exit_status_and_stderr_of_the_real_command(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((3, 4)), y=np.zeros(3))
    command = [sys.executable, "-m", "tf_influence", "explain", "--model", str(tmp_path / "missing.keras"),
               "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "train.npz")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(tfi.__file__))))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]  # earlier lines: TensorFlow's own start-up logging
    assert last.startswith("error: --model") and "does not exist" in last, done.stderr


@pytest.mark.parametrize("extra, words", [
    (["--damping", "abc"], ["--damping", "'auto'", "'abc'"]),
    (["--damping", "-1"], ["--damping", "≥ 0"]),
    (["--damping", "nan"], ["--damping"]),
    (["--curvature", "newton"], ["--curvature", "gauss_newton"]),
    (["--method", "magic"], ["--method", "'magic'", "cg"]),
    (["--top-k", "0"], ["--top-k", "positive integer"]),
    (["--l2", "-0.1"], ["--l2"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_flags_are_one_line(saved, capsys, extra, words):
    path, *_ = saved
    _refused(_explain_args(path, *extra), capsys, path, *words)


def test_missing_required_flag_is_one_line(capsys):
    message = _user_error(["explain", "--model", "m.keras"], capsys)
    assert "--train" in message and "--test" in message


# -- Outputs are checked before anything is computed -----------------------------------------------


@pytest.mark.parametrize("output, words", [
    ("no_such_folder/scores.npz", ["--output", "no_such_folder", "does not exist", "mkdir"]),
    ("a_folder", ["--output", "is a directory"]),
    ("scores.txt", ["--output", "must end in '.npz'"]),
    ("train.npz", ["--output", "also an input"]),
    ("notes.npz", ["--output", "already exists", "--overwrite"]),
])
def test_bad_outputs_are_refused_first(saved, capsys, no_compute, output, words):
    path, *_ = saved
    (path / "a_folder").mkdir()
    (path / "notes.npz").write_text("my notes")
    _refused(_explain_args(path, "--damping", "0.5", output=output), capsys, path, *words)


def test_an_input_is_never_overwritten(saved, capsys, no_compute):
    path, *_ = saved
    _refused(_explain_args(path, "--overwrite", output="test.npz"), capsys, path, "--output", "also an input")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs a folder nobody can write in (/proc)")
def test_output_in_an_unwritable_folder_is_refused(saved, capsys, no_compute):
    path, *_ = saved
    args = _explain_args(path)
    args[args.index("--output") + 1] = "/proc/scores.npz"
    _refused(args, capsys, path, "--output", "cannot write in the folder '/proc'")


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_text("not a model"), ["existing file", "the export is a directory"]),
    (lambda p: (p.mkdir(), (p / "keep.txt").write_text("keep")), ["not a SavedModel", "--overwrite"]),
    (None, ["no_such_folder", "does not exist"]),
])
def test_export_out_is_checked_first(saved, capsys, no_compute, make, words):
    path, *_ = saved
    out = path / "exported" if make else path / "no_such_folder" / "exported"
    if make:
        make(out)
    _refused(["export", "--model", str(path / "model.keras"), "--train", str(path / "train.npz"), "--out", str(out),
              "--overwrite"], capsys, path, "--out", *words)
    if out.is_dir():
        assert (out / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("plot, words", [("no_such_folder/demo.png", ["--plot", "does not exist"]),
                                         ("demo.xyz", ["--plot", "unknown image format", "png"])])
def test_demo_plot_is_checked_before_training(tmp_path, capsys, no_compute, plot, words):
    pytest.importorskip("matplotlib")
    _refused(["demo", "--plot", str(tmp_path / plot)], capsys, tmp_path, *words)


# -- Inputs are checked before anything is computed ------------------------------------------------


def _npy(p):
    np.save(p, np.zeros((3, 4)))
    os.replace(str(p) + ".npy", p)


def _truncated_npz(p):
    np.savez(p, x=np.zeros((30, 4)), y=np.zeros(30))
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


@pytest.mark.parametrize("make, words", [
    (None, ["does not exist"]),
    (lambda p: p.mkdir(), ["is a directory"]),
    (_npy, ["NumPy .npy file", "expected an .npz", "np.savez"]),
    (lambda p: p.write_text("x,y\n1,2\n"), ["is a text file", "expected an .npz"]),
    (lambda p: p.write_bytes(b""), ["empty file"]),
    (_truncated_npz, ["damaged"]),
    (lambda p: np.savez(p, x=np.zeros((3, 4))), ["needs arrays 'x' and 'y'", "missing ['y']"]),
    (lambda p: np.savez(p, x=np.array([[1], "a"], dtype=object), y=np.zeros(2)), ["'x'", "Python objects"]),
    (lambda p: np.savez(p, x=np.array([["a"] * 4] * 3), y=np.zeros(3)), ["numeric"]),
    (lambda p: np.savez(p, x=np.zeros((3, 4)), y=np.zeros(2)), ["same number of examples"]),
    (lambda p: np.savez(p, x=np.full((3, 4), np.nan), y=np.zeros(3)), ["NaN/Inf"]),
    (lambda p: np.savez(p, x=np.zeros((3, 4)), y=np.zeros(3), w=-np.ones(3)), ["sample weights"]),
    (lambda p: np.savez(p, x=np.float64(1.0), y=np.zeros(3)), ["scalar"]),
])
def test_bad_data_files_are_refused_first(saved, capsys, no_compute, make, words):
    path, *_ = saved
    if make:
        make(path / "bad.npz")
    message = _refused(_explain_args(path, train="bad.npz"), capsys, path, "--train", "bad.npz", *words)
    assert make is None or "does not exist" not in message


def _npz_named_keras(p):
    with open(p, "wb") as f:  # np.savez(path) would append ".npz" to the name
        np.savez(f, x=np.zeros(3), y=np.zeros(3))


def _random_bytes(p):
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _cut(fraction):
    def make(p):
        data = (p.parent / "model.keras").read_bytes()
        p.write_bytes(data[:int(len(data) * fraction)])
    return make


def _flip_middle_bytes(p):
    data = bytearray((p.parent / "model.keras").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("name, make, words", [
    ("bad.keras", None, ["does not exist"]),
    ("bad.keras", lambda p: p.mkdir(), ["is a directory"]),
    ("bad.keras", _random_bytes, ["binary file of unknown format", "not a Keras model"]),
    ("bad.keras", lambda p: p.write_text("hello"), ["text file", "not a Keras model"]),
    ("bad.keras", _cut(0.5), ["damaged"]),
    ("bad.keras", _flip_middle_bytes, ["damaged"]),
    ("bad.keras", _npz_named_keras, ["an .npz data archive", "not a Keras model"]),
    ("bad.h5", lambda p: p.write_text("hello"), ["text file", "HDF5"]),
    ("bad.pkl", lambda p: p.write_bytes(b"\x80\x04K\x01."), ["Python pickle", "expected a Keras model"]),
])
def test_bad_model_files_are_refused_first(saved, capsys, no_compute, name, make, words):
    path, *_ = saved
    if make:
        make(path / name)
    message = _refused(_explain_args(path, model=name), capsys, path, "--model", name, *words)
    assert make is None or "does not exist" not in message and "not found" not in message


def test_loss_from_a_file_path(float64):
    import tensorflow as tf

    from tf_influence import cli_io

    path = os.path.join(os.path.dirname(os.path.abspath(cli_losses.__file__)), "cli_losses.py")
    focal = cli_io.import_object(f"{path}:focal", "--loss")
    assert focal is not cli_losses.focal  # loaded from the file, not the imported module
    y, logits = tf.constant([0, 2]), tf.constant([[1.0, -0.5, 0.2], [0.3, 0.1, -2.0]], tf.float64)
    np.testing.assert_array_equal(focal(y, logits).numpy(), cli_losses.focal(y, logits).numpy())


@pytest.mark.parametrize("spec, words", [
    ("tests.no_such_module:focal", ["importing 'tests.no_such_module' failed", "ModuleNotFoundError"]),
    ("tests.cli_losses:nope", ["has no attribute 'nope'", "focal"]),
    ("missing_file.py:focal", ["missing_file.py", "does not exist"]),
    ("focal", ["not a Keras loss name", "module:function"]),
    ("tests.cli_losses:", ["module:name"]),
    ("tests.cli_losses:keras", ["is a module, not a function"]),
])
def test_bad_loss_specs_are_one_line(saved, capsys, spec, words):
    path, *_ = saved
    _refused(_explain_args(path, "--loss", spec), capsys, path, "--loss", *words)


# -- The library's own input checks become one line -----------------------------------------------


def test_library_input_errors_are_one_line(saved, capsys):
    path, *_ = saved
    np.savez(path / "wide.npz", x=np.zeros((5, 7)), y=np.zeros(5, dtype="int64"))
    np.savez(path / "labels.npz", x=np.zeros((5, 4)), y=np.full(5, 7))
    _refused(_explain_args(path, "--damping", "0.5", train="wide.npz"), capsys, path,
             "--train", "wide.npz", "could not be called", "(5, 7)")
    _refused(_explain_args(path, "--damping", "0.5", test="labels.npz"), capsys, path,
             "--test", "labels.npz", "[0, 3)")
    _refused(_explain_args(path, "--damping", "0.5", "--variables", "nope"), capsys, path,
             "--variables nope", "No layer named 'nope'")


def test_negative_curvature_is_one_line_with_the_flags_that_fix_it(saved, capsys):
    path, *_ = saved  # an untrained tanh MLP: its Hessian is indefinite, and CG meets that without damping
    _refused(_explain_args(path, "--method", "cg", "--damping", "0"), capsys, path,
             "negative curvature", "--damping", "--curvature gauss_newton")
