"""Pairwise influence scores with KFAC/EKFAC, without per-example training gradients.

    score[j, i] = g_testⱼᵀ (C + λI)⁻¹ gᵢ = Σ_layers ⟨Pⱼ, Σ_t a_{i,t} g_{i,t}ᵀ⟩

with `Pⱼ = (C + λI)⁻¹ g_testⱼ` split into per-layer matrices `[d_a, d_g]` (one EKFAC solve for all
test points), and `a_{i,t}`, `g_{i,t}` the captured layer inputs and pre-activation gradients of
training example i. For a layer without positions (Dense on vectors) this is `Σ_l (aᵢᵀ Pⱼ)_l g_{i,l}`:
the `[d_a, d_g]` per-example gradient is never formed. For layers with positions (convolutions,
sequences) the per-example layer gradient of one batch is formed, one layer at a time.

`FactoredDots` (used by `Influence.scores` with KFAC/EKFAC where `eigenbasis_scores.py` does not
apply) takes the same rows the other way round: each training example's flat loss gradient
`Σ_t a_{i,t} g_{i,t}ᵀ` per block, assembled from ONE forward and backward pass of the batch, then one
matrix product with all preconditioned test directions. It gives the numbers of the per-example
jacobian route (`BatchFunctions`) to rounding; on the digits MLP of benchmarks/peers.py (1,200
examples, 2,410 parameters, 50 test points) it takes 0.1 s of CPU time where the jacobian took 1.3 s
(benchmarks/ekfac_speed.py).

The compiled functions (captured rows of a batch; scores of a batch; row gradients) are traced once
per model, blocks, loss and dtype and shared by later calls (a weak cache: an entry goes with its model).
"""

import contextlib
import weakref

import numpy as np
import tensorflow as tf

from tf_influence.curvature.layer_rows import layer_rows
from tf_influence.curvature.passes import shared_for_model
from tf_influence.data import as_dataset
from tf_influence.errors import InputError
from tf_influence.influence.batch_functions import DEFAULT_MEMORY_BUDGET
from tf_influence.layers import batch_coupled_layers
from tf_influence.linalg.host_blas import matmul_transposed
from tf_influence.linalg.kronecker import join_layers

DEFAULT_TEST_CHUNK = 128


def ekfac_scores(operator, test_gradients, train, *, objective=None, batch_size=None,
                 test_chunk=DEFAULT_TEST_CHUNK):
    """`g_testᵀ (C + λI)⁻¹ g_train` for every test gradient and training example.

    Args:
      operator: an `EKFACOperator` (fitted factors + damping).
      test_gradients: flat test gradients `[k, p]` (or `[p]`), in `operator.factors.space` order.
      train: training data, `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset`.
        Scores use each example's unweighted loss gradient `gᵢ = ∇ℓ(zᵢ, θ)`.
      objective: the `Objective` defining ℓ (default: the one the factors were fitted with).
      batch_size: batch size when `train` holds arrays.
      test_chunk: test rows scored together (memory `test_chunk · batch · d_g` per layer).

    Returns:
      `np.ndarray` `[k, n_train]` (float64). Positive: the training example helped the test loss.

    Example:
      >>> op = EKFACOperator(fit_factors(problem), damping=1e-3)
      >>> scores = ekfac_scores(op, g_test, train)          # [n_test, n_train]
    """
    factors = operator.factors
    objective = objective if objective is not None else factors.objective
    if objective is None:
        raise InputError(
            "ekfac_scores needs the loss: pass objective=tfi.Objective(model, loss) (loaded factors "
            "carry no objective).")
    coupled = [layer.name for layer in batch_coupled_layers(factors.model, training=objective.training)]
    if coupled:
        raise InputError(
            f"ekfac_scores needs each training example's gradient as Σ_t a_t g_tᵀ of its own captured rows, but in "
            f"training mode the batch statistics of {coupled} couple the examples of a batch. Use "
            "tfi.Influence(..., method='ekfac').scores(test) (per-example gradients by forward-mode passes), or an "
            "objective with training=False.")
    rows = tf.convert_to_tensor(test_gradients)
    if rows.shape.rank == 1:
        rows = rows[tf.newaxis]
    if rows.shape.rank != 2 or rows.shape[-1] != factors.space.size:
        raise InputError(
            f"test_gradients must have shape [k, {factors.space.size}] (flat gradients of the selected "
            f"variables). Received shape {tuple(rows.shape)}.")
    directions = operator.layer_solve(rows)
    dataset = as_dataset(train, batch_size=batch_size, name="train")
    functions = score_functions(objective, factors.blocks, operator.compute_dtype)
    columns = []
    with functions.using(objective):
        for x, y, _ in dataset:
            captured = functions.rows(x, y)
            parts = []
            for start in range(0, int(rows.shape[0]), test_chunk):
                chunk = [d[start:start + test_chunk] for d in directions]
                parts.append(functions.scores(captured, chunk).numpy())
            columns.append(np.concatenate(parts, axis=0))
    return np.concatenate(columns, axis=1).astype(np.float64)


