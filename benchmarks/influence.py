"""Scoring cost: jvp scoring vs materialised per-example gradients, and `scores` vs a training epoch.

100 test points against 10,000 training points of an MLP (float32).
Run: python benchmarks/influence.py [--n-train 10000 --n-test 100]
"""

import argparse
import time

import _timing
import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from tf_influence import scoring


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    d, classes = 64, 10
    x = rng.standard_normal((args.n_train + args.n_test, d)).astype("float32")
    y = rng.integers(0, classes, size=len(x))
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(128, activation="tanh"),
                              keras.layers.Dense(128, activation="tanh"), keras.layers.Dense(classes)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("adam", loss)
    train, test = (x[:args.n_train], y[:args.n_train]), (x[args.n_train:], y[args.n_train:])

    start = time.perf_counter()
    model.fit(*train, epochs=1, batch_size=args.batch, verbose=0)
    start = time.perf_counter()
    model.fit(*train, epochs=1, batch_size=args.batch, verbose=0)
    epoch = time.perf_counter() - start

    inf = tfi.Influence(model, loss, train, method="cg", damping=1e-2, curvature="gauss_newton", batch_size=args.batch,
                        progress=False, tol=1e-4, maxiter=50)
    start = time.perf_counter()
    directions = tf.constant(inf.test_inverse_hvps(test))
    t_ihvp = time.perf_counter() - start
    space, objective, tf_vars = inf.space, inf.objective, inf._tf_vars
    batches = list(inf.operator.dataset)

    dots = tf.function(lambda b, s: scoring.gradient_dot(objective, tf_vars, space, b, s))
    grads = tf.function(lambda b, s: tf.matmul(scoring.per_example_gradients(objective, tf_vars, space, b), s,
                                               transpose_b=True))
    t_jvp = _timing.median_time(lambda: [dots(b, directions) for b in batches], repeats=3, warmup=1)
    t_mat = _timing.median_time(lambda: [grads(b, directions) for b in batches], repeats=3, warmup=1)
    check = np.abs(np.concatenate([dots(b, directions).numpy() for b in batches[:1]])
                   - np.concatenate([grads(b, directions).numpy() for b in batches[:1]])).max()
    start = time.perf_counter()
    inf.clear_cache()
    inf.scores(test)
    t_scores = time.perf_counter() - start

    print(_timing.machine_info())
    _timing.print_table(
        f"Scoring {args.n_test} test x {args.n_train} train, MLP {space.size:,} params, batch {args.batch}",
        ("what", "seconds", "ratio"),
        [("one training epoch (model.fit)", f"{epoch:.2f}", "1.00 epoch"),
         ("jvp scoring pass (all test IHVPs)", f"{t_jvp:.2f}", f"{t_jvp / epoch:.2f} epochs"),
         ("per-example gradients + matmul", f"{t_mat:.2f}", f"{t_mat / epoch:.2f} epochs"),
         ("jvp speed-up over per-example gradients", "", f"{t_mat / t_jvp:.1f}x"),
         (f"test IHVPs (cg, {inf.last_solve_info.iterations} it)", f"{t_ihvp:.2f}", f"{t_ihvp / epoch:.2f} epochs"),
         ("whole scores() call", f"{t_scores:.2f}", f"{t_scores / epoch:.2f} epochs")])
    print(f"max |jvp - materialised| on one batch: {check:.2e}")


if __name__ == "__main__":
    main()
