"""The cost model behind `method="auto"`: time and memory estimates of each route for one problem.

Routes (each a method of `tf_influence.solvers`), with p selected parameters, n training examples,
k right-hand sides (test points), F the model's forward flops per example:

  direct  dense `H + λI` (p exact curvature products) and a Cholesky factor: time ~ p·n·4F + p³/3,
          memory ~ 3·p²·8 bytes; exact; afterwards every solve is two triangular solves.
  chain   the exact Riccati sweep for Dense chains (`tf_influence.curvature.chain_plan`): time ~
          Σ_layers p³ + p²a + pa² + a³ with a = n·width; memory `chain_blocks.memory_estimate`.
  cg      conjugate gradient on exact products, EKFAC-preconditioned where EKFAC applies: time ~
          iterations·k·n·4F, memory ~ 6 rows of p per right-hand side in a chunk; exact to `tol`.
  ekfac_refined
          EKFAC, then preconditioned CG on the exact curvature to a relative residual of 0.1
          (`EKFAC(tol=0.1)`): EKFAC's time plus ~`REFINE_ITERATIONS` CG iterations; approximate, but
          close to exact where one-shot EKFAC is not (small damping; Pearson ≥ 0.99 measured, README).
  ekfac   Kronecker-factored Gauss-Newton: two passes of ~(1 + 2C)F per example (C output targets:
          the output entries for the exact expectation), per-layer eigendecompositions; memory ~
          Σ_layers d_in² + d_out² + d_in·d_out; approximate.

The constants (`DATA_FLOPS_PER_SECOND`, `BLAS_FLOPS_PER_SECOND`, `CG_ITERATIONS`) are rough CPU
figures; the estimates order the routes, they do not promise seconds. A route is applicable when the
static checks its method makes pass (layer support, second-derivative traps, loss) and its memory
fits the budget; `Auto` still falls back to the next route when preparing one fails.

Example:
  >>> plan = plan_routes(source, n_test=100, memory_bytes=2**30)
  >>> print(plan)                  # a table, the chosen route marked with *
  >>> plan.chosen.name
  'direct'

Choice: the cheapest applicable exact route, where direct counts as cheapest unless another is
estimated `DIRECT_PREFERENCE` times cheaper. When the chosen exact route is estimated above
`max_seconds`, an approximate route estimated cheaper than it: refined EKFAC when it applies (exact
curvature products), else one-shot EKFAC. When no exact route applies, EKFAC (refinement needs the
same exact products).
"""

import dataclasses
import math
import os
import warnings

import numpy as np

from tf_influence.curvature.capture import find_blocks
from tf_influence.curvature.chain_blocks import memory_estimate
from tf_influence.curvature.chain_plan import loss_spec, plan_stages
from tf_influence.curvature.targets import EXACT_MAX_OUTPUTS
from tf_influence.errors import InfluenceError
from tf_influence.layers import leaf_layers
from tf_influence.operators.damping import LANCZOS_ITERATIONS
from tf_influence.operators.hessian import MAX_DENSE_SIZE
from tf_influence.operators.rows import operator_size
from tf_influence.traps import second_derivative_traps

DATA_FLOPS_PER_SECOND = 5e9  # curvature products through TensorFlow on a CPU core, small models
BLAS_FLOPS_PER_SECOND = 1e10  # float64 dense factorisations (LAPACK)
HVP_FORWARDS = 4  # one curvature-vector product per example ≈ 4 forward passes
REFINE_ITERATIONS = 10  # CG iterations of EKFAC(tol=0.1): 3-22 measured at λ = 0.1-0.001 (README)
CG_ITERATIONS = 100  # a guess for H + λI with condition ~100 (the default damping's target) and tol 1e-6
CG_CHUNK = 256  # right-hand sides solved together (Influence solves in chunks of this size)
MEMORY_FRACTION = 0.5  # of the available memory, when no budget is given
SETUP_SECONDS = 1.0  # tracing and compiling a route's functions
BATCH_SECONDS = 0.002  # fixed cost of one batch in one data pass
DIRECT_PREFERENCE = 2.0  # direct is chosen unless another exact route is estimated this many times cheaper
DENSE_CHUNK = 256  # rows of the dense matrix per data pass (curvature/dense.py's pfor chunks)
DENSE_ROW_SPEEDUP = 3.5  # a vectorised dense row costs this much less than one curvature product
#                          (benchmarks/dense.py, 2,410-parameter MLP: 8.7 s CPU against 31 s for p products)
ROUTES = ("direct", "chain", "cg", "ekfac_refined", "ekfac")  # approximate routes: most accurate first
REFINE_TOL = 0.1  # the refined route's relative residual