_CACHE = weakref.WeakKeyDictionary()  # model -> {key: ScoreFunctions}


def score_functions(objective, blocks, dtype):
    """The compiled `ScoreFunctions` of `blocks` (shared by every call on the same model and settings)."""
    return shared_for_model(_CACHE, objective, blocks, tf.as_dtype(dtype).name, lambda: ScoreFunctions(blocks, dtype))


class ScoreFunctions:
    """`rows(x, y)`: per block `(a, g)` of each example's own loss; `scores(captured, directions)`: `[k, N]`.

    Attributes:
      traces: traces of each function (`{"rows": n, "scores": n}`), for tests and profiling.
    """

    def __init__(self, blocks, dtype):
        self.blocks = list(blocks)
        self.dtype = tf.as_dtype(dtype)
        self.traces = {"rows": 0, "scores": 0}
        self._objective = None  # set only during `using`: the cache must not keep the model alive
        self.rows = tf.function(self._rows, reduce_retracing=True, autograph=False)
        self.scores = tf.function(self._scores, reduce_retracing=True, autograph=False)

    @contextlib.contextmanager
    def using(self, objective):
        """Context in which `rows` evaluates `objective`."""
        self._objective = objective
        try:
            yield
        finally:
            self._objective = None

    def example_rows(self, x, y):
        """Per block, `(a, g)`: the captured input rows and the pre-activation gradient rows of each example's
        own loss (untraced: for use inside this object's compiled functions and those of subclasses)."""
        rows = layer_rows(self._objective, self.blocks, x, y, fisher="empirical", dtype=self.dtype)
        return [(a, gs[0][0]) for a, gs in rows]

    def _rows(self, x, y):
        self.traces["rows"] += 1
        return self.example_rows(x, y)

    def _scores(self, captured, directions):
        self.traces["scores"] += 1
        return _batch_scores(self.blocks, captured, directions)



def dots_for(problem, prepared):
    """`FactoredDots` for a prepared KFAC/EKFAC method (its `inverse` holds the factors' blocks), else None."""
    factors = getattr(getattr(prepared, "inverse", None), "factors", None)
    if factors is None or not same_variables(factors, problem):
        return None
    return factored_dots(problem, factors.blocks)


def same_variables(factors, problem):
    """True when `factors` were fitted for exactly the problem's selected variables (in its order)."""
    return [id(v) for v in factors.variables] == [id(v) for v in problem.variables]


def rows_apply(problem):
    """True where each example's gradient can be assembled from its own captured layer rows: no distribution
    strategy (rows are captured on one device) and no batch-coupled layers in training mode."""
    return problem.strategy is None and not batch_coupled_layers(problem.model, training=problem.objective.training)


def factored_dots(problem, blocks, *, memory_budget=DEFAULT_MEMORY_BUDGET):
    """A `FactoredDots` for `problem` (whose variables `blocks` cover), or None where its route does not
    apply: where `rows_apply` is False, or with an Embedding block (whose per-example gradient rows are
    vocabulary-sized)."""
    if not rows_apply(problem) or any(block.diagonal_inputs for block in blocks):
        return None
    return FactoredDots(problem, blocks, memory_budget=memory_budget)


