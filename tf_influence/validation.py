"""Ground truth for influence: leave-one-out retraining of convex models, and the LDS.

`leave_one_out` retrains with L-BFGS (SciPy's L-BFGS-B on a compiled objective), warm-started from the full-data
optimum, once per removed example, and returns the actual change of each test loss next to what
influence predicted. Retraining only makes sense where the optimum is unique (convex models such
as logistic regression with l2 > 0, or a convex last layer with the rest frozen).

Removing example i here means retraining on the others with the usual mean objective. The
first-order prediction `score·wᵢ/Σw` differs from that by a term common to every i (the
renormalisation of the mean), which shifts but does not decorrelate the two.
"""

import dataclasses

import numpy as np
import scipy.optimize
import scipy.stats
import tensorflow as tf

from tf_influence.data import as_dataset
from tf_influence.errors import InputError
from tf_influence.influence.measurements import resolve_measurement
from tf_influence.objective import Objective
from tf_influence.problem import Problem


@dataclasses.dataclass(frozen=True)
class LeaveOneOutResult:
    """Actual vs predicted test-loss changes for removed training examples.

    Attributes:
      indices: the removed training examples `[m]`.
      actual: `[n_test, m]` test-loss change after retraining without each example.
      predicted: `[n_test, m]` the prediction given (or None).
      pearson, spearman: correlations over all entries (None without a prediction).
      max_gradient_norm: largest ‖∇R‖ at the end of the retrainings (how converged they are).
    """

    indices: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray = None
    pearson: float = None
    spearman: float = None
    max_gradient_norm: float = 0.0


def fit_to_optimum(model, loss, train, *, variables=None, l2=0.0, tolerance=1e-10, max_iterations=1000,
                   batch_size=None):
    """Minimises the mean training objective over `variables` with L-BFGS; updates the model in place.

    Returns the final gradient norm. Use it to make a convex model exactly optimal before
    comparing influence with retraining.

    Example:
      >>> fit_to_optimum(model, "binary_crossentropy", (x, y), l2=1e-2)
    """
    problem = _Retraining(model, loss, train, variables, l2, batch_size)
    theta, grad_norm = problem.minimize(problem.theta(), np.ones(problem.n), tolerance, max_iterations)
    problem.assign(theta)
    return grad_norm


def leave_one_out(model, loss, train, test, indices, *, predicted=None, variables=None, l2=0.0,
                  tolerance=1e-10, max_iterations=1000, batch_size=None, measurement=None):
    """Retrains without each listed training example and measures the change of each test loss.

    The model's weights are restored afterwards, also if an exception escapes.

    Args:
      model, loss, train: as for `tfi.Influence` (train as arrays or tf.data).
      test: test data whose losses are measured.
      indices: training examples to remove, one at a time.
      predicted: optional `[n_test, len(indices)]` predictions (e.g. columns of
        `Influence.predicted_loss_change`) to correlate with.
      variables, l2: the parameters retrained and the objective's l2 (match the Influence).
      tolerance: L-BFGS gradient tolerance; max_iterations: its iteration cap.
      measurement: what is measured on the test points instead of the loss (as for
        `tfi.Influence(measurement=...)`: "margin", "logit", "probability", a function, ...).

    Returns:
      A `LeaveOneOutResult`.

    Example:
      >>> pred = inf.predicted_loss_change(test)[:, idx]
      >>> result = leave_one_out(model, loss, train, test, idx, predicted=pred, l2=1e-2)
      >>> result.pearson
    """
    problem = _Retraining(model, loss, train, variables, l2, batch_size, measurement)
    indices = np.atleast_1d(np.asarray(indices))
    if indices.dtype.kind not in "iu" or np.any(indices < 0) or np.any(indices >= problem.n):
        raise InputError(f"indices must be integers in [0, {problem.n}). Received {indices.tolist()}.")
    original = problem.theta()
    test_set = as_dataset(test, batch_size=batch_size, name="test")
    try:
        base, base_norm = problem.minimize(original, np.ones(problem.n), tolerance, max_iterations)
        problem.assign(base)
        base_losses = problem.test_losses(test_set)
        actual, norms = [], [base_norm]
        for i in indices:
            mask = np.ones(problem.n)
            mask[i] = 0.0
            theta, grad_norm = problem.minimize(base, mask, tolerance, max_iterations)
            problem.assign(theta)
            actual.append(problem.test_losses(test_set) - base_losses)
            norms.append(grad_norm)
    finally:
        problem.assign(original)
    actual = np.stack(actual, axis=1)
    if predicted is None:
        return LeaveOneOutResult(indices, actual, max_gradient_norm=max(norms))
    predicted = np.asarray(predicted).reshape(actual.shape)
    pearson = float(np.corrcoef(predicted.ravel(), actual.ravel())[0, 1])
    spearman = float(scipy.stats.spearmanr(predicted.ravel(), actual.ravel()).statistic)
    return LeaveOneOutResult(indices, actual, predicted, pearson, spearman, max(norms))


