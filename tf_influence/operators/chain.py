"""`ChainHessian`: `H + λI` of a Dense chain, exact, with linear-time products and solves.

The blocks come from `tf_influence.curvature.chain_plan` / `chain_blocks`; products and the Riccati
factorisation from `tf_influence.linalg.riccati` (docs/mathematics.md, "Exact chain solver").
"""

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence.curvature.chain_blocks import (block_diagonal, l2_coefficient, loss_terms, memory_estimate,
                                                 stage_blocks)
from tf_influence.curvature.chain_plan import SUPPORTED, composed, loss_spec, plan_stages
from tf_influence.errors import InputError, ResourceError, UnsupportedLayerError
from tf_influence.linalg.riccati import ChainBlocks, chain_factor_solve, chain_factorize, chain_matmul
from tf_influence.operators.rows import RowsOperator
from tf_influence.problem import Problem

DEFAULT_MAX_MEMORY_BYTES = 2 * 2**30


def _one_batch(batches):
    """All of the `(x, y, w)` batches as one batch of tensors."""
    xs, ys, ws = [], [], []
    for x, y, w in batches:
        if isinstance(x, (dict, list, tuple)) or isinstance(y, (dict, list, tuple)):
            raise InputError("method='chain' needs a single input tensor x and label tensor y; received a "
                             f"structure of type {type(x).__name__ if isinstance(x, (dict, list, tuple)) else type(y).__name__}.")
        xs.append(x), ys.append(y), ws.append(w)
    return tf.concat(xs, 0), tf.concat(ys, 0), tf.concat(ws, 0)


