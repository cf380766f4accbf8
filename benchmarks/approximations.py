"""Approximate influence methods against the exact damped solve: Pearson and time per method, λ and model.

Models (float64, scikit-learn's bundled digits, 1,200 train / 50 test, x/16):
  mlp  the shared benchmark MLP of `peers.py`: 64-32-10 tanh, logits, 2,410 parameters, Adam 100 epochs;
  cnn  Conv2D(8, 3x3, tanh) on the 8x8 images -> Flatten -> Dense(10): 2,970 parameters, Adam 40 epochs.

Curvature: the Gauss-Newton matrix G (--curvature; positive semi-definite, so every method is defined
at every λ). Ground truth: the exact damped solve `(G + λI)⁻¹` with the dense matrix (built once per
model from exact curvature products, its time shown in the "exact" row) and per-example gradients by
tape jacobians; each row reports the Pearson correlation of its [50, 1200] score matrix with the
exact one and the wall time of the user's whole computation (Influence construction to scores, in a
fresh Influence, so fitting factors and eigenpairs is included).

Methods:
  EKFAC, KFAC            one-shot Kronecker factors, the default exact expectation (fisher="auto")
  EKFAC sampled          the former default, one sampled label per example (fisher="true")
  EKFAC refined          EKFAC(tol=--refine-tol): CG on the exact curvature, preconditioned by EKFAC
  tridiagonal KFAC       neighbouring layers' cross-curvature (block-tridiagonal inverse)
  Arnoldi                top --rank eigenpairs by block Lanczos, 1/λ outside ("damping" complement)
  LiSSA                  scale 1.1·λ_max (Lanczos), depth min(--lissa-depth, J) with (1 − λ/s)^J ≤ 1e-3,
                         minibatch --lissa-batch
  CG                     plain CG to relative residual 1e-6

Run: python benchmarks/approximations.py [--models mlp cnn] [--lambdas 1e-3 1e-2 1e-1] [--only ...]
"""

import argparse
import gc
import math
import os
import sys
import time
import warnings

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_models as pm  # noqa: E402

import tf_influence as tfi  # noqa: E402
from tf_influence.linalg import extreme_eigenvalues  # noqa: E402

LABELS = {"direct": "exact (direct)", "ekfac": "EKFAC", "kfac": "KFAC", "ekfac_sampled": "EKFAC sampled",
          "ekfac_refined": "EKFAC refined", "kfac_tridiagonal": "tridiagonal KFAC", "arnoldi": "Arnoldi",
          "lissa": "LiSSA", "cg": "CG 1e-6"}
METHODS = tuple(LABELS)[1:]


def cnn():
    return keras.Sequential([keras.Input((8, 8, 1), dtype="float64"),
                             keras.layers.Conv2D(8, 3, activation="tanh", dtype="float64"),
                             keras.layers.Flatten(dtype="float64"), keras.layers.Dense(10, dtype="float64")])


def build(name, data, args):
    x = data["x_train"] if name == "mlp" else data["x_train"].reshape(-1, 8, 8, 1)
    if name == "mlp":
        return pm.train_mlp([64, 32, 10], x, data["y_train"], epochs=args.epochs), x
    keras.utils.set_random_seed(0)
    model = cnn()
    model.compile(keras.optimizers.Adam(1e-3), pm.loss_fn())
    model.fit(x, data["y_train"], epochs=args.cnn_epochs, batch_size=32, verbose=0)
    return model, x


def solver(method, damping, args, spectrum):
    if method == "direct":
        return "direct"
    if method in ("ekfac", "kfac"):
        return {"ekfac": tfi.solvers.EKFAC, "kfac": tfi.solvers.KFAC}[method]()
    if method == "ekfac_sampled":
        return tfi.solvers.EKFAC(fisher="true", seed=0)
    if method == "ekfac_refined":
        return tfi.solvers.EKFAC(tol=args.refine_tol)
    if method == "kfac_tridiagonal":
        return tfi.solvers.TridiagonalKFAC()
    if method == "arnoldi":
        return tfi.solvers.Arnoldi(rank=args.rank)
    if method == "cg":
        return tfi.solvers.CG(tol=1e-6)
    scale = 1.1 * spectrum
    depth = min(args.lissa_depth, math.ceil(math.log(1e3) / -math.log1p(-damping / scale)))
    return tfi.solvers.LiSSA(scale=scale, batch_size=args.lissa_batch, recursion_depth=depth, seed=0,
                             progress=False, check_residual=False)


