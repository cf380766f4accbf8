"""Large model: a ~1M-parameter CNN scored against up to 50,000 training examples on CPU.

Memory must stay bounded by the batch size: the training images are generated batch by batch
(tf.data, deterministic), test IHVPs come from EKFAC (factors fitted in two streamed passes), and
the `[n_test, n_train]` scores are streamed to a `.npy` memmap with `tfi.score_to_file` (progress,
ETA, resumable). Each training-set size runs in its own process so its peak RSS is its own.

Run: python benchmarks/large.py [--n-train 10000 50000] [--n-test 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import _timing

_CHILD = "--child"


def child(n_train, n_test, batch, out):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import tf_influence as tfi

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(600, activation="relu"), keras.layers.Dense(10),
    ])

    def example(i):
        image = tf.random.stateless_uniform([28, 28, 1], seed=tf.stack([i, tf.constant(1, tf.int64)]))
        return image, tf.math.floormod(i * 7, 10), tf.constant(1.0)

    train = tf.data.Dataset.range(n_train).map(example).batch(batch).prefetch(2)
    test = tf.data.Dataset.range(10**7, 10**7 + n_test).map(example).batch(n_test)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    inf = tfi.Influence(model, loss, train, method="ekfac", curvature="gauss_newton", damping=1e-2,
                        residual_rows=0, progress=False)
    baseline = _rss()
    peak, running = [baseline], True

    def sample():
        while running:
            peak.append(_rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    inf.test_inverse_hvps(test)
    t_ihvp = time.perf_counter() - start
    start = time.perf_counter()
    scores = tfi.score_to_file(inf, test, out, progress=True)
    t_score = time.perf_counter() - start
    running = False
    sampler.join()
    print(json.dumps({"params": inf.space.size, "n_train": n_train, "n_test": n_test, "ihvp_s": t_ihvp,
                      "score_s": t_score, "throughput": n_train / t_score, "rss_before": baseline,
                      "rss_peak": max(peak), "finite": bool(float(abs(scores).sum()) < float("inf"))}))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--n-test", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100,
                        help="batch size (EKFAC's second pass holds [batch, 1601, 600] per-example gradients)")
    parser.add_argument("--quick", action="store_true", help="2,000 and 10,000 training examples")
    args = parser.parse_args(argv)
    sizes = [2_000, 10_000] if args.quick else args.n_train
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out = os.path.join(tmp, f"scores_{n}.npy")
            proc = subprocess.run([sys.executable, __file__, _CHILD, str(n), str(args.n_test), str(args.batch), out],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = results[0]
    rows = [(f"{r['n_train']:,}", f"{r['ihvp_s']:.1f}", f"{r['score_s']:.1f}", f"{r['throughput']:,.0f}",
             f"{r['rss_peak'] / 2**20:,.0f}", f"{r['rss_peak'] / first['rss_peak']:.3f}") for r in results]
    print(_timing.machine_info())
    _timing.print_table(
        f"CNN with {first['params']:,} parameters, {first['n_test']} test points, scores streamed to disk",
        ("n_train", "EKFAC fit + test IHVPs s", "scoring s", "train examples/s", "peak RSS MiB", "RSS ratio"), rows)
    return [dict(r) for r in results]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD:
        child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
