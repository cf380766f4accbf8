"""Linear datamodeling score (LDS; Park et al. 2023, TRAK) of every tf_influence method.

For 50 random half subsets S of the training data (seeded), the model is retrained on S and each
test point's loss measured; a method's prediction for S is `Σ_{i∉S} predicted_loss_change[test, i]`,
and the LDS is the mean over test points of the Spearman correlation (over subsets) between
prediction and measurement (`tfi.validation.linear_datamodeling_score`). Problems, retraining
recipes and the on-disk cache of retrained outcomes are in `benchmarks/_lds_problems.py`:
(a) logistic regression (convex, retrained to optimum), (b) a digits MLP 64-32-10 (full-batch
L-BFGS from two initialisations; their agreement is printed as the ceiling).

Every method in `METHODS` runs at each damping λ; a method this tf_influence does not know is
skipped with a note, and a run that fails (negative curvature, divergence, memory) is reported as
such. Baselines: the gradient dot product `g_testᵀ g_i / n` (no curvature: the λ → ∞ limit of
influence, up to scale) and random attributions. Times are attribution only (building the
`Influence`, fitting factors, solving, scoring), per test row. Peers (pyDVL, kronfluence) on the
identical weights plug in at `peer_attributions` below.

Run: python benchmarks/lds.py [--quick] [--problems logreg mlp] [--methods direct cg ...] [--no-peers]
     (retrained outcomes are cached in benchmarks/.cache/, so a rerun only recomputes attributions)
"""

import argparse
import dataclasses
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's tf_influence

import _lds_problems  # noqa: E402
import _timing  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_influence as tfi  # noqa: E402

