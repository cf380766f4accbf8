"""IHVP solvers against dense solves (float64): direct, cg, lissa, scipy fmin_ncg."""

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as sh
from tests.helpers import relative_error
from tf_influence.solvers import cg, direct, lissa, scipy_ncg


@pytest.fixture(params=["softmax_regression", "indefinite_mlp"])
def problem(request):
    return request.getfixturevalue(request.param)


# -- direct -------------------------------------------------------------------------------------


def test_direct_matches_closed_form_logistic_regression(softmax_regression):
    prob = softmax_regression
    x, info = direct(prob.operator, prob.b)
    assert relative_error(x, prob.solve(prob.b)) <= 1e-10
    assert info.method == "direct" and info.converged and info.extra["factorization"] == "cholesky"
    assert info.residual <= 1e-12
    x1, _ = direct(prob.operator, prob.b[0])  # a single [p] vector keeps its shape
    assert x1.shape == (prob.operator.space.size,)
    np.testing.assert_allclose(x1, x[0], rtol=1e-12)


def test_direct_indefinite_warns_and_is_exact(indefinite_mlp):
    # The undamped MLP Hessian is singular (softmax shift invariance) and indefinite; half of
    # −λ_min as damping keeps it indefinite but nonsingular.
    smallest = float(np.linalg.eigvalsh(indefinite_mlp.undamped_dense)[0])
    damping = -smallest / 2
    matrix = indefinite_mlp.undamped_dense + damping * np.eye(len(indefinite_mlp.dense))
    with pytest.warns(UserWarning, match=rf"indefinite.*most negative is {smallest / 2:.4g} \(with damping "
                                         rf"λ={damping:g}\).*damping="):
        x, info = direct(indefinite_mlp.operator.with_options(damping=damping), indefinite_mlp.b)
    assert info.extra["factorization"] == "eigh"
    assert info.extra["min_eigenvalue"] == pytest.approx(smallest / 2, rel=1e-8)
    assert relative_error(x, np.linalg.solve(matrix, indefinite_mlp.b.T).T) <= 1e-9


def test_direct_on_indefinite_raise_and_the_suggested_damping(indefinite_mlp):
    smallest = float(np.linalg.eigvalsh(indefinite_mlp.undamped_dense)[0])
    matrix = indefinite_mlp.undamped_dense - smallest / 2 * np.eye(len(indefinite_mlp.dense))
    message = rf"indefinite: \d+ of 83 eigenvalues are negative, the most negative is {smallest / 2:.4g}\."
    with pytest.raises(tfi.NegativeCurvatureError, match=message) as caught:
        direct(sh.dense_operator(matrix, is_self_adjoint=True), indefinite_mlp.b, on_indefinite="raise")
    suggested = float(str(caught.value).rsplit("damping=", 1)[1].split(" ")[0])
    assert suggested > 0 and np.linalg.eigvalsh(matrix + suggested * np.eye(len(matrix)))[0] > 0
    _, info = direct(sh.dense_operator(matrix + suggested * np.eye(len(matrix)), is_self_adjoint=True), indefinite_mlp.b)
    assert info.extra["factorization"] == "cholesky"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "ignore" solves silently
        x, _ = direct(sh.dense_operator(matrix, is_self_adjoint=True), indefinite_mlp.b, on_indefinite="ignore")
    assert relative_error(x, np.linalg.solve(matrix, indefinite_mlp.b.T).T) <= 1e-9
    with pytest.raises(tfi.NegativeCurvatureError, match=r"singular: its eigenvalue closest to zero.*Add damping"):
        direct(sh.dense_operator(indefinite_mlp.undamped_dense, is_self_adjoint=True), indefinite_mlp.b)


def test_direct_singular_raises():
    singular = sh.dense_operator(np.diag([2.0, 1.0, 0.0]), is_self_adjoint=True)
    with pytest.raises(tfi.NegativeCurvatureError, match=r"singular.*Add damping"):
        direct(singular, np.ones(3))


