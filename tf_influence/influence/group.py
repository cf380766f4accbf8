"""Group influence: the predicted effect on each test measurement of removing a SET of training examples.

For a group U with weight fraction `p = Σ_{i∈U} wᵢ / Σw`, write (docs/mathematics.md, "Group influence")

    ĝ_U = Σ_{i∈U} wᵢ ∇ℓ(zᵢ) / Σw                    the group's share of the loss gradient
    s   = (H + λI)⁻¹ ∇m(z_test)                     the test point's solution (σ included)

**First order** is the sum of the individual removals, `Σ_{i∈U} Influence.predicted_change`:

    Δm⁽¹⁾ = ⟨∇m, (H + λI)⁻¹ ĝ_U⟩

It leaves out that the mean of the remaining losses is renormalised while the regulariser Ω is
not, so the regulariser gains weight: to first order `p ⟨∇m, (H + λI)⁻¹ ∇Ω⟩` (`regularization_term`;
zero without l2 or weight regularisers). `first_order + regularization_term` is the first-order
Taylor expansion of leave-group-out retraining in the group's weight.

**Second order** is Basu, You & Feizi (2020, "On Second-Order Group Influence Functions for
Black-Box Predictions", ICML), applied to the training objective written as a mean of
`ℓ̃ᵢ = ℓᵢ + Ω` (removing examples renormalises the mean of the losses but not the regulariser Ω, and
that is exactly what the mean of ℓ̃ over the kept examples does):

    g̃_U = ĝ_U + p ∇Ω(θ)                          Ã_U v = Σ_{i∈U} wᵢ ∇²ℓᵢ v / Σw + p ∇²Ω v
    u   = (H + λI)⁻¹ g̃_U
    Δθ⁽²⁾ = (1 − 2p)/(1 − p)² · u  +  1/(1 − p)² · (H + λI)⁻¹ Ã_U u
    Δm⁽²⁾ = ⟨∇m, Δθ⁽²⁾⟩ = (1 − 2p)/(1 − p)² ⟨s, g̃_U⟩ + 1/(1 − p)² ⟨s, Ã_U u⟩

(the same coefficients as influenciae's `SecondOrderInfluenceCalculator`). The correction adds the
pairwise interactions of the removed examples (through the group's own curvature Ã_U) and the
renormalisation of the mean; it is exact when the loss is quadratic and the group's curvature is
its share of the total (`Ã_U = p·H`). Both orders are linear in Δθ (the test measurement's own
curvature is left out, as in the paper).

Cost: per group, one gradient and one curvature product over the group's examples only (never a
pass over the whole training set), and one solve for all groups together. The curvature products
are exact (the Hessian, or the Gauss-Newton matrix with `curvature="gauss_newton"`), whatever the
method that solves with `H + λI`.
"""

import dataclasses
import weakref

import numpy as np
import tensorflow as tf

from tf_influence.curvature.products import batch_curvature_product, regularizer_curvature_product
from tf_influence.data import DEFAULT_BATCH_SIZE
from tf_influence.errors import InputError, SecondDerivativeError
from tf_influence.traps import second_derivative_traps, trap_message

_COMPILED = weakref.WeakKeyDictionary()  # Influence -> its compiled group functions (traced once)


@dataclasses.dataclass(frozen=True)
class GroupInfluence:
    """Predicted change of each test measurement when each group is removed (and the model retrained).

    Attributes:
      first_order: `[n_test, n_groups]`, the sum of the individual predicted changes.
      second_order: `[n_test, n_groups]`, Basu et al.'s second-order prediction (None for `order=1`).
      regularization_term: `[n_test, n_groups]`, the first-order effect of the regulariser's relative
        weight growing when the group is removed (see the module docstring).
      fractions: `[n_groups]`, each group's share `p` of the training weight.
      sizes: `[n_groups]`, the number of examples in each group.

    The changes are of the measurement itself (the loss by default): positive means removing the
    group raises it (bad for a loss, good for a margin).
    """

    first_order: np.ndarray
    second_order: np.ndarray
    regularization_term: np.ndarray
    fractions: np.ndarray
    sizes: np.ndarray