DAMPINGS = (1e-3, 1e-2, 1e-1)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One tf_influence method as the LDS benchmark runs it: `tfi.solvers.make_solver(name, **options)`
    passed to `tfi.Influence` (an object, so that options such as LiSSA's `progress` reach the method)."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)
    curvature: str = "hessian"
    variant: str = ""  # shown after the name, e.g. "refined tol=0.1"

    @property
    def label(self):
        label = f"{self.name} {self.variant}".strip()
        return label if self.curvature == "hessian" else f"{label} ({self.curvature})"


# Add new methods here (e.g. when tf_influence gains them); unknown names are skipped with a note.
METHODS = (
    MethodSpec("direct"),
    MethodSpec("cg", dict(tol=1e-8, maxiter=2000)),
    MethodSpec("lissa", dict(seed=0, progress=False)),
    MethodSpec("ekfac", dict(seed=0)),
    MethodSpec("ekfac", dict(seed=0, tol=0.1), variant="refined tol=0.1"),
    MethodSpec("kfac", dict(seed=0)),
    MethodSpec("arnoldi", dict(rank=200, seed=0), variant="rank=200"),
    MethodSpec("chain"),
)


def run_method(problem, spec, damping):
    """Attributions of one method at one damping: (matrix or None, seconds, note)."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method = tfi.solvers.make_solver(spec.name, **spec.options)
            inf = tfi.Influence(problem.model, problem.loss, problem.train, method=method, damping=damping,
                                l2=problem.l2, curvature=spec.curvature, progress=False)
            attributions = inf.predicted_loss_change(problem.test)
    except tfi.InputError as e:
        if "Unknown method" in str(e):
            return None, 0.0, f"skipped: this tf_influence has no method {spec.name!r}"
        return None, time.perf_counter() - start, f"FAILED: {_first_line(e)}"
    except (tfi.InfluenceError, tf.errors.OpError, ValueError, ArithmeticError) as e:
        return None, time.perf_counter() - start, f"FAILED ({type(e).__name__}): {_first_line(e)}"
    seconds = time.perf_counter() - start
    notes = []
    info = inf.last_solve_info
    if info is not None and info.iterations:
        notes.append(f"{info.iterations} it")
    if info is not None and np.isfinite(info.residual):
        notes.append(f"residual {info.residual:.0e}{' (est.)' if info.residual_is_estimate else ''}")
    if info is not None and not info.converged:
        notes.append("NOT converged")
    notes += [f"warning: {_first_line(w.message)[:90]}" for w in caught
              if not issubclass(w.category, (DeprecationWarning, ResourceWarning))][:1]
    return attributions, seconds, "; ".join(notes)


def gradient_dot(problem):
    """`g_testᵀ g_i / n` from per-example gradients (all trainable weights), no curvature."""
    start = time.perf_counter()
    variables = [v.value for v in problem.model.trainable_variables]

    @tf.function
    def per_example(x, y):
        with tf.GradientTape() as tape:
            losses = problem.loss(y, problem.model(x))
        jac = tape.jacobian(losses, variables)
        return tf.concat([tf.reshape(j, [tf.shape(losses)[0], -1]) for j in jac], axis=1)

    g_train = per_example(*map(tf.constant, problem.train)).numpy()
    g_test = per_example(*map(tf.constant, problem.test)).numpy()
    return g_test @ g_train.T / len(g_train), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# PEER HOOK — pyDVL and kronfluence on the identical weights, exported to PyTorch by the peers benchmark's
# helpers (`benchmarks/_peer_models.py`: torch_mlp_from_keras, check_logits; `benchmarks/_peer_libs.py`:
# available, setup, pydvl_run, kronfluence_run). Until those modules are importable (and torch, pyDVL and
# kronfluence installed: see benchmarks/README.md), the hook returns None and the tables have no peer rows.
# The peers minimise the mean cross-entropy without the l2 term, so they get λ + l2 to solve the same
# system (H_loss + l2·I + λI) x = b; their scores g_tᵀ(...)⁻¹g_i (positive = helpful) are divided by n to
# give predicted loss changes. Only the softmax MLP is exported (the peers' loss is F.cross_entropy).
# ---------------------------------------------------------------------------------------------------------

PEER_METHODS = (("pyDVL", "direct"), ("pyDVL", "cg"), ("pyDVL", "ekfac"), ("pyDVL", "kfac"),
                ("kronfluence", "ekfac"), ("kronfluence", "kfac"))


def peer_attributions(problem, dampings, log=print):
    """`{(label, λ): (attributions [n_test, n_train] or None, seconds, note)}` from the peers, or None when the
    peers are not importable. A peer run that raises is kept as a row with its error as the note."""
    try:
        import _peer_libs
        import _peer_models
    except ImportError as e:
        log(f"[{problem.name}] peers not run: {e} (the peers benchmark's helpers are not here)")
        return None
    available, why = _peer_libs.available()
    if not available:
        log(f"[{problem.name}] peers not run: {why}")
        return None
    if problem.loss_name != "sparse_categorical_crossentropy":
        log(f"[{problem.name}] peers not run: only the softmax MLP is exported to PyTorch")
        return None
    _peer_libs.setup()
    twin = _peer_models.torch_mlp_from_keras(problem.model)
    _peer_models.check_logits(problem.model, twin, problem.train[0])
    n = len(problem.train[1])
    out = {}
    for library, method in PEER_METHODS:
        for damping in dampings:
            label = (f"{library} {method}", damping)
            if library == "pyDVL":
                run = _peer_libs.pydvl_run(method, twin, problem.train, problem.test, damping + problem.l2,
                                           batch_size=n, cg_rtol=1e-4)
            else:
                run = _peer_libs.kronfluence_run(method, twin, problem.train, problem.test,
                                                 damping + problem.l2, batch_size=n)
            start = time.perf_counter()
            try:
                out[label] = (run() / n, time.perf_counter() - start, "")
            except Exception as e:  # noqa: BLE001 - a peer's failure is a row, not a crash
                out[label] = (None, time.perf_counter() - start, f"FAILED ({type(e).__name__}): {_first_line(e)}")
    return out


def lds(problem, attributions):
    """(LDS, its standard error over test points) of an attribution matrix against the cached outcomes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant rows (e.g. a point every subset leaves alone)
        result = tfi.validation.linear_datamodeling_score(
            attributions, problem.lookup, num_subsets=problem.num_subsets, fraction=_lds_problems.FRACTION,
            seed=_lds_problems.SUBSET_SEED)
    per_test = result.per_test[np.isfinite(result.per_test)]
    return result.score, float(np.std(per_test, ddof=1) / np.sqrt(len(per_test)))


def evaluate(problem, methods, dampings, *, with_peers=True, log=print):
    """Rows (dicts) of LDS and time for every method × damping, the baselines and the peers."""
    n_test = len(problem.test[1])
    rows = []

    def add(label, damping, attributions, seconds, note=""):
        score, err = lds(problem, attributions) if attributions is not None else (None, None)
        rows.append(dict(problem=problem.name, method=label, damping=damping, lds=score, stderr=err,
                         seconds=seconds, ms_per_row=1e3 * seconds / n_test, note=note))
        shown = "n/a" if score is None else f"{score:.3f}"
        log(f"[{problem.name}] {label:<22} λ={damping if damping is not None else '-'}: LDS {shown} "
            f"({seconds:.1f} s) {note}")

    for spec in methods:
        for damping in dampings:
            attributions, seconds, note = run_method(problem, spec, damping)
            if note.startswith("skipped"):
                add(spec.label, None, None, seconds, note)
                break
            add(spec.label, damping, attributions, seconds, note)
    attributions, seconds = gradient_dot(problem)
    add("gradient dot product", None, attributions, seconds, "g_testᵀ g_i, no curvature")
    random = np.random.default_rng(0).standard_normal(attributions.shape)
    add("random", None, random, 0.0)
    peers = peer_attributions(problem, dampings, log) if with_peers else None
    for (label, damping), (attributions, seconds, note) in (peers or {}).items():
        add(f"peer: {label}", damping, attributions, seconds, note)
    return rows


def print_rows(problem, rows):
    table = []
    for r in rows:
        score = "n/a" if r["lds"] is None else f"{r['lds']:.3f}"
        err = "" if r["stderr"] is None else f"{r['stderr']:.3f}"
        damping = "" if r["damping"] is None else f"{r['damping']:g}"
        timing = "" if r["note"].startswith("skipped") else f"{r['seconds']:.2f}"
        per_row = "" if r["note"].startswith("skipped") else f"{r['ms_per_row']:.1f}"
        note = r["note"] if len(r["note"]) <= 110 else r["note"][:107] + "..."
        table.append((r["problem"], r["method"], damping, score, err, timing, per_row, note))
    _timing.print_table(f"LDS, {problem.title}; {problem.num_subsets} half subsets",
                        ("problem", "method", "λ", "LDS", "± s.e.", "seconds", "ms / test row", "note"), table)
    if np.isfinite(problem.ceiling):
        print(f"ceiling ({problem.name}): Spearman between the two initialisations' retrained test losses "
              f"(over subsets, mean over test points) = {problem.ceiling:.3f}")
    else:
        print(f"ceiling ({problem.name}): 1 (convex, unique optimum: retraining is deterministic)")
    state = "loaded from cache" if problem.cached else "computed now"
    print(f"retraining ({problem.name}): {problem.per_init.shape[0]} x {problem.num_subsets} models, "
          f"{problem.retrain_seconds:.0f} s ({state}); max final gradient norm {problem.max_gradient_norm:.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 subsets, MLP with 300 train / 30 test points")
    parser.add_argument("--problems", nargs="+", choices=sorted(_lds_problems.PROBLEMS), default=["logreg", "mlp"])
    parser.add_argument("--methods", nargs="+", help="method names to run (default: all in METHODS); an unknown "
                        "name (e.g. 'none') is skipped, so '--methods none' runs only the baselines and the peers")
    parser.add_argument("--dampings", nargs="+", type=float, default=list(DAMPINGS))
    parser.add_argument("--subsets", type=int, help="number of half subsets (default 50, quick 12)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer hook")
    args = parser.parse_args(argv)
    methods = [m for m in METHODS if args.methods is None or m.name in args.methods]
    methods += [MethodSpec(name) for name in args.methods or () if name not in {m.name for m in METHODS}]
    num_subsets = args.subsets or (12 if args.quick else 50)
    print(_timing.machine_info())
    all_rows = []
    for name in args.problems:
        sizes = dict(n_train=300, n_test=30) if args.quick and name == "mlp" else {}
        start = time.perf_counter()
        problem = _lds_problems.PROBLEMS[name](num_subsets=num_subsets, **sizes)
        rows = evaluate(problem, methods, args.dampings, with_peers=not args.no_peers)
        print_rows(problem, rows)
        print(f"{name}: {time.perf_counter() - start:.0f} s in all (retraining included when not cached)")
        all_rows += rows
    return all_rows


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    main()
