"""SavedModel export: loaded in a fresh process without tf_influence, it gives the library's scores."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import tf_influence as tfi
from tests import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "saved_models" / "digits_mlp"

# Runs with `python -I` from a temporary directory (see the script's docstring).
LOADER = pathlib.Path(__file__).resolve().parent / "scripts" / "load_exported.py"

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
_ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "TF_CPP_MIN_LOG_LEVEL": "2"}

# name: (method, store, method options)
CASES = {
    "direct": ("direct", "auto", {}),
    "cg_inverse": ("cg", "inverse", {"tol": 1e-10}),
    "cg_preconditioned": ("cg", "preconditioned", {"tol": 1e-10}),
    "ekfac": ("ekfac", "auto", {}),
}


def _run_hidden(tmp_path, names):
    result = subprocess.run([sys.executable, "-I", str(LOADER), str(ROOT), str(tmp_path), *names], cwd=tmp_path,
                            env=_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _largest_graph_constant(path):
    """Elements of the largest Const node in the SavedModel's graphs (stored state would be big)."""
    proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    sizes = [int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim]))
             for n in nodes if n.op == "Const"]
    return max(sizes)


def test_loaded_model_gives_the_library_scores_without_tf_influence(tmp_path, float64, rng):
    model = models.mlp(hidden=5)
    x, y = models.classification_data(rng, n=40)
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    infos = {}
    for name, (method, store, options) in CASES.items():
        inf = tfi.Influence(model, sce, train, method=method, damping=0.1, curvature="gauss_newton",
                            progress=False, **options)
        infos[name] = info = tfi.export_saved_model(inf, tmp_path / name, store=store)
        assert info["parameters"] == inf.space.size == 43 and info["n_train"] == 30 and info["bytes"] > 0
        # Stored state lives in variables: no graph constant is anywhere near a stored matrix's size.
        assert _largest_graph_constant(tmp_path / name) < 16, name
        top = inf.top_k(test, 3)
        np.savez(tmp_path / f"{name}.npz", x=test[0], y=test[1], scores=inf.scores(test),
                 self_influence=_self_influence(inf, test), predictions=model(test[0]).numpy(),
                 helpful=top.helpful_indices, harmful=top.harmful_indices)
    assert infos["direct"]["store"] == "inverse" and infos["ekfac"]["store"] == "factors"
    assert infos["direct"]["arrays"] == {"inverse": [43, 43], "train_gradients": [30, 43]}
    assert infos["cg_preconditioned"]["arrays"] == {"preconditioned": [30, 43]}
    assert infos["ekfac"]["arrays"] == {"train_gradients": [30, 43], "layer0_q_a": [5, 5], "layer0_q_s": [5, 5],
                                        "layer0_scale": [5, 5], "layer1_q_a": [6, 6], "layer1_q_s": [3, 3],
                                        "layer1_scale": [6, 3]}

    result = _run_hidden(tmp_path, list(CASES))
    for name in CASES:  # the measured differences and sizes, shown with `pytest -s`
        r = result[name]
        print(f"{name}: {infos[name]['bytes']} bytes; scores max abs {r['scores']['abs']:.3g} rel "
              f"{r['scores']['rel']:.3g}; self_influence {r.get('self')}")
    assert result["hidden"], "tf_influence was importable in the loading process"
    for name, (method, store, _) in CASES.items():
        r = result[name]
        assert r["shape"] == [10, 30], name
        assert r["scores"]["abs"] <= 1e-5 and r["scores"]["rel"] <= 1e-5, (name, r)
        assert r["predictions"]["abs"] <= 1e-12, (name, r)
        assert r["top_k"], name
        assert r["settings"]["method"] == method and r["settings"]["damping"] == 0.1, r["settings"]
        if store == "preconditioned":
            assert "self_influence" not in r["signatures"]
        else:
            assert r["self"]["abs"] <= 1e-5 and r["self"]["rel"] <= 1e-5, (name, r)
        assert all(r["errors"].values()), (name, r["errors"])  # every bad input raised
        assert "x must have shape [batch, 4]" in r["errors"]["width"], r["errors"]
        assert "expected to be a int64 tensor but is a float tensor" in r["errors"]["label_dtype"], r["errors"]
        assert "labels y must be < 3" in r["errors"]["label_range"], r["errors"]
        assert "same number of examples" in r["errors"]["batch"] and "NaN" in r["errors"]["nan"]
        assert "k must be ≤ n_train" in r["errors"]["k_large"] and "k must be ≥ 1" in r["errors"]["k_zero"]


