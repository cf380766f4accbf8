"""EKFAC cost: factor fitting as a multiple of a training epoch, and scoring with EKFAC vs CG.

For an MLP and a small CNN (float32, generated data from scikit-learn's make_classification):
  * one training epoch (model.fit, measured after a warm-up epoch) and one gradient pass over the
    training data (HessianOperator.gradient), as the units of cost;
  * fitting EKFAC factors (two passes, fisher="true") and KFAC factors (one pass), first call
    (tracing included) and a second call;
  * scoring n_test test points against n_train training points with tfi.Influence:
    method="ekfac" measured whole (fit + test IHVPs + jvp scoring pass); method="cg" = its test
    IHVPs measured on --cg-test test points (iterations and seconds), scaled to n_test by the lower
    of two estimates (linear in test points; or iterations x a measured operator pass on 256 rows,
    Influence's solve chunk, x the number of chunks), plus the same jvp scoring pass, measured.
    Solving all 1,000 with CG would take tens of minutes on 2 cores; this keeps the run short.

Run: python benchmarks/ekfac.py [--n-train 10000 --n-test 1000 --cg-test 16]
Import (from a script in benchmarks/, e.g. run_all.py): `import ekfac; rows = ekfac.main([...])`, a list of dicts.
"""

import argparse
import sys
import time

import _timing
import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from tf_influence.curvature import fit_factors

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(d=64, classes=10):
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(64, activation="tanh"),
                             keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(classes)])


def cnn(classes=10):
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="tanh"),
                             keras.layers.Conv2D(16, 3, activation="tanh"), keras.layers.AveragePooling2D(2),
                             keras.layers.Flatten(), keras.layers.Dense(classes)])


def data(n, seed=0):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=64, n_informative=24, n_classes=10,
                               n_clusters_per_class=1, random_state=seed)
    return x.astype("float32"), y.astype("int64")


def _seconds(fn):
    start = time.perf_counter()
    result = fn()
    _timing._block(result)
    return time.perf_counter() - start, result