def test_direct_refuses_a_non_symmetric_matrix():
    with pytest.raises(tfi.InputError, match=r"not symmetric \(max \|A − Aᵀ\| = 1"):
        direct(sh.dense_operator(np.array([[2.0, 1.0], [0.0, 2.0]])), np.ones(2))


def test_direct_refuses_a_matrix_that_does_not_fit():
    big = tf.linalg.LinearOperatorScaledIdentity(30_000, tf.constant(2.0, tf.float64), is_self_adjoint=True)
    with pytest.raises(tfi.ResourceError, match=r"30000x30000.*13\.4 GiB.*max_size=20000.*cg"):
        direct(big, np.ones(30_000))


# -- cg -----------------------------------------------------------------------------------------


def test_cg_matches_direct(problem):
    x, info = cg(problem.operator, problem.b, tol=1e-10)
    error = relative_error(x, problem.solve(problem.b))
    assert error <= 1e-6, error
    assert info.converged and info.residual <= 1e-10
    assert 0 < info.iterations <= problem.operator.space.size + 5


def test_cg_many_right_hand_sides_equal_one_at_a_time(indefinite_mlp):
    op, p = indefinite_mlp.operator, indefinite_mlp.operator.space.size
    eigenvalues, vectors = np.linalg.eigh(indefinite_mlp.dense)
    b = np.vstack([indefinite_mlp.b, np.zeros(p), vectors[:, -1]])  # 5 rows: 3 random, zero, an eigenvector
    together, info = cg(op, b, tol=1e-10)
    assert info.extra["iterations_per_rhs"][3:] == [0, 1]  # converged rows stay frozen
    np.testing.assert_array_equal(together[3], np.zeros(p))
    np.testing.assert_allclose(together[4], vectors[:, -1] / eigenvalues[-1], rtol=1e-10, atol=1e-14)
    for j in range(3):
        alone, info_j = cg(op, b[j], tol=1e-10)
        assert info_j.iterations == info.extra["iterations_per_rhs"][j]
        assert relative_error(together[j], alone) <= 1e-9


def test_cg_exact_inverse_preconditioner_converges_in_one_iteration(indefinite_mlp):
    inverse = sh.dense_operator(np.linalg.inv(indefinite_mlp.dense), is_self_adjoint=True, is_positive_definite=True)
    x, info = cg(indefinite_mlp.operator, indefinite_mlp.b, preconditioner=inverse, tol=1e-8)
    assert info.iterations == 1 and info.converged
    assert relative_error(x, indefinite_mlp.solve(indefinite_mlp.b)) <= 1e-8


def test_cg_diagonal_preconditioner_gives_the_same_answer(problem):
    jacobi = tf.linalg.LinearOperatorDiag(tf.constant(1 / np.diag(problem.dense)), is_self_adjoint=True,
                                          is_positive_definite=True)
    x, info = cg(problem.operator, problem.b, preconditioner=jacobi, tol=1e-10)
    assert info.converged and info.extra["preconditioned"]
    assert relative_error(x, problem.solve(problem.b)) <= 1e-6


def test_cg_callable_preconditioner(softmax_regression):
    prob = softmax_regression
    a = sh.dense_operator(prob.dense, is_self_adjoint=True)
    diagonal = np.diag(prob.dense)
    plain, plain_info = cg(a, prob.b, tol=1e-10)
    x, info = cg(a, prob.b, preconditioner=lambda rows: rows / diagonal, tol=1e-10)
    assert relative_error(x, prob.solve(prob.b)) <= 1e-8 and relative_error(plain, prob.solve(prob.b)) <= 1e-8
    assert info.extra["preconditioned"] and not plain_info.extra["preconditioned"]


def test_cg_negative_curvature_raises_and_damping_fixes_it(indefinite_mlp):
    with pytest.raises(tfi.NegativeCurvatureError, match=r"negative curvature.*damping.*gauss_newton"):
        cg(indefinite_mlp.undamped, indefinite_mlp.b)
    x, info = cg(indefinite_mlp.operator, indefinite_mlp.b[0], tol=1e-10)  # damping = −λ_min + 0.05
    assert info.converged and relative_error(x, indefinite_mlp.solve(indefinite_mlp.b[0])) <= 1e-6


