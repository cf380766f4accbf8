"""HessianOperator: variable subsets, data formats, weights, LinearOperator use, spectrum."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, relative_error

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)


@pytest.fixture
def problem(float64, rng):
    x, y = models.classification_data(rng, n=37)
    return models.mlp(), x, y


def test_subset_hessian_is_sub_block(problem):
    model, x, y = problem
    H = dense_hessian(model, sce, x, y, l2=0.02)
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    head_start = sum(sizes[:2])
    for selection in (model.layers[-1], "head", list(model.layers[-1].trainable_variables)):
        op = tfi.HessianOperator(model, sce, (x, y), variables=selection, l2=0.02)
        assert op.space.size == sum(sizes[2:])
        assert relative_error(op.to_dense().numpy(), H[head_start:, head_start:]) <= 1e-10
    kernel_only = tfi.HessianOperator(model, sce, (x, y), variables=[model.layers[0].kernel], l2=0.02)
    assert relative_error(kernel_only.to_dense().numpy(), H[:sizes[0], :sizes[0]]) <= 1e-10


def test_frozen_layers_are_excluded(problem):
    model, x, y = problem
    model.layers[0].trainable = False
    selected = tfi.select_variables(model)
    assert [v.path for v in selected] == [v.path for v in model.layers[1].trainable_variables]
    op = tfi.HessianOperator(model, sce, (x, y))
    assert op.space.size == int(sum(np.prod(v.shape) for v in model.layers[1].trainable_variables))
    with pytest.raises(tfi.InputError, match="frozen"):
        tfi.select_variables(model, "hidden")


def test_batch_norm_statistics_are_never_selected(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    selected = {v.path for v in tfi.select_variables(model)}
    assert not any("moving" in p for p in selected)
    moving = [v for v in model.non_trainable_variables if "moving_mean" in v.path][0]
    with pytest.raises(tfi.InputError, match="not trainable"):
        tfi.select_variables(model, moving)


@pytest.mark.parametrize("batch_size", [1, 5, 36, 37, 100])
def test_batch_size_and_partial_batches(problem, batch_size):
    model, x, y = problem
    reference = dense_hessian(model, sce, x, y)
    op = tfi.HessianOperator(model, sce, (x, y), batch_size=batch_size)
    assert relative_error(op.to_dense().numpy(), reference) <= 1e-10


def test_tf_data_known_and_unknown_cardinality(problem, rng):
    model, x, y = problem
    reference = dense_hessian(model, sce, x, y)
    known = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    unknown = known.filter(lambda a, b: True)
    assert unknown.cardinality() == tf.data.UNKNOWN_CARDINALITY
    for ds in (known, unknown):
        assert relative_error(tfi.HessianOperator(model, sce, ds).to_dense().numpy(), reference) <= 1e-10


def test_sample_weights_are_honoured(problem, rng):
    model, x, y = problem
    w = rng.integers(1, 4, size=len(y)).astype("float64")
    reference = dense_hessian(model, sce, x, y, w)
    duplicated = (np.repeat(x, w.astype(int), axis=0), np.repeat(y, w.astype(int)))
    weighted = tfi.HessianOperator(model, sce, (x, y, w), batch_size=6).to_dense().numpy()
    assert relative_error(weighted, reference) <= 1e-10
    assert relative_error(tfi.HessianOperator(model, sce, duplicated).to_dense().numpy(), weighted) <= 1e-10
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(10)
    assert relative_error(tfi.HessianOperator(model, sce, ds).to_dense().numpy(), weighted) <= 1e-10


def test_works_with_tf_conjugate_gradient(problem, rng):
    model, x, y = problem
    op = tfi.HessianOperator(model, sce, (x, y), damping=0.5, curvature="gauss_newton")
    assert op.is_positive_definite and op.is_self_adjoint
    b = rng.standard_normal(op.space.size)
    result = tf.linalg.experimental.conjugate_gradient(op, tf.constant(b), tol=1e-10, max_iter=200)
    dense = op.to_dense().numpy()
    assert relative_error(result.x.numpy(), np.linalg.solve(dense, b)) <= 1e-7


def test_extreme_eigenvalues_match_eigvalsh(problem):
    model, x, y = problem
    op = tfi.HessianOperator(model, sce, (x, y))
    exact = np.linalg.eigvalsh(op.to_dense().numpy())
    estimate = tfi.extreme_eigenvalues(op, num_iterations=op.space.size)
    assert abs(estimate.largest - exact[-1]) <= 1e-8 * abs(exact[-1])
    assert abs(estimate.smallest - exact[0]) <= 1e-8 * abs(exact[-1])
    short = tfi.extreme_eigenvalues(op, num_iterations=20)
    assert abs(short.largest - exact[-1]) <= 1e-3 * abs(exact[-1])
    if exact[0] < 0:
        assert short.suggested_damping > 0


def test_layer_normalization_products_are_exact(float64, rng):
    """LayerNormalization's TF second derivatives are wrong, but the operator's products are made exact
    (they agree with finite differences of exact gradients; without the patch the error is ~0.2)."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3)])
    x, y = models.classification_data(rng, n=20)
    report = tfi.check_hvp(model, sce, (x, y))
    assert report.ok and report.max_relative_error < 1e-7, str(report)
    for mode in ("forward_over_back", "back_over_back"):
        op = tfi.HessianOperator(model, sce, (x, y), mode=mode, batch_size=7)
        fd = op.with_options(mode="finite_difference")
        v = rng.standard_normal((2, op.space.size))
        assert relative_error(op.matmul_rows(v).numpy(), fd.matmul_rows(v).numpy()) < 1e-7


