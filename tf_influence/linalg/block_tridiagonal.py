"""`block_tridiagonal_solve`: solves block-tridiagonal systems, in the style of `tf.linalg.tridiagonal_solve`.

The matrix `A` has `L` block rows. Block row `i` holds `lower[i-1]`, `diagonal[i]` and `upper[i]`:

    A = [[D0, U0,  0,  0 ],
         [L0, D1, U1,  0 ],
         [ 0, L1, D2, U2 ],
         [ 0,  0, L2, D3 ]]        A[i, i] = D_i,  A[i+1, i] = L_i,  A[i, i+1] = U_i.

So `lower` and `upper` hold `L - 1` blocks each, with no padding (unlike the "sequence" format of
`tf.linalg.tridiagonal_solve`, which pads its diagonals to length L).
"""

import tensorflow as tf

from tf_influence.errors import InputError


def block_tridiagonal_solve(diagonal, lower, upper, rhs, *, assume_positive_definite=False):
    """Solves `A x = rhs` for a block-tridiagonal matrix `A`.

    Two forms are accepted:

    * stacked tensors for equal block sizes m: `diagonal` `[..., L, m, m]`, `lower` and `upper`
      `[..., L-1, m, m]`, `rhs` `[..., L, m, k]`; the result has the shape of `rhs`.
    * lists for unequal block sizes `m_0, ..., m_{L-1}`: `diagonal[i]` `[..., m_i, m_i]`,
      `lower[i]` `[..., m_{i+1}, m_i]`, `upper[i]` `[..., m_i, m_{i+1}]`, `rhs[i]` `[..., m_i, k]`;
      the result is a list like `rhs`.

    Leading batch axes `...` broadcast as in `tf.linalg.solve`.

    Methods: with `assume_positive_definite=True`, a block Cholesky factorization `A = 𝓛𝓛ᵀ` that
    reads `diagonal` and `lower` only (A is taken to be symmetric, `upper[i] = lower[i]ᵀ`; pass
    `upper=None`). Otherwise block LU without pivoting across blocks and with partial pivoting
    inside each pivot block (`tf.linalg.lu`); this is stable for block diagonally dominant
    systems and for symmetric positive definite ones, but, like the scalar Thomas algorithm, can
    fail on a nonsingular matrix whose pivot block (a Schur complement) is singular.

    Args:
      diagonal: the L diagonal blocks (stacked tensor or list).
      lower: the L-1 blocks below the diagonal (same form as `diagonal`).
      upper: the L-1 blocks above the diagonal, or None with `assume_positive_definite=True`.
      rhs: right-hand sides, k columns per block (a trailing axis of size 1 for one vector).
      assume_positive_definite: use block Cholesky; a promise that `A` is symmetric positive
        definite (eagerly checked: a failed Cholesky raises).

    Returns:
      `x` with the form and shape of `rhs`.

    Raises:
      InputError: for inconsistent shapes, a failed Cholesky (A not positive definite), or a
        singular pivot block (non-finite solution).

    Performance: `O(L m³ + L m² k)` time and `O(L m²)` memory, versus `O(L³ m³)` for a dense solve.

    Example:
      >>> D = 4.0 * tf.eye(3, batch_shape=[5], dtype=tf.float64)   # L = 5 blocks of size 3
      >>> E = 0.5 * tf.ones([4, 3, 3], tf.float64)
      >>> x = block_tridiagonal_solve(D, E, E, tf.ones([5, 3, 1], tf.float64))   # [5, 3, 1]
    """
    stacked = not isinstance(diagonal, (list, tuple))
    if stacked:
        diagonal, lower, upper, rhs = _unstack(diagonal, lower, upper, rhs, assume_positive_definite)
    else:
        diagonal, lower, upper, rhs = _as_lists(diagonal, lower, upper, rhs, assume_positive_definite)
    _check_block_shapes(diagonal, lower, upper, rhs, assume_positive_definite)
    if assume_positive_definite:
        x = _cholesky_solve(diagonal, lower, rhs)
    else:
        x = _lu_solve(diagonal, lower, upper, rhs)
    if tf.executing_eagerly() and not all(bool(tf.reduce_all(tf.math.is_finite(b))) for b in x):
        raise InputError(
            "block_tridiagonal_solve produced NaN/Inf: a pivot block (a Schur complement of A) is "
            "singular, or the inputs contain NaN/Inf. Check that A is nonsingular and block "
            "diagonally dominant or symmetric positive definite (then pass "
            "assume_positive_definite=True)."
        )
    return tf.stack(x, axis=-3) if stacked else x