def test_cg_negative_curvature_on_a_dense_indefinite_matrix():
    indefinite = sh.dense_operator(np.diag([1.0, -1.0]), is_self_adjoint=True)
    with pytest.raises(tfi.NegativeCurvatureError, match=r"iteration 1: pᵀ\(H \+ λI\)p / ‖p‖² = 0 ≤ 0.*a positive damping"):
        cg(indefinite, np.ones(2))


def test_cg_not_converged_warns(indefinite_mlp):
    with pytest.warns(UserWarning, match=r"cg did not converge: 3 of 3 .* maxiter=2"):
        _, info = cg(indefinite_mlp.operator, indefinite_mlp.b, maxiter=2)
    assert not info.converged and info.iterations == 2 and info.residual > 1e-6


def test_cg_equals_scipy_after_1_and_3_iterations():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a = q @ np.diag(np.linspace(0.1, 5.0, 12)) @ q.T
    b = rng.standard_normal(12)
    for iterations in (1, 3):
        reference, _ = scipy.sparse.linalg.cg(a, b, rtol=1e-12, maxiter=iterations)
        with pytest.warns(UserWarning, match="did not converge"):
            x, info = cg(sh.dense_operator(a, is_self_adjoint=True), b, tol=1e-12, maxiter=iterations)
        assert info.iterations == iterations
        np.testing.assert_allclose(x, reference, rtol=1e-12, atol=1e-12)


def test_cg_on_a_plain_linear_operator_with_xla_and_x0():
    a, b, op, reference = sh.spd_system()
    for jit in (False, True):
        x, info = cg(op, b, tol=1e-12, jit_compile=jit)
        assert info.converged and relative_error(x, reference) <= 1e-9
    x, info = cg(op, b, x0=reference, tol=1e-6)  # starting at the answer: nothing to do
    assert info.iterations == 0 and relative_error(x, reference) <= 1e-12


def test_cg_rejects_bad_input(softmax_regression):
    op = softmax_regression.operator
    with pytest.raises(tfi.InputError, match=r"shape \[p\] or \[k, p\] with p = 21.*\(3, 20\)"):
        cg(op, np.ones((3, 20)))
    with pytest.raises(tfi.InputError, match="NaN/Inf"):
        cg(op, np.full(21, np.nan))
    with pytest.raises(tfi.InputError, match=r"tol must be a positive number. Received: tol=0"):
        cg(op, np.ones(21), tol=0)
    with pytest.raises(tfi.InputError, match=r"maxiter must be a positive integer. Received: maxiter=0"):
        cg(op, np.ones(21), maxiter=0)
    with pytest.raises(tfi.InputError, match=r"jit_compile=True.*HessianOperator\(\.\.\., jit_compile=True\)"):
        cg(op, np.ones(21), jit_compile=True)
    with pytest.raises(tfi.InputError, match=r"preconditioner must be \[p, p\] = \[21, 21\].*\(3, 3\)"):
        cg(op, np.ones(21), preconditioner=tf.linalg.LinearOperatorIdentity(3, dtype=tf.float64))
    with pytest.raises(tfi.InputError, match="is_positive_definite=False"):
        cg(sh.dense_operator(np.eye(2), is_self_adjoint=True, is_positive_definite=False), np.ones(2))
    not_pd = sh.dense_operator(-np.eye(21), is_self_adjoint=True)
    with pytest.raises(tfi.InputError, match=r"preconditioner is not positive definite: rᵀMr = -"):
        cg(op, np.ones(21), preconditioner=not_pd)


# -- scipy --------------------------------------------------------------------------------------


def test_scipy_ncg_matches_direct(problem):
    b = problem.b[0]
    x, info = scipy_ncg(problem.operator, b)
    error = relative_error(x, problem.solve(b))
    assert error <= 1e-5, error
    assert info.converged and info.method == "scipy"
    assert np.asarray(x).shape == np.shape(b)


