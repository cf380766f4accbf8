"""Runs the README's code paths on a small model with a partial last batch and prints every TensorFlow
log message that mentions retracing, then the trace counts of the compiled per-batch functions.

A fresh process, because TensorFlow warns about frequent retracing at most twice per function per
process (tests/test_batch_functions.py runs it). Usage: python no_retracing.py
"""

import logging
import os
import pathlib
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_influence as tfi  # noqa: E402


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


records = Records()
tf.get_logger().addHandler(records)
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
rng = np.random.default_rng(0)
x, y = rng.standard_normal((43, 4)).astype("float32"), rng.integers(0, 3, 43)  # batches of 10 and a last one of 3
x_test, y_test = rng.standard_normal((7, 4)).astype("float32"), rng.integers(0, 3, 7)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
method = sys.argv[1] if len(sys.argv) > 1 else "cg"
inf = tfi.Influence(model, loss, (x, y), method=method, damping=1.0, batch_size=10, progress=False)
for _ in range(3):  # the compiled functions are reused across calls
    inf.scores((x_test, y_test))
    inf.top_k((x_test, y_test), k=3)
    inf.self_influence()
    inf.inverse_hvp(inf.training_gradients([0, 1, 2, 3, 4]))
    inf.inverse_hvp(inf.training_gradients([5]))
    inf.scores((x_test[:2], y_test[:2]))  # 2 test points: forward-mode dots
for message in records.messages:
    if "retracing" in message:
        print("RETRACING", message)
print("TRACES", inf.batch_functions.traces)
