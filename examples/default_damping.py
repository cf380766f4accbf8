"""The default call on ordinary networks: `tfi.Influence(model, loss, train).scores(test)`.

A ReLU MLP and a CNN with BatchNormalization and max pooling, trained briefly on scikit-learn's
bundled digits (no download). Their Hessians are indefinite, so CG with a small fixed damping
(0 or 1e-3, tried below) can meet negative curvature; the default `damping=None` chooses λ from
the spectrum (30 Lanczos products of the undamped Hessian: the smallest λ that makes H + λI
positive definite with condition ≤ ~100). For each model this prints the λ chosen and why, the
route `method="auto"` took, the exact extreme eigenvalues of H (dense, to compare with the Lanczos estimate), and
what CG does with damping 0 and 1e-3.

Run: python examples/default_damping.py        (a few minutes on a laptop CPU)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tf_influence as tfi  # noqa: E402


def relu_mlp():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])


def batchnorm_cnn():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, padding="same"),
                             keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.MaxPooling2D(2),
                             keras.layers.Flatten(), keras.layers.Dense(10)])


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    train, test = (x[:500], y[:500]), (x[1000:1010], y[1000:1010])
    for name, build in (("ReLU MLP", relu_mlp), ("BatchNorm CNN", batchnorm_cnn)):
        model = build()
        model.compile("adam", loss)
        model.fit(x[:1000], y[:1000], epochs=10, batch_size=32, verbose=0)
        inf = tfi.Influence(model, loss, train, progress=False)  # the default call: method="auto", damping=None
        scores = inf.scores(test)
        info = inf.last_solve_info
        route = inf.prepared().method.name
        exact = np.linalg.eigvalsh(tfi.HessianOperator(model, loss, train).to_dense().numpy().astype(np.float64))
        print(f"{name} ({inf.space.size} parameters): scores {scores.shape}, λ = {inf.damping:.4g} "
              f"({info.extra['damping_source']}), route {route}, residual {info.residual:.1e}, "
              f"converged={info.converged}")
        print(f"  exact eigenvalues of H in [{exact[0]:.4g}, {exact[-1]:.4g}]; {info.extra['damping_reason']}")
        for damping in (0.0, 1e-3):
            try:
                tfi.Influence(model, loss, train, method="cg", damping=damping, progress=False).scores(test)
                print(f"  method='cg', damping={damping:g}: CG converged too")
            except tfi.NegativeCurvatureError as error:
                print(f"  method='cg', damping={damping:g}: NegativeCurvatureError ({str(error)[:60]}...)")


if __name__ == "__main__":
    main()