def _self_influence(inf, test):
    """`g_testᵀ (H + λI)⁻¹ g_test` for new points, from the library's cached test IHVPs."""
    grads = np.concatenate([inf.gradients(b).numpy() for b in inf.test_dataset(test)])
    return np.sum(inf.test_inverse_hvps(test) * grads, axis=1)


def test_export_is_atomic_and_needs_overwrite(tmp_path, float64, rng, monkeypatch):
    model = models.mlp()
    x, y = models.classification_data(rng, n=20)
    inf = tfi.Influence(model, sce, (x, y), method="direct", damping=0.5, curvature="gauss_newton",
                        progress=False)
    target = tmp_path / "model"

    def fail_midway(module, path, **kwargs):
        (pathlib.Path(path) / "saved_model.pb").write_bytes(b"partial")
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(tf.saved_model, "save", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        tfi.export_saved_model(inf, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    first = tfi.export_saved_model(inf, target)
    with pytest.raises(tfi.InputError, match="already exists. Pass overwrite=True"):
        tfi.export_saved_model(inf, target)
    # An interrupted overwrite keeps the previous model intact.
    monkeypatch.setattr(tf.saved_model, "save", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        tfi.export_saved_model(inf, target, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert tf.saved_model.load(str(target)).n_train.numpy() == first["n_train"]
    tfi.export_saved_model(inf, target, overwrite=True)
    assert (target / "saved_model.pb").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with pytest.raises(tfi.ResourceError, match="max_parameters=10.*store='preconditioned'"):
        tfi.export_saved_model(inf, tmp_path / "big", max_parameters=10)
    with pytest.raises(tfi.InputError, match="store='factors'.*method='direct'"):
        tfi.export_saved_model(inf, tmp_path / "factors", store="factors")
    with pytest.raises(tfi.InputError, match="Received: store='dense'"):
        tfi.export_saved_model(inf, tmp_path / "dense", store="dense")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _saved_model_cli():
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if cli.exists():
        return [str(cli)]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def test_saved_model_cli_runs_the_committed_example(tmp_path):
    with np.load(ROOT / "saved_models" / "digits_query.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:2])
        np.save(tmp_path / "y.npy", data["y"][:2])
        expected = data["scores"][:2]
    # `show` and `run` are independent: both start at once (each process starts TensorFlow), output to files.
    commands = {"show": [*_saved_model_cli(), "show", "--all", "--dir", str(EXAMPLE)],
                "run": [*_saved_model_cli(), "run", "--dir", str(EXAMPLE), "--tag_set", "serve", "--signature_def",
                        "influence", "--inputs", f"x={tmp_path / 'x.npy'};y={tmp_path / 'y.npy'}", "--outdir",
                        str(tmp_path / "out")]}
    procs = {}
    for name, command in commands.items():
        with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=_ENV)
    try:
        returncodes = {name: proc.wait(timeout=300) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    show_stdout = (tmp_path / "show.out").read_text()
    assert returncodes["show"] == 0, (tmp_path / "show.err").read_text()[-3000:]
    for name in ("'influence'", "'top_k'", "'self_influence'", "'serving_default'"):
        assert f"signature_def[{name}]" in show_stdout, name
    assert returncodes["run"] == 0, (tmp_path / "run.err").read_text()[-3000:]
    scores = np.load(tmp_path / "out" / "scores.npy")
    assert scores.shape == expected.shape == (2, 1200)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