def group_influence(influence, test, groups, *, order=2):
    """Predicted change of each test measurement when each group of training examples is removed.

    Args:
      influence: a `tfi.Influence` (any method; the model should be at a minimum of its objective).
      test: test data, as for `Influence.scores`.
      groups: a list of groups, each a sequence of training indices (a single flat list of indices
        is one group), or a boolean mask `[n_groups, n_train]`.
      order: 1 (first order only) or 2 (also the second-order prediction).

    Returns:
      A `GroupInfluence`.

    Example:
      >>> result = inf.group_influence((x_test, y_test), [[3, 17, 42], list(range(100, 140))])
      >>> result.second_order[0]        # predicted change of test point 0's loss, per group
    """
    if order not in (1, 2):
        raise InputError(f"order must be 1 or 2. Received: order={order!r}.")
    weights = influence.problem.weights()
    groups = _check_groups(groups, len(weights))
    total = weights.sum()
    fractions = np.array([weights[g].sum() / total for g in groups])
    if np.any(fractions >= 1.0):
        raise InputError("A group holds all of the training weight; removing it leaves nothing to train on. "
                         f"Group sizes: {[len(g) for g in groups]} of {len(weights)}.")
    if order == 2:
        _check_curvature(influence)
    directions = influence.test_inverse_hvps(test)  # [n_test, p]
    members = np.unique(np.concatenate(groups))
    examples = _gather(influence.problem.batches, members)
    chunk = influence.problem.batch_size or DEFAULT_BATCH_SIZE
    if influence not in _COMPILED:
        _COMPILED[influence] = (_compiled_gradient_sum(influence), _compiled_curvature(influence),
                                _regularizer(influence))
    gradient_sum, product, (reg_gradient_fn, reg_product) = _COMPILED[influence]
    group_gradients = np.stack([
        _over_chunks(examples, np.searchsorted(members, g), chunk, gradient_sum) / total for g in groups])
    sigma = influence.measurement.orientation
    first = sigma * directions @ group_gradients.T
    reg_gradient = reg_gradient_fn().numpy()
    regularization = sigma * np.outer(directions @ reg_gradient, fractions)
    second = None
    if order == 2:
        tilde = group_gradients + fractions[:, np.newaxis] * reg_gradient[np.newaxis, :]
        u = np.asarray(influence.solve(tf.constant(tilde, influence.space.dtype)))
        curved = np.stack([
            _over_chunks(examples, np.searchsorted(members, g), chunk, product, u[j]) / total
            + fractions[j] * reg_product(u[j]) for j, g in enumerate(groups)])
        c1 = (1.0 - 2.0 * fractions) / (1.0 - fractions) ** 2
        c2 = 1.0 / (1.0 - fractions) ** 2
        second = sigma * (c1 * (directions @ tilde.T) + c2 * (directions @ curved.T))
    return GroupInfluence(np.asarray(first, np.float64), None if second is None else np.asarray(second, np.float64),
                          np.asarray(regularization, np.float64), fractions, np.array([len(g) for g in groups]))


def _check_groups(groups, n):
    if isinstance(groups, np.ndarray) and groups.dtype == bool:
        if groups.ndim != 2 or groups.shape[1] != n:
            raise InputError(f"A boolean group mask must have shape [n_groups, {n}]. Received {groups.shape}.")
        groups = [np.flatnonzero(row) for row in groups]
    elif isinstance(groups, (list, tuple, np.ndarray)) and len(groups) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in groups):
        groups = [groups]
    if not isinstance(groups, (list, tuple)) or not groups:
        raise InputError(f"groups must be a non-empty list of index lists (or a boolean mask [n_groups, {n}]). "
                         f"Received {type(groups).__name__}.")
    checked = []
    for j, group in enumerate(groups):
        g = np.asarray(group)
        if g.ndim != 1 or g.size == 0 or g.dtype.kind not in "iu" or np.any(g < 0) or np.any(g >= n):
            raise InputError(f"Group {j} must be a non-empty list of training indices in [0, {n}). Received "
                             f"{np.asarray(group).tolist()!r:.200}.")
        if len(np.unique(g)) != len(g):
            raise InputError(f"Group {j} lists an index more than once; each example is removed once.")
        checked.append(np.sort(g.astype(np.int64)))
    return checked


