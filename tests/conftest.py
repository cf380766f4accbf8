import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import helpers  # noqa: E402


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


@pytest.fixture(scope="module")
def softmax_regression():
    """Multinomial logistic regression with its closed-form Hessian (see tests/helpers.py)."""
    return helpers.softmax_regression()


@pytest.fixture(scope="module")
def indefinite_mlp():
    """A tanh MLP with an indefinite Hessian, damped to be positive definite (see tests/helpers.py)."""
    return helpers.mlp()


@pytest.fixture(scope="session")
def breast_cancer_optimum():
    """scikit-learn's breast cancer data (standardised, shuffled with seed 0) split 400 / 169, and the weights
    `[kernel [30, 1], bias [1]]` of float64 logistic regression at its optimum for l2 = 0.1 (fitted once per
    session by `validation.fit_to_optimum`, gradient norm checked); shared by test_influence and
    test_measurements, which build their own models from the weights."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    from tests import models
    from tf_influence import validation

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = StandardScaler().fit_transform(data.data)[order]
    y = data.target[order].astype("float64")[:, None]
    l2 = 0.1
    old_floatx, old_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(0)
        model = models.logistic_regression(x.shape[1])
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        grad_norm = validation.fit_to_optimum(model, loss, (x[:400], y[:400]), l2=l2)
    finally:
        keras.backend.set_floatx(old_floatx)
        keras.config.set_dtype_policy(old_policy)
    assert grad_norm < 1e-8
    return (x[:400], y[:400]), (x[400:], y[400:]), l2, model.get_weights()
