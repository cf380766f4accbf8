"""HVP cost as a multiple of a gradient, per mode, eager vs tf.function vs XLA.

Run: python benchmarks/hvp.py [--repeats 7]
"""

import argparse

import _timing  # noqa: F401  (sets TF log level before TensorFlow loads)
import keras
import numpy as np
import tensorflow as tf

from tf_influence import hvp
from tf_influence.objective import Objective
from tf_influence.params import ParameterSpace, tf_variables


def mlp():
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="tanh"),
                             keras.layers.Dense(256, activation="tanh"), keras.layers.Dense(10)])


def cnn():
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 3, activation="tanh"),
                             keras.layers.MaxPooling2D(2), keras.layers.Conv2D(32, 3, activation="tanh"),
                             keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)])


def bench(name, model, x, y, repeats):
    objective = Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tf_vars = tf_variables(model.trainable_variables)
    space = ParameterSpace(model.trainable_variables)
    batch = (tf.constant(x), tf.constant(y), tf.ones([len(y)]))
    v = [t[tf.newaxis] for t in space.unflatten(tf.random.normal([space.size]))]

    def gradient():
        with tf.GradientTape() as tape:
            loss = objective.weighted_loss_sum(*batch)
        return tape.gradient(loss, tf_vars)

    products = {
        "forward_over_back": lambda: hvp.batch_curvature_product(
            objective, tf_vars, batch, v, mode="forward_over_back", curvature="hessian"),
        "back_over_back": lambda: hvp.batch_curvature_product(
            objective, tf_vars, batch, v, mode="back_over_back", curvature="hessian"),
        "gauss_newton": lambda: hvp.batch_curvature_product(
            objective, tf_vars, batch, v, mode="forward_over_back", curvature="gauss_newton"),
    }
    rows = []
    for compile_mode in ("eager", "tf.function", "XLA"):
        wrap = {"eager": lambda f: f, "tf.function": tf.function,
                "XLA": lambda f: tf.function(f, jit_compile=True)}[compile_mode]
        t_grad = _timing.median_time(wrap(gradient), repeats=repeats)
        for product, fn in products.items():
            t = _timing.median_time(wrap(fn), repeats=repeats)
            rows.append((name, f"{space.size:,}", compile_mode, product, f"{t_grad * 1e3:.1f}",
                         f"{t * 1e3:.1f}", f"{t / t_grad:.2f}"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=args.batch)
    rows = bench("MLP", mlp(), rng.standard_normal((args.batch, 784)).astype("float32"), y, args.repeats)
    rows += bench("CNN", cnn(), rng.standard_normal((args.batch, 28, 28, 1)).astype("float32"), y, args.repeats)
    print(_timing.machine_info())
    _timing.print_table(
        f"HVP time / gradient time, batch {args.batch}, float32, medians of {args.repeats}",
        ("model", "params", "compile", "product", "grad ms", "product ms", "ratio"), rows)


if __name__ == "__main__":
    main()