# -- lissa --------------------------------------------------------------------------------------


def _largest(problem):
    return float(np.linalg.eigvalsh(problem.dense)[-1])


def _depth(problem, scale, error):
    """Steps after which the Neumann truncation error (1 − μ_min/scale)^J is below `error`."""
    return int(np.ceil(scale / np.linalg.eigvalsh(problem.dense)[0] * np.log(1 / error)))


def test_lissa_full_batch_matches_direct(problem):
    scale = _largest(problem)
    x, info = lissa(problem.operator, problem.b, scale=scale, batch_size=sh.N,
                    recursion_depth=_depth(problem, scale, 1e-5), progress=False)
    error = relative_error(x, problem.solve(problem.b))
    assert error <= 1e-3, error
    assert info.converged and info.residual <= 1e-3 and not info.residual_is_estimate
    assert info.extra["source"] == "all"
    assert info.extra["d"] == pytest.approx(problem.operator.damping / scale)


def test_lissa_minibatch_with_repeats_matches_direct(problem):
    # Independent minibatches make the estimate unbiased; its error falls like 1/√num_samples.
    # The MLP (λ_min of H + λI only 0.05, minibatch Hessians indefinite) is the noisy one: measured
    # error 0.050 with 10 samples, 0.022 with 40; the convex problem reaches ~1e-3 with 10.
    num_samples = 40 if problem.name == "mlp" else 10
    scale = 1.5 * _largest(problem)
    depth = _depth(problem, scale, 1 / 3000)
    x, info = lissa(problem.operator, problem.b, scale=scale, batch_size=64, recursion_depth=depth,
                    num_samples=num_samples, progress=False)
    error = relative_error(x, problem.solve(problem.b))
    assert error <= 5e-2, error
    assert info.iterations == num_samples * depth and info.extra["source"] == "independent"


def test_lissa_minibatches_of_finite_differences(softmax_regression):
    """mode="finite_difference" has per-batch products (θ ± r·v evaluated without assigning), so LiSSA
    draws the same minibatches and gets the same estimate as with exact products, to the FD error."""
    op = softmax_regression.operator
    options = dict(scale=1.0, batch_size=32, recursion_depth=50, seed=3, progress=False, check_residual=False)
    exact, _ = lissa(op, softmax_regression.b, **options)
    fd, _ = lissa(op.with_options(mode="finite_difference"), softmax_regression.b, **options)
    assert relative_error(fd, exact) <= 1e-7


def test_lissa_shuffled_epochs_is_reproducible_and_close_on_the_convex_problem(softmax_regression):
    prob = softmax_regression
    scale = 1.5 * _largest(prob)
    options = dict(scale=scale, batch_size=64, recursion_depth=_depth(prob, scale, 1 / 3000), num_samples=3,
                   sampling="shuffled_epochs", progress=False)
    x, info = lissa(prob.operator, prob.b, **options)
    again, _ = lissa(prob.operator, prob.b, **options)
    np.testing.assert_array_equal(x, again)
    assert info.extra["source"] == "epochs"
    assert relative_error(x, prob.solve(prob.b)) <= 5e-2


def test_lissa_is_reproducible_and_seeded(softmax_regression):
    prob = softmax_regression
    options = dict(scale=2.5, batch_size=32, recursion_depth=50, num_samples=2, progress=False)
    first, _ = lissa(prob.operator, prob.b, seed=3, **options)
    again, _ = lissa(prob.operator, prob.b, seed=3, **options)
    other, _ = lissa(prob.operator, prob.b, seed=4, **options)
    np.testing.assert_array_equal(first, again)
    assert relative_error(other, first) > 1e-6


def test_lissa_exact_products_of_any_operator():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((15, 15)))
    a = q @ np.diag(np.linspace(0.2, 2.0, 15)) @ q.T
    b = rng.standard_normal((2, 15))
    x, info = lissa(sh.dense_operator(a, is_self_adjoint=True), b, scale=2.0, batch_size=None,
                    recursion_depth=200, progress=False)
    assert relative_error(x, np.linalg.solve(a, b.T).T) <= 1e-6
    assert info.extra["batch_size"] is None