@dataclasses.dataclass(frozen=True)
class Route:
    """One method's estimated cost for a problem.

    Attributes:
      name: the route name (`ROUTES`: "direct", "chain", "cg", "ekfac_refined", "ekfac").
      exact: True when the route solves `(H + λI) x = b` itself (to rounding or to CG's tolerance).
      applicable: whether the static checks pass and the memory fits the budget.
      seconds: estimated time of preparing the route and solving the planned right-hand sides.
      memory_bytes: estimated peak memory of the route's own state.
      note: why the route is (not) applicable, or what it would do.
    """

    name: str
    exact: bool
    applicable: bool
    seconds: float
    memory_bytes: float
    note: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """The routes of one problem, cheapest applicable exact route chosen (an approximate one when none fits in time).

    Attributes:
      routes: the `Route`s in `ROUTES` order.
      chosen: the chosen `Route`.
      reason: one sentence saying why it was chosen.
      p, n_train, n_test: the problem size the plan was made for.
      memory_budget: bytes a route may use.
    """

    routes: tuple
    chosen: Route
    reason: str
    p: int
    n_train: int
    n_test: int
    memory_budget: float

    def route(self, name):
        """The `Route` called `name`."""
        return next(r for r in self.routes if r.name == name)

    def order(self):
        """The applicable routes to try: the chosen one first, then the exact ones cheapest first, then the
        approximate ones most accurate first."""
        rest = sorted((r for r in self.routes if r.applicable and r is not self.chosen),
                      key=lambda r: (not r.exact, r.seconds if r.exact else ROUTES.index(r.name)))
        return [self.chosen] + rest if self.chosen.applicable else rest

    def __str__(self):
        lines = [f"Plan for p={self.p} parameters, n_train={self.n_train}, n_test={self.n_test} (memory budget "
                 f"{_bytes(self.memory_budget)}):",
                 f"    {'route':<13} {'exact':<6} {'est. time':>10} {'memory':>10}  note"]
        for r in self.routes:
            mark = "*" if r is self.chosen else " "
            time = _seconds(r.seconds) if r.applicable or math.isfinite(r.seconds) else "-"
            lines.append(f"  {mark} {r.name:<13} {'yes' if r.exact else 'no':<6} {time:>10} "
                         f"{_bytes(r.memory_bytes):>10}  {r.note}")
        lines.append(f"  * chosen: {self.reason}")
        return "\n".join(lines)


