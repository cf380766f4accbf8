"""Which Keras layers TensorFlow differentiates wrongly twice: a scan, with and without the patch.

For one small float64 model per layer family (a tanh Dense before the layer, a Dense head after
it, every weight selected), forward-over-back Hessian-vector products are compared with central
finite differences of exact gradients, Richardson-extrapolated:
    D(r) = (∇R(θ + r v) − ∇R(θ − r v)) / 2r,   F(r) = (4 D(r/2) − D(r)) / 3,
whose error is O(r⁴) for smooth models. The column `fd noise` is ‖F(r) − F(r/2)‖ / ‖F(r/2)‖,
the finite differences' own uncertainty: an HVP error far above it is a real error. The HVP is
taken once as TensorFlow computes it and once inside `exact_second_derivatives(model)`.

Not a timing script. Run:
    python benchmarks/second_derivatives.py [--vectors 2] [--step 1e-3] [--only Normalization]
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import _timing  # noqa: E402,F401  (sets TF log level before TensorFlow loads)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_influence.curvature.products import forward_over_back  # noqa: E402
from tf_influence.normalization import exact_second_derivatives, inexact_layers  # noqa: E402

L = keras.layers


def _head(h):
    if len(h.shape) > 2:
        h = L.Flatten()(h)
    return L.Dense(2)(h)


def _model(shape, layer, *, pre=True, tanh_after=False):
    """Input → tanh Dense (parameters before the layer) → layer → Dense head."""
    inputs = keras.Input(shape)
    h = L.Dense(shape[-1], activation="tanh")(inputs) if pre else inputs
    h = layer(h)
    if tanh_after:
        h = L.Activation("tanh")(h)
    return keras.Model(inputs, _head(h))


def _attention(shape, layer):
    inputs = keras.Input(shape)
    h = L.Dense(shape[-1], activation="tanh")(inputs)
    h = layer([h, h]) if isinstance(layer, (L.Attention, L.AdditiveAttention)) else layer(h, h)
    return keras.Model(inputs, _head(h))


def _embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = L.Dense(3, activation="tanh")(L.Embedding(10, 4)(inputs))
    return keras.Model(inputs, _head(h))


def _masked_batch_norm():
    inputs = keras.Input((5,), dtype="int32")
    h = L.Dense(4, activation="tanh")(L.Embedding(10, 4, mask_zero=True)(inputs))
    h = L.GlobalAveragePooling1D()(L.BatchNormalization()(h))
    return keras.Model(inputs, L.Dense(2)(h))


def _act(cls, *args, **kwargs):
    """A builder: the layer `cls(*args, **kwargs)` followed by tanh (it has no nonlinearity)."""
    return lambda shape: _model(shape, cls(*args, **kwargs), tanh_after=True)


def _plain(cls, *args, **kwargs):
    return lambda shape: _model(shape, cls(*args, **kwargs))


# name, input shape (None: integer tokens), builder(shape) -> model, training
CASES = [
    ("Dense", (5,), _act(L.Dense, 4), False),
    ("EinsumDense", (5,), _act(L.EinsumDense, "ab,bc->ac", 4, bias_axes="c"), False),
    ("Conv1D", (6, 2), _act(L.Conv1D, 3, 2), False),
    ("Conv2D", (4, 4, 2), _act(L.Conv2D, 3, 2), False),
    ("Conv3D", (3, 3, 3, 2), _act(L.Conv3D, 2, 2), False),
    ("Conv2DTranspose", (3, 3, 2), _act(L.Conv2DTranspose, 2, 2), False),
    ("DepthwiseConv2D", (4, 4, 2), _act(L.DepthwiseConv2D, 2), False),
    ("SeparableConv2D", (4, 4, 2), _act(L.SeparableConv2D, 3, 2), False),
    ("Embedding", None, lambda shape: _embedding(), False),
    ("LayerNormalization", (5,), _plain(L.LayerNormalization), False),
    ("LayerNormalization(rms_scaling)", (5,), _plain(L.LayerNormalization, rms_scaling=True), False),
    ("RMSNormalization", (5,), _plain(L.RMSNormalization), False),
    ("BatchNormalization (inference)", (5,), _plain(L.BatchNormalization), False),
    ("BatchNormalization (training)", (5,), _plain(L.BatchNormalization), True),
    ("BatchNormalization (training, mask)", None, lambda shape: _masked_batch_norm(), True),
    ("BatchNormalization (training, synchronized)", (5,), _plain(L.BatchNormalization, synchronized=True),
     True),
    ("BatchNormalization (training, renorm)", (5,), _plain(L.BatchNormalization, renorm=True), True),
    ("GroupNormalization", (4,), _plain(L.GroupNormalization, 2), False),
    ("UnitNormalization", (5,), _plain(L.UnitNormalization), False),
    ("MultiHeadAttention", (4, 6), lambda shape: _attention(shape, L.MultiHeadAttention(2, 3)), False),
    ("SimpleRNN", (4, 3), _plain(L.SimpleRNN, 4), False),
    ("GRU", (4, 3), _plain(L.GRU, 4), False),
    ("LSTM", (4, 3), _plain(L.LSTM, 4), False),
    ("PReLU", (5,), _plain(L.PReLU, alpha_initializer=keras.initializers.Constant(0.3)), False),
    # more families with weights
    ("Conv1DTranspose", (4, 2), _act(L.Conv1DTranspose, 2, 2), False),
    ("Conv3DTranspose", (2, 2, 2, 2), _act(L.Conv3DTranspose, 2, 2), False),
    ("DepthwiseConv1D", (5, 2), _act(L.DepthwiseConv1D, 2), False),
    ("SeparableConv1D", (5, 2), _act(L.SeparableConv1D, 3, 2), False),
    ("Bidirectional(LSTM)", (4, 3), lambda shape: _model(shape, L.Bidirectional(L.LSTM(3))), False),
    ("ConvLSTM1D", (3, 4, 2), _plain(L.ConvLSTM1D, 2, 2), False),
    ("GroupedQueryAttention", (4, 6), lambda shape: _attention(shape, L.GroupQueryAttention(3, 2, 1)), False),
    ("Attention(use_scale)", (4, 6), lambda shape: _attention(shape, L.Attention(use_scale=True)), False),
    ("AdditiveAttention", (4, 6), lambda shape: _attention(shape, L.AdditiveAttention()), False),
]


def _data(shape, rng, n=6):
    if shape is None:
        tokens = rng.integers(1, 10, (n, 5))
        tokens[:, -2:] = 0  # padding (masked where the Embedding has mask_zero=True)
        return tf.constant(tokens, tf.int32), tf.constant(rng.standard_normal((n, 2)))
    return tf.constant(rng.standard_normal((n, *shape))), tf.constant(rng.standard_normal((n, 2)))


def _flat(parts):
    return tf.concat([tf.reshape(p, [-1]) for p in parts], 0).numpy()


def scan_one(build, shape, training, rng, *, vectors, step):
    keras.utils.set_random_seed(0)
    model = build(shape)
    if any(v.dtype != "float64" for v in model.weights):
        raise RuntimeError(f"{model.name} has weights that are not float64: build layers inside the builder")
    for v in model.trainable_variables:  # away from initial values (γ = 1, β = 0, PReLU α = 0.3)
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    x, y = _data(shape, rng)
    variables = [v.value for v in model.trainable_variables]
    state = [(v, v.numpy()) for v in model.non_trainable_variables]

    def objective():
        for v, value in state:  # BN in training mode moves its statistics; renorm then reads them
            v.assign(value)
        return tf.reduce_mean(tf.reduce_sum((model(x, training=training) - y) ** 2, -1))

    def gradient():
        with tf.GradientTape() as tape:
            loss = objective()
        return _flat(tape.gradient(loss, variables, unconnected_gradients="zero"))

    def difference(direction, r):
        start = [tf.identity(v) for v in variables]
        try:
            for var, d in zip(variables, direction):
                var.assign_add(r * d)
            plus = gradient()
            for var, s, d in zip(variables, start, direction):
                var.assign(s - r * d)
            minus = gradient()
        finally:
            for var, s in zip(variables, start):
                var.assign(s)
        return (plus - minus) / (2 * r)

    def richardson(direction, r):
        return (4 * difference(direction, r / 2) - difference(direction, r)) / 3

    errors_plain, errors_exact, noise = [], [], []
    for _ in range(vectors):
        flat = rng.standard_normal(sum(int(np.prod(v.shape)) for v in variables))
        flat /= np.linalg.norm(flat)
        sizes = np.cumsum([int(np.prod(v.shape)) for v in variables])[:-1]
        direction = [tf.constant(np.reshape(p, v.shape)) for p, v in zip(np.split(flat, sizes), variables)]
        coarse, reference = richardson(direction, step), richardson(direction, step / 2)
        scale = np.linalg.norm(reference)
        noise.append(np.linalg.norm(coarse - reference) / scale)
        plain = _flat(forward_over_back(objective, variables, direction))
        with exact_second_derivatives(model) as patched:
            exact = _flat(forward_over_back(objective, variables, direction))
        errors_plain.append(np.linalg.norm(plain - reference) / scale)
        errors_exact.append(np.linalg.norm(exact - reference) / scale)
    for v, value in state:
        v.assign(value)
    return (max(errors_plain), max(errors_exact), max(noise), len(patched),
            len(inexact_layers(model, training=training)), model.count_params())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--step", type=float, default=1e-3)
    parser.add_argument("--only", default="", help="run only the families whose name contains this")
    args = parser.parse_args()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    warnings.filterwarnings("ignore", message="You passed `rms_scaling=True`")
    rng = np.random.default_rng(0)
    header = (f"{'layer family':44s} {'params':>6s} {'patched':>7s} {'inexact':>7s} {'fd noise':>9s} "
              f"{'error, TF':>10s} {'error, patched':>14s}")
    print(f"forward-over-back HVP vs Richardson finite differences (step {args.step:g}), float64, "
          f"max over {args.vectors} unit vectors; TF {tf.__version__}, Keras {keras.__version__}")
    print(header)
    print("-" * len(header))
    for name, shape, build, training in CASES:
        if args.only not in name:
            continue
        plain, exact, noise, patched, inexact, params = scan_one(build, shape, training, rng,
                                                                 vectors=args.vectors, step=args.step)
        print(f"{name:44s} {params:6d} {patched:7d} {inexact:7d} {noise:9.1e} {plain:10.1e} {exact:14.1e}")


if __name__ == "__main__":
    main()
