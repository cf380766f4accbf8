"""Dense curvature matrices of the training objective, built in a handful of compiled passes.

    dense_hessian(...)             = Σᵢ wᵢ ∇²ℓᵢ / Σᵢ wᵢ          (data term of H = ∇²R; no ∇²Ω)
    dense_gauss_newton(...)        = Σᵢ wᵢ Jᵢᵀ Mᵢ Jᵢ / Σᵢ wᵢ      (data term of the GGN; no ∇²Ω)
    dense_regularizer_hessian(...) = ∇²Ω                         (model.losses + (l2/2)‖θ‖²)
    dense_curvature(...)           = data term + ∇²Ω + λI        (HessianOperator's dense matrix)

`Jᵢ` `[c, p]` is the Jacobian of example i's c outputs (every output tensor flattened and
concatenated), `Mᵢ` `[c, c]` the Hessian of its loss in those outputs. Exact to rounding.

How, and where the time goes (64-32-10 digits MLP, float64, CPU; `benchmarks/dense.py --profile`):
  Gauss-Newton: per batch, per-example Jacobians (reverse passes vectorised over examples and
    output units), `wᵢMᵢ = QΛQᵀ` by `eigh`, rows `U = |Λ|^½ Qᵀ Jᵢ` with signs `sign(λ)`, then one
    product `Σ ±UᵀU`. Signed factors keep it exact when a loss is not convex in the outputs or a
    weight is negative; eigenvalues below `c·ε·max|λ|` are rounding noise and are dropped (softmax
    cross-entropy's null direction: one row in c). The product takes ~75 % of the time. TensorFlow's
    float64 matmul on CPU runs at about a quarter of the machine's BLAS speed (its kernels are built
    without AVX2/FMA), so on CPU the float64 sum goes to BLAS `syrk` through SciPy (`gemm="auto"`).
  Hessian: rows of the Jacobian of the batch gradient by reverse-over-reverse products with
    identity cotangents, vectorised by pfor, `chunk_size` rows per compiled pass over the data.
    Kernel time: matmuls ~40 %, pfor's transposes ~25 %, elementwise ops ~30 %, all in TensorFlow's
    float64 kernels (a float32 model runs ~3x faster). Forward-over-back under `tf.vectorized_map`
    measured 2-3x slower; XLA took minutes to compile for ~10 % less CPU time.

Precision: derivatives are computed in the variables' dtype; sums over batches (and, with BLAS,
over examples) are accumulated in `dtype` (float64 by default), which the direct solver factorises.
A float32 model gives its float32 curvature accumulated in float64.
"""

import contextlib

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.compiled import shared_function
from tf_influence.data import batch_spec, first_batch
from tf_influence.errors import InputError
from tf_influence.linalg.host_blas import prefers_host_blas
from tf_influence.normalization import exact_second_derivatives
from tf_influence.params import densify

_ZERO = tf.UnconnectedGradients.ZERO
DEFAULT_MEMORY_BUDGET = 2**30
GEMM_BACKENDS = ("auto", "blas", "tensorflow")


