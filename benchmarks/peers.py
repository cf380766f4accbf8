"""tf_influence side by side with pyDVL (0.10) and kronfluence (1.0) on the identical trained model.

One float64 Keras MLP 64-32-10 (tanh, logits, 2,410 parameters) trained on scikit-learn's bundled
digits (1,200 train / 50 test, x/16); its exact PyTorch twin gets the same weights (logits checked
to 1e-10). Every library is configured to compute

    score[t, i] = g_tᵀ (H + λI)⁻¹ g_i     H = Hessian of the MEAN training loss, positive = helpful

(how each peer's options map onto this: `_peer_libs.py`). Ground truth: the Hessian by nested
GradientTapes and a dense float64 solve (`_peer_models.py`), cross-checked against torch.func.
Each row times the user's whole computation, object construction to the [50, 1200] score matrix;
the time is the median of --repeats runs; the details show the 1st run (cold: tracing, first calls)
and the median of the later ones (warm: a new object on the same model) apart, in wall and CPU seconds. Libraries run
round-robin; before each timed run the Python heap is collected and frozen (gc.freeze), so that a
library's own gc.collect() calls do not scan the other framework's objects.

Methods per λ: exact (direct), CG to relative residual 1e-6, LiSSA (same scale, depth and
minibatch size for both libraries that have it), EKFAC and KFAC. At scale: EKFAC scoring
1,000 test x 1,200 train, fit and score timed apart, on the 64-32-10 MLP and a 64-512-512-10 MLP
(301k parameters); kronfluence is also shown with its default float32 statistics there.

LiSSA settings: scale s = --lissa-scale (above λ_max/2 of 100-example minibatch Hessians,
which reach ~1.9 here), depth J = smallest multiple of 100 with (1 − (λ + λ_min(H))/s)^J ≤ 1e-3
(the bias of the truncated series), minibatch --lissa-batch, one sample.

Run (the peers live in their own venv, see benchmarks/README.md):
  /work/venv-peers/bin/python benchmarks/peers.py [--quick] [--only direct cg lissa ekfac]
      [--lambdas 0.1 0.01] [--repeats 3] [--skip-large] [--threads N]
  (--quick runs once unless --repeats is given: `--quick --repeats 3` shows cold and warm runs)
Without torch/pyDVL/kronfluence it prints a note and runs the tf_influence rows only.
Import: `import peers; rows = peers.main([...])`, a list of dicts.
"""

import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings

import _peer_libs as libs
import _peer_models as pm
import _timing
import numpy as np

import tf_influence as tfi

METHODS = ("direct", "cg", "lissa", "ekfac")
LABELS = {"direct": "exact (direct)", "cg": "CG 1e-6", "lissa": "LiSSA", "ekfac": "EKFAC", "kfac": "KFAC"}
SUPPORTED = {"tf_influence": ("direct", "cg", "lissa", "ekfac", "kfac"),
             "pyDVL": ("direct", "cg", "lissa", "ekfac", "kfac"), "kronfluence": ("ekfac", "kfac")}
CG_TOL = 1e-6


def tfi_run(method, model, train, test, damping, *, batch_size, lissa=None):
    """tf_influence through its public API; run() -> scores, run.fit() / run.score(inf) for EKFAC."""

    def make():
        solver = {"direct": lambda: "direct",
                  "cg": lambda: tfi.solvers.CG(tol=CG_TOL),
                  "lissa": lambda: tfi.solvers.LiSSA(scale=lissa["scale"], batch_size=lissa["batch_size"],
                                                     recursion_depth=lissa["depth"], seed=0, progress=False),
                  "ekfac": lambda: tfi.solvers.EKFAC(seed=0),
                  "kfac": lambda: tfi.solvers.KFAC(seed=0)}[method]()  # a fresh method object: no cached factors
        return tfi.Influence(model, pm.loss_fn(), train, method=solver, damping=damping, batch_size=batch_size,
                             progress=False)

    def run():
        run.last = make()
        return run.last.scores(test)

    def fit():
        influence = make()
        influence.solver.fit(influence.operator)
        return influence

    run.fit, run.score = fit, lambda influence: influence.scores(test)
    return run


