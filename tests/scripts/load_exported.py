"""Loads exported influence SavedModels with TensorFlow alone and prints their answers as JSON.

Usage: python -I load_exported.py REPO_ROOT DIR NAME...; tests/test_export.py runs it from a temporary
directory after removing every way to find tf_influence (the editable-install finder and the
repository path), so only TensorFlow loads the models.
"""

import importlib.util
import json
import sys

sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                 and "editable" not in getattr(f, "__name__", "")]
sys.path = [p for p in sys.path if p and not p.startswith(sys.argv[1])]

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

out = {"hidden": importlib.util.find_spec("tf_influence") is None}

def diff(a, b):
    return {"abs": float(np.abs(a - b).max()), "rel": float(np.abs(a - b).max() / np.abs(b).max())}

for name in sys.argv[3:]:
    data = np.load(f"{sys.argv[2]}/{name}.npz")
    model = tf.saved_model.load(f"{sys.argv[2]}/{name}")
    x, y = tf.constant(data["x"]), tf.constant(data["y"])
    sig = model.signatures
    scores = sig["influence"](x=x, y=y)["scores"].numpy()
    top = sig["top_k"](x=x, y=y, k=tf.constant(3))
    r = {"signatures": sorted(sig), "shape": list(scores.shape), "scores": diff(scores, data["scores"]),
         "predictions": diff(sig["serving_default"](x=x)["predictions"].numpy(), data["predictions"]),
         "top_k": bool(np.array_equal(top["helpful_indices"].numpy(), data["helpful"])
                       and np.array_equal(top["harmful_indices"].numpy(), data["harmful"])),
         "settings": json.loads(model.settings.numpy())}
    if "self_influence" in sig:
        r["self"] = diff(sig["self_influence"](x=x, y=y)["scores"].numpy(), data["self_influence"])
    bad_x = x.numpy().copy()
    bad_x[0, 0] = np.nan
    errors = {}
    for label, call in [
            ("width", lambda: sig["influence"](x=tf.zeros([2, x.shape[1] + 1], x.dtype), y=y[:2])),
            ("label_dtype", lambda: sig["influence"](x=x, y=tf.cast(y, tf.float32))),
            ("label_range", lambda: sig["influence"](x=x, y=y + 100)),
            ("batch", lambda: sig["influence"](x=x[:3], y=y[:2])),
            ("nan", lambda: sig["influence"](x=tf.constant(bad_x), y=y)),
            ("k_large", lambda: sig["top_k"](x=x, y=y, k=tf.constant(10**6))),
            ("k_zero", lambda: sig["top_k"](x=x, y=y, k=tf.constant(0)))]:
        try:
            call()
            errors[label] = None
        except Exception as e:
            errors[label] = f"{type(e).__name__}: {str(e)}"
    r["errors"] = errors
    out[name] = r
print(json.dumps(out))
