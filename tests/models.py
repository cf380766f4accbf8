"""Small models and data sets shared by the tests (built in the current floatx)."""

import keras


def logistic_regression(d=4):
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, name="logit")])


def mlp(d=4, hidden=6, classes=3, activation="tanh", **dense_kwargs):
    return keras.Sequential([
        keras.Input((d,)),
        keras.layers.Dense(hidden, activation=activation, name="hidden", **dense_kwargs),
        keras.layers.Dense(classes, name="head", **dense_kwargs),
    ])


def small_cnn(classes=3):
    return keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, activation="tanh", name="conv"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(classes, name="head"),
    ])


def two_input_functional():
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(4, activation="tanh", name="da")(a),
                                    keras.layers.Dense(2, activation="sigmoid", name="db")(b)])
    out = keras.layers.Dense(2, name="out")(h)
    return keras.Model([a, b], out)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="softplus")
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def classification_data(rng, n=40, d=4, classes=3):
    x = rng.standard_normal((n, d))
    y = rng.integers(0, classes, size=n)
    return x, y


class OwnLayerNormalization(keras.layers.LayerNormalization):
    """A LayerNormalization subclass with its own `call`: tf_influence cannot make its second
    derivatives exact (its formula is unknown), so exact Hessian products refuse it."""

    def call(self, inputs):
        return super().call(inputs)


def own_layer_norm_mlp(hidden=5, classes=3):
    """Dense(tanh) -> OwnLayerNormalization -> Dense(classes): a model only EKFAC/KFAC (and Gauss-Newton) accept."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(hidden, activation="tanh", name="hidden"),
                             OwnLayerNormalization(), keras.layers.Dense(classes, name="head")])