def test_renorm_trap_is_caught_and_every_fix_it_names_works(float64, rng):
    """BatchNormalization(renorm=True) in training mode cannot be made exact: refused, and each fix the
    message names works (Gauss-Newton, finite differences, variables after it, on_unsafe_layers='warn')."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.BatchNormalization(renorm=True, name="bn"), keras.layers.Dense(3)])
    x, y = models.classification_data(rng, n=20)
    snapshot = [w.copy() for w in model.get_weights()]
    with pytest.raises(tfi.SecondDerivativeError, match=r"bn are incorrect.*renorm.*gauss_newton.*finite_difference"):
        tfi.HessianOperator(model, sce, (x, y), training=True)
    wrong = tfi.check_hvp(model, sce, (x, y), training=True)
    assert wrong.ok is False and wrong.max_relative_error > 1e-3, str(wrong)  # the refusal is justified
    fd = tfi.HessianOperator(model, sce, (x, y), training=True, mode="finite_difference")
    v = rng.standard_normal((1, fd.space.size))
    assert np.all(np.isfinite(fd.matmul_rows(v).numpy()))
    gauss_newton = tfi.HessianOperator(model, sce, (x, y), training=True, curvature="gauss_newton")
    assert np.all(np.isfinite(gauss_newton.matmul_rows(v).numpy()))
    head = tfi.HessianOperator(model, sce, (x, y), training=True, variables=model.layers[-1])
    w = rng.standard_normal((2, head.space.size))
    assert relative_error(head.matmul_rows(w).numpy(),
                          head.with_options(mode="finite_difference").matmul_rows(w).numpy()) < 1e-7
    with pytest.warns(UserWarning, match="silently wrong"):
        tfi.HessianOperator(model, sce, (x, y), training=True, on_unsafe_layers="warn")
    for before, after in zip(snapshot, model.get_weights()):  # training-mode passes never move the statistics
        np.testing.assert_array_equal(before, after)


def _relu_mlp():
    return keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])


def test_check_hvp_is_not_fooled_by_relu_kinks(float64, rng):
    model = _relu_mlp()
    x, y = rng.standard_normal((256, 20)), rng.integers(0, 10, size=256)
    # A central difference with step 1e-3 crosses ReLU kinks and is far off ...
    first_step_only = tfi.check_hvp(model, sce, (x, y), step=1e-3, max_step_reductions=0)
    assert first_step_only.ok is None and first_step_only.max_relative_error > 1
    # ... smaller steps settle on the product, which is right.
    report = tfi.check_hvp(model, sce, (x, y), step=1e-3)
    assert all(report.settled) and report.ok and report.max_relative_error <= 1e-6


def test_check_hvp_on_relu_in_float32_is_inconclusive_not_wrong(rng):
    model = _relu_mlp()
    x, y = rng.standard_normal((256, 20)).astype("float32"), rng.integers(0, 10, size=256)
    report = tfi.check_hvp(model, sce, (x, y))
    assert report.ok is None and not all(report.settled)
    assert "INCONCLUSIVE" in str(report) and "float64 copy" in str(report)


def test_batch_norm_in_inference_mode_is_fine(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    x, y = models.classification_data(rng, n=20)
    op = tfi.HessianOperator(model, sce, (x, y))
    assert relative_error(op.to_dense().numpy(), dense_hessian(model, sce, x, y)) <= 1e-10
    renorm = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                               keras.layers.BatchNormalization(renorm=True, name="renorm"), keras.layers.Dense(3)])
    with pytest.raises(tfi.SecondDerivativeError, match="renorm"):  # training mode: batch moments, renorm unfixed
        tfi.HessianOperator(renorm, sce, (x, y), training=True)