def _cholesky_solve(diagonal, lower, rhs):
    """A = 𝓛𝓛ᵀ with 𝓛 block lower bidiagonal: diagonal blocks C_i, sub-diagonal blocks E_i."""
    chol = [_cholesky(diagonal[0], 0)]
    e_t = [None]  # e_t[i] = E_iᵀ = C_{i-1}⁻¹ lower[i-1]ᵀ
    for i in range(1, len(diagonal)):
        et = tf.linalg.triangular_solve(chol[i - 1], tf.linalg.adjoint(lower[i - 1]), lower=True)
        e_t.append(et)
        chol.append(_cholesky(diagonal[i] - tf.linalg.matmul(et, et, adjoint_a=True), i))
    y = [tf.linalg.triangular_solve(chol[0], rhs[0], lower=True)]
    for i in range(1, len(diagonal)):
        y.append(tf.linalg.triangular_solve(chol[i], rhs[i] - tf.linalg.matmul(e_t[i], y[i - 1], adjoint_a=True),
                                            lower=True))
    x = [None] * len(diagonal)
    x[-1] = tf.linalg.triangular_solve(chol[-1], y[-1], lower=True, adjoint=True)
    for i in range(len(diagonal) - 2, -1, -1):
        x[i] = tf.linalg.triangular_solve(chol[i], y[i] - tf.linalg.matmul(e_t[i + 1], x[i + 1]),
                                          lower=True, adjoint=True)
    return x


def _cholesky(block, i):
    try:
        factor = tf.linalg.cholesky(block)
    except tf.errors.InvalidArgumentError as e:
        raise _not_positive_definite(i) from e
    if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(factor))):
        raise _not_positive_definite(i)
    return factor


def _not_positive_definite(i):
    return InputError(
        f"block_tridiagonal_solve(assume_positive_definite=True): the Cholesky factorization of pivot "
        f"block {i} failed, so the matrix is not symmetric positive definite. Pass "
        "assume_positive_definite=False (block LU) for indefinite or non-symmetric systems."
    )


def _lu_solve(diagonal, lower, upper, rhs):
    """A = 𝓛𝓤 with 𝓛 unit block lower bidiagonal and 𝓤 = [P_i on the diagonal, upper[i] above]."""
    factors = [_lu(diagonal[0], 0)]
    y = [rhs[0]]
    for i in range(1, len(diagonal)):
        lu, perm = factors[i - 1]
        coupling = tf.linalg.lu_solve(lu, perm, _broadcast_like(upper[i - 1], lu))
        factors.append(_lu(diagonal[i] - tf.linalg.matmul(lower[i - 1], coupling), i))
        carried = tf.linalg.lu_solve(lu, perm, _broadcast_like(y[i - 1], lu))
        y.append(rhs[i] - tf.linalg.matmul(lower[i - 1], carried))
    x = [None] * len(diagonal)
    lu, perm = factors[-1]
    x[-1] = tf.linalg.lu_solve(lu, perm, _broadcast_like(y[-1], lu))
    for i in range(len(diagonal) - 2, -1, -1):
        lu, perm = factors[i]
        x[i] = tf.linalg.lu_solve(lu, perm, _broadcast_like(y[i] - tf.linalg.matmul(upper[i], x[i + 1]), lu))
    return x


def _lu(block, i):
    try:
        return tf.linalg.lu(block)
    except tf.errors.InvalidArgumentError as e:
        raise InputError(
            f"block_tridiagonal_solve: pivot block {i} (a Schur complement of A) is singular, so block LU "
            "without pivoting across blocks cannot proceed. Check that A is nonsingular; a block "
            "diagonally dominant or positive definite A never has singular pivots."
        ) from e


def _broadcast_like(matrix, lu):
    """`lu_solve` needs equal batch shapes; broadcast `matrix`'s batch axes against `lu`'s."""
    batch = tf.broadcast_dynamic_shape(tf.shape(matrix)[:-2], tf.shape(lu)[:-2])
    return tf.broadcast_to(matrix, tf.concat([batch, tf.shape(matrix)[-2:]], 0))


# -- Input handling ------------------------------------------------------------------------------

