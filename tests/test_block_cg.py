"""Block CG against one-at-a-time CG and dense solves (float64)."""

import numpy as np
import pytest

import tf_influence as tfi
from tests import helpers as sh
from tests.helpers import relative_error
from tf_influence.solvers import block_cg, cg


def test_block_cg_equals_one_at_a_time_cg_and_the_direct_solve(indefinite_mlp):
    op, p = indefinite_mlp.operator, indefinite_mlp.operator.space.size
    eigenvalues, vectors = np.linalg.eigh(indefinite_mlp.dense)
    # 3 random rows, a zero row, an eigenvector, and a repeated row (the block is rank deficient).
    b = np.vstack([indefinite_mlp.b, np.zeros(p), vectors[:, -1], indefinite_mlp.b[0]])
    together, info = block_cg(op, b, tol=1e-10)
    assert info.converged and info.extra["block"] and info.residual <= 1e-10
    np.testing.assert_array_equal(together[3], np.zeros(p))
    np.testing.assert_allclose(together[4], vectors[:, -1] / eigenvalues[-1], rtol=1e-9, atol=1e-12)
    reference = indefinite_mlp.solve(b)
    for j in range(len(b)):
        alone, _ = cg(op, b[j], tol=1e-10)
        assert relative_error(together[j], alone) <= 1e-8, j
        assert relative_error(together[j], reference[j]) <= 1e-8, j
    # The shared Krylov space: fewer block iterations than the slowest right-hand side alone needs.
    _, plain = cg(op, b, tol=1e-10)
    assert info.iterations <= plain.iterations


def test_block_cg_with_more_right_hand_sides_than_parameters(softmax_regression):
    prob = softmax_regression
    p = prob.operator.space.size
    b = np.random.default_rng(3).standard_normal((2 * p + 1, p))
    x, info = block_cg(prob.operator, b, tol=1e-10)
    assert info.converged and info.iterations <= 3  # the first block already spans the whole space
    assert relative_error(x, prob.solve(b)) <= 1e-9


def test_block_cg_preconditioned_and_on_a_plain_operator_with_xla():
    a, b, op, reference = sh.spd_system()
    for jit in (False, True):
        x, info = block_cg(op, b, tol=1e-12, jit_compile=jit)
        assert info.converged and relative_error(x, reference) <= 1e-9
    inverse = sh.dense_operator(np.linalg.inv(a), is_self_adjoint=True, is_positive_definite=True)
    x, info = block_cg(op, b, preconditioner=inverse, tol=1e-10)
    assert info.iterations == 1 and relative_error(x, reference) <= 1e-9
    x, info = block_cg(op, b, x0=reference, tol=1e-6)  # starting at the answer: nothing to do
    assert info.iterations == 0 and relative_error(x, reference) <= 1e-12


def test_block_cg_negative_curvature_and_not_converged(indefinite_mlp):
    with pytest.raises(tfi.NegativeCurvatureError, match=r"negative curvature at iteration 1.*damping"):
        block_cg(indefinite_mlp.undamped, indefinite_mlp.b)
    with pytest.warns(UserWarning, match=r"block_cg did not converge: 3 of 3 .* maxiter=1"):
        _, info = block_cg(indefinite_mlp.operator, indefinite_mlp.b, maxiter=1)
    assert not info.converged and info.iterations == 1


def test_cg_method_solves_many_rows_by_block_cg(indefinite_mlp):
    source = tfi.operators.CurvatureSource.of(indefinite_mlp.operator)
    b = indefinite_mlp.b
    for block in (True, False):
        prepared = tfi.solvers.CG(tol=1e-10, block=block).prepare(source)
        x, info = prepared.solve(b)
        assert info.extra.get("block", False) is block
        assert relative_error(x, indefinite_mlp.solve(b)) <= 1e-8