def dense_gauss_newton(objective, tf_vars, space, dataset, *, gemm="auto", memory_budget=DEFAULT_MEMORY_BUDGET,
                       dtype=tf.float64):
    """The dense generalised Gauss-Newton matrix of the data term, `Σᵢ wᵢ Jᵢᵀ Mᵢ Jᵢ / Σᵢ wᵢ`.

    Equals `HessianOperator(..., curvature="gauss_newton").to_dense()` minus `∇²Ω` and the damping,
    also when `Mᵢ` is indefinite. Regulariser NOT included (see `dense_regularizer_hessian`).

    Args:
      objective: an `Objective` (model, per-example loss).
      tf_vars: the selected variables as `tf.Variable`s (`params.tf_variables(selected)`).
      space: the `ParameterSpace` of the selected variables (p parameters).
      dataset: the `(x, y, w)` batches: a batched `tf.data.Dataset` (`data.as_dataset`) or `data.ArrayBatches`.
      gemm: who forms `Σ ±UᵀU`: `"blas"` (SciPy `syrk`, in place in a NumPy accumulator of
        `dtype`), `"tensorflow"` (`tf.matmul` in the model's dtype, per batch) or `"auto"` (BLAS
        when no GPU is visible and `dtype` is float64).
      memory_budget: approximate bytes for the transient per-example Jacobians (`[m, c, p]` for
        sub-batches of m examples); the result's `p²` entries come on top.
      dtype: dtype of the accumulation and of the result.

    Returns:
      A symmetric `[p, p]` tensor of `dtype`.

    Performance: one forward pass and c reverse passes per example (vectorised), then
    `~(c-1)·n·p²` multiply-adds in the products (c output units, n examples); memory `p²` plus
    the budget.

    Example:
      >>> G = dense_gauss_newton(objective, tf_vars, space, as_dataset((x, y)))
    """
    return tf.convert_to_tensor(_gauss_newton_array(objective, tf_vars, space, dataset, gemm, memory_budget, dtype))


def dense_hessian(objective, tf_vars, space, dataset, *, chunk_size=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                  dtype=tf.float64):
    """The dense Hessian of the data term, `Σᵢ wᵢ ∇²ℓᵢ / Σᵢ wᵢ`, exact to rounding.

    Regulariser NOT included (see `dense_regularizer_hessian`).

    Args:
      objective: an `Objective` (model, per-example loss).
      tf_vars: the selected variables as `tf.Variable`s.
      space: the `ParameterSpace` of the selected variables (p parameters).
      dataset: the `(x, y, w)` batches, as for `dense_gauss_newton`.
      chunk_size: Hessian rows per compiled pass over the data. Default: as many as fit in
        `memory_budget`, at most 256 (larger chunks measured no faster on CPU).
      memory_budget: approximate bytes for one chunk's vectorised intermediates (about
        `3·chunk_size·(batch·a + f)` entries for a model whose gradient graph holds a entries per
        example and f fixed ones; both are counted by tracing that graph).
      dtype: dtype of the sum over batches and of the result.

    Returns:
      A symmetric `[p, p]` tensor of `dtype`.

    Performance: `p / chunk_size` passes over the data; each costs about `chunk_size` Hessian-vector
    products, vectorised into large matmuls. Memory `p²` for the result plus the budget.

    Example:
      >>> H = dense_hessian(objective, tf_vars, space, as_dataset((x, y))) + dense_regularizer_hessian(
      ...     objective, tf_vars, variables, space)
    """
    return tf.convert_to_tensor(_hessian_array(objective, tf_vars, space, dataset, chunk_size, memory_budget, dtype))


def dense_regularizer_hessian(objective, tf_vars, variables, space, *, chunk_size=None,
                              memory_budget=DEFAULT_MEMORY_BUDGET, dtype=tf.float64):
    """`∇²Ω`: the Hessian of the model's weight regularisers plus `(l2/2)‖θ‖²` (`l2·I`).

    Args:
      objective: an `Objective`; its `regularization(variables)` is differentiated.
      tf_vars: the selected variables as `tf.Variable`s.
      variables: the selected variables as the model holds them (what `regularization` takes).
      space: their `ParameterSpace`.
      chunk_size: rows per vectorised pass (default from `memory_budget`).
      memory_budget: approximate bytes for one chunk (`~4·chunk_size·p` entries).
      dtype: dtype of the result.

    Returns:
      A symmetric `[p, p]` tensor of `dtype`.

    Example:
      >>> R = dense_regularizer_hessian(objective, tf_vars, variables, space)   # l2·I without regularisers
    """
    return tf.convert_to_tensor(_regularizer_array(objective, tf_vars, variables, space, chunk_size, memory_budget,
                                                   dtype))


