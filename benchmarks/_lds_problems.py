"""The two problems of `benchmarks/lds.py`: data, the trained model, and retrained outcomes (cached).

A `Problem` holds a float64 Keras model trained on all training data, the data, the objective's l2,
and the ground truth of the LDS: for each random half subset S (drawn exactly as
`tfi.validation.linear_datamodeling_score` draws them), the test losses after retraining on S.

* `logreg`: logistic regression on scikit-learn's breast cancer (standardised, 400 train / 100 test),
  l2 = 1e-2. Convex: each subset is retrained to its unique optimum by
  `tfi.validation.subset_retrainer` (tfp L-BFGS, warm-started, tolerance 1e-10; the largest final
  gradient norm is printed), so there is no retraining noise and the ceiling is 1.
* `mlp`: a 64-32-10 tanh MLP (logits, float64) on scikit-learn's digits (pixels / 16, 1,200 train /
  100 test), objective mean cross-entropy + (l2/2)‖θ‖² over all weights and biases, l2 = 1e-3.
  Retraining recipe (fixed): full-batch L-BFGS (scipy's L-BFGS-B, 20 correction pairs) from a
  Glorot-uniform initialisation with zero biases, until the gradient's max-norm is ≤ 1e-6 (at most
  3,000 iterations), on the same objective, with two initialisations (seeds 1 and 2, shared by all
  subsets so that subsets differ only in their data); the outcome is the two runs' mean test loss,
  and the ceiling is the Spearman correlation (over subsets, mean over test points) between the two
  initialisations' losses. The attributed model is trained by the same recipe on all data (seed 0).

Why full-batch L-BFGS rather than Adam: it is deterministic given the initialisation (no minibatch
order), and it ends at a stationary point (‖∇R‖∞ ≤ 1e-6, reached after ~800-900 iterations), which
is what influence functions linearise around; Adam with a fixed schedule stops wherever the schedule
ends, so part of the retrained outcome would be optimiser noise. Why scipy on a numpy objective
rather than tensorflow-probability's L-BFGS: the same algorithm and stopping rule, but the ground
truth is then computed by code independent of TensorFlow and tf_influence, single-threaded and
bit-for-bit repeatable; speed is not the reason (side by side in one process on the loaded 2-core
machine, tfp took 22-24 s and scipy 34-43 s per fit; at a lower load scipy took 6 s). The
hand-written gradient is checked against TensorFlow's autodiff of the Keras model on every run
(`_check_against_keras`), so the attributed model computes the same objective.

Outcomes are cached in `benchmarks/.cache/lds_<problem>_<hash>.npz`, the hash covering the data,
the recipe and the subset draw, so a rerun only recomputes the attributions.
"""

import dataclasses
import hashlib
import json
import pathlib
import time
import warnings

import keras
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
import tensorflow as tf

import tf_influence as tfi

CACHE_DIR = pathlib.Path(__file__).resolve().parent / ".cache"
FRACTION = 0.5
SUBSET_SEED = 0


@dataclasses.dataclass
class Problem:
    """A trained model, its data, and the retrained outcomes of the LDS subsets."""

    name: str
    title: str
    model: keras.Model
    loss: keras.losses.Loss
    loss_name: str            # "binary_crossentropy" or "sparse_categorical_crossentropy", from logits
    train: tuple
    test: tuple
    l2: float
    num_subsets: int
    outcomes: dict            # frozenset(kept) -> [n_test] averaged retrained test loss
    per_init: np.ndarray      # [num_inits, num_subsets, n_test]
    ceiling: float            # Spearman between initialisations (nan when retraining is deterministic)
    recipe: dict
    retrain_seconds: float
    max_gradient_norm: float
    cached: bool

    def lookup(self, kept):
        """A `retrain_fn` for `tfi.validation.linear_datamodeling_score` that reads the cache."""
        return self.outcomes[frozenset(np.asarray(kept).tolist())]


