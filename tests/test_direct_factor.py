"""The exact direct route: one dense factorisation per weights, reused by every call; self-influence by it."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.export.stores import stored_arrays
from tf_influence.solvers.direct import DenseFactorization
from tests import models
from tests.helpers import dense_hessian, per_example_gradients, relative_error

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)


def _per_example_solves(inf, x, y, damping, l2=0.0):
    """`gᵢᵀ (H + λI)⁻¹ gᵢ`, one dense solve per example, H by nested tapes (independent of the library)."""
    model = inf.model
    dense = dense_hessian(model, sce, x, y, l2=l2) + damping * np.eye(inf.space.size)
    grads = per_example_gradients(inf.objective, model.trainable_variables, x, y)
    return np.array([g @ np.linalg.solve(dense, g) for g in grads]), dense


@pytest.mark.parametrize("damping", [0.5, 0.02])
def test_self_influence_by_the_factor_equals_per_example_solves(float64, rng, damping):
    """λ = 0.5: Cholesky; λ = 0.02 leaves H + λI indefinite at this point: the eigendecomposition."""
    model = models.mlp()
    x, y = models.classification_data(rng, n=30)
    inf = tfi.Influence(model, sce, (x, y), method=tfi.solvers.Direct(on_indefinite="ignore"), damping=damping,
                        batch_size=8, progress=False)
    expected, dense = _per_example_solves(inf, x, y, damping)
    factorization = inf.prepared().factorization
    assert factorization.kind == ("cholesky" if np.linalg.eigvalsh(dense)[0] > 0 else "eigh")
    assert inf.prepared().quadratic_forms is not None
    assert relative_error(inf.self_influence(), expected) <= 1e-10


def test_quadratic_forms_of_both_factorizations(rng):
    a = rng.standard_normal((7, 7))
    b = rng.standard_normal((7, 4))
    for matrix in (a @ a.T + 7 * np.eye(7), a + a.T):   # positive definite; indefinite
        factorization = DenseFactorization(matrix, on_indefinite="ignore")
        expected = np.einsum("ij,ij->j", b, np.linalg.solve(matrix, b))
        assert relative_error(factorization.quadratic_forms(b), expected) <= 1e-12
    assert {DenseFactorization(m, on_indefinite="ignore").kind for m in (a @ a.T + 7 * np.eye(7), a + a.T)} == {
        "cholesky", "eigh"}


def test_the_factor_is_built_once_per_weights(float64, rng, monkeypatch):
    builds = []
    dense_matrix = tfi.HessianOperator.dense_matrix

    def counting(self, *args, **kwargs):
        builds.append(self.curvature)
        return dense_matrix(self, *args, **kwargs)

    monkeypatch.setattr(tfi.HessianOperator, "dense_matrix", counting)
    model = models.mlp()
    x, y = models.classification_data(rng, n=30)
    train, test = (x[:24], y[:24]), (x[24:], y[24:])
    inf = tfi.Influence(model, sce, train, method="direct", damping=0.5, curvature="gauss_newton", batch_size=8,
                        progress=False)
    scores = inf.scores(test)
    inf.top_k(test, k=3)
    self_values = inf.self_influence()
    inf.inverse_hvp(tf.ones([inf.space.size], tf.float64))
    inf.parameter_change([0, 5])
    arrays = stored_arrays(inf, "inverse")   # what export stores
    assert builds == ["gauss_newton"]
    assert inf.source.built == ["hessian"]
    prepared = inf.prepared()
    assert inf.prepared() is prepared
    gradients = inf.training_gradients()
    np.testing.assert_allclose(np.einsum("ij,jk,ik->i", gradients, arrays["inverse"], gradients), self_values,
                               rtol=1e-10)
    np.testing.assert_allclose(inf.scores(test), scores, rtol=1e-12)
    assert builds == ["gauss_newton"]

    model.layers[-1].bias.assign(model.layers[-1].bias + 0.1)   # new weights: factored again, once
    with pytest.warns(UserWarning, match="weights changed"):
        inf.self_influence()
    inf.scores(test)
    assert builds == ["gauss_newton"] * 2
    assert inf.prepared() is not prepared
