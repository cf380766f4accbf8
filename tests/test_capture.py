"""Layer capture: captured inputs and pre-activation gradients reproduce weight gradients exactly,
and the user's model is left untouched (also when an exception escapes)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.curvature import capture, find_blocks, layer_rows

CE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _check_weight_gradients(model, loss, x, y, variables=None):
    """aᵀg summed over examples and positions equals ∂(Σℓ)/∂W for every block."""
    objective = tfi.Objective(model, loss)
    selected = tfi.select_variables(model, variables)
    blocks = find_blocks(model, selected)
    rows = layer_rows(objective, blocks, tf.constant(x), tf.constant(y), fisher="empirical")
    tf_vars = [v.value for v in selected]
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(objective.per_example_loss(y, objective.outputs(x)))
    expected = {id(v): tf.convert_to_tensor(g).numpy() for v, g in zip(selected, tape.gradient(total, tf_vars))}
    checked = 0
    for block, (a, gs) in zip(blocks, rows):
        for variable, grad in zip(block.variables, block.weight_gradients(a, gs[0][0])):
            np.testing.assert_allclose(grad.numpy(), expected[id(variable)], rtol=1e-10, atol=1e-12)
            checked += 1
    assert checked == len(selected)
    return blocks


def test_dense_gradients(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    blocks = _check_weight_gradients(model, CE_LOGITS, rng.standard_normal((7, 4)), rng.integers(0, 3, 7))
    assert [(b.kind, b.a_size, b.out_features) for b in blocks] == [("dense", 5, 5), ("dense", 6, 3)]


@pytest.mark.parametrize("padding,strides,dilation", [("valid", 1, 1), ("same", 2, 1), ("same", 1, 2)])
def test_conv2d_gradients(float64, rng, padding, strides, dilation):
    model = keras.Sequential([
        keras.Input((7, 6, 2)),
        keras.layers.Conv2D(3, (3, 2), strides=strides, padding=padding, dilation_rate=dilation,
                            activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    blocks = _check_weight_gradients(model, CE_LOGITS, rng.standard_normal((5, 7, 6, 2)), rng.integers(0, 3, 5))
    assert blocks[0].kind == "conv" and blocks[0].a_size == 3 * 2 * 2 + 1


def test_conv1d_causal_gradients(float64, rng):
    model = keras.Sequential([
        keras.Input((8, 2)),
        keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2, activation="tanh"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])
    _check_weight_gradients(model, CE_LOGITS, rng.standard_normal((4, 8, 2)), rng.integers(0, 2, 4))


def test_embedding_gradients(float64, rng):
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(11, 4),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3),
    ])
    x = rng.integers(0, 11, (6, 5)).astype(np.int32)
    x[0, :3] = 2  # a repeated token inside one example
    blocks = _check_weight_gradients(model, CE_LOGITS, x, rng.integers(0, 3, 6))
    assert blocks[0].kind == "embedding" and blocks[0].diagonal_inputs


def test_einsum_dense_and_sequences(float64, rng):
    inputs = keras.Input((4, 3))
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(4, 5), bias_axes="d", activation="tanh")(inputs)
    h = keras.layers.Dense(2)(h)  # a Dense layer on a sequence: positions are extra samples
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, out)
    blocks = _check_weight_gradients(model, CE_LOGITS, rng.standard_normal((5, 4, 3)), rng.integers(0, 3, 5))
    assert [b.kind for b in blocks] == ["dense"] * 3


def test_nested_functional_shared_layer_and_subsets(float64, rng):
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, shared(shared(keras.layers.Dense(4, name="pre")(inner_in))), name="inner")
    outer_in = keras.Input((3,))
    model = keras.Model(outer_in, keras.layers.Dense(2, name="head")(inner(outer_in)))
    x, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    _check_weight_gradients(model, CE_LOGITS, x, y)  # the shared layer: two calls, summed
    bias_only = [model.get_layer("head").bias, shared.kernel]
    blocks = _check_weight_gradients(model, CE_LOGITS, x, y, variables=bias_only)
    assert [(b.name, b.kernel is None, b.bias is None) for b in blocks] == [("shared", False, True), ("head", True, False)]


def test_capture_inside_tf_function(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2)])
    blocks = find_blocks(model, model.trainable_variables)
    x = tf.constant(rng.standard_normal((5, 4)))

    @tf.function
    def preactivation_grads(x):
        with tf.GradientTape() as tape, capture(blocks, tape=tape) as rec:
            out = model(x)
            total = tf.reduce_sum(out ** 2)
        return rec.inputs[1][0], tape.gradient(total, rec.preactivations[1][0])

    a, g = preactivation_grads(x)
    hidden = tf.tanh(x @ model.layers[0].kernel + model.layers[0].bias)
    np.testing.assert_allclose(a.numpy(), hidden.numpy(), rtol=1e-12)
    np.testing.assert_allclose(g.numpy(), 2 * model(x).numpy(), rtol=1e-12)
    assert "call" not in model.layers[0].__dict__


def _state(model):
    return [(layer.__dict__.get("call"), getattr(layer, "activation", None), layer.trainable,
             [w.numpy().copy() for w in layer.weights]) for layer in model.layers]


def _same_state(before, after):
    for (call0, act0, tr0, w0), (call1, act1, tr1, w1) in zip(before, after):
        assert call0 is call1 and act0 is act1 and tr0 == tr1
        for a, b in zip(w0, w1):
            np.testing.assert_array_equal(a, b)


def test_model_unchanged_after_capture_and_after_exceptions(float64, rng):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)])
    x = rng.standard_normal((5, 4))
    reference = model(x).numpy()
    before = _state(model)
    blocks = find_blocks(model, model.trainable_variables)
    with capture(blocks) as rec:
        model(x)
    assert len(rec.inputs[0]) == 1
    _same_state(before, _state(model))
    with pytest.raises(RuntimeError, match="boom"):
        with capture(blocks):
            model(x)
            raise RuntimeError("boom")
    _same_state(before, _state(model))
    with pytest.raises(Exception, match="shape|Matrix|incompatible|size"):
        with capture(blocks):
            model(rng.standard_normal((5, 7)))  # fails inside the wrapped call
    _same_state(before, _state(model))
    np.testing.assert_array_equal(model(x).numpy(), reference)


def test_unsupported_layers_are_listed_with_the_fixes(float64, rng):
    """A recurrent layer (its weights live in its cell) and an unknown custom layer are named, with what
    the message offers: exact methods, or the supported layers as the variable selection."""

    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), name="w")

        def call(self, x):
            return x * self.w

    model = keras.Sequential([
        keras.Input((5, 4)), keras.layers.LSTM(3, return_sequences=True, name="lstm"),
        Scale(name="scale"), keras.layers.Flatten(), keras.layers.Dense(2, name="d2"),
    ])
    with pytest.raises(tfi.UnsupportedLayerError,
                       match=r"'lstm' \(LSTM, in its sublayer 'lstm_cell' \(LSTMCell\): recurrent layer.*'scale' "
                             r"\(Scale: layer type not supported\).*method='direct'.*method='cg'.*variables=\['d2'\]"):
        find_blocks(model, model.trainable_variables)
    blocks = find_blocks(model, tfi.select_variables(model, ["d2"]))  # the fix the message names
    assert [b.name for b in blocks] == ["d2"]


def test_unsupported_einsum(float64):
    partial = keras.layers.EinsumDense("abc,cd->abd", output_shape=(2, 3), bias_axes="b", name="partial_bias")
    model = keras.Sequential([keras.Input((2, 4)), partial])
    with pytest.raises(tfi.UnsupportedLayerError, match=r"'partial_bias' \(EinsumDense: bias over only some"):
        find_blocks(model, model.trainable_variables)


@pytest.mark.parametrize("name,shape,make", [
    ("grouped", (5, 5, 4), lambda: keras.layers.Conv2D(4, 2, groups=2, activation="tanh")),
    ("depthwise", (5, 5, 2), lambda: keras.layers.DepthwiseConv2D(2, depth_multiplier=2, activation="tanh")),
    ("depthwise_1d", (6, 2), lambda: keras.layers.DepthwiseConv1D(3, strides=2, activation="tanh")),
    ("separable", (5, 5, 2), lambda: keras.layers.SeparableConv2D(3, 2, depth_multiplier=2, activation="tanh")),
    ("transposed_same", (3, 3, 2), lambda: keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same",
                                                                        activation="tanh")),
    ("transposed_valid", (3, 3, 2), lambda: keras.layers.Conv2DTranspose(2, (2, 3), strides=(1, 2))),
    ("transposed_1d", (4, 2), lambda: keras.layers.Conv1DTranspose(2, 3, strides=2, dilation_rate=1)),
    ("transposed_3d", (2, 2, 2, 2), lambda: keras.layers.Conv3DTranspose(2, 2, activation="tanh")),
    ("conv_3d", (3, 4, 3, 2), lambda: keras.layers.Conv3D(2, (2, 3, 2), strides=2, padding="same")),
    ("layer_norm", (4, 3), lambda: keras.layers.LayerNormalization(axis=[1, 2])),
    ("batch_norm", (4, 3), lambda: keras.layers.BatchNormalization(axis=1)),
    ("group_norm", (3, 3, 4), lambda: keras.layers.GroupNormalization(2)),
    ("prelu", (4, 3), lambda: keras.layers.PReLU(shared_axes=[1])),
])
def test_more_layer_kinds_gradients(float64, rng, name, shape, make):
    """Each new kind's captured rows give the exact weight gradients (see also tests/test_ekfac_layers.py)."""
    inputs = keras.Input(shape)
    h = make()(keras.layers.Dense(shape[-1], activation="tanh")(inputs))
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, out)
    for v in model.trainable_variables:
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    _check_weight_gradients(model, CE_LOGITS, rng.standard_normal((5, *shape)), rng.integers(0, 3, 5))
