"""IHVP solvers on an MLP with ~50k parameters and 5,000 training examples (float64).

Measured side by side in one run, on one damped Hessian `H + λI`:
  * compiled CG (`tfi.solvers.cg`) vs a `scipy.optimize.fmin_ncg` loop over NumPy vectors (the
    seeds' / Koh & Liang's approach), both stopped the moment the relative residual
    `‖(H + λI)x − b‖ / ‖b‖` reaches 1e-6;
  * LiSSA (exact products, and minibatches): recursion depth and time to 1e-2 relative error
    against a CG reference solved to 1e-10;
  * the cost of one CG iteration as a multiple of one full-data gradient.

Run: python benchmarks/solvers.py [--examples 5000] [--quick]
"""

import argparse
import time

import _timing
import keras
import numpy as np
import scipy.optimize
import tensorflow as tf

import tf_influence as tfi
from tf_influence.solvers import cg, lissa

TARGET_RESIDUAL = 1e-6
LISSA_TARGET_ERROR = 1e-2


def problem(n, hidden, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    d, classes = 64, 10
    x = rng.standard_normal((n, d))
    y = np.argmax(x @ rng.standard_normal((d, classes)) + 2 * rng.standard_normal((n, classes)), axis=1)
    model = keras.Sequential([keras.Input((d,), dtype="float64")]
                             + [keras.layers.Dense(h, activation="tanh", dtype="float64") for h in hidden]
                             + [keras.layers.Dense(classes, dtype="float64")])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, epochs=5, batch_size=100, verbose=0)  # near (not at) a minimum: H is indefinite
    return model, loss, x, y


class _StopAtResidual(Exception):
    pass


def scipy_fmin_ncg(operator, b, target, maxiter=200):
    """The seeds' loop: f, ∇f and Hp over NumPy vectors; stops once ‖Ax − b‖/‖b‖ ≤ target."""
    b = np.asarray(b, dtype=np.float64)
    b_norm = np.linalg.norm(b)
    cache = {}
    counts = dict(products=0, newton=0)

    def times(v):
        counts["products"] += 1
        return operator.apply(tf.constant(v[np.newaxis]))[0].numpy()

    def ax(x):
        key = x.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = times(x)
        return cache[key]

    def callback(x):
        counts["newton"] += 1
        if np.linalg.norm(ax(x) - b) / b_norm <= target:
            raise _StopAtResidual(x)

    start = time.perf_counter()
    try:
        x = scipy.optimize.fmin_ncg(lambda x: 0.5 * x @ ax(x) - b @ x, b.copy(), fprime=lambda x: ax(x) - b,
                                    fhess_p=lambda x, p: times(p), callback=callback, avextol=1e-16,
                                    maxiter=maxiter, disp=False)
    except _StopAtResidual as stop:
        x = stop.args[0]
    seconds = time.perf_counter() - start
    residual = np.linalg.norm(ax(x) - b) / b_norm
    return x, seconds, residual, counts


def lissa_to_error(operator, b, reference, *, scale, batch_size, start_depth, max_depth, seed=0):
    """Doubles the recursion depth until the relative error is ≤ LISSA_TARGET_ERROR (or max_depth)."""
    depth, runs = start_depth, []
    while True:
        start = time.perf_counter()
        x, info = lissa(operator, b, scale=scale, batch_size=batch_size, recursion_depth=depth, seed=seed,
                        progress=False, check_residual=False)
        seconds = time.perf_counter() - start
        error = float(np.linalg.norm(x.numpy() - reference) / np.linalg.norm(reference))
        runs.append((depth, error, seconds))
        if error <= LISSA_TARGET_ERROR or depth >= max_depth:
            return runs
        depth = min(2 * depth, max_depth)