def available_memory():
    """Bytes of memory available now (MemAvailable on Linux; physical pages elsewhere; 4 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def forward_flops(model):
    """Rough forward flops per example: 2·(weights)·(positions) summed over the layers holding weights."""
    total = 0
    for layer in leaf_layers(model):
        size = sum(int(np.prod(w.shape)) for w in layer.weights)
        if not size:
            continue
        positions = 1
        try:
            shape = layer.output.shape
            positions = int(np.prod([d for d in shape[1:-1] if d])) if len(shape) > 2 else 1
        except (AttributeError, ValueError, TypeError):
            pass
        total += 2 * size * positions
    return max(total, 1)


def plan_routes(source, *, n_test=100, self_influence=False, memory_bytes=None, max_seconds=600.0,
                direct_max_size=MAX_DENSE_SIZE, tol=1e-6, refine_tol=REFINE_TOL):
    """The `Plan` for a `CurvatureSource`: every route's estimated time and memory, and the choice.

    Args:
      source: a `CurvatureSource` (its problem, curvature, damping and HVP options are read, nothing built).
      n_test: right-hand sides to plan for (test points).
      self_influence: also plan for one solve per training example.
      memory_bytes: memory budget in bytes; None: `MEMORY_FRACTION` of `available_memory()`.
      max_seconds: above this estimate for the cheapest exact route, a cheaper EKFAC is chosen.
      direct_max_size: largest p the direct route densifies.
      tol: CG's tolerance (its iteration guess grows with log(1/tol)).
      refine_tol: the refined EKFAC route's relative residual; None: no refined route.

    Returns:
      A `Plan`. Choice: the cheapest applicable exact route (direct, chain, cg); when that is estimated
      above `max_seconds`, refined EKFAC or else EKFAC, if cheaper; EKFAC when no exact route applies.
    """
    budget = float(memory_bytes) if memory_bytes is not None else MEMORY_FRACTION * available_memory()
    problem = source.problem
    p = operator_size(source.hessian()) if problem is None else problem.space.size
    n = problem.num_examples if problem is not None else 1
    flops = forward_flops(problem.model) if problem is not None else 2 * p
    k = n_test + (n if self_influence else 0)
    batches = _batches(problem)
    vector_seconds = n * HVP_FORWARDS * flops / DATA_FLOPS_PER_SECOND  # one curvature-vector product over the data
    pass_seconds = batches * BATCH_SECONDS  # the fixed cost of one pass over the data
    lanczos = LANCZOS_ITERATIONS * (vector_seconds + pass_seconds) if source.damping_choice is None else 0.0
    exact_note = _exact_products_problem(source)
    iterations = min(p, int(round(CG_ITERATIONS * max(1.0, math.log10(1.0 / tol) / 6.0))))
    ekfac = _ekfac(source, n, k, flops, pass_seconds, budget)
    routes = [
        _direct(p, vector_seconds, pass_seconds, lanczos, budget, direct_max_size, exact_note),
        _chain(source, n, budget, lanczos),
        _cg(p, k, iterations, vector_seconds, pass_seconds, lanczos, exact_note, _ekfac_blocks(source)),
        _refined(ekfac, p, k, vector_seconds, pass_seconds, lanczos, exact_note, refine_tol),
        ekfac,
    ]
    chosen, reason = _choose(routes, max_seconds)
    return Plan(tuple(routes), chosen, reason, p, n, n_test, budget)


def _choose(routes, max_seconds):
    exact = [r for r in routes if r.applicable and r.exact]
    ekfac = next(r for r in routes if r.name == "ekfac")
    refined = next(r for r in routes if r.name == "ekfac_refined")
    cheapest = best = min(exact, key=lambda r: r.seconds, default=None)
    direct = routes[0]
    if best is not None and direct.applicable and direct.seconds <= DIRECT_PREFERENCE * best.seconds:
        best = direct  # the simplest exact route (any model, an exact residual) unless much dearer
    if best is None:
        if ekfac.applicable:
            return ekfac, ("no exact route applies here (see their notes); EKFAC approximates the damped "
                           "Gauss-Newton solve")
        return routes[0], "no route applies (see their notes)"
    if best.seconds > max_seconds:
        cheaper = [r for r in (refined, ekfac) if r.applicable and r.seconds < best.seconds]
        if cheaper:
            approximate = cheaper[0]
            return approximate, (f"the cheapest exact route ({best.name}) is estimated at {_seconds(best.seconds)}, "
                                 f"above max_seconds={max_seconds:g}; {approximate.name} approximates it in "
                                 f"~{_seconds(approximate.seconds)}")
    others = ", ".join(f"{r.name} ~{_seconds(r.seconds)}" for r in exact if r is not best)
    what = ("the cheapest exact route" if best is cheapest else
            f"within {DIRECT_PREFERENCE:g}x of the cheapest exact route ({cheapest.name}) and the simplest")
    return best, (f"{best.name} is {what} (~{_seconds(best.seconds)}, "
                  f"{_bytes(best.memory_bytes)})" + (f"; {others}" if others else ""))


def _exact_products_problem(source):
    """Why exact curvature products cannot be built (None when they can), from the static trap check."""
    problem, options = source.problem, source.hessian_options
    if problem is None or source.curvature != "hessian" or options.get("mode") == "finite_difference":
        return None
    if options.get("on_unsafe_layers", "raise") != "raise":
        return None
    traps = second_derivative_traps(problem.model, problem.variables, training=problem.objective.training)
    if traps:
        return (f"TensorFlow's second derivatives through {traps} are wrong, so exact Hessian products are refused "
                "(curvature='gauss_newton' or mode='finite_difference' allow them)")
    return None


def _batches(problem):
    if problem is None:
        return 1
    cardinality = problem.num_batches
    return cardinality if cardinality > 0 else max(1, problem.num_examples // 32)


def _direct(p, vector_seconds, pass_seconds, lanczos, budget, max_size, problem_note):
    memory = 3.0 * p * p * 8
    build = p * vector_seconds / DENSE_ROW_SPEEDUP + math.ceil(p / DENSE_CHUNK) * pass_seconds
    seconds = SETUP_SECONDS + lanczos + build + p ** 3 / 3 / BLAS_FLOPS_PER_SECOND
    if problem_note:
        return Route("direct", True, False, seconds, memory, problem_note)
    if p > max_size:
        return Route("direct", True, False, seconds, memory, f"p={p} > direct_max_size={max_size}")
    if memory > budget:
        return Route("direct", True, False, seconds, memory, f"dense {p}x{p} matrix does not fit the memory budget")
    passes = math.ceil(p / DENSE_CHUNK)
    return Route("direct", True, True, seconds, memory, f"dense {p}x{p} matrix in {passes} data passes, Cholesky")


def _chain(source, n, budget, lanczos):
    problem = source.problem
    if problem is None:
        return Route("chain", True, False, math.inf, math.nan, "needs a model (no problem behind this operator)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plan_stages warns about kinked activations; Chain itself will too
            _, stages = plan_stages(problem.model, problem.variables, loss_spec(problem.objective),
                                    training=problem.objective.training, curvature=source.curvature)
    except (InfluenceError, ValueError, TypeError, AttributeError) as e:
        return Route("chain", True, False, math.inf, math.nan, f"not a Dense chain: {_first_sentence(e)}")
    shapes = [(s.inputs, s.units, s.size) for s in stages]
    memory = float(memory_estimate(n, shapes, itemsize=8))
    flops = sum(q ** 3 + q * q * n * d + q * (n * d) ** 2 + (n * d) ** 3 for _, d, q in shapes)
    seconds = SETUP_SECONDS + lanczos + flops / BLAS_FLOPS_PER_SECOND
    if memory > budget:
        return Route("chain", True, False, seconds, memory,
                     f"{len(shapes)} Dense stages; blocks exceed the memory budget")
    return Route("chain", True, True, seconds, memory, f"{len(shapes)} Dense stages, Riccati sweep over n={n}")


def _ekfac_blocks(source):
    if source.problem is None:
        return None
    try:
        return find_blocks(source.problem.model, source.problem.variables)
    except (InfluenceError, ValueError, TypeError, AttributeError):
        return None


def _cg(p, k, iterations, vector_seconds, pass_seconds, lanczos, problem_note, blocks):
    memory = 6.0 * min(k, CG_CHUNK) * p * 8
    seconds = SETUP_SECONDS + lanczos + iterations * (k * vector_seconds + math.ceil(k / CG_CHUNK) * pass_seconds)
    preconditioned = blocks is not None
    if problem_note:
        return Route("cg", True, False, seconds, memory, problem_note)
    note = f"~{iterations} iterations x {k} right-hand sides" + (", EKFAC-preconditioned" if preconditioned else "")
    return Route("cg", True, True, seconds, memory, note)


def _refined(ekfac, p, k, vector_seconds, pass_seconds, lanczos, problem_note, refine_tol):
    iterations = REFINE_ITERATIONS
    seconds = ekfac.seconds + lanczos + iterations * (k * vector_seconds + math.ceil(k / CG_CHUNK) * pass_seconds)
    memory = ekfac.memory_bytes + 6.0 * min(k, CG_CHUNK) * p * 8
    if refine_tol is None:
        return Route("ekfac_refined", False, False, seconds, memory, "refine_tol=None")
    if problem_note or not ekfac.applicable:
        return Route("ekfac_refined", False, False, seconds, memory, problem_note or ekfac.note)
    return Route("ekfac_refined", False, True, seconds, memory,
                 f"EKFAC, then ~{iterations} CG iterations on exact products to residual {refine_tol:g}; approximate")


def _ekfac(source, n, k, flops, pass_seconds, budget):
    problem = source.problem
    if problem is None:
        return Route("ekfac", False, False, math.inf, math.nan, "needs a model (no problem behind this operator)")
    try:
        blocks = find_blocks(problem.model, problem.variables)
    except (InfluenceError, ValueError, TypeError, AttributeError) as e:
        return Route("ekfac", False, False, math.inf, math.nan, _first_sentence(e))
    sizes = [(b.a_size, b.out_features) for b in blocks]
    memory = float(sum(a * a + g * g + 2 * a * g for a, g in sizes) * 8)
    per_example = (1 + 2 * _output_targets(problem.model)) * flops  # forward, then a backward per target
    passes = 2 * (n * per_example / DATA_FLOPS_PER_SECOND + pass_seconds)  # factors, then eigenvalue correction
    eigen = sum(10 * (a ** 3 + g ** 3) for a, g in sizes) / BLAS_FLOPS_PER_SECOND
    seconds = SETUP_SECONDS + passes + eigen + k * sum(4 * a * g * (a + g) for a, g in sizes) / BLAS_FLOPS_PER_SECOND
    if memory > budget:
        return Route("ekfac", False, False, seconds, memory, "factors exceed the memory budget")
    return Route("ekfac", False, True, seconds, memory, f"{len(blocks)} Kronecker-factored layers; approximate")


def _output_targets(model):
    """Output targets per example of EKFAC's default fisher="auto": the output entries when at most
    `EXACT_MAX_OUTPUTS` (the exact expectation), else 1 sampled label; 1 when the shape is unknown."""
    try:
        shape = model.outputs[0].shape
        entries = int(np.prod([int(d) for d in shape[1:]]))
    except (AttributeError, IndexError, TypeError, ValueError):
        return 1
    return entries if entries <= EXACT_MAX_OUTPUTS else 1


def _first_sentence(error):
    text = str(error)
    return text.split(". ")[0].rstrip(".")


def _seconds(value):
    if not math.isfinite(value):
        return "-"
    return f"{value:.2g} s" if value < 10 else f"{value:,.0f} s"


def _bytes(value):
    if not math.isfinite(value):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"
