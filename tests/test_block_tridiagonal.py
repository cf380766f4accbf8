"""block_tridiagonal_solve against dense solves of the assembled matrix (float64)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_influence.errors import InputError
from tf_influence.linalg import block_tridiagonal_solve

TOL = 1e-12


def _random_system(rng, sizes, *, batch=(), symmetric, k=2):
    """Block diagonally dominant blocks (well conditioned); SPD when `symmetric`."""
    num = len(sizes)
    lower = [rng.standard_normal(batch + (sizes[i + 1], sizes[i])) for i in range(num - 1)]
    upper = ([np.swapaxes(b, -1, -2) for b in lower] if symmetric
             else [rng.standard_normal(batch + (sizes[i], sizes[i + 1])) for i in range(num - 1)])
    diagonal = []
    for i, m in enumerate(sizes):
        a = rng.standard_normal(batch + (m, m))
        block = a @ np.swapaxes(a, -1, -2) if symmetric else a
        off = sum(np.linalg.norm(b, axis=(-2, -1)) for b in
                  ([lower[i - 1]] if i > 0 else []) + ([upper[i]] if i < num - 1 else []))
        shift = np.asarray(2.0 * (off + 1.0) + (0 if symmetric else np.linalg.norm(a, axis=(-2, -1))))
        diagonal.append(block + shift[..., None, None] * np.eye(m))
    rhs = [rng.standard_normal(batch + (m, k)) for m in sizes]
    return diagonal, lower, upper, rhs


def _dense(diagonal, lower, upper):
    offsets = np.concatenate([[0], np.cumsum([d.shape[-1] for d in diagonal])])
    batch = diagonal[0].shape[:-2]
    a = np.zeros(batch + (offsets[-1], offsets[-1]))
    for i, d in enumerate(diagonal):
        a[..., offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]] = d
    for i in range(len(lower)):
        a[..., offsets[i + 1]:offsets[i + 2], offsets[i]:offsets[i + 1]] = lower[i]
        a[..., offsets[i]:offsets[i + 1], offsets[i + 1]:offsets[i + 2]] = upper[i]
    return a


def _reference(diagonal, lower, upper, rhs):
    return np.linalg.solve(_dense(diagonal, lower, upper), np.concatenate(rhs, axis=-2))


@pytest.mark.parametrize("spd", [True, False])
@pytest.mark.parametrize("batch", [(), (2, 3)])
@pytest.mark.parametrize("num_blocks", [1, 2, 7])
def test_stacked_equal_blocks_match_dense_solve(spd, batch, num_blocks):
    rng = np.random.default_rng(num_blocks + 10 * len(batch) + 100 * spd)
    diagonal, lower, upper, rhs = _random_system(rng, [4] * num_blocks, batch=batch, symmetric=spd)
    stack = lambda blocks: np.stack(blocks, axis=-3) if blocks else np.zeros(batch + (0, 4, 4))  # noqa: E731
    x = block_tridiagonal_solve(stack(diagonal), stack(lower), None if spd else stack(upper), stack(rhs),
                                assume_positive_definite=spd)
    assert x.shape == batch + (num_blocks, 4, 2)
    expected = _reference(diagonal, lower, upper, rhs)
    got = np.reshape(x.numpy(), batch + (4 * num_blocks, 2))
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err <= TOL, err


@pytest.mark.parametrize("spd", [True, False])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_list_form_unequal_blocks_match_dense_solve(spd, batch):
    rng = np.random.default_rng(7 + spd)
    sizes = [3, 1, 5, 2, 4]
    diagonal, lower, upper, rhs = _random_system(rng, sizes, batch=batch, symmetric=spd, k=3)
    x = block_tridiagonal_solve(diagonal, lower, upper, rhs, assume_positive_definite=spd)
    assert [tuple(b.shape) for b in x] == [batch + (m, 3) for m in sizes]
    expected = _reference(diagonal, lower, upper, rhs)
    got = np.concatenate([b.numpy() for b in x], axis=-2)
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err <= TOL, err


def test_cholesky_and_lu_paths_agree_on_spd_system():
    rng = np.random.default_rng(3)
    diagonal, lower, upper, rhs = _random_system(rng, [2, 6, 3], symmetric=True)
    x_chol = block_tridiagonal_solve(diagonal, lower, None, rhs, assume_positive_definite=True)
    x_lu = block_tridiagonal_solve(diagonal, lower, upper, rhs)
    for a, b in zip(x_chol, x_lu):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-13)


def test_unbatched_matrix_broadcasts_against_batched_rhs():
    rng = np.random.default_rng(4)
    diagonal, lower, upper, _ = _random_system(rng, [3] * 4, symmetric=False)
    rhs = rng.standard_normal((5, 4, 3, 1))
    x = block_tridiagonal_solve(np.stack(diagonal), np.stack(lower), np.stack(upper), rhs)
    dense = _dense(diagonal, lower, upper)
    expected = np.linalg.solve(dense, rhs.reshape(5, 12, 1))
    err = np.linalg.norm(x.numpy().reshape(5, 12, 1) - expected) / np.linalg.norm(expected)
    assert err <= TOL, err


def test_float32_is_accurate_to_float32_precision():
    rng = np.random.default_rng(5)
    diagonal, lower, upper, rhs = _random_system(rng, [4] * 5, symmetric=True)
    x = block_tridiagonal_solve(*(np.stack(b).astype(np.float32) for b in (diagonal, lower, upper, rhs)),
                                assume_positive_definite=True)
    assert x.dtype == tf.float32
    expected = _reference(diagonal, lower, upper, rhs)
    err = np.linalg.norm(x.numpy().reshape(20, 2) - expected) / np.linalg.norm(expected)
    assert err <= 1e-5, err


def test_not_positive_definite_is_refused_with_the_fix():
    diagonal = np.stack([np.eye(2), -np.eye(2)])
    lower = np.zeros((1, 2, 2))
    with pytest.raises(InputError, match=r"pivot block 1 failed.*assume_positive_definite=False"):
        block_tridiagonal_solve(diagonal, lower, None, np.ones((2, 2, 1)), assume_positive_definite=True)
    # The same indefinite (but nonsingular) matrix is fine for the LU path.
    x = block_tridiagonal_solve(diagonal, lower, lower, np.ones((2, 2, 1)))
    np.testing.assert_array_equal(x.numpy().ravel(), [1, 1, -1, -1])


def test_singular_pivot_is_reported():
    diagonal = np.stack([np.zeros((2, 2)), np.eye(2)])
    with pytest.raises(InputError, match="pivot block .* is singular"):
        block_tridiagonal_solve(diagonal, np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.ones((2, 2, 1)))


@pytest.mark.parametrize("bad, match", [
    (dict(lower=np.zeros((3, 2, 2))), r"lower must have shape \[\.\.\., 1, m, m\].*Received shape \(3, 2, 2\)"),
    (dict(rhs=np.ones((2, 2))), r"rhs must have shape .*add a trailing axis of size 1"),
    (dict(upper=None), "upper=None is only allowed with assume_positive_definite=True"),
    (dict(diagonal=np.ones((2, 2, 3))), r"diagonal block 0 must be square"),
])
def test_bad_shapes_are_refused(bad, match):
    args = dict(diagonal=np.stack([np.eye(2)] * 2), lower=np.zeros((1, 2, 2)), upper=np.zeros((1, 2, 2)),
                rhs=np.ones((2, 2, 1)))
    args.update(bad)
    with pytest.raises(InputError, match=match):
        block_tridiagonal_solve(args["diagonal"], args["lower"], args["upper"], args["rhs"])


def test_list_blocks_with_wrong_coupling_shape_are_refused():
    with pytest.raises(InputError, match=r"lower block 0 must have trailing shape \(3, 2\)"):
        block_tridiagonal_solve([np.eye(2), np.eye(3)], [np.zeros((2, 3))], [np.zeros((2, 3))],
                                [np.ones((2, 1)), np.ones((3, 1))])