def _clock(fn, *args):
    # Freezing the heap keeps explicit gc.collect() calls from scanning TensorFlow's ~500k objects:
    # kronfluence calls it ~10 times per fit + score, 1 s each in this process (13 of its 15 s), a
    # cost it would not pay in a PyTorch-only process. Every library is timed this way. Unfreeze
    # first, so that the previous run's garbage cycles (an Influence with its cached IHVPs) are freed.
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def timed(runs, repeats):
    """Times each of `runs` {name: run} `repeats` times, round-robin so that a change in the machine's
    load hits every library alike; per name: median wall seconds, 1st run, all runs, median CPU
    seconds (this process, all threads), the 1st run's CPU seconds, the warm median (runs 2..n: a
    user's second object on the same model, after the 1st run's tracing) in wall and CPU seconds,
    and the last result."""
    walls, cpus, results = {n: [] for n in runs}, {n: [] for n in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wall, cpu, results[name] = _clock(run)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {n: dict(seconds=statistics.median(walls[n]), first=walls[n][0], times=walls[n],
                    cpu=statistics.median(cpus[n]), first_cpu=cpus[n][0], cpus=cpus[n],
                    warm=statistics.median(walls[n][1:]) if repeats > 1 else None,
                    warm_cpu=statistics.median(cpus[n][1:]) if repeats > 1 else None, scores=results[n]) for n in runs}


def timed_stages(runs, repeats):
    """Like `timed`, with fit and score timed apart (run.fit() -> state, run.score(state))."""
    fits, scores, firsts = ({n: [] for n in runs} for _ in range(3))
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit, _, state = _clock(run.fit)
                score, _, results[name] = _clock(run.score, state)
                del state  # an Influence holds its cached test IHVPs (2.4 GB for 1,000 x 301k)
            fits[name].append(fit)
            scores[name].append(score)
            firsts[name].append(fit + score)
    return {n: dict(fit=statistics.median(fits[n]), score=statistics.median(scores[n]), first=firsts[n][0],
                    scores=results[n]) for n in runs}


def lissa_settings(damping, min_eigenvalue, args):
    mu = damping + min(min_eigenvalue, 0.0)
    if mu <= 0:
        raise ValueError(f"H + {damping}I is not positive definite (λ_min(H) = {min_eigenvalue:.3g}); LiSSA diverges.")
    depth = math.ceil(math.log(1e3) / -math.log1p(-mu / args.lissa_scale) / 100) * 100
    return dict(scale=args.lissa_scale, batch_size=args.lissa_batch, depth=depth)


def relative_residual(hessian, damping, x, b):
    """max_j ‖(H + λI) x_j − b_j‖ / ‖b_j‖ for rows x, b."""
    r = x @ hessian + damping * x - b
    return float(np.max(np.linalg.norm(r, axis=1) / np.linalg.norm(b, axis=1)))


def small_rows(args, data, model, twin, truth_h, g_train, g_test, peers):
    perm = pm.keras_to_torch_permutation(model)
    min_eig = float(np.linalg.eigvalsh(truth_h)[0])
    train, test = (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
    rows = []
    for damping in args.lambdas:
        truth = pm.exact_scores(truth_h, g_test, g_train, damping)
        lissa = lissa_settings(damping, min_eig, args)
        for method in [m for m in ("direct", "cg", "lissa", "ekfac", "kfac") if m in args.only or
                       (m == "kfac" and "ekfac" in args.only)]:
            runs = {}
            for library, methods in SUPPORTED.items():
                if method not in methods or (library != "tf_influence" and not peers):
                    continue
                common = dict(batch_size=args.batch_size)
                if library == "tf_influence":
                    runs[library] = tfi_run(method, model, train, test, damping, lissa=lissa, **common)
                elif library == "pyDVL":
                    runs[library] = libs.pydvl_run(method, twin, train, test, damping, lissa=lissa, **common)
                else:
                    runs[library] = libs.kronfluence_run(method, twin, train, test, damping, **common)
            print(f"  {LABELS[method]:15s} λ={damping:g}: {', '.join(runs)} x {args.repeats} ...", end="", flush=True)
            results = timed(runs, args.repeats)
            for library, result in results.items():
                pearson, max_rel = pm.compare(result["scores"], truth)
                note = ""
                if method == "lissa":
                    note = f"s={lissa['scale']:g}, J={lissa['depth']}, batch {lissa['batch_size']}"
                if method == "cg" and library == "tf_influence":
                    influence = runs[library].last
                    x = influence.test_inverse_hvps(test)
                    note = (f"{influence.last_solve_info.iterations} it, "
                            f"residual {relative_residual(truth_h, damping, x, g_test):.1e}")
                if method == "cg" and library == "pyDVL":
                    x = np.empty_like(g_test)
                    x[:, perm] = runs[library].factors(runs[library].fit())  # torch order back to Keras order
                    note = f"block CG rtol=1e-3, residual {relative_residual(truth_h, damping, x, g_test):.1e}"
                rows.append(dict(section="small", library=library, method=method, damping=damping,
                                 seconds=result["seconds"], first=result["first"], times=result["times"],
                                 cpu=result["cpu"], first_cpu=result["first_cpu"], cpus=result["cpus"],
                                 warm=result["warm"], warm_cpu=result["warm_cpu"], pearson=pearson,
                                 max_rel=max_rel, note=note))
            print(" " + ", ".join(f"{lib} {r['seconds']:.2f} s" for lib, r in results.items()), flush=True)
    return rows


def large_rows(args, name, model, twin, data, reference, peers):
    """EKFAC at scale: fit and score timed apart; Pearson vs `reference` (exact scores or None)."""
    train, test = (data["x_train"], data["y_train"]), (data["x_large"], data["y_large"])
    batch = args.batch_size if pm.num_parameters(model) < 10_000 else args.large_batch
    damping = args.large_lambda
    runs = {("tf_influence", "float64"): tfi_run("ekfac", model, train, test, damping, batch_size=batch)}
    if peers and "kronfluence" in args.large_peers:
        kron = dict(batch_size=batch, query_batch_size=500)
        runs[("kronfluence", "float64")] = libs.kronfluence_run("ekfac", twin, train, test, damping, **kron)
        runs[("kronfluence", "float32 defaults")] = libs.kronfluence_run("ekfac", twin, train, test, damping,
                                                                         float64=False, **kron)
    if peers and "pyDVL" in args.large_peers:
        runs[("pyDVL", "float64")] = libs.pydvl_run("ekfac", twin, train, test, damping, batch_size=batch,
                                                    score_chunk=batch)
    print(f"  {name}: EKFAC, {', '.join(f'{lib} ({precision})' for lib, precision in runs)} x {args.repeats} ...",
          end="", flush=True)
    results = timed_stages(runs, args.repeats)
    print(" done", flush=True)
    tf_scores = results[("tf_influence", "float64")]["scores"]
    rows = []
    for (library, precision), result in results.items():
        pearson, max_rel = pm.compare(result["scores"], reference if reference is not None else tf_scores)
        rows.append(dict(section="large", model=name, params=pm.num_parameters(model), library=library,
                         precision=precision, method="ekfac", damping=damping, fit=result["fit"],
                         score=result["score"], seconds=result["fit"] + result["score"], first=result["first"],
                         pearson=pearson, max_rel=max_rel,
                         against="exact" if reference is not None else "tf_influence EKFAC"))
    return rows


def _fmt(seconds):
    return "–" if seconds is None else f"{seconds:.2f} s"


def print_tables(rows, args, peers):
    small = [r for r in rows if r["section"] == "small"]
    table = []
    for damping in args.lambdas:
        for method in ("direct", "cg", "lissa", "ekfac", "kfac"):
            cells = {r["library"]: r for r in small if r["method"] == method and r["damping"] == damping}
            if not cells:
                continue
            tf = cells.get("tf_influence")
            peer_rows = [cells[lib] for lib in ("pyDVL", "kronfluence") if lib in cells]
            ratio = f"{tf['seconds'] / min(r['seconds'] for r in peer_rows):.1f}x" if tf and peer_rows else (
                "n/a (peers not installed)" if not peers else "– (no peer)")
            cpu_ratio = f"{tf['cpu'] / min(r['cpu'] for r in peer_rows):.1f}x" if tf and peer_rows else "–"
            row = [LABELS[method], f"{damping:g}"]
            for lib in SUPPORTED:
                r = cells.get(lib)
                row += [_fmt(r and r["seconds"]), "–" if r is None else f"{r['pearson']:.4f}"]
            table.append(row + [ratio, cpu_ratio])
            for r in cells.values():
                r["ratio_to_best_peer"] = ratio
    _timing.print_table(
        f"Whole computation (construction → {args.n_test}x{args.n_train} scores), wall seconds, median of "
        f"{args.repeats}; Pearson vs the exact damped solve; last column: the same ratio in CPU seconds",
        ("method", "λ", "tf_influence", "Pearson", "pyDVL", "Pearson", "kronfluence", "Pearson",
         "tf_influence / best peer", "(CPU)"), table)
    _timing.print_table(
        "Details (max rel. err = max|s − t| / max|t|); cold = the 1st run (tracing, first calls), warm = median of "
        "runs 2..n (a new object on the same model)",
        ("library", "method", "λ", "median", "cold", "cold CPU", "warm", "warm CPU", "runs (wall)", "runs (CPU)",
         "Pearson", "max rel. err", "note"),
        [(r["library"], LABELS[r["method"]], f"{r['damping']:g}", _fmt(r["seconds"]), _fmt(r["first"]),
          _fmt(r["first_cpu"]), _fmt(r["warm"]), _fmt(r["warm_cpu"]), ", ".join(f"{t:.2f}" for t in r["times"]),
          ", ".join(f"{t:.2f}" for t in r["cpus"]), f"{r['pearson']:.5f}", f"{r['max_rel']:.2e}", r["note"])
         for r in small])
    for row in table:
        print(f"tf_influence / best peer, {row[0]} λ={row[1]}: {row[-2]} (CPU seconds: {row[-1]})")
    for damping in args.lambdas:
        for method in ("direct", "cg", "lissa", "ekfac", "kfac"):
            cells = {r["library"]: r for r in small if r["method"] == method and r["damping"] == damping}
            tf, peer = cells.get("tf_influence"), cells.get("pyDVL")
            if tf and peer:
                warm = (f"; warm {tf['warm'] / peer['warm']:.1f}x (CPU {tf['warm_cpu'] / peer['warm_cpu']:.1f}x)"
                        if tf["warm"] is not None else "")
                print(f"tf_influence / pyDVL, {LABELS[method]} λ={damping:g}: cold {tf['first'] / peer['first']:.1f}x "
                      f"(CPU {tf['first_cpu'] / peer['first_cpu']:.1f}x){warm}")
    large = [r for r in rows if r["section"] == "large"]
    for r in large:
        if r["library"] == "kronfluence" and r["precision"] == "float64":
            tf = next(t for t in large if t["model"] == r["model"] and t["library"] == "tf_influence")
            print(f"tf_influence / kronfluence, EKFAC fit + score at scale, {r['model']}: "
                  f"{tf['seconds'] / r['seconds']:.1f}x")
    if large:
        _timing.print_table(
            f"EKFAC at scale: {args.n_large} test x {args.n_train} train, λ={args.large_lambda:g}, "
            f"median of {args.repeats} (fit and score apart)",
            ("model", "params", "library", "precision", "fit", "score", "fit + score", "1st run", "Pearson",
             "against", "tf_influence / this"),
            [(r["model"], f"{r['params']:,}", r["library"], r["precision"], _fmt(r["fit"]), _fmt(r["score"]),
              _fmt(r["seconds"]), _fmt(r["first"]), f"{r['pearson']:.4f}", r["against"],
              f"{next(t['seconds'] for t in large if t['model'] == r['model']) / r['seconds']:.1f}x")
             for r in large])


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, λ=0.1, no at-scale rows")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run (ekfac brings kfac along)")
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.1, 0.01])
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (default 3; 1 with --quick)")
    parser.add_argument("--skip-large", action="store_true", help="skip the at-scale EKFAC rows")
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--n-large", type=int, default=1000, help="test points of the at-scale rows")
    parser.add_argument("--batch-size", type=int, default=1200, help="data batch of every library (small MLP)")
    parser.add_argument("--large-batch", type=int, default=400, help="data batch of every library (301k MLP)")
    parser.add_argument("--large-lambda", type=float, default=0.1)
    parser.add_argument("--large-peers", nargs="*", choices=("kronfluence", "pyDVL"), default=["kronfluence", "pyDVL"],
                        help="peers of the at-scale rows (pyDVL's float64 EKFAC takes longest there)")
    parser.add_argument("--lissa-scale", type=float, default=2.0)
    parser.add_argument("--lissa-batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for TensorFlow (intra- and inter-op) and torch alike; default: "
                             "each library's own (1 is steadier on a machine that other jobs load)")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of the 64-32-10 MLP")
    parser.add_argument("--large-epochs", type=int, default=30, help="training epochs of the 301k MLP")
    args = parser.parse_args(argv)
    if args.quick:
        args.lambdas, args.skip_large = [0.1], True
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv=None):
    """Runs the comparison; prints the tables and returns the rows (a list of dicts).

    Args:
      argv: command-line style options (see --help); None: sys.argv[1:].

    Returns:
      A list of dicts. Small-model rows: section="small", library, method, damping, seconds
      (median), first, times, pearson, max_rel, note, ratio_to_best_peer. At-scale rows:
      section="large", model, params, library, precision, fit, score, seconds, first, pearson.

    Example:
      >>> rows = main(["--quick", "--only", "cg", "ekfac"])
    """
    args = parse(sys.argv[1:] if argv is None else list(argv))
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if args.threads:  # before TensorFlow runs its first op
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    peers, versions = libs.available()
    print(_timing.machine_info())
    print(f"load average at start: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if peers:
        libs.setup(threads=args.threads)
        print(f"peers: {versions}")
    else:
        print(f"NOTE: peers not importable ({versions}); running the tf_influence rows only. "
              "Install them as benchmarks/README.md, section 'Peers', says (torch's CPU build first).")
    print(f"threads: {args.threads or 'library defaults'}")

    data = pm.digits(n_train=args.n_train, n_test=args.n_test, n_large=args.n_large)
    train = (data["x_train"], data["y_train"])
    start = time.perf_counter()
    model = pm.train_mlp((64, 32, 10), *train, epochs=args.epochs)
    print(f"trained MLP 64-32-10 ({pm.num_parameters(model):,} parameters) in {time.perf_counter() - start:.0f} s; "
          f"train accuracy {np.mean(np.argmax(model(data['x_train']), 1) == data['y_train']):.3f}")
    hessian = pm.keras_hessian(model, *train)
    g_train, g_test = pm.keras_gradients(model, *train), pm.keras_gradients(model, data["x_test"], data["y_test"])
    eigenvalues = np.linalg.eigvalsh(hessian)
    print(f"exact H (nested tapes): eigenvalues in [{eigenvalues[0]:.3g}, {eigenvalues[-1]:.3g}], "
          f"{int(np.sum(eigenvalues < 0))} negative; ‖mean gradient‖ = {np.linalg.norm(g_train.mean(0)):.2e}")
    twin = None
    if peers:
        twin = pm.torch_mlp_from_keras(model)
        diff = pm.check_logits(model, twin, np.concatenate([data["x_train"], data["x_test"], data["x_large"]]))
        perm = pm.keras_to_torch_permutation(model)
        h_torch, g_torch, gt_torch = pm.torch_hessian_and_gradients(twin, *train, data["x_test"], data["y_test"])
        agree = max(pm.compare(pm.exact_scores(h_torch, gt_torch, g_torch, d),
                               pm.exact_scores(hessian, g_test, g_train, d))[1] for d in args.lambdas)
        print(f"torch twin: max |logit difference| = {diff:.1e}; H differs from torch.func's by "
              f"{np.max(np.abs(hessian[np.ix_(perm, perm)] - h_torch)):.1e}, gradients by "
              f"{np.max(np.abs(g_train[:, perm] - g_torch)):.1e}; exact scores agree to {agree:.1e} (max rel.)")
    print(f"\nsmall MLP, {args.n_test} test x {args.n_train} train, batch {args.batch_size}:")
    rows = small_rows(args, data, model, twin, hessian, g_train, g_test, peers)

    if not args.skip_large:
        truth = pm.exact_scores(hessian, pm.keras_gradients(model, data["x_large"], data["y_large"]), g_train,
                                args.large_lambda)
        print(f"\nEKFAC at scale, {args.n_large} test x {args.n_train} train:")
        rows += large_rows(args, "MLP 64-32-10", model, twin, data, truth, peers)
        start = time.perf_counter()
        big = pm.train_mlp((64, 512, 512, 10), *train, epochs=args.large_epochs)
        big_twin = None
        if peers:
            big_twin = pm.torch_mlp_from_keras(big)
            diff = pm.check_logits(big, big_twin, np.concatenate([data["x_train"], data["x_large"]]))
            print(f"  trained MLP 64-512-512-10 ({pm.num_parameters(big):,} parameters) in "
                  f"{time.perf_counter() - start:.0f} s; max |logit difference| = {diff:.1e}")
        rows += large_rows(args, "MLP 64-512-512-10", big, big_twin, data, None, peers)

    print()
    print(_timing.machine_info())
    print(f"load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print_tables(rows, args, peers)
    return rows


if __name__ == "__main__":
    main()
