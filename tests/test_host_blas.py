"""Eager float64 products on the host BLAS (no GPU) give TensorFlow's numbers; other cases stay in TensorFlow."""

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import relative_error
from tf_influence.linalg.host_blas import matmul_transposed, prefers_host_blas
from tf_influence.linalg.kronecker import eigenbasis_product


def _orthogonal(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


def test_host_blas_is_chosen_for_eager_float64_without_a_gpu():
    no_gpu = not tf.config.list_logical_devices("GPU")
    assert prefers_host_blas(tf.float64) == no_gpu
    assert not prefers_host_blas(tf.float32)
    assert not tf.function(lambda: tf.constant(prefers_host_blas(tf.float64)))()  # traced: TensorFlow's kernels


@pytest.mark.parametrize("identity_a", [False, True])
def test_eigenbasis_product_on_the_host_equals_the_traced_product(rng, identity_a):
    v = tf.constant(rng.standard_normal((5, 4, 3)))
    q_a = None if identity_a else tf.constant(_orthogonal(rng, 4))
    q_s = tf.constant(_orthogonal(rng, 3))
    scale = tf.constant(rng.random((4, 3)) + 0.5)
    eager = eigenbasis_product(v, q_a, q_s, scale)                  # host BLAS where preferred
    traced = tf.function(eigenbasis_product)(v, q_a, q_s, scale)    # always TensorFlow's kernels
    assert eager.dtype == tf.float64 and eager.shape == (5, 4, 3)
    assert relative_error(eager, traced) <= 1e-14
    q = np.eye(4) if identity_a else q_a.numpy()
    expected = [q @ ((q.T @ m @ q_s.numpy()) * scale.numpy()) @ q_s.numpy().T for m in v.numpy()]
    assert relative_error(eager, np.stack(expected)) <= 1e-14


def test_float32_products_stay_in_tensorflow(rng):
    a, b = (tf.constant(rng.standard_normal(s), tf.float32) for s in ((6, 8), (3, 8)))
    result = matmul_transposed(a, b)
    assert result.dtype == tf.float32
    np.testing.assert_allclose(result.numpy(), a.numpy() @ b.numpy().T, rtol=1e-5, atol=1e-5)


def test_matmul_transposed_in_float64_equals_tensorflow(rng):
    a, b = tf.constant(rng.standard_normal((7, 9))), tf.constant(rng.standard_normal((4, 9)))
    result = matmul_transposed(a, b)
    assert result.dtype == tf.float64 and result.shape == (7, 4)
    assert relative_error(result, tf.matmul(a, b, transpose_b=True)) <= 1e-14
