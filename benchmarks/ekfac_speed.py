"""tf_influence EKFAC/KFAC on the digits MLP of peers.py: CPU time of a cold and warm runs, fit and score
apart, and Pearson with the exact damped solve, for fisher="auto" (= exact Gauss-Newton "ggn" here) and
fisher="true" (one sampled label per example), at λ = 0.1 and 0.01.

Run: python benchmarks/ekfac_speed.py [--epochs 100] [--repeats 3]
(peers.py times the same computation beside pyDVL and kronfluence; this script separates fitting from
scoring and tracing (the 1st run in the process) from running.)
"""

import argparse
import os
import statistics
import sys
import time

import _peer_models as pm

import tf_influence as tfi


def run(model, train, test, method, fisher, damping):
    """One Influence from construction to scores; returns (fit CPU s, score CPU s, wall s, scores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    solver = (tfi.solvers.EKFAC if method == "ekfac" else tfi.solvers.KFAC)(seed=0, fisher=fisher)
    influence = tfi.Influence(model, pm.loss_fn(), train, method=solver, damping=damping, batch_size=1200,
                              progress=False)
    influence.prepared()
    fitted = time.process_time()
    scores = influence.scores(test)
    return fitted - cpu, time.process_time() - fitted, time.perf_counter() - wall, scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.1, 0.01])
    args = parser.parse_args(argv)
    data = pm.digits(n_train=1200, n_test=50, n_large=1000)
    train, test = (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
    model = pm.train_mlp((64, 32, 10), *train, epochs=args.epochs)
    hessian = pm.keras_hessian(model, *train)
    g_train, g_test = pm.keras_gradients(model, *train), pm.keras_gradients(model, *test)
    print(f"load average at start: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| method | fisher | λ | 1st run CPU (fit + score) | warm fit CPU | warm score CPU | warm wall | Pearson |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("ekfac", "kfac"):
        for fisher in ("auto", "true"):
            for damping in args.lambdas:
                runs = [run(model, train, test, method, fisher, damping) for _ in range(args.repeats)]
                truth = pm.exact_scores(hessian, g_test, g_train, damping)
                pearson, _ = pm.compare(runs[-1][3], truth)
                warm = runs[1:] or runs
                print(f"| {method} | {fisher} | {damping:g} | {runs[0][0] + runs[0][1]:.2f} s | "
                      f"{statistics.median(r[0] for r in warm):.2f} s | "
                      f"{statistics.median(r[1] for r in warm):.2f} s | "
                      f"{statistics.median(r[2] for r in warm):.2f} s | {pearson:.4f} |", flush=True)
    print(f"load average at end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
