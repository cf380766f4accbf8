"""SavedModel export: loaded in a fresh process without tf_influence, it gives the library's scores."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "saved_models" / "digits_mlp"

# Runs in a fresh interpreter in which `import tf_influence` fails: only TensorFlow loads the models.
_LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["tf_influence"] = None
    import numpy as np, tensorflow as tf
    try:
        import tf_influence
        hidden = False
    except ImportError:
        hidden = True
    out = {"hidden": hidden}
    for name in sys.argv[2:]:
        data = np.load(f"{sys.argv[1]}/{name}.npz")
        model = tf.saved_model.load(f"{sys.argv[1]}/{name}")
        x, y = tf.constant(data["x"]), tf.constant(data["y"])
        sig = model.signatures
        scores = sig["influence"](x=x, y=y)["scores"].numpy()
        top = sig["top_k"](x=x, y=y, k=tf.constant(3))
        self_inf = sig["self_influence"](x=x, y=y)["scores"].numpy()
        preds = sig["serving_default"](x=x)["predictions"].numpy()
        rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
        errors = {}
        for label, bad in [("width", lambda: sig["influence"](x=tf.zeros([2, x.shape[1] + 1], x.dtype), y=y[:2])),
                           ("label_dtype", lambda: sig["influence"](x=x, y=tf.cast(y, tf.float32))),
                           ("k", lambda: sig["top_k"](x=x, y=y, k=tf.constant(10**6)))]:
            try:
                bad()
                errors[label] = None
            except Exception as e:
                errors[label] = type(e).__name__
        out[name] = {"scores": rel(scores, data["scores"]), "self": rel(self_inf, data["self_influence"]),
                     "predictions": rel(preds, data["predictions"]),
                     "top_k": bool(np.array_equal(top["helpful_indices"].numpy(), data["helpful"])
                                   and np.array_equal(top["harmful_indices"].numpy(), data["harmful"])),
                     "shape": list(scores.shape), "errors": errors}
    print(json.dumps(out))
""")

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _run_hidden(tmp_path, names):
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), *names], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_loaded_model_gives_the_library_scores_without_tf_influence(tmp_path, float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng, n=40)
    train, test = (x[:30], y[:30]), (x[30:], y[30:])
    methods = {"direct": {}, "cg": {"tol": 1e-10}, "ekfac": {}}
    for method, options in methods.items():
        inf = tfi.Influence(model, sce, train, method=method, damping=0.1, curvature="gauss_newton",
                            progress=False, **options)
        info = tfi.export_saved_model(inf, tmp_path / method)
        assert info["parameters"] == inf.space.size and info["n_train"] == 30 and info["bytes"] > 0
        scores = inf.scores(test)
        top = inf.top_k(test, 3)
        np.savez(tmp_path / f"{method}.npz", x=test[0], y=test[1], scores=scores,
                 self_influence=_self_influence(inf, test), predictions=model(test[0]).numpy(),
                 helpful=top.helpful_indices, harmful=top.harmful_indices)
    result = _run_hidden(tmp_path, list(methods))
    print(json.dumps(result))  # the measured differences, shown with `pytest -s`
    assert result["hidden"]
    for method in methods:
        r = result[method]
        assert r["shape"] == [10, 30]
        assert r["scores"] <= 1e-5 and r["self"] <= 1e-5 and r["predictions"] <= 1e-12, (method, r)
        assert r["top_k"], method
        assert all(r["errors"].values()), r["errors"]  # each bad input raised


def _self_influence(inf, test):
    """`g_testᵀ (H + λI)⁻¹ g_test` for new points, from the library's cached test IHVPs."""
    grads = np.concatenate([inf._gradients(b).numpy() for b in inf._dataset(test, "test")])
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

    tfi.export_saved_model(inf, target)
    with pytest.raises(tfi.InputError, match="already exists. Pass overwrite=True"):
        tfi.export_saved_model(inf, target)
    tfi.export_saved_model(inf, target, overwrite=True)
    assert (target / "saved_model.pb").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(tfi.ResourceError, match="max_parameters=10"):
        tfi.export_saved_model(inf, tmp_path / "big", max_parameters=10)


def test_saved_model_cli_runs_the_committed_example(tmp_path):
    cli = shutil.which("saved_model_cli") or str(pathlib.Path(sys.executable).parent / "saved_model_cli")
    with np.load(ROOT / "saved_models" / "digits_query.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:2])
        np.save(tmp_path / "y.npy", data["y"][:2])
        expected = data["scores"][:2]
    result = subprocess.run(
        [cli, "run", "--dir", str(EXAMPLE), "--tag_set", "serve", "--signature_def", "influence",
         "--inputs", f"x={tmp_path / 'x.npy'};y={tmp_path / 'y.npy'}", "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    scores = np.load(tmp_path / "out" / "scores.npy")
    assert scores.shape == expected.shape
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
