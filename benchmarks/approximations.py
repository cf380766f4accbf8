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
  LiSSA                  scale 1.1·λ_max (or --lissa-scale), depth min(--lissa-depth, J) with
                         (1 − μ/s)^J ≤ 1e-3 (μ the smallest eigenvalue of G + λI), minibatch --lissa-batch
  CG                     plain CG to relative residual 1e-6

With --peers (run with /work/venv-peers/bin/python) the MLP rows also include pyDVL's EKFAC, LiSSA
(the same scale, depth and minibatch) and CG (rtol 1e-3), and kronfluence's EKFAC, on the PyTorch twin
of the same weights (`peers.py`), timed in the same process.

Run: PYTHONPATH=. python benchmarks/approximations.py [--models mlp cnn] [--lambdas 1e-3 1e-2 1e-1]
     [--only ...] [--curvature hessian] [--peers]
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


def lissa_settings(damping, spectrum, args):
    """Scale s (--lissa-scale, or 1.1·λ_max), depth min(--lissa-depth, J) with (1 − μ/s)^J ≤ 1e-3,
    μ = λ + min(λ_min, 0) the smallest eigenvalue of the damped curvature."""
    largest, smallest = spectrum
    scale = args.lissa_scale or 1.1 * largest
    mu = damping + min(smallest, 0.0)
    depth = args.lissa_depth if mu <= 0 else min(args.lissa_depth, math.ceil(math.log(1e3) / -math.log1p(-mu / scale)))
    return dict(scale=scale, depth=depth, batch_size=args.lissa_batch)


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
    lissa = lissa_settings(damping, spectrum, args)
    return tfi.solvers.LiSSA(scale=lissa["scale"], batch_size=lissa["batch_size"], recursion_depth=lissa["depth"],
                             seed=0, progress=False, check_residual=False)


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
    parser.add_argument("--lissa-scale", type=float, default=None, help="default: 1.1·λ_max")
    parser.add_argument("--peers", action="store_true", help="also pyDVL and kronfluence on the MLP (peers' venv)")
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
        start = time.perf_counter()
        dense = undamped.to_dense().numpy()
        dense = 0.5 * (dense + dense.T)
        g_train, g_test = pm.keras_gradients(model, *train), pm.keras_gradients(model, *test)
        build_seconds = time.perf_counter() - start
        eigenvalues = np.linalg.eigvalsh(dense)
        spectrum = (float(eigenvalues[-1]), float(eigenvalues[0]))
        print(f"{name}: {pm.num_parameters(model)} parameters, eigenvalues of the curvature in "
              f"[{spectrum[1]:.3g}, {spectrum[0]:.3g}]", flush=True)
        peer_runs = peers(model, train, test, args) if args.peers and name == "mlp" else None
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
            for label, make in (peer_runs or {}).items():
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scores = make(damping, lissa_settings(damping, spectrum, args))()
                seconds = time.perf_counter() - start
                pearson = pm.compare(scores, truth)[0]
                LABELS[label] = label
                rows.append(dict(model=name, damping=damping, method=label, pearson=pearson, seconds=seconds,
                                 note=""))
                print(f"  {name} λ={damping:g} {label:17s} Pearson {pearson:.4f}  {seconds:7.2f} s", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    print_table(rows, args)
    return rows


def peers(model, train, test, args):
    """pyDVL and kronfluence on the PyTorch twin of the MLP (`peers.py`), same data and batch size."""
    import _peer_libs as libs

    ok, versions = libs.available()
    if not ok:
        print(f"peers not available ({versions}); run with /work/venv-peers/bin/python", flush=True)
        return None
    libs.setup()
    twin = pm.torch_mlp_from_keras(model)
    pm.check_logits(model, twin, train[0])
    print(f"peers: {versions}", flush=True)
    common = dict(batch_size=args.batch_size)
    return {
        "pyDVL EKFAC": lambda d, lissa: libs.pydvl_run("ekfac", twin, train, test, d, **common),
        "pyDVL LiSSA": lambda d, lissa: libs.pydvl_run("lissa", twin, train, test, d, lissa=lissa, **common),
        "pyDVL CG": lambda d, lissa: libs.pydvl_run("cg", twin, train, test, d, **common),
        "kronfluence EKFAC": lambda d, lissa: libs.kronfluence_run("ekfac", twin, train, test, d, **common),
    }


def print_table(rows, args):
    lambdas = args.lambdas
    header = "| model | method | " + " | ".join(f"λ={d:g}" for d in lambdas) + " |"
    print(header)
    print("|" + "---|" * (len(lambdas) + 2))
    for name in args.models:
        methods = list(dict.fromkeys(r["method"] for r in rows if r["model"] == name))
        for method in methods:
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
