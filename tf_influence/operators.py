"""`HessianOperator`: the damped, data-averaged curvature of the training objective as a LinearOperator."""

import logging
import re
import warnings

import numpy as np
import tensorflow as tf

from tf_influence import distribute as _distribute
from tf_influence import hvp as _hvp
from tf_influence.data import as_dataset, first_batch
from tf_influence.errors import InputError, NotFiniteError, ResourceError, SecondDerivativeError
from tf_influence.objective import Objective
from tf_influence.params import ParameterSpace, select_variables, tf_variables
from tf_influence.traps import second_derivative_traps, trap_message

_log = logging.getLogger(__name__)

MAX_DENSE_SIZE = 20_000


class HessianOperator(tf.linalg.LinearOperator):
    """`H + λI` for the mean training objective, as a self-adjoint `tf.linalg.LinearOperator`.

    `H = ∇²R(θ)` with `R(θ) = Σ wᵢ ℓ(zᵢ, θ) / Σ wᵢ + Ω(θ)` over the selected variables θ (or the
    Gauss-Newton matrix `Σ wᵢ Jᵢᵀ ∇²ℓᵢ Jᵢ / Σ wᵢ + ∇²Ω` with `curvature="gauss_newton"`).
    `matvec` on a flat vector of length p runs one compiled pass over the data; `matmul` with
    k columns handles k vectors in the same pass.

    Args:
      model: a built Keras model.
      loss: a Keras loss, loss name, or callable giving per-example losses.
      data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset` of such tuples.
      variables: `None` for all trainable variables, or layers / layer names / variables.
      damping: λ ≥ 0 added to the diagonal.
      l2: extra `(l2/2)·‖θ‖²` in the objective.
      curvature: `"hessian"` or `"gauss_newton"`.
      mode: `"forward_over_back"` (default), `"back_over_back"` or `"finite_difference"`.
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

    Performance: one matvec costs about 2-3 gradient evaluations over the data (forward-over-back);
    `to_dense()` costs p matvecs and `p²` memory, and refuses p > 20,000.

    Hints: `is_self_adjoint=True` always. `is_positive_definite` is True for Gauss-Newton with
    λ > 0, otherwise only if you promise it; a Hessian away from a minimum can be indefinite.

    Example:
      >>> H = tfi.HessianOperator(model, "sparse_categorical_crossentropy", (x, y), damping=1e-2,
      ...                         is_positive_definite=True)   # a promise, as in tf.linalg
      >>> hv = H.matvec(v)                                      # v: [p]
      >>> x = tf.linalg.experimental.conjugate_gradient(H, b).x
    """

    def __init__(self, model, loss, data, variables=None, *, damping=0.0, l2=0.0,
                 curvature="hessian", mode="forward_over_back", batch_size=None, step=None,
                 training=False, on_unsafe_layers="raise", jit_compile=False,
                 is_positive_definite=None, strategy=None, name="HessianOperator"):
        if mode not in _hvp.MODES:
            raise InputError(f"Unknown mode {mode!r}. Expected one of {_hvp.MODES}.")
        if curvature not in _hvp.CURVATURES:
            raise InputError(f"Unknown curvature {curvature!r}. Expected one of {_hvp.CURVATURES}.")
        if on_unsafe_layers not in ("raise", "warn", "ignore"):
            raise InputError(
                f"on_unsafe_layers must be 'raise', 'warn' or 'ignore'. Received {on_unsafe_layers!r}."
            )
        damping = float(damping)
        if not np.isfinite(damping) or damping < 0:
            raise InputError(f"damping must be a finite number ≥ 0. Received: damping={damping}.")
        objective = loss if isinstance(loss, Objective) else Objective(model, loss, l2=l2, training=training)
        self.objective = objective
        self.model = model
        self.selected_variables = select_variables(model, variables)
        self.space = ParameterSpace(self.selected_variables)
        self.dataset = as_dataset(data, batch_size=batch_size, name="data")
        objective.validate(first_batch(self.dataset, "data"), "data")
        self.damping = damping
        self.curvature = curvature
        self.mode = mode
        self.step = step
        self.jit_compile = jit_compile
        self._data = data
        self._batch_size = batch_size
        self._on_unsafe_layers = on_unsafe_layers
        if curvature == "hessian" and mode != "finite_difference":
            traps = second_derivative_traps(model, self.selected_variables, training=objective.training)
            if traps and on_unsafe_layers == "raise":
                raise SecondDerivativeError(trap_message(traps, mode))
            if traps and on_unsafe_layers == "warn":
                warnings.warn(trap_message(traps, mode), stacklevel=2)
        self._tf_vars = tf_variables(self.selected_variables)
        # XLA cannot compile dataset iteration, so only the per-batch product is jit-compiled.
        self._batch_product = tf.function(self._batch_product_fn, jit_compile=jit_compile)
        self._data_pass = tf.function(self._data_pass_fn)
        self._gradient_pass = tf.function(self._gradient_pass_fn)
        self.strategy = _distribute.resolve_strategy(strategy)
        if self.strategy is not None:
            self._data_pass = tf.function(self._distributed_data_pass_fn)
            self._gradient_pass = tf.function(self._distributed_gradient_pass_fn)
        elif jit_compile and self.has_batch_products:
            self._check_xla_compiles(first_batch(self.dataset, "data"))
        p = self.space.size
        self._pd_promise = is_positive_definite
        if is_positive_definite is None and curvature == "gauss_newton" and damping > 0:
            is_positive_definite = True
        super().__init__(
            dtype=self.space.dtype,
            is_self_adjoint=True,
            is_positive_definite=is_positive_definite,
            is_square=True,
            name=name,
            parameters=dict(damping=damping, curvature=curvature, mode=mode, l2=objective.l2, size=p),
        )

    @property
    def has_batch_products(self):
        """False when products are finite differences, which move the variables over all the data."""
        return not (self.mode == "finite_difference" and self.curvature == "hessian")

    def default_step(self):
        """The finite-difference step for a unit vector, `ε^(1/3)·(1 + ‖θ‖)` (divided by ‖v‖ otherwise)."""
        theta = self.space.flatten([tf.convert_to_tensor(v) for v in self._tf_vars])
        return np.finfo(self.space.dtype.as_numpy_dtype).eps ** (1 / 3) * (1 + float(tf.linalg.norm(theta)))

    # -- LinearOperator interface -------------------------------------------------------------

    def _shape(self):
        return tf.TensorShape([self.space.size, self.space.size])

    def _shape_tensor(self):
        return tf.constant([self.space.size, self.space.size], dtype=tf.int32)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        if x.shape.rank != 2:
            raise InputError(f"{self.name} supports no batch shape; received x of shape {x.shape}.")
        return tf.transpose(self.apply(tf.transpose(x)))

    def _to_dense(self):
        p = self.space.size
        if p > MAX_DENSE_SIZE:
            raise ResourceError(
                f"to_dense() of a {p}x{p} Hessian would need {p * p * self.dtype.size / 2**30:.1f} GiB "
                f"and {p} matvecs; the limit is p ≤ {MAX_DENSE_SIZE}. Select fewer variables or use "
                "an iterative method."
            )
        eye = tf.eye(p, dtype=self.dtype)
        chunk = 64
        rows = [self.apply(eye[i:i + chunk]) for i in range(0, p, chunk)]
        dense = tf.concat(rows, axis=0)
        return 0.5 * (dense + tf.transpose(dense))

    # -- Products on flat vectors ---------------------------------------------------------------

    def apply(self, vectors):
        """`(H + λI) vᵀ` for each row of `vectors` `[k, p]`; returns `[k, p]`."""
        vectors = tf.convert_to_tensor(vectors, dtype=self.dtype)
        if not self.has_batch_products:
            result = self._finite_difference(vectors)
        else:
            total, weight = self._data_pass(vectors)
            result = total / tf.cast(weight, self.dtype) + self._regularizer_product(vectors)
        result = result + self.damping * vectors
        if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(result))):
            raise NotFiniteError(
                "The curvature product contains NaN/Inf. Check the data and the loss for NaN, and the "
                "model weights for divergence."
            )
        return result

    def with_options(self, **changes):
        """A new operator on the same model, loss, data and variables with some options changed."""
        options = dict(damping=self.damping, curvature=self.curvature, mode=self.mode,
                       batch_size=self._batch_size, step=self.step,
                       on_unsafe_layers=self._on_unsafe_layers, jit_compile=self.jit_compile,
                       is_positive_definite=self._pd_promise, strategy=self.strategy)
        options.update(changes)
        return HessianOperator(self.model, self.objective, self._data, self.selected_variables, **options)

    def batch_apply(self, batch, vectors):
        """Curvature of ONE batch `(x, y, w)` times each row of `vectors` `[k, p]`, without damping.

        Returns `Σ_{i∈batch} wᵢ Cᵢ v / Σ_{i∈batch} wᵢ + ∇²Ω v` (`[k, p]`): the minibatch estimate
        `H̃` of `H` that stochastic solvers (LiSSA) use. Traceable inside `tf.function`; no NaN
        check and no damping (add `self.damping · v` yourself).
        """
        if not self.has_batch_products:
            raise InputError(
                "batch_apply has no finite-difference form (it moves the variables over the whole "
                "data set). Use mode='forward_over_back' or 'back_over_back' for minibatch products."
            )
        vectors = tf.convert_to_tensor(vectors, dtype=self.dtype)
        if self.strategy is not None:
            total = _distribute.batch_sum(self.strategy, self._shard_product, batch, vectors)
        else:
            total = self._batch_product(batch, self.space.unflatten(vectors))
        weight = tf.cast(tf.reduce_sum(batch[2]), self.dtype)
        return total / weight + self._regularizer_product(vectors)

    def gradient(self):
        """Flat gradient `∇R(θ)` of the mean objective (regulariser included)."""
        total, weight = self._gradient_pass()
        return total / tf.cast(weight, self.dtype) + self._regularizer_gradient()

    # -- Internals ------------------------------------------------------------------------------

    def _check_xla_compiles(self, batch):
        # Fail here, with the reason, rather than deep inside a solver loop.
        zeros = tf.zeros([1, self.space.size], self.space.dtype)
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

    def _data_pass_fn(self, vectors):
        tangents = self.space.unflatten(vectors)
        total = tf.zeros_like(vectors)
        weight = tf.zeros([], dtype=tf.float64)
        # Iterating an iterator, not the dataset: AutoGraph turns `for b in dataset` into a
        # dataset reduce whose body TF re-instantiates and re-optimises on every call (~0.5 s).
        for batch in iter(self.dataset):
            total += self._batch_product(batch, tangents)
            weight += tf.cast(tf.reduce_sum(batch[2]), tf.float64)
        tf.debugging.assert_positive(weight, message="The data has zero total sample weight (or no examples).")
        return total, weight

    def _batch_product_fn(self, batch, tangents):
        products = _hvp.batch_curvature_product(
            self.objective, self._tf_vars, batch, tangents, mode=self.mode, curvature=self.curvature)
        return self.space.flatten(products, batch_dims=1)

    def _distributed_data_pass_fn(self, vectors):
        initial = (tf.zeros_like(vectors), tf.zeros([], dtype=tf.float64))
        total, weight = _distribute.replica_sum(self.strategy, self.dataset, self._shard_product_and_weight,
                                                initial, vectors)
        tf.debugging.assert_positive(weight, message="The data has zero total sample weight (or no examples).")
        return total, weight

    def _shard_product(self, shard, vectors):
        return self._batch_product_fn(shard, self.space.unflatten(vectors))

    def _shard_product_and_weight(self, shard, vectors):
        return self._shard_product(shard, vectors), tf.cast(tf.reduce_sum(shard[2]), tf.float64)

    def _distributed_gradient_pass_fn(self):
        initial = (tf.zeros([self.space.size], self.dtype), tf.zeros([], dtype=tf.float64))
        return _distribute.replica_sum(self.strategy, self.dataset, self._shard_gradient_and_weight, initial)

    def _shard_gradient_and_weight(self, shard):
        x, y, w = shard
        with tf.GradientTape() as tape:
            tape.watch(self._tf_vars)
            loss = self.objective.weighted_loss_sum(x, y, w)
        grads = tape.gradient(loss, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.space.flatten(grads), tf.cast(tf.reduce_sum(w), tf.float64)

    def _regularizer_product(self, vectors):
        if not self.objective.l2 and not _has_regularizers(self.model):
            return tf.zeros_like(vectors)
        products = _hvp.regularizer_curvature_product(
            self.objective, self._tf_vars, self.selected_variables, self.space.unflatten(vectors))
        return self.space.flatten(products, batch_dims=1)

    def _gradient_pass_fn(self):
        total = tf.zeros([self.space.size], self.dtype)
        weight = tf.zeros([], dtype=tf.float64)
        for x, y, w in iter(self.dataset):  # an iterator: see _data_pass_fn
            with tf.GradientTape() as tape:
                tape.watch(self._tf_vars)
                loss = self.objective.weighted_loss_sum(x, y, w)
            grads = tape.gradient(loss, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            total += self.space.flatten(grads)
            weight += tf.cast(tf.reduce_sum(w), tf.float64)
        return total, weight

    def _regularizer_gradient(self):
        with tf.GradientTape() as tape:
            tape.watch(self._tf_vars)
            reg = self.objective.regularization(self.selected_variables)
        grads = tape.gradient(reg, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.space.flatten(grads)

    def _finite_difference(self, vectors):
        originals = [tf.identity(v) for v in self._tf_vars]
        unit_step = self.default_step()
        rows = []
        try:
            for v in tf.unstack(vectors):
                v_norm = float(tf.linalg.norm(v))
                if v_norm == 0:
                    rows.append(tf.zeros_like(v))
                    continue
                r = self.step if self.step is not None else unit_step / v_norm
                delta = self.space.unflatten(r * v)
                for var, orig, d in zip(self._tf_vars, originals, delta):
                    var.assign(orig + d)
                g_plus = self.gradient()
                for var, orig, d in zip(self._tf_vars, originals, delta):
                    var.assign(orig - d)
                g_minus = self.gradient()
                rows.append((g_plus - g_minus) / (2 * r))
        finally:
            for var, orig in zip(self._tf_vars, originals):
                var.assign(orig)
        return tf.stack(rows)


def _has_regularizers(model):
    if hasattr(model, "_get_regularization_losses"):
        return any(getattr(v, "regularizer", None) is not None for v in model.trainable_weights)
    return bool(model.losses)
