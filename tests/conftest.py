import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture
def float64():
    """Builds layers in float64 for the duration of a test."""
    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    yield
    keras.backend.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def dense_hessian(model, loss_fn, x, y, w=None, *, variables=None, l2=0.0, gauss_newton=False):
    """Reference Hessian of the mean objective by nested GradientTape jacobians (all data at once).

    Independent of the library: weighted mean of per-example losses + model.losses + (l2/2)||θ||².
    """
    variables = list(variables if variables is not None else model.trainable_variables)
    tf_vars = [v if isinstance(v, tf.Variable) else v.value for v in variables]
    n = len(tf.nest.flatten(y)[0])
    w = tf.ones([n], tf.float64) if w is None else tf.constant(w, tf.float64)
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            losses = tf.cast(loss_fn(y, model(x, training=False)), tf.float64)
            objective = tf.reduce_sum(w * losses) / tf.reduce_sum(w)
            objective += tf.add_n([tf.cast(l, tf.float64) for l in model.losses] or [tf.constant(0.0, tf.float64)])
            objective += 0.5 * l2 * tf.add_n([tf.reduce_sum(tf.cast(v, tf.float64) ** 2) for v in tf_vars])
        grads = inner.gradient(objective, tf_vars, unconnected_gradients="zero")
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], 0)
    blocks = outer.jacobian(flat, tf_vars, unconnected_gradients="zero", experimental_use_pfor=False)
    return tf.concat([tf.reshape(b, [flat.shape[0], -1]) for b in blocks], 1).numpy()


def relative_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
