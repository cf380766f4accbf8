"""Exact curvature through normalisation layers and finite differences, through the public API.

References are independent of the patched products: finite differences of exact first derivatives
(which TensorFlow gets right through normalisation), and for the whole models the plain-TF twins
in tests/test_modern_architectures.py.
"""

import keras
import numpy as np
import pytest

import tf_influence as tfi
from tests.helpers import relative_error

CE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _layer_norm_mlp(rng, dtype):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3)])
    x, y = rng.standard_normal((30, 4)).astype(dtype), rng.integers(0, 3, 30)
    return model, x, y


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx(request.param)
    keras.config.set_dtype_policy(request.param)
    keras.utils.set_random_seed(0)
    yield request.param
    keras.backend.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


def test_finite_differences_eagerly_and_inside_the_compiled_cg_loop(dtype, rng):
    """mode="finite_difference" agrees with the exact products (patched forward-over-back) in float32 and
    float64: matvec with NumPy vectors, and influence scores with CG, whose loop is one tf.function.
    Measured: products 3e-5 (float32) / 2e-10 (float64); CG scores 3e-4 / 2e-7 (tol 1e-6)."""
    model, x, y = _layer_norm_mlp(rng, dtype)
    exact = tfi.HessianOperator(model, CE_LOGITS, (x, y), batch_size=8, damping=1.0)
    fd = exact.with_options(mode="finite_difference")
    v = rng.standard_normal((2, exact.space.size))
    tolerance = {"float32": (1e-3, 1e-2), "float64": (1e-8, 1e-5)}[dtype]
    assert fd.matvec(v[0]).dtype == dtype
    assert relative_error(fd.matvec(v[0]).numpy(), exact.matvec(v[0]).numpy()) <= tolerance[0]
    assert relative_error(fd.matmul_rows(v).numpy(), exact.matmul_rows(v).numpy()) <= tolerance[0]
    scores = {mode: tfi.Influence(model, CE_LOGITS, (x, y), mode=mode, method="cg", damping=1.0, batch_size=8,
                                  progress=False, tol=1e-6).scores((x[:3], y[:3]))
              for mode in ("forward_over_back", "finite_difference")}
    assert relative_error(scores["finite_difference"], scores["forward_over_back"]) <= tolerance[1]


def test_compiled_products_through_layer_normalization_are_exact(float64, rng):
    """The XLA-compiled per-batch product is traced inside the patch too."""
    model, x, y = _layer_norm_mlp(rng, "float64")
    op = tfi.HessianOperator(model, CE_LOGITS, (x, y), batch_size=8, jit_compile=True)
    v = rng.standard_normal((2, op.space.size))
    reference = op.with_options(mode="finite_difference", jit_compile=False).matmul_rows(v).numpy()
    assert relative_error(op.matmul_rows(v).numpy(), reference) <= 1e-8


def test_influence_passes_on_unsafe_layers_through(float64, rng):
    """A layer that stays inexact (BatchNormalization(renorm=True), training mode) is refused by exact
    methods unless on_unsafe_layers says otherwise; the option is Influence's, not the solver's."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.BatchNormalization(renorm=True, name="bn"), keras.layers.Dense(3)])
    x, y = rng.standard_normal((20, 4)), rng.integers(0, 3, 20)
    options = dict(method="cg", damping=10.0, training=True, progress=False)
    with pytest.raises(tfi.SecondDerivativeError, match=r"through bn are incorrect"):
        tfi.Influence(model, CE_LOGITS, (x, y), **options).scores((x[:2], y[:2]))
    with pytest.warns(UserWarning, match=r"through bn are incorrect"):
        scores = tfi.Influence(model, CE_LOGITS, (x, y), on_unsafe_layers="warn", **options).scores((x[:2], y[:2]))
    assert np.all(np.isfinite(scores))
    with pytest.raises(tfi.InputError, match=r"on_unsafe_layers must be one of .*Received: on_unsafe_layers='skip'"):
        tfi.Influence(model, CE_LOGITS, (x, y), on_unsafe_layers="skip", **options)
    fixed = tfi.Influence(model, CE_LOGITS, (x, y), mode="finite_difference", **options).scores((x[:2], y[:2]))
    assert np.all(np.isfinite(fixed))