def dense_curvature(objective, tf_vars, variables, space, dataset, *, curvature="hessian", damping=0.0,
                    chunk_size=None, gemm="auto", memory_budget=DEFAULT_MEMORY_BUDGET, dtype=tf.float64,
                    as_array=False):
    """The whole dense matrix of `HessianOperator`: data term + `∇²Ω` + `damping·I`, in one buffer.

    Args:
      curvature: `"hessian"` (`dense_hessian`) or `"gauss_newton"` (`dense_gauss_newton`).
      damping: λ added to the diagonal.
      as_array: return the NumPy buffer itself (no tensor copy), e.g. for a LAPACK factorisation.
      Others: as for `dense_hessian`, `dense_gauss_newton` and `dense_regularizer_hessian`.

    Returns:
      A symmetric `[p, p]` tensor of `dtype` (one `p²` NumPy buffer, converted once), or that
      NumPy array with `as_array=True`.

    Example:
      >>> A = dense_curvature(objective, tf_vars, variables, space, dataset, damping=1e-3)
    """
    damping = arguments.nonnegative_float(damping, "damping")
    arguments.one_of(curvature, "curvature", ("hessian", "gauss_newton"))
    if curvature == "hessian":
        # Traced inside the patch, as curvature/products.py does: TensorFlow's own second derivatives
        # through LayerNormalization, GroupNormalization and training-mode BatchNormalization are wrong.
        result = _hessian_array(objective, tf_vars, space, dataset, chunk_size, memory_budget, dtype, exact=True)
    else:
        result = _gauss_newton_array(objective, tf_vars, space, dataset, gemm, memory_budget, dtype)
    if objective.has_weight_regularizers:  # ∇²Ω by pfor; without them ∇²Ω = l2·I exactly
        result += _regularizer_array(objective, tf_vars, variables, space, None, memory_budget, dtype)
    else:
        damping += float(objective.l2)
    result[np.diag_indices_from(result)] += damping
    return result if as_array else tf.convert_to_tensor(result)


# -- Whole matrices as NumPy arrays -------------------------------------------------------------


