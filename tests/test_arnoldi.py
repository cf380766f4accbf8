"""Block Lanczos eigenpairs and Arnoldi (low-rank) influence against dense eigendecompositions and solves."""

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests.helpers import dense_operator, relative_error
from tf_influence.linalg import top_eigenpairs
from tf_influence.solvers import Arnoldi, arnoldi


def _symmetric(rng, eigenvalues):
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * eigenvalues) @ q.T


def _by_magnitude(matrix):
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(-np.abs(values))
    return values[order], vectors[:, order].T


def test_top_eigenpairs_of_a_gapped_spectrum(rng):
    """The 5 largest-magnitude pairs (one negative) of a 60 x 60 matrix from a 35-dimensional block Krylov space."""
    spectrum = np.concatenate([[100.0, -50.0, 20.0, 10.0, 5.0], rng.uniform(-1.0, 1.0, 55)])
    matrix = _symmetric(rng, spectrum)
    pairs = top_eigenpairs(dense_operator(matrix, is_self_adjoint=True), 5, block_size=5, krylov_dimension=35)
    values, vectors = _by_magnitude(matrix)
    np.testing.assert_allclose(pairs.values, values[:5], rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(pairs.vectors * vectors[:5], axis=1)), 1.0, atol=1e-9)
    np.testing.assert_allclose(pairs.vectors @ pairs.vectors.T, np.eye(5), atol=1e-12)
    assert pairs.passes == 7 and pairs.products == 35
    assert pairs.residuals.max() < 1e-4  # ‖A v − μ v‖ bounds the eigenvalue error by its square / gap


def test_top_eigenpairs_shift_and_invariant_space(rng):
    """A rank-3 matrix: the Krylov space becomes invariant after one block; the shift is subtracted."""
    u = np.linalg.qr(rng.standard_normal((40, 3)))[0]
    matrix = (u * [3.0, 2.0, 1.0]) @ u.T + 0.5 * np.eye(40)
    pairs = top_eigenpairs(dense_operator(matrix, is_self_adjoint=True), 3, block_size=3, shift=0.5)
    np.testing.assert_allclose(pairs.values, [3.0, 2.0, 1.0], rtol=1e-10)
    assert pairs.residuals.max() < 1e-10


def test_arnoldi_at_full_rank_equals_the_direct_solve(float64, indefinite_mlp):
    """Every eigenpair kept: both complements give (H + λI)⁻¹ b on an MLP with an indefinite Hessian."""
    problem = indefinite_mlp
    p = problem.operator.space.size
    for complement in ("damping", "drop"):
        x, info = arnoldi(problem.operator, problem.b, rank=p, complement=complement)
        assert relative_error(x, problem.solve(problem.b)) < 1e-9
        assert info.extra["rank"] == p and info.method == "arnoldi"


def test_arnoldi_below_full_rank_is_the_woodbury_inverse_of_the_top_pairs(float64, indefinite_mlp):
    """With an exact eigenbasis (Krylov space = everything), rank k keeps the k largest |μ| of H:
    x = Vᵀ (μ + λ)⁻¹ V b + (b − VᵀVb)/λ ("damping") or without the last term ("drop")."""
    problem = indefinite_mlp
    p, damping, k = problem.operator.space.size, problem.operator.damping, 20
    values, vectors = _by_magnitude(problem.undamped_dense)
    v, mu, b = vectors[:k], values[:k], problem.b
    inside = (b @ v.T / (mu + damping)) @ v
    expected = {"damping": inside + (b - (b @ v.T) @ v) / damping, "drop": inside}
    for complement, reference in expected.items():
        method = Arnoldi(rank=k, complement=complement, krylov_dimension=p)
        x, _ = method.solve(problem.operator, b)
        assert relative_error(x, reference) < 1e-8, complement


def test_arnoldi_through_influence_matches_direct_scores_at_full_rank(float64, softmax_regression):
    problem = softmax_regression
    p = problem.operator.space.size
    train, test = (problem.x[:150], problem.y[:150]), (problem.x[150:160], problem.y[150:160])
    common = dict(damping=0.01, l2=problem.l2, batch_size=64, progress=False)
    exact = tfi.Influence(problem.model, "sparse_categorical_crossentropy", train, method="direct", **common)
    low = tfi.Influence(problem.model, "sparse_categorical_crossentropy", train, method="arnoldi", rank=p, **common)
    assert relative_error(low.scores(test), exact.scores(test)) < 1e-9
    assert low.last_solve_info.extra["passes"] >= 1


@pytest.mark.parametrize("options, message", [
    (dict(rank=0), "rank"),
    (dict(rank=3, complement="zero"), "complement"),
    (dict(rank=3, block_size=0), "block_size"),
])
def test_bad_options(options, message):
    with pytest.raises(tfi.InputError, match=message):
        Arnoldi(**options)


def test_damping_complement_needs_damping_and_rank_at_most_p(float64, rng):
    matrix = _symmetric(rng, np.linspace(1.0, 2.0, 6))
    operator = dense_operator(matrix, is_self_adjoint=True)
    with pytest.raises(tfi.InputError, match="needs damping"):
        Arnoldi(rank=2).solve(operator, tf.ones([6], tf.float64))
    with pytest.raises(tfi.InputError, match="at most p=6"):
        Arnoldi(rank=7, complement="drop").solve(operator, tf.ones([6], tf.float64))
    x, _ = Arnoldi(rank=6, complement="drop").solve(operator, tf.ones([6], tf.float64))
    np.testing.assert_allclose(x, np.linalg.solve(matrix, np.ones(6)), rtol=1e-10)
