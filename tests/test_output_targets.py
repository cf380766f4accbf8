"""The exact Gauss-Newton targets factor every example's output Hessian: `Σ_s c_s u_s u_sᵀ = ∇²_f ℓ` (float64).

Cross-entropy on logits takes the closed-form factor of `diag(p) − ppᵀ`; other losses the eigendecomposition.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.curvature.targets import output_targets

LOSSES = {
    "sparse_ce_logits": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse"),
    "ce_logits_smoothed": (keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2), "one_hot"),
    "ce_probabilities": (keras.losses.SparseCategoricalCrossentropy(), "probabilities"),
    "mse": (keras.losses.MeanSquaredError(reduction=None), "regression"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_ggn_targets_factor_the_output_hessian(name, float64, rng):
    loss, kind = LOSSES[name]
    n, k = 6, 4
    f = tf.constant(rng.standard_normal((n, k)))
    if kind == "probabilities":
        f = tf.nn.softmax(f)
    labels = rng.integers(0, k, n)
    y = {"sparse": labels, "probabilities": labels, "one_hot": np.eye(k)[labels],
         "regression": rng.standard_normal((n, k))}[kind]
    objective = tfi.Objective(keras.Sequential([keras.Input((k,)), keras.layers.Dense(k)]), loss)
    us, weights = output_targets(objective, f, tf.constant(y), fisher="ggn")
    factored = sum(np.einsum("n,nk,nl->nkl", c.numpy(), u.numpy(), u.numpy()) for u, c in zip(us, weights))
    with tf.GradientTape() as outer:  # examples are independent: the batch Jacobian of the gradient
        outer.watch(f)
        with tf.GradientTape() as inner:
            inner.watch(f)
            loss = tf.reduce_sum(objective.per_example_loss(tf.constant(y), f))
        gradient = inner.gradient(loss, f)
    hessian = outer.batch_jacobian(gradient, f).numpy()
    np.testing.assert_allclose(factored, hessian, rtol=0, atol=1e-12 * np.abs(hessian).max())