class FactoredDots:
    """`⟨gᵢ, sⱼ⟩` for each example i of a batch and each direction j, with every example's loss gradient
    assembled from its captured layer rows (`Σ_t a_t g_tᵀ` per block, from one forward and one backward
    pass of the batch) rather than a per-example jacobian: the same numbers as
    `BatchFunctions.gradient_dots` up to rounding, for far less work on small layers. The batch is cut
    into slices whose `[m, p]` gradients fit in `memory_budget` bytes, each multiplied with all directions
    in one matrix product. The compiled function is shared by every `FactoredDots` on the same model.

    Example:
      >>> dots = factored_dots(problem, factors.blocks)
      >>> dots(batch, directions)                       # [m, k]
    """

    def __init__(self, problem, blocks, *, memory_budget=DEFAULT_MEMORY_BUDGET):
        self.problem = problem
        space = problem.space
        self.functions = _row_gradient_functions(problem.objective, blocks, space)
        self.step = max(1, int(memory_budget) // (space.size * space.dtype.size))

    def __call__(self, batch, directions):
        x, y = batch[0], batch[1]
        directions = tf.convert_to_tensor(directions, self.problem.space.dtype)
        m = int(tf.shape(tf.nest.flatten(x)[0])[0])
        parts = []
        with self.functions.using(self.problem.objective):
            for start in range(0, m, self.step):
                cut = lambda t: t[start:start + self.step]  # noqa: E731
                gradients = self.functions.gradients(tf.nest.map_structure(cut, x), tf.nest.map_structure(cut, y))
                parts.append(matmul_transposed(gradients, directions))
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


_GRADIENT_CACHE = weakref.WeakKeyDictionary()  # model -> {key: RowGradients}


def _row_gradient_functions(objective, blocks, space):
    # The flat order of the gradients is the space's: part of the key beside the blocks' variables.
    key = (tuple(id(v) for v in space.variables), space.dtype.name)
    return shared_for_model(_GRADIENT_CACHE, objective, blocks, key, lambda: RowGradients(blocks, space))


class RowGradients(ScoreFunctions):
    """`gradients(x, y)`: per-example loss gradients `[m, p]` (in `space` order) from captured layer rows.

    Attributes:
      traces: as `ScoreFunctions.traces`, with "gradients".
    """

    def __init__(self, blocks, space):
        super().__init__(blocks, space.dtype)
        index = {id(v): i for i, v in enumerate(space.variables)}
        self.layouts = [block.layout(index) for block in blocks]
        self.sizes = list(space.sizes)
        self.traces["gradients"] = 0
        self.gradients = tf.function(self._gradients, reduce_retracing=True, autograph=False)

    def _gradients(self, x, y):
        self.traces["gradients"] += 1
        matrices = [_example_matrices(block, a, g) for block, (a, g) in zip(self.blocks, self.example_rows(x, y))]
        return join_layers(matrices, self.sizes, self.layouts)


def _example_matrices(block, a, g):
    """Per-example gradient matrices `[N, (G,) d_a, d_g]` of one block (flat `[N, p]` for elementwise)."""
    if block.kind == "elementwise":  # g holds the exact per-example gradients [N, 1, p]
        return g[:, 0]
    if block.groups > 1:
        return tf.einsum("ntgk,ntgl->ngkl", a, g)
    if a.shape[1] == 1:
        return a[:, 0, :, tf.newaxis] * g[:, 0, tf.newaxis, :]
    return tf.einsum("ntk,ntl->nkl", a, g)


def _batch_scores(blocks, captured, directions):
    """`[k, N]` scores of one training batch against k preconditioned test directions."""
    total = 0.0
    for block, (a, g), p in zip(blocks, captured, directions):
        if block.kind == "elementwise":  # g holds the exact per-example gradients [N, 1, p]
            total += tf.einsum("jp,np->jn", tf.reshape(p, [tf.shape(p)[0], -1]), g[:, 0])
        elif block.groups > 1:
            total += tf.einsum("jgkl,ngkl->jn", p, tf.einsum("ntgk,ntgl->ngkl", a, g))
        elif block.diagonal_inputs:
            total += tf.einsum("jntl,ntl->jn", tf.gather(p, a, axis=1), g)
        elif a.shape[1] == 1:
            a1, g1 = a[:, 0], g[:, 0]
            if block.out_features <= block.a_size:
                total += tf.einsum("jnl,nl->jn", tf.einsum("nk,jkl->jnl", a1, p), g1)
            else:
                total += tf.einsum("jnk,nk->jn", tf.einsum("jkl,nl->jnk", p, g1), a1)
        else:
            total += tf.einsum("jkl,nkl->jn", p, tf.einsum("ntk,ntl->nkl", a, g))
    return total