def lissa_samples_to_error(operator, b, reference, *, scale, batch_size, depth, max_samples, seed=0):
    """Doubles num_samples (minibatch noise averages out like 1/√samples) until the error target."""
    samples, runs = 4, []
    while True:
        start = time.perf_counter()
        x, _ = lissa(operator, b, scale=scale, batch_size=batch_size, recursion_depth=depth,
                     num_samples=samples, seed=seed, progress=False, check_residual=False)
        seconds = time.perf_counter() - start
        error = float(np.linalg.norm(x.numpy() - reference) / np.linalg.norm(reference))
        runs.append((samples, error, seconds))
        if error <= LISSA_TARGET_ERROR or samples >= max_samples:
            return runs
        samples *= 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--mode", default="forward_over_back", help="HessianOperator mode")
    parser.add_argument("--quick", action="store_true", help="a tiny model, to check the script runs")
    args = parser.parse_args()
    hidden = (16,) if args.quick else (256, 128)
    n = 500 if args.quick else args.examples
    print(_timing.machine_info())

    model, loss, x, y = problem(n, hidden)
    undamped = tfi.HessianOperator(model, loss, (x, y), batch_size=args.batch_size, mode=args.mode)
    p = undamped.space.size
    spectrum = tfi.extreme_eigenvalues(undamped, num_iterations=30)
    # Damping: enough to make H + λI positive definite, plus 2% of the largest eigenvalue.
    damping = spectrum.suggested_damping + 0.02 * spectrum.largest
    operator = undamped.with_options(damping=damping)
    print(f"MLP {hidden}: p = {p:,} parameters, n = {n:,} examples, batch {args.batch_size}, {args.mode}; "
          f"H: {spectrum}; "
          f"damping λ = {damping:.4g}")

    rng = np.random.default_rng(1)
    b = rng.standard_normal((8, p))
    t_grad = _timing.median_time(operator.gradient, repeats=5)
    t_apply = _timing.median_time(lambda: operator.apply(tf.constant(b[:1])), repeats=5)

    cg(operator, b[:1], tol=1e-2)  # trace the compiled loops outside the timings
    cg(operator, b, tol=1e-2)
    reference, ref_info = cg(operator, b[:1], tol=1e-10)
    reference = reference.numpy()[0]

    rows = []
    start = time.perf_counter()
    _, info1 = cg(operator, b[:1], tol=TARGET_RESIDUAL)
    t_cg1 = time.perf_counter() - start
    start = time.perf_counter()
    _, info8 = cg(operator, b, tol=TARGET_RESIDUAL)
    t_cg8 = time.perf_counter() - start
    _, t_scipy, scipy_residual, counts = scipy_fmin_ncg(operator, b[0], TARGET_RESIDUAL)
    rows.append(("CG, compiled (tfi.solvers.cg)", 1, f"{info1.iterations} iterations", info1.iterations,
                 f"{info1.residual:.1e}", f"{t_cg1:.1f}", f"{t_cg1 / t_grad:.0f}"))
    rows.append(("CG, compiled, 8 RHS together", 8, f"{info8.iterations} iterations", info8.iterations,
                 f"{info8.residual:.1e}", f"{t_cg8:.1f}", f"{t_cg8 / t_grad:.0f}"))
    rows.append(("scipy fmin_ncg loop over NumPy", 1, f"{counts['newton']} Newton iterations",
                 counts["products"], f"{scipy_residual:.1e}", f"{t_scipy:.1f}", f"{t_scipy / t_grad:.0f}"))
    rows.append(("scipy fmin_ncg loop, 8 RHS (8 × the above, one at a time)", 8, "", 8 * counts["products"], "",
                 f"{8 * t_scipy:.1f}", f"{8 * t_scipy / t_grad:.0f}"))

    lam_max = spectrum.largest + damping
    lam_min = max(spectrum.smallest + damping, 1e-3 * lam_max)
    scale = 1.1 * lam_max
    predicted = int(np.ceil(np.log(LISSA_TARGET_ERROR) / np.log(1 - lam_min / scale)))
    lissa_rows = []
    runs = lissa_to_error(operator, b[0], reference, scale=scale, batch_size=None,
                          start_depth=max(8, predicted // 4), max_depth=4 * predicted)
    exact_depth = runs[-1][0]
    lissa_rows.append(_lissa_row("LiSSA, exact products (batch_size=None), 1 sample", runs, t_grad))
    runs = lissa_to_error(operator, b[0], reference, scale=scale, batch_size=args.batch_size,
                          start_depth=max(8, predicted // 4), max_depth=8 * predicted)
    lissa_rows.append(_lissa_row(f"LiSSA, minibatch {args.batch_size}, 1 sample (depth doubled)", runs, t_grad))
    runs = lissa_samples_to_error(operator, b[0], reference, scale=scale, batch_size=args.batch_size,
                                  depth=exact_depth, max_samples=64)
    samples, error, seconds = runs[-1]
    reached = "" if error <= LISSA_TARGET_ERROR else " (NOT reached)"
    lissa_rows.append((f"LiSSA, minibatch {args.batch_size}, depth {exact_depth}, samples doubled",
                       f"{samples} × {exact_depth}{reached}", f"{error:.1e}", f"{seconds:.1f}",
                       f"{seconds / t_grad:.0f}", "; ".join(f"{s} samples:{e:.1e}" for s, e, _ in runs)))

    per_iteration = t_cg1 / max(info1.iterations, 1)
    _timing.print_table(
        f"Solve (H + λI) x = b to relative residual {TARGET_RESIDUAL:g} (p = {p:,}, n = {n:,})",
        ("method", "RHS", "iterations", "operator products", "final residual", "seconds", "× gradient"),
        rows)
    _timing.print_table(
        f"LiSSA to relative error {LISSA_TARGET_ERROR:g} vs CG at 1e-10 (scale = {scale:.3g}; depth doubled until reached)",
        ("method", "steps (samples × depth)", "error", "seconds (last run)", "× gradient", "each run"),
        lissa_rows)
    _timing.print_table(
        "Cost of one CG iteration",
        ("quantity", "seconds", "× full-data gradient"),
        [("full-data gradient (operator.gradient)", f"{t_grad:.3f}", "1.0"),
         ("one operator.apply, 1 vector", f"{t_apply:.3f}", f"{t_apply / t_grad:.1f}"),
         ("one CG iteration, 1 RHS (loop time / iterations)", f"{per_iteration:.3f}", f"{per_iteration / t_grad:.1f}"),
         ("one CG iteration, 8 RHS", f"{t_cg8 / max(info8.iterations, 1):.3f}",
          f"{t_cg8 / max(info8.iterations, 1) / t_grad:.1f}")])
    print(f"\nCG speed-up over the scipy loop, 1 RHS: {t_scipy / t_cg1:.1f}x; 8 RHS: {8 * t_scipy / t_cg8:.1f}x. "
          f"Reference solve: {ref_info.iterations} CG iterations to 1e-10.")


def _lissa_row(label, runs, t_grad):
    depth, error, seconds = runs[-1]
    reached = "" if error <= LISSA_TARGET_ERROR else " (NOT reached)"
    return (label, f"{depth}{reached}", f"{error:.1e}", f"{seconds:.1f}", f"{seconds / t_grad:.0f}",
            "; ".join(f"depth {d}:{e:.1e}" for d, e, _ in runs))


if __name__ == "__main__":
    main()