def _subset_masks(n_train, num_subsets):
    """The subsets `linear_datamodeling_score` draws, asked of it with a retrain_fn that retrains nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Spearman of constant outcomes
        result = tfi.validation.linear_datamodeling_score(
            np.zeros((1, n_train)), lambda kept: np.zeros(1), num_subsets=num_subsets, fraction=FRACTION,
            seed=SUBSET_SEED)
    return np.asarray(result.subsets, dtype=bool)


def _key(name, recipe, arrays):
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return CACHE_DIR / f"lds_{name}_{digest.hexdigest()[:16]}.npz"


def _finish(name, title, model, loss, loss_name, train, test, l2, recipe, path, retrain_many, log, extra=None):
    """Loads the outcomes from `path` or computes them with `retrain_many(masks)` and saves them
    (with the arrays in `extra`, e.g. the attributed weights)."""
    masks = _subset_masks(len(train[1]), recipe["num_subsets"])
    cached = path.exists()
    if cached:
        stored = np.load(path)
        per_init, seconds, grad = stored["per_init"], float(stored["seconds"]), float(stored["max_grad"])
        if not np.array_equal(stored["masks"], masks):
            raise RuntimeError(f"{path} holds other subsets; delete it and rerun.")
        log(f"[{name}] retrained outcomes loaded from {path.relative_to(path.parents[1])}")
    else:
        start = time.perf_counter()
        per_init, grad = retrain_many(masks)
        seconds = time.perf_counter() - start
        CACHE_DIR.mkdir(exist_ok=True)
        np.savez(path, per_init=per_init, masks=masks, seconds=seconds, max_grad=grad,
                 recipe=json.dumps(recipe, sort_keys=True), **(extra or {}))
        log(f"[{name}] retrained {per_init.shape[0]} x {len(masks)} models in {seconds:.0f} s "
            f"(max final gradient norm {grad:.1e}); cached in {path.relative_to(path.parents[1])}")
    mean = per_init.mean(axis=0)
    outcomes = {frozenset(np.flatnonzero(m).tolist()): row for m, row in zip(masks, mean)}
    ceiling = float("nan")
    if per_init.shape[0] >= 2:
        ceiling = float(np.nanmean([scipy.stats.spearmanr(per_init[0][:, t], per_init[1][:, t]).statistic
                                    for t in range(mean.shape[1])]))
    return Problem(name, title, model, loss, loss_name, train, test, l2, len(masks), outcomes, per_init,
                   ceiling, recipe, seconds, grad, cached)


# -- (a) logistic regression --------------------------------------------------------------------

def logistic_regression(*, num_subsets=50, n_train=400, n_test=100, l2=1e-2, log=print):
    """Breast cancer logistic regression, retrained to optimum per subset (convex: ceiling 1)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = StandardScaler().fit_transform(data.data)[order]
    y = data.target[order].astype("float64")[:, None]
    train, test = (x[:n_train], y[:n_train]), (x[n_train:n_train + n_test], y[n_train:n_train + n_test])
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype="float64")
    model = keras.Sequential([keras.Input((x.shape[1],), dtype="float64"),
                              keras.layers.Dense(1, dtype="float64", name="logit")])
    grad = tfi.validation.fit_to_optimum(model, loss, train, l2=l2)
    recipe = dict(problem="logreg", l2=l2, num_subsets=num_subsets, fraction=FRACTION, seed=SUBSET_SEED,
                  retrain="tfi.validation.subset_retrainer, L-BFGS tol 1e-10, warm start")
    path = _key("logreg", recipe, [*train, *test])

    def retrain_many(masks):
        retrain = tfi.validation.subset_retrainer(model, loss, train, test, l2=l2)
        rows = [retrain(np.flatnonzero(m)) for m in masks]
        return np.stack(rows)[np.newaxis], grad

    return _finish("logreg", f"logistic regression, breast cancer ({n_train} train, {n_test} test, "
                   f"p = {x.shape[1] + 1}, l2 = {l2:g}, convex: retrained to optimum)", model, loss,
                   "binary_crossentropy", train, test, l2, recipe, path, retrain_many, log)


# -- (b) digits MLP ------------------------------------------------------------------------------

_HIDDEN, _CLASSES = 32, 10


