"""Quickstart: which training examples made a prediction, and what removing one would change.

Logistic regression on scikit-learn's bundled breast-cancer data (no download), trained to its
optimum, then:
  1. the most helpful and most harmful training examples for a test prediction,
  2. the predicted change of that test loss if each is removed, checked against actually
     retraining without it (leave-one-out).

Run: python examples/quickstart.py        (about 20 s on a laptop CPU)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import tf_influence as tfi  # noqa: E402
from tf_influence import validation  # noqa: E402


def main():
    keras.config.set_floatx("float64")  # float64 makes the comparison with retraining exact
    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = StandardScaler().fit_transform(data.data)[order]
    y = data.target[order].astype("float64")[:, None]
    train, test = (x[:400], y[:400]), (x[400:], y[400:])

    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(1)])
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    l2 = 0.1
    grad_norm = validation.fit_to_optimum(model, loss, train, l2=l2)  # L-BFGS to the optimum
    print(f"Trained logistic regression on {len(train[1])} examples (gradient norm {grad_norm:.1e}).")

    # The influence of every training example on every test loss. `l2` must match training.
    inf = tfi.Influence(model, loss, train, l2=l2, method="cg", progress=False)
    test_point = (test[0][:1], test[1][:1])
    top = inf.top_k(test_point, k=5)
    print("\nTest example 0, label", int(test_point[1][0, 0]))
    print("  most helpful training examples:", top.helpful_indices[0].tolist(),
          "scores", np.round(top.helpful_scores[0], 3).tolist())
    print("  most harmful training examples:", top.harmful_indices[0].tolist(),
          "scores", np.round(top.harmful_scores[0], 3).tolist())

    # Positive score = helped. Removing example i is predicted to change the test loss by score/n.
    predicted = inf.predicted_loss_change(test_point)
    check = np.concatenate([top.helpful_indices[0], top.harmful_indices[0]])
    result = validation.leave_one_out(model, loss, train, test_point, check,
                                      predicted=predicted[:, check], l2=l2)
    print("\n  removed  predicted Δloss  actual Δloss (retrained)")
    for i, p, a in zip(check, result.predicted[0], result.actual[0]):
        print(f"  #{i:<6d} {p:+.6f}        {a:+.6f}")
    print(f"\nPearson correlation predicted vs actual: {result.pearson:.4f}")


if __name__ == "__main__":
    main()
