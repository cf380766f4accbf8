"""`HessianOperator`: the damped, data-averaged curvature of the training objective as a LinearOperator."""

import logging
import re
import warnings

import numpy as np
import tensorflow as tf

from tf_influence import arguments
from tf_influence import distribute as _distribute
from tf_influence.compiled import shared_function
from tf_influence.curvature import dense as _dense
from tf_influence.curvature import products as _products
from tf_influence.data import batch_spec
from tf_influence.errors import InputError, NotFiniteError, ResourceError, SecondDerivativeError
from tf_influence.layers import batch_coupled_layers, looping_recurrent_layers
from tf_influence.operators.assigned_differences import assigned_finite_differences, default_step
from tf_influence.operators.damping import DampingChoice, lanczos_damping
from tf_influence.operators.minibatch import MinibatchCurvature
from tf_influence.operators.rows import RowsOperator, TracedProduct
from tf_influence.problem import Problem
from tf_influence.traps import second_derivative_traps, trap_message

_log = logging.getLogger(__name__)

MAX_DENSE_SIZE = 20_000


class HessianOperator(RowsOperator):
    """`H + λI` for the mean training objective, as a self-adjoint `tf.linalg.LinearOperator`.

    `H = ∇²R(θ)` with `R(θ) = Σ wᵢ ℓ(zᵢ, θ) / Σ wᵢ + Ω(θ)` over the selected variables θ (or the
    Gauss-Newton matrix `Σ wᵢ Jᵢᵀ ∇²ℓᵢ Jᵢ / Σ wᵢ + ∇²Ω` with `curvature="gauss_newton"`).
    `matvec` on a flat vector of length p runs one compiled pass over the data; `matmul` with
    k columns handles k vectors in the same pass.

    Args:
      model: a built Keras model, or a `tfi.Problem` (then `loss`, `data`, `variables`, `l2`,
        `training`, `batch_size` and `strategy` come from it and must not be given).
      loss: a Keras loss, loss name, or callable giving per-example losses.
      data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset` of such tuples.
      variables: `None` for all trainable variables, or layers / layer names / variables.
      damping: λ ≥ 0 added to the diagonal, or None to choose it from the spectrum when the
        operator is built (30 Lanczos products of the undamped operator; the rule is in
        `tf_influence.operators.damping`). `damping_choice` says what was chosen and why.
      l2: extra `(l2/2)·‖θ‖²` in the objective.
      curvature: `"hessian"` or `"gauss_newton"`.
      mode: `"back_over_back"` (default), `"forward_over_back"` (back-over-back for models with
        recurrent layers) or `"finite_difference"`. Both nested modes are exact; back-over-back
        traces 1.2-1.7x faster (the first call of a new model); on CPU it runs faster for one
        vector and up to ~15% slower for 50 at once (digits MLP, benchmarks/RESULTS.md).
      batch_size: batch size when `data` holds arrays.
      step: finite-difference step r (default `ε^(1/3)·(1 + ‖θ‖)/‖v‖`).
      training: the `training` flag the model is called with.
      on_unsafe_layers: `"raise"` (default), `"warn"` or `"ignore"` when a layer with wrong TF
        second derivatives (LayerNormalization, ...) lies on the selected path.
      jit_compile: compile each batch's product with XLA (the loop over the data stays a
        `tf.function`). On CPU this roughly halves the cost of products through max pooling.
      is_positive_definite: a promise, as for every `LinearOperator`: set True when you know
        `H + λI` is positive definite (convex loss with l2 > 0, or λ above |λ_min|; see
        `tfi.extreme_eigenvalues`). Defaults to True for Gauss-Newton with λ > 0, else None.
      strategy: a `tf.distribute.Strategy` to split every batch across its replicas (sums
        reduced, same result as one device), or None for the strategy whose `scope()` is active
        when the operator is built (single device outside every scope). See `tf_influence.distribute`.

    Shape: `[p, p]` with p the number of selected parameters.

    Performance: one matvec costs about 2-3 gradient evaluations over the data;
    `to_dense()` / `dense_matrix()` cost a few compiled passes over the data (about p/256 for the
    Hessian, one for Gauss-Newton) and `p²` memory, and refuse p > 20,000.

    Hints: `is_self_adjoint=True` always. `is_positive_definite` is True for Gauss-Newton with
    λ > 0, otherwise only if you promise it; a Hessian away from a minimum can be indefinite.

    Example:
      >>> H = tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y), damping=1e-2,
      ...                         is_positive_definite=True)   # a promise, as in tf.linalg
      >>> hv = H.matvec(v)                                      # v: [p]
      >>> x = tf.linalg.experimental.conjugate_gradient(H, b).x
      >>> H.matmul_rows(vectors)                                # [k, p] -> [k, p], one data pass
    """

    def __init__(self, model, loss=None, data=None, variables=None, *, damping=0.0, l2=0.0,
                 curvature="hessian", mode="back_over_back", batch_size=None, step=None,
                 training=False, on_unsafe_layers="raise", jit_compile=False,
                 is_positive_definite=None, strategy=None, loss_weights=None, name="HessianOperator"):
        arguments.one_of(mode, "mode", _products.MODES)
        arguments.one_of(curvature, "curvature", _products.CURVATURES)
        arguments.one_of(on_unsafe_layers, "on_unsafe_layers", ("raise", "warn", "ignore"))
        choice = damping if isinstance(damping, DampingChoice) else None
        if choice is not None:
            damping = choice.value
        if damping is not None:
            damping = arguments.nonnegative_float(damping, "damping")
        if isinstance(model, Problem):
            given = {k: v for k, v in dict(loss=loss, data=data, variables=variables, l2=l2, training=training,
                                           batch_size=batch_size, strategy=strategy,
                                           loss_weights=loss_weights).items() if v}
            if given:
                raise InputError(f"HessianOperator(problem, ...) takes its {sorted(given)} from the Problem; "
                                 "do not pass them again.")
            problem = model
        else:
            problem = Problem(model, loss, data, variables, l2=l2, training=training, batch_size=batch_size,
                              strategy=strategy, loss_weights=loss_weights)
        if damping is None:  # chosen from the spectrum of the undamped operator (same options)
            undamped = HessianOperator(problem, damping=0.0, curvature=curvature, mode=mode, step=step,
                                       on_unsafe_layers=on_unsafe_layers, jit_compile=jit_compile)
            choice = lanczos_damping(undamped)
            damping = choice.value
        self.damping_choice = choice or DampingChoice.given(damping)
        self.problem = problem
        self.source = None  # the CurvatureSource that built or wraps this operator, if any
        self.space = problem.space
        self.size = problem.space.size
        self.damping = damping
        self.curvature = curvature
        self.mode = mode
        self.step = step
        self.jit_compile = jit_compile
        self._on_unsafe_layers = on_unsafe_layers
        if curvature == "hessian" and mode != "finite_difference":
            traps = second_derivative_traps(problem.model, problem.variables, training=problem.objective.training)
            if traps and on_unsafe_layers == "raise":
                raise SecondDerivativeError(trap_message(traps, mode))
            if traps and on_unsafe_layers == "warn":
                warnings.warn(trap_message(traps, mode), stacklevel=2)
        # The data pass `(rows[, dataset]) -> (Σᵢ wᵢ Cᵢ rows, Σᵢ wᵢ)`: one compiled pass over the data (XLA cannot
        # compile dataset iteration, so only the per-batch product is jit-compiled).
        # Input signatures: one trace for every batch size and number of rows (no retracing); one row
        # has its own (unvectorised) trace, made only when used: same rounding as a plain product.
        # Shared with every operator of the same model, loss, variables and options
        # (`tf_influence.compiled`): a second operator traces nothing.
        identity, options = problem.compiled_key()
        self._batch_products = {
            k: shared_function(_batch_product_of, self, identity=identity,
                               options=options + (curvature, mode, step, k), jit_compile=jit_compile,
                               autograph=problem.objective.needs_autograph,
                               input_signature=[batch_spec(problem.batches), [
                                   tf.TensorSpec([k, *shape], problem.space.dtype) for shape in problem.space.shapes]])
            for k in (1, None)}
        self._regularizer_products = shared_function(
            _regularizer_product_of, self, identity=identity, options=options,
            input_signature=[tf.TensorSpec([None, problem.space.size], problem.space.dtype)])
        if problem.strategy is not None:
            self.data_pass = tf.function(self._distributed_data_pass_fn)
            self._gradient_pass = tf.function(self._distributed_gradient_pass_fn)
        else:
            # The data set is an argument, so operators of the same model with other data share the pass.
            passes = {k: shared_function(_data_pass_of, self, identity=identity,
                                         options=options + (curvature, mode, step, jit_compile, k),
                                         input_signature=[tf.TensorSpec([k, problem.space.size], problem.space.dtype),
                                                          tf.data.DatasetSpec(problem.batches.element_spec)])
                      for k in (1, None)}
            self._data_pass_over = lambda rows, dataset: passes[1 if rows.shape[0] == 1 else None](rows, dataset)
            self._gradient_pass = tf.function(self._gradient_pass_fn)
            if jit_compile and self.has_batch_products:
                self._check_xla_compiles(problem.first_batch)
        self._pd_promise = is_positive_definite
        if is_positive_definite is None and curvature == "gauss_newton" and damping > 0:
            is_positive_definite = True
        super().__init__(
            dtype=problem.space.dtype,
            is_self_adjoint=True,
            is_positive_definite=is_positive_definite,
            is_square=True,
            name=name,
            parameters=dict(damping=damping, curvature=curvature, mode=mode, l2=problem.objective.l2,
                            size=self.size),
        )

    @property
    def has_batch_products(self):
        """True when every product is a sum of per-batch products (traceable, usable on minibatches).

        False only for finite differences of a tf-keras model: they assign θ ± r·v to the variables
        and run over all the data, eagerly. Keras 3 models are evaluated at θ ± r·v without
        assigning (see `Objective.outputs`), batch by batch.
        """
        return not (self.mode == "finite_difference" and self.curvature == "hessian"
                    and not self.problem.objective.can_substitute)

    def default_step(self):
        """The finite-difference step for a unit vector, `ε^(1/3)·(1 + ‖θ‖)` (divided by ‖v‖ otherwise).

        Eager only (it returns a Python float); traced products compute the same step as tensors.
        """
        return default_step(self.space, self.problem.tf_variables)

    def dense_matrix(self, dtype=tf.float64):
        """The dense `[p, p]` matrix of this operator (`H + λI`), symmetric, as a NumPy array of `dtype`.

        Built by `curvature.dense.dense_curvature` in a few compiled passes over the data (the
        Hessian as pfor-vectorised rows of the batch gradient's Jacobian, the Gauss-Newton matrix
        from per-example output Jacobians), derivatives in the model's dtype and sums in `dtype`.
        Finite-difference operators, distributed problems, models with looping recurrent layers
        (whose while loops pfor cannot vectorise) and, for the Gauss-Newton matrix (built from
        per-example Jacobians), models whose examples are coupled within a batch (training-mode
        BatchNormalization) fall back to p operator products.

        Args:
          dtype: dtype of the accumulation and of the result (float64 for a factorisation).

        Returns:
          A symmetric NumPy array `[p, p]`.

        Raises:
          ResourceError: p > 20,000 (the message gives the memory it would need).
          NotFiniteError: the matrix contains NaN/Inf.

        Example:
          >>> A = tfi.HessianOperator(model, loss, (x, y), variables="head", damping=1e-3).dense_matrix()
        """
        p = self.size
        if p > MAX_DENSE_SIZE:
            raise ResourceError(
                f"The dense {p}x{p} curvature matrix would need {p * p * tf.as_dtype(dtype).size / 2**30:.1f} "
                f"GiB; the limit is p ≤ {MAX_DENSE_SIZE}. Select fewer variables or use an iterative method."
            )
        problem = self.problem
        coupled = self.curvature == "gauss_newton" and batch_coupled_layers(problem.model,
                                                                            training=problem.objective.training)
        if (self.has_batch_products and problem.strategy is None and not looping_recurrent_layers(problem.model)
                and not coupled):
            dense = _dense.dense_curvature(problem.objective, problem.tf_variables, problem.variables, self.space,
                                           problem.batches, curvature=self.curvature, damping=self.damping,
                                           dtype=dtype, as_array=True)
        else:
            dense = self._dense_by_products().astype(tf.as_dtype(dtype).as_numpy_dtype)
        if not np.isfinite(dense).all():
            raise NotFiniteError(
                "The dense curvature matrix contains NaN/Inf. Check the data and the loss for NaN, and the "
                "model weights for divergence."
            )
        return dense

    def _to_dense(self):
        return tf.convert_to_tensor(self.dense_matrix().astype(self.dtype.as_numpy_dtype, copy=False))

    def _dense_by_products(self, chunk=64):
        eye = tf.eye(self.size, dtype=self.dtype)
        dense = np.concatenate([self.matmul_rows(eye[i:i + chunk]).numpy() for i in range(0, self.size, chunk)])
        return 0.5 * (dense + dense.T)

    # -- Products on rows ------------------------------------------------------------------------

    def _matmul_rows(self, rows):
        if not self.has_batch_products:
            if not tf.executing_eagerly():
                raise InputError(
                    "mode='finite_difference' on a tf-keras model assigns θ ± r·v to the variables and runs "
                    "only eagerly, not inside a compiled solver loop (method='cg', 'lissa'). Use "
                    "method='direct' (or operator.matmul_rows / to_dense), a Keras 3 model (evaluated at "
                    "θ ± r·v without assigning, in any solver), or mode='forward_over_back' (exact through "
                    "normalisation layers except those tf_influence.normalization.inexact_layers lists).")
            result = assigned_finite_differences(self.gradient, self.space, self.problem.tf_variables, rows,
                                                 step=self.step)
            result = result + self.damping * rows
        elif self.problem.strategy is not None:
            result = self._product(self.data_pass(rows), rows, self.damping)
        else:
            result = self._product_over((self.problem.dataset, self.damping), rows)
        if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(result))):
            raise NotFiniteError(
                "The curvature product contains NaN/Inf. Check the data and the loss for NaN, and the "
                "model weights for divergence."
            )
        return result

    def with_options(self, **changes):
        """A new operator on the same problem (model, loss, data, variables) with some options changed."""
        options = dict(damping=self.damping_choice, curvature=self.curvature, mode=self.mode, step=self.step,
                       on_unsafe_layers=self._on_unsafe_layers, jit_compile=self.jit_compile,
                       is_positive_definite=self._pd_promise)
        options.update(changes)
        return HessianOperator(self.problem, **options)

    def minibatches(self, *, batch_size, sampling="independent", seed=0):
        """Curvature products of random minibatches of the training data (undamped), for LiSSA.

        Returns a `MinibatchCurvature` whose traceable `matmul_rows(rows, step)` gives `H̃_step`
        times each row: step s always draws the same minibatch for the same seed.
        """
        if not self.has_batch_products:
            raise InputError(
                "minibatch products of a tf-keras model have no finite-difference form (it assigns the "
                "variables over the whole data set). Use mode='forward_over_back' or 'back_over_back' "
                "for minibatch products, or a Keras 3 model.")
        return MinibatchCurvature(self.problem.dataset, self.batch_matmul_rows, num_examples=self.problem.num_examples,
                                  batch_size=batch_size, sampling=sampling, seed=seed)

    def batch_matmul_rows(self, batch, rows):
        """Curvature of ONE batch `(x, y, w)` times each row of `rows` `[k, p]`, without damping.

        Returns `Σ_{i∈batch} wᵢ Cᵢ v / Σ_{i∈batch} wᵢ + ∇²Ω v` (`[k, p]`): the minibatch estimate
        `H̃` of `H` that stochastic solvers (LiSSA) use. Traceable inside `tf.function`; no NaN
        check and no damping (add `self.damping · v` yourself).
        """
        if not self.has_batch_products:
            raise InputError(
                "batch products of a tf-keras model have no finite-difference form (it assigns the "
                "variables over the whole data set). Use mode='forward_over_back' or 'back_over_back' "
                "for minibatch products, or a Keras 3 model.")
        rows = tf.convert_to_tensor(rows, dtype=self.dtype)
        if self.problem.strategy is not None:
            total = _distribute.batch_sum(self.problem.strategy, self._shard_product, batch, rows)
        else:
            total = tf.ensure_shape(self._batch_product(batch, self.space.unflatten(rows)), rows.shape)
        weight = tf.cast(tf.reduce_sum(batch[2]), self.dtype)
        return total / weight + self._regularizer_product(rows)

    def gradient(self):
        """Flat gradient `∇R(θ)` of the mean objective (regulariser included)."""
        total, weight = self._gradient_pass()
        return total / tf.cast(weight, self.dtype) + self._regularizer_gradient()

    # -- Internals ------------------------------------------------------------------------------

    def _check_xla_compiles(self, batch):
        # Fail here, with the reason, rather than deep inside a solver loop.
        zeros = tf.zeros([1, self.size], self.problem.dtype)
        try:
            self._batch_product(batch, self.space.unflatten(zeros))
        except tf.errors.InvalidArgumentError as error:
            unsupported = re.search(r"compile graph .* on XLA_\w+: (\w+)", str(error))
            if unsupported is None:
                raise
            raise InputError(
                f"jit_compile=True: XLA cannot compile this model's curvature product (op "
                f"{unsupported.group(1)} has no XLA kernel for this device and dtype; e.g. XLA on CPU has "
                "no float64 MaxPoolGradGrad, which second derivatives through max pooling need). Use "
                "jit_compile=False, or a float32 model."
            ) from None

    def _batch_product(self, batch, tangents):
        return self._batch_products[1 if tangents[0].shape[0] == 1 else None](batch, tangents)

    def _data_pass_fn(self, rows, dataset):
        tangents = self.space.unflatten(rows)
        total = tf.zeros_like(rows)
        weight = tf.zeros([], dtype=tf.float64)
        # Iterating an iterator, not the dataset: AutoGraph turns `for b in dataset` into a
        # dataset reduce whose body TF re-instantiates and re-optimises on every call (~0.5 s).
        for batch in iter(dataset):
            total += self._batch_product(batch, tangents)
            weight += tf.cast(tf.reduce_sum(batch[2]), tf.float64)
        tf.debugging.assert_positive(weight, message="The data has zero total sample weight (or no examples).")
        return total, weight

    def _batch_product_fn(self, batch, tangents):
        products = _products.batch_curvature_product(
            self.problem.objective, self.problem.tf_variables, batch, tangents, mode=self.mode,
            curvature=self.curvature, variables=self.problem.variables, step=self.step)
        return self.space.flatten(products, batch_dims=1)

    def _distributed_data_pass_fn(self, rows):
        initial = (tf.zeros_like(rows), tf.zeros([], dtype=tf.float64))
        total, weight = _distribute.replica_sum(self.problem.strategy, self.problem.dataset,
                                                self._shard_product_and_weight, initial, rows)
        tf.debugging.assert_positive(weight, message="The data has zero total sample weight (or no examples).")
        return total, weight

    def _shard_product(self, shard, rows):
        return self._batch_product_fn(shard, self.space.unflatten(rows))

    def _shard_product_and_weight(self, shard, rows):
        return self._shard_product(shard, rows), tf.cast(tf.reduce_sum(shard[2]), tf.float64)

    def _distributed_gradient_pass_fn(self):
        initial = (tf.zeros([self.size], self.dtype), tf.zeros([], dtype=tf.float64))
        return _distribute.replica_sum(self.problem.strategy, self.problem.dataset,
                                       self._shard_gradient_and_weight, initial)

    def _shard_gradient_and_weight(self, shard):
        return self._batch_gradient(*shard), tf.cast(tf.reduce_sum(shard[2]), tf.float64)

    def _batch_gradient(self, x, y, w):
        tf_vars = self.problem.tf_variables
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            loss = self.problem.objective.weighted_loss_sum(x, y, w)
        grads = tape.gradient(loss, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.space.flatten(grads)

    def _gradient_pass_fn(self):
        total = tf.zeros([self.size], self.dtype)
        weight = tf.zeros([], dtype=tf.float64)
        for x, y, w in iter(self.problem.dataset):  # an iterator: see _data_pass_fn
            total += self._batch_gradient(x, y, w)
            weight += tf.cast(tf.reduce_sum(w), tf.float64)
        return total, weight

    def traced_product(self):
        """This operator's product for compiled solver loops (`tf_influence.operators.rows.TracedProduct`):
        the data set and damping are inputs, so every operator of the same model, loss, variables and
        options shares a loop's trace; distributed and finite-difference tf-keras operators by identity."""
        if self.problem.strategy is not None or not self.has_batch_products:
            return TracedProduct.by_identity(self)
        identity, options = self.problem.compiled_key()
        return TracedProduct(identity, options + ("HessianOperator", self.curvature, self.mode, self.step,
                                                  self.jit_compile),
                             (self.problem.dataset, tf.constant(self.damping, self.dtype)), self._product_over)

    def _product_over(self, inputs, rows):
        dataset, damping = inputs
        return self._product(self._data_pass_over(rows, dataset), rows, damping)

    def _product(self, data_pass, rows, damping):
        total, weight = data_pass
        total = tf.ensure_shape(total, rows.shape)  # the pass is traced for any number of rows
        return total / tf.cast(weight, self.dtype) + self._regularizer_product(rows) + damping * rows

    def _regularizer_product(self, rows):
        objective = self.problem.objective
        if objective.has_weight_regularizers:  # differentiated: compiled once, not retraced per eager call
            return self._regularizer_products(rows)
        return self._regularizer_product_fn(rows)  # l2·I only: nothing to trace

    def _regularizer_product_fn(self, rows):
        products = _products.regularizer_curvature_product(
            self.problem.objective, self.problem.tf_variables, self.problem.variables, self.space.unflatten(rows))
        return self.space.flatten(products, batch_dims=1)

    def _regularizer_gradient(self):
        tf_vars = self.problem.tf_variables
        with tf.GradientTape() as tape:
            tape.watch(tf_vars)
            reg = self.problem.objective.regularization(self.problem.variables)
        grads = tape.gradient(reg, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.space.flatten(grads)


def _batch_product_of(operator, batch, tangents):
    """The traced per-batch product of `operator` (shared by equivalent operators, see `tf_influence.compiled`)."""
    return operator._batch_product_fn(batch, tangents)


def _data_pass_of(operator, rows, dataset):
    """The traced pass `(Σᵢ wᵢ Cᵢ rows, Σᵢ wᵢ)` over `dataset` (shared like `_batch_product_of`)."""
    return operator._data_pass_fn(rows, dataset)


def _regularizer_product_of(operator, rows):
    """The traced product of the model's weight regularisers and l2 (shared like `_batch_product_of`)."""
    return operator._regularizer_product_fn(rows)