class _NumpyMLP:
    """Mean softmax cross-entropy + (l2/2)‖θ‖² of a d-32-10 tanh MLP, θ flat in Keras' weight order."""

    def __init__(self, d, l2):
        self.shapes = [(d, _HIDDEN), (_HIDDEN,), (_HIDDEN, _CLASSES), (_CLASSES,)]
        self.offsets = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes])
        self.l2 = l2

    def unflatten(self, theta):
        return [theta[a:b].reshape(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def init(self, seed):
        """Glorot-uniform kernels and zero biases (Keras' Dense defaults), from a seeded generator."""
        rng = np.random.default_rng(seed)
        parts = [rng.uniform(-1, 1, s).ravel() * np.sqrt(6 / sum(s)) if len(s) == 2 else np.zeros(s)
                 for s in self.shapes]
        return np.concatenate(parts)

    def logits(self, theta, x):
        w1, b1, w2, b2 = self.unflatten(theta)
        return np.tanh(x @ w1 + b1) @ w2 + b2

    def value_and_gradient(self, theta, x, y):
        w1, b1, w2, b2 = self.unflatten(theta)
        n = len(y)
        h = np.tanh(x @ w1 + b1)
        z = h @ w2 + b2
        lse = scipy.special.logsumexp(z, axis=1)
        value = np.mean(lse - z[np.arange(n), y]) + 0.5 * self.l2 * theta @ theta
        dz = np.exp(z - lse[:, None])
        dz[np.arange(n), y] -= 1.0
        dz /= n
        dh = (dz @ w2.T) * (1.0 - h * h)
        grad = np.concatenate([(x.T @ dh).ravel(), dh.sum(0), (h.T @ dz).ravel(), dz.sum(0)])
        return value, grad + self.l2 * theta

    def test_losses(self, theta, x, y):
        z = self.logits(theta, x)
        return scipy.special.logsumexp(z, axis=1) - z[np.arange(len(y)), y]

    def fit(self, x, y, seed, *, gtol=1e-6, maxiter=3000):
        """Full-batch L-BFGS from `init(seed)`; returns (θ, final gradient max-norm)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # tiny matrices: BLAS threads only contend
            result = scipy.optimize.minimize(
                self.value_and_gradient, self.init(seed), args=(x, y), jac=True, method="L-BFGS-B",
                options=dict(maxiter=maxiter, maxfun=4 * maxiter, gtol=gtol, ftol=0.0, maxcor=20))
        return result.x, float(np.max(np.abs(result.jac)))


def _keras_mlp(mlp, theta, d):
    model = keras.Sequential([
        keras.Input((d,), dtype="float64"),
        keras.layers.Dense(_HIDDEN, activation="tanh", dtype="float64", name="hidden"),
        keras.layers.Dense(_CLASSES, dtype="float64", name="head"),
    ])
    model.set_weights(mlp.unflatten(theta))
    return model


def _check_against_keras(mlp, theta, model, loss, x, y):
    """The numpy objective and gradient equal TF autodiff of the Keras model (else RuntimeError)."""
    value, grad = mlp.value_and_gradient(theta, x, y)
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        tf_value = tf.reduce_mean(loss(y, model(x))) + 0.5 * mlp.l2 * tf.add_n(
            [tf.reduce_sum(v ** 2) for v in variables])
    tf_grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(tf_value, variables)])
    errors = abs(value - float(tf_value)), np.max(np.abs(grad - tf_grad)) / np.max(np.abs(tf_grad))
    if errors[0] > 1e-10 or errors[1] > 1e-8:
        raise RuntimeError(f"numpy MLP objective disagrees with the Keras model: |Δvalue| = {errors[0]:.2e}, "
                           f"relative max |Δgrad| = {errors[1]:.2e}.")


def digits_mlp(*, num_subsets=50, n_train=1200, n_test=100, l2=1e-3, init_seeds=(1, 2), log=print):
    """Digits 64-32-10 tanh MLP; each subset retrained by full-batch L-BFGS from two initialisations."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x, y = (digits.data / 16.0)[order], digits.target[order].astype("int64")
    train, test = (x[:n_train], y[:n_train]), (x[n_train:n_train + n_test], y[n_train:n_train + n_test])
    mlp = _NumpyMLP(x.shape[1], l2)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    recipe = dict(problem="mlp", l2=l2, num_subsets=num_subsets, fraction=FRACTION, seed=SUBSET_SEED,
                  init_seeds=list(init_seeds), full_seed=0, gtol=1e-6, maxiter=3000, maxcor=20,
                  retrain="scipy L-BFGS-B full batch, numpy objective")
    path = _key("mlp", recipe, [*train, *test])

    stored = np.load(path) if path.exists() else None
    if stored is not None and "theta" in stored.files:  # the attributed weights, as retrained against
        theta, grad = stored["theta"], float(stored["max_grad"])
    else:
        theta, grad = mlp.fit(*train, seed=0)
    model = _keras_mlp(mlp, theta, x.shape[1])
    _check_against_keras(mlp, theta, model, loss, *train)

    def retrain_many(masks):
        per_init, worst = [], grad
        for seed in init_seeds:
            rows = []
            for m in masks:
                theta_s, g = mlp.fit(train[0][m], train[1][m], seed=seed)
                rows.append(mlp.test_losses(theta_s, *test))
                worst = max(worst, g)
            per_init.append(np.stack(rows))
            log(f"[mlp] retrained {len(masks)} subsets from initialisation seed {seed}")
        return np.stack(per_init), worst

    return _finish("mlp", f"digits MLP 64-32-10 tanh ({n_train} train, {n_test} test, "
                      f"p = {mlp.offsets[-1]}, l2 = {l2:g}, full-batch L-BFGS, 2 initialisations)",
                      model, loss, "sparse_categorical_crossentropy", train, test, l2, recipe, path,
                      retrain_many, log, extra=dict(theta=theta))


PROBLEMS = {"logreg": logistic_regression, "mlp": digits_mlp}