class ChainHessian(RowsOperator):
    """`H + λI` of a Dense chain over one batch of n examples, exact, with linear-time matmul and solve.

    `H` is the Hessian (or Gauss-Newton matrix) of `R(θ) = Σ wᵢ ℓᵢ / Σ wᵢ + Ω(θ)` over the selected
    variables θ, with Ω the model's L2 weight regularisers plus `(l2/2)·‖θ‖²`: the same matrix as
    `tfi.HessianOperator` on the same data, computed in `dtype` (float64 by default). Flat vectors
    follow the order of `select_variables(model, variables)` (that of `model.trainable_variables`).

    Supported models: Dense layers with elementwise activations (closed forms for linear, tanh, sigmoid,
    softplus, silu, elu, exponential, relu; autodiff of the activation otherwise, e.g. gelu), Activation /
    ReLU / LeakyReLU layers, inference-time Dropout; any layers before the first selected layer (a
    frozen front is evaluated as data). Losses: (sparse) categorical cross-entropy with softmax or
    logits, binary cross-entropy with sigmoid or logits, mean squared error.

    Args:
      model: a built Keras model (Sequential or single-path Functional), or a `tfi.Problem` (then
        `loss`, `data`, `variables`, `l2` and `training` come from it).
      loss: a loss name, Keras loss instance, or an `Objective` (then `l2` and `training` come from it).
      data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset`; all of it is read as one batch.
      variables: `None` (all trainable variables) or layers / names / variables, as in `HessianOperator`.
      damping: λ ≥ 0 added to the diagonal.
      l2: extra `(l2/2)·‖θ‖²` in the objective.
      curvature: `"hessian"` or `"gauss_newton"` (with respect to the model's outputs, logits only).
      training: the `training` flag the model is evaluated with (Dropout needs False).
      dtype: computation dtype (`tf.float64` by default).
      max_memory_bytes: refuse with a `ResourceError` when the blocks would need more (default 2 GiB).

    Shape: `[p, p]`, p the number of selected parameters.

    Performance: building the blocks and `matmul` cost `O(Σ_ℓ a_ℓ p_ℓ + a_ℓ² + p_ℓ²)` per vector, with
    `a_ℓ = n·width_ℓ`; the first `solve` factorizes in `O(Σ_ℓ p_ℓ³ + p_ℓ² a_ℓ + p_ℓ a_ℓ² + a_ℓ³)`, later
    solves reuse it. All linear in depth; memory `O(Σ_ℓ p_ℓ² + p_ℓ a_ℓ + a_ℓ²)` (see `memory_estimate`).

    Hints: `is_self_adjoint=True`. `is_positive_definite=True` only for Gauss-Newton with a positive
    diagonal shift (every supported loss is convex in its input); otherwise None: a Hessian can be
    indefinite, and `inertia` tells.

    Example:
      >>> H = ChainHessian(model, "sparse_categorical_crossentropy", (x, y), damping=1e-3)
      >>> hv = H.matvec(v)                  # exact, linear time in depth
      >>> x = H.solvevec(g)                 # exact (H + λI)⁻¹ g
      >>> xs = H.solve_rows(g_rows)         # [k, p] rows, reusing the factorization
      >>> H.inertia                         # negative eigenvalues of H + λI
    """

    def __init__(self, model, loss=None, data=None, variables=None, *, damping=0.0, l2=0.0,
                 curvature="hessian", training=False, dtype=tf.float64,
                 max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES, name="ChainHessian"):
        damping = arguments.nonnegative_float(damping, "damping")
        arguments.one_of(curvature, "curvature", ("hessian", "gauss_newton"))
        arguments.positive_int(max_memory_bytes, "max_memory_bytes")
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float32, tf.float64):
            raise InputError(f"dtype must be float32 or float64. Received {dtype.name}.")
        problem = model if isinstance(model, Problem) else Problem(model, loss, data, variables, l2=l2,
                                                                  training=training)
        objective = problem.objective
        self.problem, self.damping, self.curvature = problem, damping, curvature
        self.space = problem.space
        self.size = problem.space.size
        spec = loss_spec(objective)
        prefix, self._stages = plan_stages(problem.model, problem.variables, spec, training=objective.training,
                                           curvature=curvature)
        x, y, w = _one_batch(problem.batches)
        n = int(x.shape[0])
        shapes = [(s.inputs, s.units, s.size) for s in self._stages]
        need = memory_estimate(n, shapes, itemsize=dtype.size)
        if need > max_memory_bytes:
            widest = max(n * max(m, d) for m, d, _ in shapes)
            raise ResourceError(
                f"method='chain' would need about {need / 2**30:.2f} GiB for n={n} examples and {len(shapes)} "
                f"Dense layers (state size n·width up to {widest}, up to {max(p for *_, p in shapes)} parameters "
                f"per layer); the limit is max_memory_bytes={max_memory_bytes} ({max_memory_bytes / 2**30:.2f} GiB). "
                "Memory grows as (n·width)² per layer: use fewer examples, raise max_memory_bytes, or use "
                "method='cg' / 'ekfac'.")
        self._blocks, self.loss_values = self._build(prefix, spec, x, y, w, dtype)
        self._order(problem.variables)
        self._factorization = None
        min_shift = min((float(tf.reduce_min(s)) for s in self._blocks.shift if s.shape[0]), default=0.0)
        pd_hint = True if curvature == "gauss_newton" and min_shift > 0 else None
        super().__init__(dtype=dtype, is_self_adjoint=True, is_positive_definite=pd_hint, is_square=True, name=name,
                         parameters=dict(damping=damping, curvature=curvature, l2=objective.l2, size=self.size,
                                         examples=n))

    # -- Construction ---------------------------------------------------------------------------

    def _build(self, prefix, spec, x, y, w, dtype):
        model_dtype = tf.as_dtype(self.space.dtype)
        z = x
        for layer in prefix:
            z = layer(z, training=self.problem.objective.training)
        z = tf.cast(z, dtype)
        if z.shape.rank != 2:
            raise UnsupportedLayerError(
                f"method='chain' needs the input of layer {self._stages[0].name!r} to be [batch, features]; "
                f"received shape {tuple(z.shape)}. Add a Flatten layer before it.")
        saved = []
        for stage in self._stages:
            kernel = tf.cast(stage.layer.kernel, dtype)
            bias = None if getattr(stage.layer, "bias", None) is None else tf.cast(stage.layer.bias, dtype)
            u = z @ kernel + (bias if bias is not None else 0)
            value, s1, s2 = composed(stage, u)
            saved.append((z, s1, s2, kernel, bias))
            z = value
        last = self._stages[-1]
        outputs = last.output_fn(z) if last.output_fn is not None else z
        self._check_outputs(x, outputs, model_dtype)
        coeff = tf.cast(w, dtype) / tf.reduce_sum(tf.cast(w, dtype))
        losses, grad, hess = loss_terms(spec, z, y, coeff)
        self._check_losses(spec, y, outputs, losses)
        hessian = self.curvature == "hessian"
        parts = {k: [None] * len(self._stages) for k in ("dx", "dz", "fxx", "fzx", "fzz")}
        c = grad
        for l in range(len(self._stages) - 1, -1, -1):
            z_in, s1, s2, kernel, bias = saved[l]
            blocks = stage_blocks(self._stages[l], z_in, (None, s1, s2), c, kernel, bias, first=l == 0, hessian=hessian)
            for key, block in zip(("dx", "dz", "fxx", "fzx", "fzz"), blocks):
                parts[key][l] = block
            c = tf.matmul(c * s1, kernel, transpose_b=True)
        shift = [self._shift(stage, dtype) for stage in self._stages]
        return ChainBlocks(loss_hessian=block_diagonal(hess), shift=shift, **parts), losses

    def _shift(self, stage, dtype):
        base = self.damping + self.problem.objective.l2
        pieces = []
        if stage.kernel_selected:
            c = l2_coefficient(getattr(stage.layer, "kernel_regularizer", None), stage.layer.kernel, stage.layer, "kernel")
            pieces.append(tf.fill([stage.inputs * stage.units], tf.constant(base + 2 * c, dtype)))
        if stage.bias_selected:
            c = l2_coefficient(getattr(stage.layer, "bias_regularizer", None), stage.layer.bias, stage.layer, "bias")
            pieces.append(tf.fill([stage.units], tf.constant(base + 2 * c, dtype)))
        return tf.concat(pieces, 0) if pieces else tf.zeros([0], dtype)

    def _check_outputs(self, x, outputs, model_dtype):
        expected = tf.cast(self.problem.model(x, training=self.problem.objective.training), outputs.dtype)
        tol = float(np.sqrt(np.finfo(model_dtype.as_numpy_dtype).eps))
        scale = max(1.0, float(tf.reduce_max(tf.abs(expected))))
        if expected.shape != outputs.shape or float(tf.reduce_max(tf.abs(expected - outputs))) > tol * scale:
            raise UnsupportedLayerError(
                f"method='chain' rebuilt model {self.problem.model.name!r} as a chain of its layers, but the result differs "
                f"from model(x) (shapes {tuple(outputs.shape)} vs {tuple(expected.shape)}). The model is not a plain "
                f"chain (shared layers, branches or a custom call). Supported: {SUPPORTED}.")

    def _check_losses(self, spec, y, outputs, losses):
        expected = tf.cast(self.problem.objective.per_example_loss(tf.cast(y, outputs.dtype) if spec.kind != "sparse_ce" else y,
                                                           outputs), losses.dtype)
        if float(tf.reduce_max(tf.abs(expected - losses) / (1 + tf.abs(expected)))) > 1e-6:
            raise InputError(
                f"method='chain' evaluated the loss {spec.name!r} in closed form (from_logits={spec.from_logits}, "
                f"label_smoothing={spec.label_smoothing}) and got values that differ from Keras's; its options are "
                "not supported. Use method='cg'.")

    def _order(self, variables):
        index = {id(v): i for i, v in enumerate(variables)}
        chain_vars = [v for stage in self._stages for v in stage.variables()]
        self._perm = [index[id(v)] for v in chain_vars]
        self._chain_sizes = [self.space.sizes[i] for i in self._perm]
        self._stage_sizes = [stage.size for stage in self._stages]

    # -- Rows <-> per-stage blocks ----------------------------------------------------------------

    def _split(self, rows):
        pieces = tf.split(rows, self.space.sizes, axis=1)
        flat = tf.concat([pieces[i] for i in self._perm], axis=1)
        return [tf.transpose(b) for b in tf.split(flat, self._stage_sizes, axis=1)]

    def _join(self, parts):
        flat = tf.concat([tf.transpose(b) for b in parts], axis=1)
        pieces = tf.split(flat, self._chain_sizes, axis=1)
        ordered = [None] * len(pieces)
        for j, i in enumerate(self._perm):
            ordered[i] = pieces[j]
        return tf.concat(ordered, axis=1)

    # -- Public products ----------------------------------------------------------------------------

    @property
    def factorization(self):
        """The Riccati factorization (computed on first use, then cached)."""
        if self._factorization is None:
            self._factorization = chain_factorize(self._blocks, stage_names=[f"layer {s.name!r}" for s in self._stages])
        return self._factorization

    @property
    def inertia(self):
        """Number of negative eigenvalues of `H + λI` (factorizes on first use)."""
        return self.factorization.inertia

    def _matmul_rows(self, rows):
        return self._join(chain_matmul(self._blocks, self._split(rows)))

    def _solve_rows(self, rows):
        return self._join(chain_factor_solve(self.factorization, self._blocks, self._split(rows)))