def _gauss_newton_array(objective, tf_vars, space, dataset, gemm, memory_budget, dtype):
    arguments.one_of(gemm, "gemm", GEMM_BACKENDS)
    dtype = tf.as_dtype(dtype)
    if gemm == "auto":
        gemm = "blas" if prefers_host_blas(dtype) else "tensorflow"
    p = space.size
    c = _output_size(objective, first_batch(dataset, "data")[0])
    sub_batch = max(1, int(memory_budget // (c * p * (3 * space.dtype.size + 8))))
    builder = _Builder(objective, tf_vars, space)
    factors = shared_function(_traced_gauss_newton_factors, builder, identity=builder.identity,
                              options=builder.options, input_signature=batch_spec(dataset),
                              autograph=objective.needs_autograph)
    product = tf.function(lambda rows, signs: tf.matmul(rows, rows * signs[:, None], transpose_a=True),
                          input_signature=[tf.TensorSpec([None, p], space.dtype), tf.TensorSpec([None], space.dtype)])
    total = np.zeros((p, p), dtype.as_numpy_dtype, order="F") if gemm == "blas" else tf.zeros([p, p], dtype)
    weight = 0.0
    for x, y, w in dataset:
        weight += float(tf.reduce_sum(tf.cast(w, tf.float64)))
        for start in range(0, int(tf.shape(w)[0]), sub_batch):
            rows, signs = factors(*tf.nest.map_structure(lambda t: t[start:start + sub_batch], (x, y, w)))  # noqa: B023
            if gemm == "blas":
                _blas_add(total, rows.numpy(), signs.numpy())
            else:
                total += tf.cast(product(rows, signs), dtype)
    _check_weight(weight)
    if gemm == "blas":
        _mirror_upper(total)
    else:
        total = np.array(total)
        _symmetrize(total)
    total /= weight
    return total


def _hessian_array(objective, tf_vars, space, dataset, chunk_size, memory_budget, dtype, exact=False):
    dtype = tf.as_dtype(dtype)
    p = space.size
    builder = _Builder(objective, tf_vars, space, exact)
    if chunk_size is None:
        chunk_size = _rows_per_chunk(builder, dataset, memory_budget)
    else:
        chunk_size = arguments.positive_int(chunk_size, "chunk_size")
    int_spec = tf.TensorSpec([], tf.int32)
    batch_rows = shared_function(_traced_hessian_rows, builder, identity=builder.identity,
                                 options=builder.options + (exact, dtype.name), autograph=objective.needs_autograph,
                                 input_signature=[batch_spec(dataset), int_spec, int_spec])

    def rows(start, stop):
        # A Python loop over the batches around one traced per-batch function, shared by every builder
        # of the same model, loss and variables (`tf_influence.compiled`): nothing captures the data set.
        total, weight = None, 0.0
        for batch in dataset:
            block = tf.cast(batch_rows(batch, start, stop), dtype)
            total = block if total is None else total + block
            weight += float(tf.reduce_sum(tf.cast(batch[2], tf.float64)))
        return (tf.zeros([stop - start, p], dtype) if total is None else total), weight

    result, weight = _assemble_rows(rows, p, int(chunk_size), dtype)
    _check_weight(weight)
    result /= float(weight)
    return result


class _Builder:
    """The owner of the dense builder's shared traced functions: objective, variables and space."""

    def __init__(self, objective, tf_vars, space, exact=False):
        self.objective, self.tf_vars, self.space, self.exact = objective, list(tf_vars), space, exact
        identity, options = objective.compiled_key()
        self.identity = identity + self.tf_vars
        self.options = options + (space.dtype.name,)


def _traced_hessian_rows(builder, batch, start, stop):
    """Rows `start:stop` of the Hessian of one batch's weighted loss sum (inside the exactness patch if asked)."""
    x, y, w = batch
    patch = exact_second_derivatives(builder.objective.model) if builder.exact else contextlib.nullcontext()
    with patch:
        return _jacobian_of_gradient(lambda: builder.objective.weighted_loss_sum(x, y, w), builder.tf_vars,
                                     builder.space, start, stop)


def _traced_gauss_newton_factors(builder, x, y, w):
    return _gauss_newton_factors(builder.objective, builder.tf_vars, builder.space, x, y, w)


def _regularizer_array(objective, tf_vars, variables, space, chunk_size, memory_budget, dtype):
    dtype = tf.as_dtype(dtype)
    p = space.size
    if not objective.has_weight_regularizers:  # ∇²Ω = l2·I exactly: nothing to differentiate or trace
        return float(objective.l2) * np.eye(p, dtype=dtype.as_numpy_dtype)
    if chunk_size is None:
        chunk_size = max(1, min(p, int(memory_budget // (4 * p * space.dtype.size))))
    int_spec = tf.TensorSpec([], tf.int32)

    @tf.function(input_signature=[int_spec, int_spec])
    def rows(start, stop):
        return tf.cast(_jacobian_of_gradient(lambda: objective.regularization(variables), tf_vars, space, start, stop),
                       dtype)

    return _assemble_rows(lambda start, stop: (rows(start, stop), None), p, int(chunk_size), dtype)[0]


def _assemble_rows(rows, p, chunk_size, dtype):
    """Fills a symmetrised `[p, p]` NumPy array from `rows(start, stop) -> (block, extra)`."""
    result = np.empty((p, p), dtype=dtype.as_numpy_dtype)
    extra = None
    for start in range(0, p, chunk_size):
        stop = min(start + chunk_size, p)
        block, extra = rows(tf.constant(start), tf.constant(stop))
        result[start:stop] = block.numpy()
    _symmetrize(result)
    return result, extra


# -- Per-batch pieces ---------------------------------------------------------------------------


def _jacobian_of_gradient(loss_fn, tf_vars, space, start, stop):
    """Rows `start:stop` of `∇²loss_fn()` (`[stop - start, p]`): pfor over identity cotangents."""
    with tf.GradientTape(persistent=True) as outer:  # persistent: pfor may trace `row` twice
        outer.watch(tf_vars)
        with tf.GradientTape() as inner:
            inner.watch(tf_vars)
            loss = loss_fn()
        gradient = space.flatten(inner.gradient(loss, tf_vars, unconnected_gradients=_ZERO))
    cotangents = tf.one_hot(tf.range(start, stop), space.size, dtype=gradient.dtype)

    def row(cotangent):
        parts = outer.gradient(gradient, tf_vars, output_gradients=cotangent, unconnected_gradients=_ZERO)
        return space.flatten([densify(t) for t in parts])

    return tf.vectorized_map(row, cotangents)


def _gauss_newton_factors(objective, tf_vars, space, x, y, w):
    """Rows `U` `[m, p]` and signs `[m]` with `Σᵢ wᵢ Jᵢᵀ Mᵢ Jᵢ = Uᵀ diag(signs) U` for one batch."""
    jacobians = _output_jacobians(objective, tf_vars, space, x)              # [n, c, p]
    hessians = _output_hessians(objective, x, y, w)                          # [n, c, c], weighted
    eigenvalues, vectors = tf.linalg.eigh(0.5 * (hessians + tf.linalg.matrix_transpose(hessians)))
    scale = tf.abs(eigenvalues)
    c = tf.cast(tf.shape(eigenvalues)[-1], scale.dtype)
    eps = np.finfo(scale.dtype.as_numpy_dtype).eps
    keep = scale > c * eps * tf.reduce_max(scale, axis=-1, keepdims=True)   # drops rounding noise
    rows = tf.sqrt(scale)[..., None] * tf.matmul(vectors, jacobians, transpose_a=True)
    return tf.boolean_mask(rows, keep), tf.boolean_mask(tf.sign(eigenvalues), keep)


def _output_jacobians(objective, tf_vars, space, x):
    """`[n, c, p]`: each example's output Jacobian, reverse passes vectorised over examples and outputs."""

    def one(example):
        example = tf.nest.map_structure(lambda t: t[tf.newaxis], example)
        with tf.GradientTape(persistent=True) as tape:  # persistent: pfor may trace `row` twice
            tape.watch(tf_vars)
            outputs = _flat_outputs(objective.outputs(example))[0]

        def row(cotangent):
            parts = tape.gradient(outputs, tf_vars, output_gradients=cotangent, unconnected_gradients=_ZERO)
            return space.flatten([densify(t) for t in parts])

        return tf.vectorized_map(row, tf.eye(tf.shape(outputs)[0], dtype=outputs.dtype))

    return tf.vectorized_map(one, x)


def _output_hessians(objective, x, y, w):
    """`[n, c, c]`: `wᵢ ∇²_f ℓᵢ`, the weighted Hessian of each example's loss in its outputs."""
    outputs = objective.outputs(x)
    flat = tf.stop_gradient(_flat_outputs(outputs))
    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            losses = objective.per_example_loss(y, _unflatten_outputs(flat, outputs))
            total = tf.reduce_sum(tf.cast(w, losses.dtype) * losses)
        gradient = inner.gradient(total, flat, unconnected_gradients=_ZERO)
    return outer.batch_jacobian(gradient, flat, unconnected_gradients=_ZERO)


def _flat_outputs(outputs):
    """Every output tensor `[n, ...]` flattened and concatenated: `[n, c]`."""
    parts = [tf.reshape(t, [tf.shape(t)[0], -1]) for t in tf.nest.flatten(outputs)]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


def _unflatten_outputs(flat, like):
    templates = tf.nest.flatten(like)
    sizes = [int(np.prod(t.shape[1:])) for t in templates]
    parts = tf.split(flat, sizes, axis=1) if len(sizes) > 1 else [flat]
    shaped = [tf.reshape(part, tf.shape(t)) for part, t in zip(parts, templates)]
    return tf.nest.pack_sequence_as(like, shaped)


# -- Sizes, accumulation and small helpers --------------------------------------------------------


def _rows_per_chunk(builder, dataset, memory_budget):
    """Hessian rows per chunk so that ~3 copies of the vectorised gradient graph fit the budget."""
    per_example, fixed = _gradient_graph_entries(builder, dataset)
    batch = int(tf.shape(first_batch(dataset, "data")[2])[0])
    p, itemsize = builder.space.size, builder.space.dtype.size
    per_row = 3 * itemsize * (batch * per_example + fixed) + 8 * p
    return int(max(1, min(256, p, memory_budget // per_row)))


def _gradient_graph_entries(builder, dataset):
    """Float entries of the gradient graph per example and fixed (from graphs of 1 and 2 examples), read
    from a shared function's graphs: a second builder of the same model, loss and variables traces nothing."""
    gradient = shared_function(_traced_gradient, builder, identity=builder.identity, options=builder.options,
                               autograph=builder.objective.needs_autograph)

    def entries(n):
        specs = tf.nest.map_structure(lambda s: tf.TensorSpec([n, *s.shape[1:]], s.dtype), dataset.element_spec)
        graph = gradient.concrete_function(*specs).graph
        return sum(t.shape.num_elements() or 0 for op in graph.get_operations() for t in op.outputs
                   if t.dtype.is_floating)

    one, two = entries(1), entries(2)
    return max(two - one, 1), max(2 * one - two, 0)


def _traced_gradient(builder, x, y, w):
    with tf.GradientTape() as tape:
        tape.watch(builder.tf_vars)
        loss = builder.objective.weighted_loss_sum(x, y, w)
    return tape.gradient(loss, builder.tf_vars, unconnected_gradients=_ZERO)


def _output_size(objective, x):
    example = tf.nest.map_structure(lambda t: t[:1], x)
    return int(_flat_outputs(objective.outputs(example)).shape[1])


def _check_weight(weight):
    if not weight > 0:
        raise InputError(
            f"The data's total sample weight is {weight}; a weighted mean needs a positive total. "
            "Check the sample weights (and that the data set is not empty)."
        )


def _blas_add(total, rows, signs):
    """`total += Σ ±rowsᵀrows` (upper triangle only) with BLAS syrk, in place."""
    from scipy.linalg import blas

    syrk = blas.dsyrk if total.dtype == np.float64 else blas.ssyrk
    rows = np.ascontiguousarray(rows, dtype=total.dtype)
    for sign in (1.0, -1.0):
        mask = signs == sign
        if mask.any():
            selected = rows if mask.all() else rows[mask]
            # selected.T is a Fortran-ordered [p, m] view: C += ±A Aᵀ without copying A.
            syrk(sign, selected.T, beta=1.0, c=total, trans=0, overwrite_c=1)


def _mirror_upper(a, block=1024):
    """Copies the upper triangle of a square NumPy array into its lower triangle, in place."""
    p = a.shape[0]
    for s in range(0, p, block):
        e = min(s + block, p)
        a[e:, s:e] = a[s:e, e:].T
        a[s:e, s:e] = np.triu(a[s:e, s:e]) + np.triu(a[s:e, s:e], 1).T


def _symmetrize(a, block=1024):
    """`a = (a + aᵀ) / 2` in place, block by block (no second p×p copy)."""
    p = a.shape[0]
    for s in range(0, p, block):
        for t in range(s, p, block):
            upper, lower = a[s:s + block, t:t + block], a[t:t + block, s:s + block]
            mean = 0.5 * (upper + lower.T)
            a[s:s + block, t:t + block] = mean
            a[t:t + block, s:s + block] = mean.T
