"""Which Keras layers TensorFlow differentiates wrongly twice: a scan, with and without the patch.

For one small float64 model per layer family (a tanh Dense before the layer, a Dense head after
it, every weight selected), forward-over-back Hessian-vector products are compared with central
finite differences of exact gradients, Richardson-extrapolated:
    D(r) = (∇R(θ + r v) − ∇R(θ − r v)) / 2r,   F(r) = (4 D(r/2) − D(r)) / 3,
whose error is O(r⁴) for smooth models. The column `fd noise` is ‖F(r) − F(r/2)‖ / ‖F(r/2)‖,
the finite differences' own uncertainty: an HVP error far above it is a real error. The HVP is
taken once as TensorFlow computes it and once inside `exact_second_derivatives(model)`.

Not a timing script. Run: python benchmarks/second_derivatives.py [--vectors 2] [--step 1e-3] [--only Normalization]
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

from tf_influence.hvp import forward_over_back  # noqa: E402
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


def _attention(shape):
    inputs = keras.Input(shape)
    h = L.Dense(shape[-1], activation="tanh")(inputs)
    return keras.Model(inputs, _head(L.MultiHeadAttention(2, 3)(h, h)))


def _embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = L.Dense(3, activation="tanh")(L.Embedding(10, 4)(inputs))
    return keras.Model(inputs, _head(h))


def _masked_batch_norm():
    inputs = keras.Input((5,), dtype="int32")
    h = L.Dense(4, activation="tanh")(L.Embedding(10, 4, mask_zero=True)(inputs))
    h = L.GlobalAveragePooling1D()(L.BatchNormalization()(h))
    return keras.Model(inputs, L.Dense(2)(h))


# name, builder, input shape (None: integer tokens), training
CASES = [
    ("Dense", lambda: _model((5,), L.Dense(4), tanh_after=True), (5,), False),
    ("EinsumDense", lambda: _model((5,), L.EinsumDense("ab,bc->ac", 4, bias_axes="c"), tanh_after=True),
     (5,), False),
    ("Conv1D", lambda: _model((6, 2), L.Conv1D(3, 2), tanh_after=True), (6, 2), False),
    ("Conv2D", lambda: _model((4, 4, 2), L.Conv2D(3, 2), tanh_after=True), (4, 4, 2), False),
    ("Conv3D", lambda: _model((3, 3, 3, 2), L.Conv3D(2, 2), tanh_after=True), (3, 3, 3, 2), False),
    ("Conv2DTranspose", lambda: _model((3, 3, 2), L.Conv2DTranspose(2, 2), tanh_after=True), (3, 3, 2), False),
    ("DepthwiseConv2D", lambda: _model((4, 4, 2), L.DepthwiseConv2D(2), tanh_after=True), (4, 4, 2), False),
    ("SeparableConv2D", lambda: _model((4, 4, 2), L.SeparableConv2D(3, 2), tanh_after=True), (4, 4, 2), False),
    ("Embedding", _embedding, None, False),
    ("LayerNormalization", lambda: _model((5,), L.LayerNormalization()), (5,), False),
    ("LayerNormalization(rms_scaling)", lambda: _model((5,), L.LayerNormalization(rms_scaling=True)),
     (5,), False),
    ("RMSNormalization", lambda: _model((5,), L.RMSNormalization()), (5,), False),
    ("BatchNormalization (inference)", lambda: _model((5,), L.BatchNormalization()), (5,), False),
    ("BatchNormalization (training)", lambda: _model((5,), L.BatchNormalization()), (5,), True),
    ("BatchNormalization (training, mask)", _masked_batch_norm, None, True),
    ("BatchNormalization (training, synchronized)",
     lambda: _model((5,), L.BatchNormalization(synchronized=True)), (5,), True),
    ("BatchNormalization (training, renorm)", lambda: _model((5,), L.BatchNormalization(renorm=True)),
     (5,), True),
    ("GroupNormalization", lambda: _model((4,), L.GroupNormalization(2)), (4,), False),
    ("UnitNormalization", lambda: _model((5,), L.UnitNormalization()), (5,), False),
    ("MultiHeadAttention", lambda: _attention((4, 6)), (4, 6), False),
    ("SimpleRNN", lambda: _model((4, 3), L.SimpleRNN(4)), (4, 3), False),
    ("GRU", lambda: _model((4, 3), L.GRU(4)), (4, 3), False),
    ("LSTM", lambda: _model((4, 3), L.LSTM(4)), (4, 3), False),
    ("PReLU", lambda: _model((5,), L.PReLU(alpha_initializer=keras.initializers.Constant(0.3))),
     (5,), False),
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
    model = build()
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
        errors_plain.append(np.linalg.norm(_flat(forward_over_back(objective, variables, direction)) - reference) / scale)
        with exact_second_derivatives(model) as patched:
            hv = _flat(forward_over_back(objective, variables, direction))
        errors_exact.append(np.linalg.norm(hv - reference) / scale)
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
    for name, build, shape, training in CASES:
        if args.only not in name:
            continue
        plain, exact, noise, patched, inexact, params = scan_one(build, shape, training, rng,
                                                                 vectors=args.vectors, step=args.step)
        print(f"{name:44s} {params:6d} {patched:7d} {inexact:7d} {noise:9.1e} {plain:10.1e} {exact:14.1e}")


if __name__ == "__main__":
    main()