@dataclasses.dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score: mean over test points of the Spearman correlation between
    predicted and actual outcomes over random training subsets."""

    score: float
    per_test: np.ndarray
    subsets: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray


def linear_datamodeling_score(attributions, retrain_fn, *, num_subsets=50, fraction=0.5, seed=0):
    """The LDS (Park et al. 2023) of removal attributions, with a user-supplied retraining function.

    For random subsets S (each training point kept with probability `fraction`), the prediction
    for a test point is `Σ_{i∉S} attributions[test, i]` (the predicted change of the measured
    quantity when the points outside S are removed) and the truth is `retrain_fn(S)`.

    Args:
      attributions: `[n_test, n_train]`, e.g. `Influence.predicted_loss_change(test)`.
      retrain_fn: `fn(kept_indices) -> [n_test]`: retrains on the kept training examples and
        returns the measured quantity (e.g. test losses) for each test point.
      num_subsets: number of random subsets; fraction: kept fraction; seed: subset seed.

    Returns:
      An `LDSResult` (`score` in [-1, 1]; higher is better).
    """
    attributions = np.asarray(attributions, dtype=np.float64)
    if attributions.ndim != 2:
        raise InputError(f"attributions must be [n_test, n_train]. Received shape {attributions.shape}.")
    if not 0 < fraction < 1 or num_subsets < 3:
        raise InputError(f"Need 0 < fraction < 1 and num_subsets ≥ 3. Received {fraction}, {num_subsets}.")
    rng = np.random.default_rng(seed)
    n_test, n_train = attributions.shape
    masks = rng.random((num_subsets, n_train)) < fraction
    actual = np.stack([np.asarray(retrain_fn(np.flatnonzero(m)), dtype=np.float64).reshape(n_test)
                       for m in masks])
    predicted = (~masks).astype(np.float64) @ attributions.T
    per_test = np.array([scipy.stats.spearmanr(predicted[:, t], actual[:, t]).statistic for t in range(n_test)])
    return LDSResult(float(np.nanmean(per_test)), per_test, masks, actual, predicted)


def subset_retrainer(model, loss, train, test, *, variables=None, l2=0.0, tolerance=1e-10,
                     max_iterations=1000, batch_size=None, measurement=None):
    """A `retrain_fn` for `linear_datamodeling_score` on a convex model.

    The returned function retrains on the kept training examples with L-BFGS (warm-started from
    the model's weights when the retrainer was made; compiled once and reused for every subset),
    returns the test losses `[n_test]` (or the test `measurement`, as for `tfi.Influence`), and
    restores the model's weights. Removing a set S and retraining is `retrain(complement of S)`.

    Example:
      >>> retrain = subset_retrainer(model, "binary_crossentropy", train, test, l2=0.1)
      >>> lds = linear_datamodeling_score(inf.predicted_loss_change(test), retrain)
    """
    problem = _Retraining(model, loss, train, variables, l2, batch_size, measurement)
    test_set = as_dataset(test, batch_size=batch_size, name="test")
    start = problem.theta()

    def retrain(kept):
        kept = np.asarray(kept)
        if kept.dtype.kind not in "iu" or kept.size == 0 or np.any(kept < 0) or np.any(kept >= problem.n):
            raise InputError(f"kept must be non-empty integer indices in [0, {problem.n}). Received {kept!r}.")
        mask = np.zeros(problem.n)
        mask[kept] = 1.0
        try:
            theta, _ = problem.minimize(start, mask, tolerance, max_iterations)
            problem.assign(theta)
            return problem.test_losses(test_set)
        finally:
            problem.assign(start)

    return retrain


class _Retraining:
    """The mean objective over the selected variables as a function of a flat θ, per-example masks."""

    def __init__(self, model, loss, train, variables, l2, batch_size, measurement=None):
        problem = Problem(model, loss, train, variables, l2=0.0 if isinstance(loss, Objective) else l2,
                          batch_size=batch_size, name="train")
        self.objective, self.variables = problem.objective, problem.variables
        self.measurement = resolve_measurement(measurement, problem.objective)
        self.space, self.tf_vars, self.dataset = problem.space, problem.tf_variables, problem.dataset
        self.weights = problem.weights()
        self.n = len(self.weights)
        self._value_and_gradient = tf.function(self._value_and_gradient_fn)

    def theta(self):
        return self.space.flatten(self.tf_vars).numpy()

    def assign(self, theta):
        for var, part in zip(self.tf_vars, self.space.unflatten(theta)):
            var.assign(part)

    def _value_and_gradient_fn(self, theta, mask):
        for var, part in zip(self.tf_vars, self.space.unflatten(theta)):
            var.assign(part)
        total = tf.zeros([], self.space.dtype)
        weight = tf.zeros([], self.space.dtype)
        grad = tf.zeros([self.space.size], self.space.dtype)
        offset = tf.constant(0)
        for x, y, w in iter(self.dataset):  # an iterator, as in HessianOperator's data pass
            size = tf.shape(w)[0]
            wm = tf.cast(w, self.space.dtype) * tf.cast(mask[offset:offset + size], self.space.dtype)
            with tf.GradientTape() as tape:
                losses = self.objective.per_example_loss(y, self.objective.outputs(x))
                value = tf.reduce_sum(wm * tf.cast(losses, self.space.dtype))
            grads = tape.gradient(value, self.tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            total += value
            grad += self.space.flatten(grads)
            weight += tf.reduce_sum(wm)
            offset += size
        with tf.GradientTape() as tape:
            reg = self.objective.regularization(self.variables)
        reg_grad = self.space.flatten(tape.gradient(reg, self.tf_vars, unconnected_gradients="zero"))
        return total / weight + reg, grad / weight + reg_grad

    def minimize(self, start, mask, tolerance, max_iterations):
        """`(θ, ‖∇R(θ)‖)`: L-BFGS from `start` until the gradient's largest entry is below `tolerance`.

        SciPy's L-BFGS-B drives the compiled objective (one trace per `_Retraining`); TFP's traced
        `lbfgs_minimize` took the same time per run but ~8 s to trace (logistic regression, 31 weights).
        """
        mask = tf.constant(mask, self.space.dtype)

        def value_and_gradient(theta):
            value, grad = self._value_and_gradient(tf.constant(theta, self.space.dtype), mask)
            return float(value), grad.numpy().astype(np.float64)

        result = scipy.optimize.minimize(
            value_and_gradient, np.asarray(start, np.float64), jac=True, method="L-BFGS-B",
            options=dict(gtol=tolerance, ftol=0.0, maxiter=max_iterations, maxcor=20))
        theta = result.x.astype(self.space.dtype.as_numpy_dtype)
        _, grad = self._value_and_gradient(tf.constant(theta), mask)
        return theta, float(np.linalg.norm(grad.numpy()))

    def test_losses(self, test_set):
        """The measurement (default: the loss) of each test example `[n_test]`."""
        return np.concatenate([self.measurement(y, self.objective.outputs(x)).numpy() for x, y, _ in test_set])
