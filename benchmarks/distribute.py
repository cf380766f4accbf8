"""Distributed speed-up: one HVP pass, CG and influence scoring, single device vs MirroredStrategy.

Without a GPU the replicas are logical CPU devices (`tf.config.set_logical_device_configuration`),
which share the same cores: TensorFlow already spreads one device's ops over every core, so expect a
speed-up near (or below) 1x on a CPU. The figure means something on several GPUs, where each replica
has its own device; the script uses every GPU it finds (at least 2) instead of logical CPUs.

Run: python benchmarks/distribute.py [--replicas 2] [--n-train 20000] [--quick]
"""

import argparse
import time

import _timing
import numpy as np
import tensorflow as tf


def _devices(replicas):
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        return [f"/gpu:{i}" for i in range(min(replicas, len(gpus)))], "GPU"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return [f"/cpu:{i}" for i in range(replicas)], "logical CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="5,000 training examples")
    args = parser.parse_args()
    if args.quick:
        args.n_train = 5_000
    devices, kind = _devices(args.replicas)  # before TensorFlow initialises its devices

    import keras

    import tf_influence as tfi

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    d, classes = 64, 10
    x = rng.standard_normal((args.n_train, d)).astype("float32")
    y = rng.integers(0, classes, size=args.n_train)
    x_test = rng.standard_normal((args.n_test, d)).astype("float32")
    y_test = rng.integers(0, classes, size=args.n_test)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def mlp():
        return keras.Sequential([keras.Input((d,)), keras.layers.Dense(256, activation="tanh"),
                                 keras.layers.Dense(256, activation="tanh"), keras.layers.Dense(classes)])

    single = mlp()
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        mirrored = mlp()
    mirrored.set_weights(single.get_weights())
    options = dict(damping=1e-2, curvature="gauss_newton", batch_size=args.batch)
    setups = {"single device": (single, None), f"MirroredStrategy, {len(devices)} {kind} replicas": (mirrored, strategy)}

    rows, times, results = [], {}, {}
    for name, (model, strat) in setups.items():
        op = tfi.HessianOperator(model, loss, (x, y), strategy=strat, **options)
        v = tf.constant(rng.standard_normal((1, op.space.size)), op.dtype)
        t_hvp = _timing.median_time(lambda: op.apply(v), repeats=3, warmup=1)
        t_grad = _timing.median_time(op.gradient, repeats=3, warmup=1)
        inf = tfi.Influence(model, loss, (x, y), method="cg", tol=1e-4, maxiter=30, progress=False,
                            strategy=strat, **options)
        inf.scores((x_test[:1], y_test[:1]))  # traces every compiled pass once
        inf.clear_cache()
        start = time.perf_counter()
        results[name] = inf.scores((x_test, y_test))
        t_scores = time.perf_counter() - start
        times[name] = (t_hvp, t_grad, t_scores)
        rows.append([name, f"{t_hvp:.3f}", f"{t_grad:.3f}", f"{t_scores:.2f}"])

    base, dist = list(times)
    agreement = np.linalg.norm(results[dist] - results[base]) / np.linalg.norm(results[base])
    rows.append(["speed-up", *(f"{a / b:.2f}x" for a, b in zip(times[base], times[dist]))])
    _timing.print_table(
        f"MLP {op.space.size:,} params, {args.n_train:,} train, {args.n_test} test, batch {args.batch} (s)",
        ["setup", "HVP pass", "gradient pass", "scores (CG + scoring)"], rows)
    print(f"scores relative difference, distributed vs single: {agreement:.1e}")
    print(f"speed-up ({len(devices)} {kind} replicas, HVP pass): {times[base][0] / times[dist][0]:.2f}x")
    print(_timing.machine_info())


if __name__ == "__main__":
    main()
