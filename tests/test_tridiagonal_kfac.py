"""Block-tridiagonal KFAC against a brute-force construction from hand-computed per-example quantities."""

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests.helpers import relative_error, sce
from tf_influence.operators import CurvatureSource
from tf_influence.solvers import KFAC, TridiagonalKFAC


def _softmax(logits):
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _three_layer_mlp():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])


def _brute_force_blocks(model, x, w):
    """Per layer pair (i, j): E_w[a_i a_jᵀ] ⊗ E_w[J_iᵀ M J_j] with J_i = d logits / d z_i and M the
    softmax cross-entropy output Hessian diag(p) − ppᵀ (the exact Gauss-Newton expectation)."""
    (w1, b1), (w2, b2), (w3, b3) = [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers]
    h1 = np.tanh(x @ w1 + b1)
    h2 = np.tanh(h1 @ w2 + b2)
    p = _softmax(h2 @ w3 + b3)
    m = np.einsum("nk,kl->nkl", p, np.eye(3)) - np.einsum("nk,nl->nkl", p, p)
    j3 = np.broadcast_to(np.eye(3), (len(x), 3, 3))
    j2 = np.einsum("kl,nk->nkl", w3, 1.0 - h2 ** 2)  # [n, 4, 3]
    j1 = np.einsum("km,nk,nml->nkl", w2, 1.0 - h1 ** 2, j2)  # [n, 5, 3]
    ones = np.ones((len(x), 1))
    a = [np.hstack([x, ones]), np.hstack([h1, ones]), np.hstack([h2, ones])]
    j = [j1, j2, j3]

    def block(i, k):
        a_ik = np.einsum("n,nk,nl->kl", w, a[i], a[k]) / w.sum()
        g_ik = np.einsum("n,nak,nkl,nbl->ab", w, j[i], m, j[k]) / w.sum()
        return np.kron(a_ik, g_ik)

    return block


def test_agrees_with_kfac_blocks_on_the_tridiagonal_and_has_a_tridiagonal_inverse(float64, rng):
    model = _three_layer_mlp()
    n, damping = 25, 0.05
    x, y, w = rng.standard_normal((n, 4)), rng.integers(0, 3, n), rng.uniform(0.5, 2.0, n)
    problem = tfi.Problem(model, sce, (x, y, w), batch_size=7)
    prepared = TridiagonalKFAC().prepare(CurvatureSource(problem, damping=damping))
    assert prepared.operator.cross.fisher == "ggn"
    dense = prepared.operator.to_dense().numpy()
    block = _brute_force_blocks(model, x, w)
    sizes = [5 * 5, 6 * 4, 5 * 3]
    edges = np.cumsum([0] + sizes)
    cut = [slice(edges[i], edges[i + 1]) for i in range(3)]
    for i in range(3):
        expected = block(i, i) + damping * np.eye(sizes[i])
        np.testing.assert_allclose(dense[cut[i], cut[i]], expected, rtol=1e-9, atol=1e-12)
    for i in range(2):
        np.testing.assert_allclose(dense[cut[i], cut[i + 1]], block(i, i + 1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    # The far block is not the KFAC block: it is the completion that makes the inverse block-tridiagonal.
    assert relative_error(dense[cut[0], cut[2]], block(0, 2)) > 0.01
    inverse = np.linalg.inv(dense)
    assert np.abs(inverse[cut[0], cut[2]]).max() < 1e-9 * np.abs(inverse).max()
    assert np.linalg.eigvalsh(dense).min() > 0
    b = rng.standard_normal((3, dense.shape[0]))
    x_solved, info = prepared.solve(b)
    assert relative_error(x_solved, np.linalg.solve(dense, b.T).T) < 1e-10
    assert info.method == "kfac_tridiagonal" and info.extra["layer_sizes"] == sizes


def test_one_layer_is_kfac(float64, softmax_regression):
    """Without a neighbour there is no cross term: the solve is KFAC's with the damping and l2 added exactly."""
    problem = softmax_regression
    operator = problem.operator.with_options(damping=0.01)
    x_tri, _ = TridiagonalKFAC(fisher="ggn").solve(operator, problem.b)
    x_kfac, _ = KFAC(fisher="ggn").solve(operator, problem.b)
    assert relative_error(x_tri, x_kfac) < 1e-10


def test_influence_route_and_refusals(float64, rng):
    model = _three_layer_mlp()
    x, y = rng.standard_normal((30, 4)), rng.integers(0, 3, 30)
    influence = tfi.Influence(model, sce, (x, y), method="kfac_tridiagonal", damping=0.1, progress=False)
    scores = influence.scores((x[:3], y[:3]))
    assert scores.shape == (3, 30) and np.isfinite(scores).all()
    assert influence.source.built == []  # no exact curvature operator was needed
    with pytest.raises(tfi.ResourceError, match="max_layer_size"):
        tfi.Influence(model, sce, (x, y), method="kfac_tridiagonal", max_layer_size=20, damping=0.1,
                      progress=False).scores((x[:1], y[:1]))
    with pytest.raises(tfi.InputError, match="fisher"):
        TridiagonalKFAC(fisher="exact")
    normalized = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.LayerNormalization(),
                                   keras.layers.Dense(3)])
    with pytest.raises(tfi.UnsupportedLayerError, match="elementwise"):
        tfi.Influence(normalized, sce, (x, y), method="kfac_tridiagonal", damping=0.1,
                      progress=False).scores((x[:1], y[:1]))
