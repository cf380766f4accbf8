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