def run(method, model, train, test, damping, args, spectrum):
    gc.collect()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        influence = tfi.Influence(model, pm.loss_fn(), train, method=solver(method, damping, args, spectrum),
                                  damping=damping, curvature=args.curvature, batch_size=args.batch_size,
                                  progress=False)
        scores = influence.scores(test)
    seconds = time.perf_counter() - start
    info = influence.last_solve_info
    note = ""
    if method in ("cg", "ekfac_refined"):
        note = f"{info.iterations} it"
    if method == "lissa":
        note = f"s={influence.solver.scale:.3g}, J={influence.solver.recursion_depth}"
    if method == "arnoldi":
        note = f"rank {args.rank}, {info.extra['passes']} passes"
    return np.asarray(scores), seconds, note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--curvature", choices=("gauss_newton", "hessian"), default="gauss_newton")
    parser.add_argument("--refine-tol", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=200)
    parser.add_argument("--lissa-depth", type=int, default=3000)
    parser.add_argument("--lissa-batch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--cnn-epochs", type=int, default=40)
    args = parser.parse_args(argv)
    keras.backend.set_floatx("float64")
    data = pm.digits()
    print(f"load average {os.getloadavg()[0]:.1f} at start; curvature={args.curvature}", flush=True)
    rows = []
    for name in args.models:
        model, x_train = build(name, data, args)
        x_test = data["x_test"] if name == "mlp" else data["x_test"].reshape(-1, 8, 8, 1)
        train, test = (x_train, data["y_train"]), (x_test, data["y_test"])
        undamped = tfi.HessianOperator(model, pm.loss_fn(), train, curvature=args.curvature,
                                       batch_size=args.batch_size)
        spectrum = extreme_eigenvalues(undamped, num_iterations=30).largest
        print(f"{name}: {pm.num_parameters(model)} parameters, λ_max ≈ {spectrum:.3g}", flush=True)
        start = time.perf_counter()
        dense = undamped.to_dense().numpy()
        g_train, g_test = pm.keras_gradients(model, *train), pm.keras_gradients(model, *test)
        build_seconds = time.perf_counter() - start
        for damping in args.lambdas:
            start = time.perf_counter()
            truth = pm.exact_scores(dense, g_test, g_train, damping)
            seconds = build_seconds + time.perf_counter() - start
            rows.append(dict(model=name, damping=damping, method="direct", pearson=1.0, seconds=seconds,
                             note="dense build + solve"))
            for method in args.only:
                try:
                    scores, seconds, note = run(method, model, train, test, damping, args, spectrum)
                    pearson = pm.compare(scores, truth)[0]
                except Exception as error:  # a method that fails is a result too
                    scores, seconds, pearson, note = None, float("nan"), float("nan"), type(error).__name__
                rows.append(dict(model=name, damping=damping, method=method, pearson=pearson, seconds=seconds,
                                 note=note))
                print(f"  {name} λ={damping:g} {LABELS[method]:17s} Pearson {pearson:.4f}  {seconds:7.2f} s  {note}",
                      flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    print_table(rows, args)
    return rows


def print_table(rows, args):
    lambdas = args.lambdas
    header = "| model | method | " + " | ".join(f"λ={d:g}" for d in lambdas) + " |"
    print(header)
    print("|" + "---|" * (len(lambdas) + 2))
    for name in args.models:
        for method in ("direct",) + tuple(args.only):
            cells = []
            for damping in lambdas:
                match = [r for r in rows if r["model"] == name and r["method"] == method and r["damping"] == damping]
                if not match:
                    cells.append("")
                    continue
                r = match[0]
                note = f", {r['note']}" if r["note"] else ""
                cells.append(f"{r['pearson']:.3f} ({r['seconds']:.1f} s{note})")
            print(f"| {name} | {LABELS[method]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