def bench(name, model, x, y, args):
    n_train, n_test = args.n_train, args.n_test
    train, test = (x[:n_train], y[:n_train]), (x[n_train:n_train + n_test], y[n_train:n_train + n_test])
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(*train, epochs=1, batch_size=args.batch, verbose=0)  # warm-up (tracing)
    epoch, _ = _seconds(lambda: model.fit(*train, epochs=1, batch_size=args.batch, verbose=0))
    model.fit(*train, epochs=3, batch_size=args.batch, verbose=0)

    operator = tfi.HessianOperator(model, LOSS, train, curvature="gauss_newton", batch_size=args.batch)
    operator.gradient()
    grad_pass, _ = _seconds(operator.gradient)

    objective = tfi.Objective(model, LOSS)
    fits = {}
    for method in ("ekfac", "kfac"):
        first, _ = _seconds(lambda: fit_factors(objective, train, method=method, batch_size=args.batch))
        second, _ = _seconds(lambda: fit_factors(objective, train, method=method, batch_size=args.batch))
        fits[method] = (first, second)

    common = dict(damping=args.damping, curvature="gauss_newton", batch_size=args.batch, progress=False)
    ekfac = tfi.Influence(model, LOSS, train, method="ekfac", **common)
    t_ekfac, ekfac_scores = _seconds(lambda: ekfac.scores(test))

    cg = tfi.Influence(model, LOSS, train, method="cg", tol=args.tol, maxiter=args.maxiter, **common)
    m = min(args.cg_test, n_test)
    cg.test_inverse_hvps((test[0][:8], test[1][:8]))  # warm-up (tracing)
    cg.clear_cache()
    t_cg_ihvp, cg_directions = _seconds(lambda: cg.test_inverse_hvps((test[0][:m], test[1][:m])))
    iterations = cg.last_solve_info.iterations
    directions = tf.constant(ekfac.test_inverse_hvps(test), ekfac.space.dtype)
    t_pass, _ = _seconds(lambda: [ekfac._dots(b, directions) for b in ekfac._train])  # the shared scoring pass
    t_cg_linear = t_cg_ihvp * n_test / m + t_pass
    # Influence solves up to 256 right-hand sides per CG run; one operator pass on 256 rows may cost
    # less than 256/m passes on m rows. Estimate from a measured 256-row pass too, keep the lower.
    rows = tf.constant(np.asarray(cg_directions)[np.arange(256) % m], cg.space.dtype)
    cg.operator.apply(rows[:m])
    t_pass_m, _ = _seconds(lambda: cg.operator.apply(rows[:m]))
    cg.operator.apply(rows)
    t_pass_256, _ = _seconds(lambda: cg.operator.apply(rows))
    t_cg_chunked = iterations * t_pass_256 * int(np.ceil(n_test / 256)) + t_pass
    t_cg = min(t_cg_linear, t_cg_chunked)
    cg_scores_m = np.concatenate([cg._dots(b, tf.constant(cg_directions)).numpy() for b in cg._train]).T
    pearson = float(np.corrcoef(ekfac_scores[:m].ravel(), cg_scores_m.ravel())[0, 1])

    params = ekfac.space.size
    row = lambda what, seconds, unit, note="": dict(  # noqa: E731
        model=name, params=params, what=what, seconds=seconds, epochs=seconds / epoch, unit=unit, note=note)
    return [
        row("one training epoch (model.fit)", epoch, "epoch"),
        row("one gradient pass (HessianOperator.gradient)", grad_pass, "pass"),
        row("EKFAC factors, 1st call (tracing)", fits["ekfac"][0], "fit"),
        row("EKFAC factors, 2nd call (traces again)", fits["ekfac"][1], "fit", f"{fits['ekfac'][1] / grad_pass:.1f} gradient passes"),
        row("KFAC factors, 2nd call (traces again)", fits["kfac"][1], "fit", f"{fits['kfac'][1] / grad_pass:.1f} gradient passes"),
        row(f"scores {n_test}x{n_train}, EKFAC (fit+solve+pass)", t_ekfac, "scores"),
        row(f"scores {n_test}x{n_train}, CG tol {args.tol:g} (estimate)", t_cg, "scores",
            f"{iterations} it; {m} test pts measured {t_cg_ihvp:.1f}s; {m}-row pass {t_pass_m:.2f}s, "
            f"256-row {t_pass_256:.2f}s; est. linear {t_cg_linear:.0f}s, 256-chunks {t_cg_chunked:.0f}s; "
            f"scoring pass {t_pass:.1f}s"),
        row("EKFAC vs CG speed-up", t_cg / t_ekfac, "ratio", f"Pearson EKFAC vs CG scores {pearson:.3f}"),
    ]


def main(argv=()):
    """Runs the benchmark; prints the table and returns its rows (a list of dicts).

    Args:
      argv: command-line style options (see --help); default: the defaults.

    Returns:
      A list of dicts with keys model, params, what, seconds, epochs (seconds / one epoch), unit, note
      (for the speed-up row, `seconds` holds the ratio).

    Example:
      >>> rows = main(["--n-train", "2000", "--n-test", "200"])
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=1_000)
    parser.add_argument("--cg-test", type=int, default=16, help="test points whose CG solves are timed")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--maxiter", type=int, default=200)
    args = parser.parse_args(list(argv))
    tf.get_logger().setLevel("ERROR")  # retracing notices of the per-call factor fitters
    keras.utils.set_random_seed(0)
    x, y = data(args.n_train + args.n_test)
    rows = bench("MLP", mlp(), x, y, args)
    rows += bench("CNN", cnn(), x.reshape(-1, 8, 8, 1), y, args)
    print(_timing.machine_info())
    _timing.print_table(
        f"EKFAC factor fitting and scoring, float32, batch {args.batch}, damping {args.damping:g}",
        ("model", "params", "what", "seconds", "/ epoch", "note"),
        [(r["model"], f"{r['params']:,}", r["what"],
          f"{r['seconds']:.2f}" + ("x" if r["unit"] == "ratio" else ""),
          "" if r["unit"] == "ratio" else f"{r['epochs']:.2f}", r["note"]) for r in rows])
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
