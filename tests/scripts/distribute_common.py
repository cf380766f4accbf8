"""The model, loss and data every distributed test process builds (imported by the scripts beside it)."""

import keras
import numpy as np


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def mlp():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, activation="tanh", name="hidden"),
        keras.layers.Dense(3, name="head"),
    ])


def sce(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def data():
    """`(rng, x, y, w, x_test, y_test)`; the rng continues the same stream in every process."""
    rng = np.random.default_rng(0)
    n = 37                                  # 37 = 4 batches of 10 (last partial, odd size)
    x = rng.standard_normal((n, 4))
    y = rng.integers(0, 3, size=n)
    w = rng.uniform(0.5, 2.0, size=n)       # sample weights: exact weighted means required
    x_test = rng.standard_normal((5, 4))
    y_test = rng.integers(0, 3, size=5)
    return rng, x, y, w, x_test, y_test