def test_lissa_too_small_scale_raises_divergence(problem):
    largest = _largest(problem)
    with pytest.raises(tfi.DivergenceError, match=r"diverged at step \d+ .*\(0, 2·scale\).*Raise scale.*scale ≥"):
        lissa(problem.operator, problem.b, scale=largest / 4, batch_size=sh.N, recursion_depth=500,
              progress=False)
    with pytest.raises(tfi.DivergenceError, match="Raise scale"):  # exact products, same verdict
        lissa(problem.operator, problem.b[:1], scale=largest / 4, batch_size=None, recursion_depth=500,
              progress=False)


def test_lissa_negative_curvature_asks_for_damping(indefinite_mlp):
    largest = float(np.linalg.eigvalsh(indefinite_mlp.undamped_dense)[-1])
    with pytest.raises(tfi.DivergenceError, match=r"not positive definite, so raising scale will not help.*damping"):
        lissa(indefinite_mlp.undamped, indefinite_mlp.b, scale=largest, batch_size=sh.N, recursion_depth=3000, progress=False)


def test_lissa_rejects_bad_input(softmax_regression):
    op = softmax_regression.operator
    with pytest.raises(tfi.InputError, match=r"recursion_depth must be a positive integer. Received: recursion_depth=0"):
        lissa(op, np.ones(21), scale=1.0, batch_size=8, recursion_depth=0)
    with pytest.raises(tfi.InputError, match=r"scale must be a positive number. Received: scale=-1"):
        lissa(op, np.ones(21), scale=-1, batch_size=8, recursion_depth=10)
    with pytest.raises(tfi.InputError, match=r"scale must be a positive number or 'auto'"):
        lissa(op, np.ones(21), scale="big", batch_size=8, recursion_depth=10)
    with pytest.raises(tfi.InputError, match=r"batch_size=8 needs minibatch.*batch_size=None"):
        lissa(sh.dense_operator(np.eye(3)), np.ones(3), scale=1.0, batch_size=8, recursion_depth=10)


def test_lissa_auto_scale(softmax_regression):
    prob = softmax_regression
    x, info = lissa(prob.operator, prob.b, scale="auto", batch_size=sh.N, recursion_depth=1500, progress=False)
    assert info.extra["scale"] == pytest.approx(1.1 * _largest(prob), rel=1e-3)
    assert relative_error(x, prob.solve(prob.b)) <= 1e-3


# -- variable subsets ---------------------------------------------------------------------------


def test_last_layer_only_equals_the_sub_block(indefinite_mlp):
    head = indefinite_mlp.operator.with_options()  # same damping
    head = tfi.HessianOperator(indefinite_mlp.model, sh.sce, (indefinite_mlp.x, indefinite_mlp.y), variables="head", damping=head.damping,
                               batch_size=64, mode="back_over_back")
    q = head.space.size
    assert q == 8 * sh.CLASSES + sh.CLASSES
    block = indefinite_mlp.dense[-q:, -q:]  # the head's variables come last in the full ordering
    b = indefinite_mlp.b[:, -q:]
    reference = np.linalg.solve(block, b.T).T
    x_cg, _ = cg(head, b, tol=1e-10)
    x_direct, _ = direct(head, b)
    assert relative_error(x_cg, reference) <= 1e-6
    assert relative_error(x_direct, reference) <= 1e-10


def test_float32_operator_gives_float32_answers(softmax_regression):
    prob = softmax_regression
    a32 = tf.linalg.LinearOperatorFullMatrix(tf.constant(prob.dense, tf.float32), is_self_adjoint=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = cg(a32, prob.b.astype(np.float32), tol=1e-4)
    assert x.dtype == tf.float32 and info.converged
    assert relative_error(x, prob.solve(prob.b)) <= 1e-3