def _unstack(diagonal, lower, upper, rhs, spd):
    diagonal = tf.convert_to_tensor(diagonal)
    dtype = diagonal.dtype
    rhs = tf.convert_to_tensor(rhs, dtype=dtype)
    lower = tf.convert_to_tensor(lower, dtype=dtype)
    upper = None if upper is None else tf.convert_to_tensor(upper, dtype=dtype)
    if diagonal.shape.rank is None or diagonal.shape.rank < 3:
        raise InputError(
            f"diagonal must have shape [..., L, m, m] (or be a list of blocks). Received shape {diagonal.shape}."
        )
    num = diagonal.shape[-3]
    for name, t, count in (("lower", lower, num - 1), ("upper", upper, num - 1), ("rhs", rhs, num)):
        if t is None:
            continue
        if t.shape.rank is None or t.shape.rank < 3 or t.shape[-3] != count:
            raise InputError(
                f"{name} must have shape [..., {count}, m, {'k' if name == 'rhs' else 'm'}] for L = {num} "
                f"diagonal blocks (lower/upper hold L-1 blocks, rhs L). Received shape {t.shape}"
                + ("; add a trailing axis of size 1 for a single right-hand side." if name == "rhs" else ".")
            )
    split = lambda t: [] if t is None or t.shape[-3] == 0 else tf.unstack(t, axis=-3)  # noqa: E731
    return split(diagonal), split(lower), (None if upper is None else split(upper)), split(rhs)


def _as_lists(diagonal, lower, upper, rhs, spd):
    diagonal = [tf.convert_to_tensor(d) for d in diagonal]
    if not diagonal:
        raise InputError("diagonal is an empty list; expected at least one block.")
    dtype = diagonal[0].dtype
    if not isinstance(rhs, (list, tuple)) or not isinstance(lower, (list, tuple)) or not (
            upper is None or isinstance(upper, (list, tuple))):
        raise InputError(
            "With diagonal given as a list of blocks, lower, upper and rhs must be lists too. Received "
            f"lower: {type(lower).__name__}, upper: {type(upper).__name__}, rhs: {type(rhs).__name__}."
        )
    convert = lambda ts: [tf.convert_to_tensor(t, dtype=dtype) for t in ts]  # noqa: E731
    return diagonal, convert(lower), (None if upper is None else convert(upper)), convert(rhs)


def _check_block_shapes(diagonal, lower, upper, rhs, spd):
    num = len(diagonal)
    if upper is None and not spd:
        raise InputError("upper=None is only allowed with assume_positive_definite=True (A symmetric).")
    counts = {"lower": (lower, num - 1), "rhs": (rhs, num)}
    if upper is not None:
        counts["upper"] = (upper, num - 1)
    for name, (blocks, expected) in counts.items():
        if len(blocks) != expected:
            raise InputError(
                f"Expected {expected} {name} blocks for {num} diagonal blocks. Received {len(blocks)}."
            )
    sizes = []
    for i, d in enumerate(diagonal):
        if d.shape.rank is None or d.shape.rank < 2 or d.shape[-1] != d.shape[-2]:
            raise InputError(f"diagonal block {i} must be square [..., m, m]. Received shape {d.shape}.")
        sizes.append(d.shape[-1])
    for i, t in enumerate(rhs):
        if t.shape.rank is None or t.shape.rank < 2 or t.shape[-2] != sizes[i]:
            raise InputError(
                f"rhs block {i} must have shape [..., {sizes[i]}, k] (a trailing axis of size 1 for one "
                f"vector). Received shape {t.shape}."
            )
    for i, t in enumerate(lower):
        _expect_shape("lower", i, t, (sizes[i + 1], sizes[i]))
    for i, t in enumerate(upper or []):
        _expect_shape("upper", i, t, (sizes[i], sizes[i + 1]))
    for name, blocks in (("diagonal", diagonal), ("lower", lower), ("upper", upper or []), ("rhs", rhs)):
        for t in blocks:
            if t.dtype not in (tf.float32, tf.float64, tf.complex64, tf.complex128):
                raise InputError(f"{name} blocks must be float32/64 or complex. Received dtype {t.dtype.name}.")


def _expect_shape(name, i, t, expected):
    if t.shape.rank is None or t.shape.rank < 2 or tuple(t.shape[-2:]) != expected:
        got = None if t.shape.rank is None else tuple(t.shape[-2:])
        raise InputError(
            f"{name} block {i} must have trailing shape {expected} (rows of block row "
            f"{i + 1 if name == 'lower' else i}, columns of block column {i if name == 'lower' else i + 1}). "
            f"Received {got}."
        )

