"""Dense curvature matrices: the compiled builders (what `HessianOperator.to_dense()` now uses) vs p products.

Digits MLP 64-32-10 (2,410 parameters, 1,200 examples of scikit-learn's bundled digits, float64,
trained a few epochs): one full-data gradient (the unit), the matrix from p operator products in
chunks of 64 (`matmul_rows` of the unit vectors: how `to_dense()` was built before), `to_dense()`, the
dense Hessian, the dense Gauss-Newton matrix (BLAS and TensorFlow products); then the same builders on a
64-128-128-10 MLP (~26k parameters). Wall and CPU seconds (CPU time is steadier on a shared machine).

Run from the repository root: PYTHONPATH=. python benchmarks/dense.py [--quick] [--profile]
                                 [--large-examples 1200] [--skip-large]
  --quick     time the p products on the first 256 rows and scale by p / 256 (marked "extrapolated")
  --profile   op-type breakdown (TF profiler) of the dense Hessian and Gauss-Newton builders
  --large-examples n: examples for the ~26k-parameter MLP (time is linear in n; the memory is not)
"""

import argparse
import resource
import time

import _timing
import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from tf_influence.curvature.dense import (
    dense_gauss_newton,
    dense_hessian,
    dense_regularizer_hessian,
)
from tf_influence.data import as_dataset
from tf_influence.objective import Objective
from tf_influence.params import ParameterSpace, select_variables, tf_variables


PRODUCTS = "p products, 64 per pass (old to_dense)"


def digits(n):
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))[:n]
    return (data.data[order] / 16.0).astype("float64"), data.target[order].astype("int64")


def trained_mlp(hidden, x, y):
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(h, activation="tanh") for h in hidden]
    model = keras.Sequential([keras.Input((x.shape[1],)), *layers, keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    return model


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    _timing._block(result)
    return result, time.perf_counter() - start, time.process_time() - cpu


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench(name, hidden, n, args, with_operator):
    x, y = digits(n)
    model = trained_mlp(hidden, x, y)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    objective = Objective(model, loss)
    selected = select_variables(model)
    tf_vars, space = tf_variables(selected), ParameterSpace(selected)
    dataset = as_dataset((x, y), batch_size=args.batch)
    p = space.size
    operator = tfi.HessianOperator(model, objective, dataset)
    t_grad = _timing.median_time(operator.gradient, repeats=5)
    rows, results = [], {}

    def add(label, seconds, cpu, note=""):
        rows.append([name, f"{p:,}", label, seconds, cpu, note])

    add("gradient pass (unit)", t_grad, float("nan"), "median of 5")
    if with_operator:
        eye = tf.eye(p, dtype=space.dtype)
        if args.quick:
            _, t, c = timed(lambda: [operator.matmul_rows(eye[i:i + 64]) for i in range(0, 256, 64)])
            add(PRODUCTS, t * p / 256, c * p / 256, "extrapolated from 256 rows")
        else:
            results["products"], t, c = timed(lambda: tf.concat(
                [operator.matmul_rows(eye[i:i + 64]) for i in range(0, p, 64)], axis=0))
            add(PRODUCTS, t, c)
        results["to_dense"], t, c = timed(operator.to_dense)
        add("HessianOperator.to_dense() (1st call)", t, c, "builds dense_hessian, traces")
    for label, fn in (
        ("dense_hessian (1st call)", lambda: dense_hessian(objective, tf_vars, space, dataset)),
        ("dense_hessian", lambda: dense_hessian(objective, tf_vars, space, dataset)),
        ("dense_gauss_newton blas (1st)", lambda: dense_gauss_newton(objective, tf_vars, space, dataset)),
        ("dense_gauss_newton blas", lambda: dense_gauss_newton(objective, tf_vars, space, dataset)),
        ("dense_gauss_newton tensorflow", lambda: dense_gauss_newton(objective, tf_vars, space, dataset,
                                                                     gemm="tensorflow")),
        ("dense_regularizer_hessian", lambda: dense_regularizer_hessian(objective, tf_vars, selected, space)),
    ):
        if "tensorflow" in label and p > 10_000 and not args.tf_gemm_large:
            continue
        results[label], t, c = timed(fn)
        add(label, t, c, f"peak RSS {peak_rss_gib():.1f} GiB")
        results[label] = results[label].numpy() if p <= 10_000 else None
    if with_operator:  # the same builder on a float32 copy: TensorFlow's float32 matmul is oneDNN's
        hidden32 = [keras.layers.Dense(h, activation="tanh", dtype="float32") for h in hidden]
        model32 = keras.Sequential([keras.Input((x.shape[1],), dtype="float32"), *hidden32,
                                    keras.layers.Dense(10, dtype="float32")])
        model32.set_weights([w.astype("float32") for w in model.get_weights()])
        objective32 = Objective(model32, loss)
        tf_vars32, space32 = tf_variables(model32.trainable_variables), ParameterSpace(model32.trainable_variables)
        dataset32 = as_dataset((x.astype("float32"), y), batch_size=args.batch)
        dense_hessian(objective32, tf_vars32, space32, dataset32)
        h32, t, c = timed(lambda: dense_hessian(objective32, tf_vars32, space32, dataset32))
        error = np.linalg.norm(h32.numpy() - results["dense_hessian"]) / np.linalg.norm(results["dense_hessian"])
        add("dense_hessian, float32 copy", t, c, f"rel. diff. to float64 {error:.0e}")
    if "products" in results:
        error = np.linalg.norm(results["dense_hessian"] - results["products"].numpy()) / np.linalg.norm(
            results["products"].numpy())
        print(f"{name}: relative difference dense_hessian vs p products: {error:.1e}")
    if results.get("dense_gauss_newton blas") is not None:
        g, g_tf = results["dense_gauss_newton blas"], results["dense_gauss_newton tensorflow"]
        print(f"{name}: relative difference GGN blas vs tensorflow: "
              f"{np.linalg.norm(g - g_tf) / np.linalg.norm(g):.1e}")
    if args.profile:
        from _profile import op_times, print_op_times

        print_op_times(f"{name}: dense_hessian", op_times(lambda: dense_hessian(objective, tf_vars, space, dataset)))
        print_op_times(f"{name}: dense_gauss_newton (TensorFlow part; BLAS syrk not shown)",
                       op_times(lambda: dense_gauss_newton(objective, tf_vars, space, dataset)))
    reference = next((r[3] for r in rows if r[2] == PRODUCTS), None)
    return [[*r[:3], f"{r[3]:.2f}", f"{r[4]:.2f}", f"{r[3] / t_grad:,.0f}",
             f"{reference / r[3]:.0f}x" if reference and r[2] != "gradient pass (unit)" else "", r[5]]
            for r in rows], t_grad


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--large-examples", type=int, default=1200)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--tf-gemm-large", action="store_true", help="also time gemm='tensorflow' at ~26k")
    args = parser.parse_args()
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    rows = [] if args.skip_small else bench("MLP 64-32-10", (32,), 1200, args, with_operator=True)[0]
    if not args.skip_large:
        print(f"MLP 64-128-128-10: the dense matrix alone takes {25_994**2 * 8 / 2**30:.1f} GiB in float64")
        large, _ = bench("MLP 64-128-128-10", (128, 128), args.large_examples, args, with_operator=False)
        rows += large
    print(_timing.machine_info())
    _timing.print_table(
        f"Dense curvature matrices, float64, batch {args.batch}, digits (1,200 examples; large: "
        f"{args.large_examples}); ratios of wall times",
        ("model", "params", "what", "wall s", "CPU s", "/ gradient", "vs products", "note"), rows)


if __name__ == "__main__":
    main()
