"""KFAC/EKFAC pairwise scores in the factors' eigenbasis: the test side is never rotated back.

Per factored block the inverse is `(C + λI)⁻¹ = Q diag(Λ + λ)⁻¹ Qᵀ` with `Q = Q_A ⊗ Q_S`, so

    score[j, i] = g_jᵀ (C + λI)⁻¹ g_i = Σ_blocks ⟨ R_j ⊘ (Λ + λ), R_i ⟩,        R = Q_Aᵀ G Q_S

where `G = Σ_t a_t g_tᵀ` is an example's loss gradient on the block, from its captured layer rows.
Rotating the rows before forming `G`, `R = Σ_t (Q_Aᵀ a_t)(Q_Sᵀ g_t)ᵀ` costs `T·(d_a² + d_g²)` per
example and block. The solve route instead applies the EKFAC inverse to each flat test gradient (four
matrix products, `2·d_a·d_g·(d_a + d_g)`) only to multiply the result, rotated back, with training
gradients: on the 301k-parameter MLP of benchmarks/peers.py that was 24 s of 1,000 test points' scoring.

Test and training examples go through the same compiled function (`rotated(x, y, bases)`, shared by
every object on the same model); the test rows are scaled by `1 / (Λ + λ)` and cached by `Influence`,
and each training batch takes one matrix product with all of them. The numbers equal the solve route's
(`Influence.test_inverse_hvps` with `FactoredDots`) to rounding (tests/test_eigenbasis_scores.py).

The route applies to influence on the loss with plain Kronecker blocks (Dense, EinsumDense,
convolutions and transposed convolutions of one group) and the one-shot KFAC/EKFAC solve; elsewhere
(elementwise, embedding or grouped blocks, a measurement, refined solves, a distribution strategy,
batch-coupled layers in training mode) `Influence` takes the solve route.
"""

import weakref

import tensorflow as tf

from tf_influence.curvature.passes import shared_for_model
from tf_influence.influence.batch_functions import DEFAULT_MEMORY_BUDGET
from tf_influence.influence.factored_scores import ScoreFunctions, rows_apply, same_variables
from tf_influence.linalg.host_blas import matmul_transposed


def eigenbasis_scores_for(problem, prepared):
    """`EigenbasisScores` for a prepared one-shot KFAC/EKFAC method on `problem`, or None where the
    route does not apply (see the module docstring)."""
    operator = getattr(prepared, "eigenbasis", None)
    if operator is None:
        return None
    factors = operator.factors
    if not same_variables(factors, problem) or not rows_apply(problem):
        return None
    if not all(_plain_kronecker(block) for block in factors.blocks):
        return None
    return EigenbasisScores(problem, operator)


def _plain_kronecker(block):
    return block.kind not in ("elementwise", "embedding") and block.groups == 1 and not block.diagonal_inputs


class EigenbasisScores:
    """Rotated example gradients `R = Q_Aᵀ G Q_S` of an `EKFACOperator`'s blocks, flattened `[m, width]`.

    `test_rows(batch)` are the test side, scaled by `1 / (Λ + λ)`; `self(batch, directions)` gives
    `[m, k]` scores of a training batch against k such rows. Batches are cut into slices whose rows
    fit in `memory_budget` bytes.

    Example:
      >>> scorer = eigenbasis_scores_for(influence.problem, influence.prepared())
      >>> directions = tf.concat([scorer.test_rows(b) for b in test_batches], axis=0)
      >>> scorer(train_batch, directions)                   # [m, n_test]
    """

    def __init__(self, problem, operator, *, memory_budget=DEFAULT_MEMORY_BUDGET):
        self.problem = problem
        self.dtype = operator.compute_dtype
        factors = operator.factors
        self.bases = [(tf.cast(layer.q_a, self.dtype), tf.cast(layer.q_s, self.dtype)) for layer in factors.layers]
        self.scale = tf.concat([tf.reshape(s, [-1]) for s in operator.scales(inverse=True)], axis=0)
        self.width = int(self.scale.shape[0])
        self.step = max(1, int(memory_budget) // (self.width * self.dtype.size))
        self.functions = shared_for_model(_CACHE, problem.objective, factors.blocks, self.dtype.name,
                                          lambda: RotatedRows(factors.blocks, self.dtype))

    def test_rows(self, batch):
        """`[m, width]`: the rotated loss gradients scaled by `1 / (Λ + λ)`."""
        return self._sliced(batch, lambda rows: rows * self.scale)

    def __call__(self, batch, directions):
        """`[m, k]` scores (in the problem's dtype, as the solve route gives them) of a training batch against
        `directions` `[k, width]` (`test_rows`, as an array: the host BLAS multiplies it without a copy)."""
        return self._sliced(batch, lambda rows: tf.cast(matmul_transposed(rows, directions), self.problem.dtype))

    def _sliced(self, batch, then):
        x, y = batch[0], batch[1]
        m = int(tf.shape(tf.nest.flatten(x)[0])[0])
        parts = []
        with self.functions.using(self.problem.objective):
            for start in range(0, m, self.step):
                cut = lambda t: t[start:start + self.step]  # noqa: E731
                parts.append(then(self.functions.rotated(tf.nest.map_structure(cut, x),
                                                         tf.nest.map_structure(cut, y), self.bases)))
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


_CACHE = weakref.WeakKeyDictionary()  # model -> {key: RotatedRows}


class RotatedRows(ScoreFunctions):
    """`rotated(x, y, bases)`: `[N, width]` rotated per-example loss gradients of a batch (compiled once per
    model, blocks, loss and dtype; the bases are inputs, so a refit traces nothing).

    Attributes:
      traces: as `ScoreFunctions.traces`, with "rotated".
    """

    def __init__(self, blocks, dtype):
        super().__init__(blocks, dtype)
        self.traces["rotated"] = 0
        self.rotated = tf.function(self._rotated, reduce_retracing=True, autograph=False)

    def _rotated(self, x, y, bases):
        self.traces["rotated"] += 1
        parts = []
        for (a, g), (q_a, q_s) in zip(self.example_rows(x, y), bases):
            a_hat = tf.einsum("ntk,km->ntm", a, q_a)
            g_hat = tf.einsum("ntl,lb->ntb", g, q_s)
            if a.shape[1] == 1:
                rotated = a_hat[:, 0, :, tf.newaxis] * g_hat[:, 0, tf.newaxis, :]
            else:
                rotated = tf.einsum("ntk,ntl->nkl", a_hat, g_hat)
            parts.append(tf.reshape(rotated, [tf.shape(rotated)[0], -1]))
        return tf.concat(parts, axis=1)