def _check_curvature(influence):
    source = influence.source
    mode = source.hessian_options.get("mode", "back_over_back")
    if source.curvature == "hessian":
        if mode == "finite_difference":
            raise InputError("The second-order group influence needs curvature products of each group; "
                             "mode='finite_difference' has none per batch. Use order=1, another mode, or "
                             "curvature='gauss_newton'.")
        problem = influence.problem
        traps = second_derivative_traps(problem.model, problem.variables, training=problem.objective.training)
        if traps:
            raise SecondDerivativeError(trap_message(traps, mode) + " (Needed by the second-order group influence; "
                                        "order=1 needs no second derivatives.)")


def _gather(dataset, indices):
    """The training examples at the sorted `indices`, as one `(x, y, w)` structure of tensors."""
    parts, offset, cursor = [], 0, 0
    for batch in dataset:
        size = int(tf.shape(batch[2])[0])
        stop = int(np.searchsorted(indices, offset + size))
        if stop > cursor:
            local = tf.constant(indices[cursor:stop] - offset)
            parts.append(tf.nest.map_structure(lambda t: tf.gather(t, local), batch))
            cursor = stop
        offset += size
    return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0), *parts)


def _over_chunks(examples, positions, chunk, fn, *args):
    """`Σ` over chunks of the examples at `positions` of `fn(batch, *args)` (flat NumPy vectors)."""
    total = 0.0
    for start in range(0, len(positions), chunk):
        rows = tf.constant(positions[start:start + chunk])
        total = total + fn(tf.nest.map_structure(lambda t: tf.gather(t, rows), examples), *args).numpy()
    return total


def _compiled_gradient_sum(influence):
    """`fn(batch) -> [p]`: `Σᵢ wᵢ ∇ℓ(zᵢ)` over a batch."""
    problem = influence.problem

    def gradient_sum(batch):
        with tf.GradientTape() as tape:
            tape.watch(problem.tf_variables)
            value = problem.objective.weighted_loss_sum(*batch)
        grads = tape.gradient(value, problem.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return problem.space.flatten(grads)

    return tf.function(gradient_sum, reduce_retracing=True)


def _compiled_curvature(influence):
    """`fn(batch, v) -> [p]`: `Σᵢ wᵢ Cᵢ v` over a batch, C the Influence's curvature (Hessian or GGN)."""
    problem, source = influence.problem, influence.source
    mode = source.hessian_options.get("mode", "back_over_back")
    space = problem.space

    def product(batch, vector):
        tangents = space.unflatten(tf.convert_to_tensor(vector, space.dtype)[tf.newaxis])
        result = batch_curvature_product(problem.objective, problem.tf_variables, batch, tangents, mode=mode,
                                         curvature=source.curvature)
        return space.flatten(result, batch_dims=1)[0]

    return tf.function(product, reduce_retracing=True)


def _regularizer(influence):
    """`(fn() -> ∇Ω(θ) [p], fn(v) -> ∇²Ω v [p])` for the objective's weight regularisers and l2."""
    problem = influence.problem
    space, tf_vars = problem.space, problem.tf_variables

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            value = problem.objective.regularization(problem.variables)
        return space.flatten(tape.gradient(value, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO))

    @tf.function
    def product(vector):
        tangents = space.unflatten(vector[tf.newaxis])
        return space.flatten(regularizer_curvature_product(problem.objective, tf_vars, problem.variables, tangents),
                             batch_dims=1)[0]

    return gradient, lambda vector: product(tf.constant(vector, space.dtype)).numpy()
