"""The linear datamodeling score ranks exact influence above the gradient dot product and random.

Logistic regression on correlated features, where the Hessian is far from a multiple of the
identity: the exact inverse-Hessian attribution must predict retrained test losses (over random half
subsets, each retrained to its optimum by an independent closed-form scipy fit) better than
`g_testᵀ g_i`, which ignores the curvature.
"""

import keras
import numpy as np

import tf_influence as tfi
from tests import models

bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype="float64")


def _correlated_logistic_data(rng, n, d=6):
    """Features mixed by a fixed matrix (strongly correlated, unequal scales); labels from a logistic model."""
    mixing = np.tril(rng.standard_normal((d, d))) + np.diag(np.linspace(0.2, 3.0, d))
    x = rng.standard_normal((n, d)) @ mixing.T
    logits = x @ rng.standard_normal(d) * 0.7
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype("float64")[:, None]
    return x, y


def _per_example_gradients(x, y, model):
    """Closed form for logistic regression: ∇ℓᵢ = (σ(zᵢ) − yᵢ) [xᵢ, 1] (kernel, then bias)."""
    residual = 1 / (1 + np.exp(-model(x).numpy())) - y
    return residual * np.hstack([x, np.ones((len(x), 1))])


def _fit(x, y, l2):
    """Optimum θ = [kernel, bias] of mean BCE + (l2/2)‖θ‖² by Newton's method (closed-form Hessian), and ‖∇‖∞."""
    features = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(features.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-features @ theta))
        grad = features.T @ (p - y[:, 0]) / len(p) + l2 * theta
        if np.max(np.abs(grad)) < 1e-12:
            break
        hessian = (features * (p * (1 - p))[:, None]).T @ features / len(p) + l2 * np.eye(len(theta))
        theta -= np.linalg.solve(hessian, grad)
    return theta, np.max(np.abs(grad))


def _test_losses(theta, x, y):
    z = x @ theta[:-1] + theta[-1]
    return np.logaddexp(0, z) - y[:, 0] * z


def test_lds_exact_influence_beats_gradient_dot_and_random(float64):
    rng = np.random.default_rng(0)
    x, y = _correlated_logistic_data(rng, 160)
    train, test = (x[:120], y[:120]), (x[120:], y[120:])
    l2 = 1e-2
    model = models.logistic_regression(x.shape[1])
    theta, grad_norm = _fit(*train, l2)
    assert grad_norm < 1e-9
    model.set_weights([theta[:-1, None], theta[-1:]])

    inf = tfi.Influence(model, bce, train, method="direct", damping=0.0, l2=l2, progress=False)
    exact = inf.predicted_loss_change(test)
    g_train, g_test = _per_example_gradients(*train, model), _per_example_gradients(*test, model)
    gradient_dot = g_test @ g_train.T / len(g_train)
    random = rng.standard_normal(exact.shape)

    cache = {}

    def retrain(kept):  # to the optimum on the kept examples; the three scores share the subsets (same seed)
        key = tuple(kept)
        if key not in cache:
            theta_kept, grad_norm = _fit(train[0][kept], train[1][kept], l2)
            assert grad_norm < 1e-9
            cache[key] = _test_losses(theta_kept, *test)
        return cache[key]

    scores = {name: tfi.validation.linear_datamodeling_score(a, retrain, num_subsets=12, seed=0).score
              for name, a in (("exact", exact), ("gradient_dot", gradient_dot), ("random", random))}
    print(f"LDS on 12 half subsets: {scores}")
    assert len(cache) == 12
    assert scores["exact"] > scores["gradient_dot"] + 0.1, scores
    assert scores["exact"] > scores["random"] + 0.5, scores
    assert scores["exact"] > 0.7, scores
