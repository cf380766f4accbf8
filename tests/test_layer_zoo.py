"""The layer zoo: one small model per Keras layer family with trainable weights, every method (float64).

Each model is `inputs → [the layer] → Flatten → Dense(3)` (normalisation and PReLU after a tanh
Dense, so that weights lie before them), trained on nothing: random weights, softmax cross-entropy.
The independent references use only first derivatives of the Keras model, which are correct
through every layer (TensorFlow's wrong second derivatives through normalisation do not enter):

  dense Hessian        central differences of exact gradients, (∇R(θ + εe_j) − ∇R(θ − εe_j)) / 2ε,
                       with Richardson extrapolation (error O(ε⁴))
  Gauss-Newton         Jᵀ H_f J v: a forward-mode jvp, the closed-form softmax cross-entropy Hessian
                       of the logits, and a vjp

Methods: "direct", "cg" and "chain" on the damped Hessian (λ 0.05 above −λ_min) are "exact" when
they match the dense solve of the reference Hessian to 1e-6 relative ("chain" refuses all but Dense);
"ekfac", "kfac" and "lissa" (stochastic mini-batches) approximate the damped Gauss-Newton solve, and
the Pearson correlation of their influence scores with those of the direct Gauss-Newton solve is
logged (the README's table); a refusal must be an UnsupportedLayerError naming the layer and a
working alternative. EXPECTED is the table: a family whose status changes fails the test.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests.helpers import relative_error
from tf_influence.operators.source import CurvatureSource
from tf_influence.solvers.dispatch import make_solver

_log = logging.getLogger(__name__)
L = keras.layers
CE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N, CLASSES, ROWS = 8, 3, 3


def _tanh_dense(make):
    return lambda h: make()(L.Dense(4, activation="tanh")(h))


FAMILIES = {  # name: (input shape, layer builder on the input tensor, training flag)
    "Dense": ((4,), lambda h: L.Dense(3, activation="tanh", name="layer")(h), False),
    "EinsumDense": ((2, 3), lambda h: L.EinsumDense("btd,dh->bth", (2, 2), bias_axes="h", activation="tanh",
                                                     name="layer")(h), False),
    "Conv1D": ((5, 2), lambda h: L.Conv1D(2, 3, activation="tanh", name="layer")(h), False),
    "Conv2D": ((4, 4, 1), lambda h: L.Conv2D(2, 2, strides=2, activation="tanh", name="layer")(h), False),
    "Conv3D": ((2, 3, 2, 1), lambda h: L.Conv3D(2, 2, activation="tanh", name="layer")(h), False),
    "Conv2DTranspose": ((2, 2, 1), lambda h: L.Conv2DTranspose(1, 2, strides=2, activation="tanh",
                                                               name="layer")(h), False),
    "DepthwiseConv2D": ((3, 3, 2), lambda h: L.DepthwiseConv2D(2, activation="tanh", name="layer")(h), False),
    "SeparableConv2D": ((3, 3, 2), lambda h: L.SeparableConv2D(2, 2, activation="tanh", name="layer")(h), False),
    "Embedding": ((3,), lambda h: L.Embedding(5, 2, name="layer")(h), False),
    "LayerNormalization": ((4,), _tanh_dense(lambda: L.LayerNormalization(name="layer")), False),
    "BatchNormalization (training)": ((4,), _tanh_dense(lambda: L.BatchNormalization(name="layer")), True),
    "GroupNormalization": ((4,), _tanh_dense(lambda: L.GroupNormalization(2, name="layer")), False),
    "MultiHeadAttention": ((3, 2), lambda h: L.MultiHeadAttention(2, 1, name="layer")(h, h), False),
    "SimpleRNN": ((3, 2), lambda h: L.SimpleRNN(2, name="layer")(h), False),
    "GRU": ((3, 2), lambda h: L.GRU(2, name="layer")(h), False),
    "LSTM": ((3, 2), lambda h: L.LSTM(2, name="layer")(h), False),
    "PReLU": ((4,), _tanh_dense(lambda: L.PReLU(name="layer")), False),
}
RECURRENT = ("SimpleRNN", "GRU", "LSTM")
METHODS = ("direct", "cg", "chain", "ekfac", "kfac", "lissa")
# The table: "exact", "approx" (Pearson of the scores vs the direct solve above PEARSON_FLOOR) or "refused".
EXPECTED = {family: {"direct": "exact", "cg": "exact", "chain": "refused",
                     "ekfac": "refused" if family in RECURRENT else "approx",
                     "kfac": "refused" if family in RECURRENT else "approx", "lissa": "approx"}
            for family in FAMILIES}
EXPECTED["Dense"]["chain"] = "exact"
PEARSON_FLOOR = 0.5  # a floor against broken approximations, not a quality target
MARGIN, GN_DAMPING = 0.05, 0.05  # Hessian damping: MARGIN above −λ_min(H)


def _model(family):
    shape, build, training = FAMILIES[family]
    inputs = keras.Input(shape, dtype="int32" if family == "Embedding" else None)
    h = build(inputs)
    if len(h.shape) > 2:
        h = L.Flatten()(h)
    return keras.Model(inputs, L.Dense(CLASSES, name="head")(h)), training


def _data(family, rng):
    shape = FAMILIES[family][0]
    x = rng.integers(0, 5, (N, *shape)).astype(np.int32) if family == "Embedding" else rng.standard_normal((N, *shape))
    return x, rng.integers(0, CLASSES, N)


class Reference:
    """First-derivative references of the mean cross-entropy R(θ) of a Keras model (stateless calls)."""

    def __init__(self, model, x, y, training):
        self.model, self.training = model, training
        self.x, self.y = tf.constant(x), tf.constant(y)
        self.space = tfi.ParameterSpace(model.trainable_variables)
        self.theta = self.space.flatten([v.value for v in model.trainable_variables])
        self.fixed = [v.value for v in model.non_trainable_variables]
        self.gradient = tf.function(self._gradient)

    def logits(self, theta):
        out, _ = self.model.stateless_call(self.space.unflatten(theta), self.fixed, self.x, training=self.training)
        return out

    def losses(self, theta):
        logits = self.logits(theta)
        return tf.reduce_logsumexp(logits, -1) - tf.gather(logits, self.y, axis=-1, batch_dims=1)

    def _gradient(self, theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = tf.reduce_mean(self.losses(theta))
        return tape.gradient(loss, theta)

    def hessian(self):
        """Dense H by central differences of exact gradients along the axes, Richardson-extrapolated
        (ε = 1e-3, 5e-4), symmetrised."""
        def difference(v, eps):
            return (self.gradient(self.theta + eps * v) - self.gradient(self.theta - eps * v)).numpy() / (2 * eps)
        columns = np.stack([(4 * difference(e, 5e-4) - difference(e, 1e-3)) / 3
                            for e in tf.eye(self.space.size, dtype=self.theta.dtype)])
        return (columns + columns.T) / 2

    def gauss_newton_products(self, vectors):
        """Jᵀ H_f J v with H_f = (diag(p) − ppᵀ)/n per example (softmax cross-entropy, mean over n)."""
        rows = []
        for v in tf.constant(vectors):
            with tf.GradientTape() as tape:
                tape.watch(self.theta)
                with tf.autodiff.ForwardAccumulator(self.theta, v) as acc:
                    logits = self.logits(self.theta)
                u = acc.jvp(logits)
            p = tf.nn.softmax(logits)
            hu = (p * u - p * tf.reduce_sum(p * u, -1, keepdims=True)) / N
            rows.append(tape.gradient(logits, self.theta, output_gradients=tf.stop_gradient(hu)).numpy())
        return np.stack(rows)

    def per_example_gradients(self):
        with tf.GradientTape() as tape:
            tape.watch(self.theta)
            losses = self.losses(self.theta)
        return tape.jacobian(losses, self.theta).numpy()


def _solve(name, source, rows):
    options = dict(tol=1e-12, maxiter=1000) if name == "cg" else {}
    if name == "lissa":
        options = dict(batch_size=4, recursion_depth=100, progress=False)
    x, _ = make_solver(name, **options).prepare(source).solve(tf.constant(rows))
    return np.asarray(x)


def _pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# One family per code path runs by default; the families whose path one of these already takes
# (other convolutions, other normalisations, other recurrent cells, ...) are `slow`: `pytest -m slow`.
DEFAULT_RUN = ("Dense", "Conv2D", "LayerNormalization", "MultiHeadAttention", "SimpleRNN")


@pytest.mark.parametrize("family", [f if f in DEFAULT_RUN else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_layer_family_every_method(float64, rng, family):
    model, training = _model(family)
    for v in model.trainable_variables:
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    x, y = _data(family, rng)
    before = [w.copy() for w in model.get_weights()]
    problem = tfi.Problem(model, CE_LOGITS, (x, y), training=training, batch_size=N)
    reference = Reference(model, x, y, training)
    p = reference.space.size
    vectors = rng.standard_normal((ROWS, p))

    hessian = reference.hessian()
    smallest = float(np.linalg.eigvalsh(hessian)[0])
    damping = max(0.0, -smallest) + MARGIN
    sources = {c: CurvatureSource(problem, damping=d, curvature=c)
               for c, d in (("hessian", damping), ("gauss_newton", GN_DAMPING))}
    errors = {"hessian": relative_error(sources["hessian"].hessian().matmul_rows(vectors).numpy(),
                                        vectors @ hessian + damping * vectors),
              "gauss_newton": relative_error(sources["gauss_newton"].hessian().matmul_rows(vectors).numpy(),
                                             reference.gauss_newton_products(vectors) + GN_DAMPING * vectors)}
    assert errors["hessian"] <= 1e-6 and errors["gauss_newton"] <= 1e-10, errors

    gradients = reference.per_example_gradients()  # [N, p]; the first ROWS examples are the "test" rows
    rows = gradients[:ROWS]
    direct = {c: _solve("direct", sources[c], rows) for c in sources}
    expected = np.linalg.solve(hessian + damping * np.eye(p), rows.T).T
    status, figures = {}, {}
    for method in METHODS:
        exact = method in ("direct", "cg", "chain")
        source = sources["hessian" if exact else "gauss_newton"]
        try:
            solution = direct["hessian"] if method == "direct" else _solve(method, source, rows)
        except tfi.UnsupportedLayerError as e:
            message = str(e)
            assert "'layer'" in message and ("method='direct'" in message or "method='cg'" in message), message
            status[method] = "refused"
            continue
        if exact:
            figures[method] = relative_error(solution, expected)
            status[method] = "exact" if figures[method] <= 1e-6 else f"wrong ({figures[method]:.2g})"
        else:
            figures[method] = _pearson(solution @ gradients.T, direct["gauss_newton"] @ gradients.T)
            status[method] = "approx" if figures[method] > PEARSON_FLOOR else f"poor ({figures[method]:.2f})"
    _log.info("zoo | %s | p=%d, λ_min(H)=%.2g | %s | %s", family, p, smallest,
              " | ".join(f"{m}: {status[m]}" + (f" {figures[m]:.3g}" if m in figures else "") for m in METHODS),
              {k: f"{v:.1e}" for k, v in errors.items()})
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert status == EXPECTED[family], (status, figures)
