"""`method="auto"` (the default): the route the cost model of `solvers.plan` finds cheapest, with fallback.

`Auto().prepare(source)` plans the routes (direct, chain, EKFAC-preconditioned CG, EKFAC refined by CG
to a residual of 0.1, one-shot EKFAC; see
`tf_influence.solvers.plan`), logs its choice and the reason on the "tf_influence" logger, and
prepares the chosen route. When preparing a route fails because the model, loss or memory does not
suit it (`InputError` and its `UnsupportedLayerError` / `SecondDerivativeError`, `ResourceError`, a
singular `NegativeCurvatureError`), it logs why and prepares the next applicable route, so auto
accepts every problem that one of those named methods accepts. The `Prepared` it returns is the
route's own (`prepared.method` is e.g. a `Direct`), with `prepared.plan` added.

`SolveAnnouncer` announces the cost of many iterative solves (n solves, an ETA from the first
batch) and names the cheaper route when the plan has one; `Influence.self_influence` uses it.
"""

import dataclasses
import logging
import time
import typing

from tf_influence import arguments
from tf_influence.errors import InfluenceError, InputError, NegativeCurvatureError, ResourceError
from tf_influence.operators.hessian import MAX_DENSE_SIZE
from tf_influence.solvers.cg import CG
from tf_influence.solvers.chain import Chain
from tf_influence.solvers.direct import Direct
from tf_influence.solvers.ekfac import EKFAC
from tf_influence.solvers.method import Method
from tf_influence.solvers.plan import REFINE_TOL, plan_routes

_log = logging.getLogger(__name__)

# Why a route could not be prepared for this problem (anything else is a real error and propagates).
_ROUTE_REFUSALS = (InputError, ResourceError, NegativeCurvatureError)


@dataclasses.dataclass(frozen=True)
class Auto(Method):
    """The cheapest applicable route by the cost model of `tf_influence.solvers.plan`, with fallback.

    Args:
      n_test: right-hand sides (test points) to plan for; iterative routes cost more with more.
      memory_bytes: memory budget of a route in bytes; None: half of the memory available now.
      max_seconds: when the cheapest exact route is estimated above this and EKFAC is cheaper, EKFAC.
      tol: CG's relative tolerance when CG is chosen.
      precondition: precondition CG with EKFAC when EKFAC applies to the layers.
      refine_tol: relative residual of the approximate route "ekfac_refined" (`EKFAC(tol=refine_tol)`),
        taken when the exact routes are estimated above `max_seconds`; None leaves only one-shot EKFAC.
      direct_max_size: largest p the direct route densifies (default 20,000).

    Example:
      >>> inf = tfi.Influence(model, loss, train, variables="head")      # method="auto"
      >>> print(inf.plan())                                               # routes, the chosen one marked
      >>> inf.prepared().method                                           # e.g. Direct(...)
    """

    n_test: int = 100
    memory_bytes: typing.Optional[int] = None
    max_seconds: float = 600.0
    tol: float = 1e-6
    precondition: bool = True
    refine_tol: typing.Optional[float] = REFINE_TOL
    direct_max_size: int = MAX_DENSE_SIZE
    name: typing.ClassVar[str] = "auto"
    exact: typing.ClassVar[bool] = False  # exact unless it falls back to EKFAC; `prepared.method.exact` says

    def __post_init__(self):
        arguments.positive_int(self.n_test, "n_test", owner="Auto")
        if self.memory_bytes is not None:
            arguments.positive_int(self.memory_bytes, "memory_bytes", owner="Auto")
        arguments.positive_float(self.max_seconds, "max_seconds", owner="Auto")
        arguments.positive_float(self.tol, "tol", owner="Auto")
        arguments.positive_int(self.direct_max_size, "direct_max_size", owner="Auto")
        if self.refine_tol is not None:
            arguments.positive_float(self.refine_tol, "refine_tol", owner="Auto")

    def plan(self, source, *, n_test=None, self_influence=False):
        """The `Plan` (every route's estimated time and memory, the choice) for a `CurvatureSource`."""
        return plan_routes(source, n_test=self.n_test if n_test is None else n_test, self_influence=self_influence,
                           memory_bytes=self.memory_bytes, max_seconds=self.max_seconds,
                           direct_max_size=self.direct_max_size, tol=self.tol, refine_tol=self.refine_tol)

    def prepare(self, source):
        plan = self.plan(source)
        _log.info("method='auto' chose %s: %s", plan.chosen.name, plan.reason)
        refusals = []
        for route in plan.order():
            try:
                prepared = self._route_method(route.name, source, plan).prepare(source)
            except _ROUTE_REFUSALS as e:
                refusals.append(f"{route.name}: {e}")
                _log.warning("method='auto': %s cannot be used here (%s: %s); trying the next route.",
                             route.name, type(e).__name__, e)
                continue
            if route is not plan.chosen or refusals:
                _log.info("method='auto' uses %s.", route.name)
            prepared.plan = plan
            return prepared
        notes = "; ".join(refusals) or "; ".join(f"{r.name}: {r.note}" for r in plan.routes)
        raise InputError(f"method='auto' found no route that can solve this problem. {notes}. Fix the cause named "
                         "for the route you want, or pass that method by name to see its full error.")

    def _route_method(self, name, source, plan):
        if name == "direct":
            return Direct(max_size=self.direct_max_size)
        if name == "chain":
            return Chain(max_memory_bytes=max(1, int(plan.memory_budget)))
        if name == "ekfac":
            return EKFAC()
        if name == "ekfac_refined":
            return EKFAC(tol=self.refine_tol)
        return CG(tol=self.tol, preconditioner=self._preconditioner(source) if self.precondition else None)

    def _preconditioner(self, source):
        """EKFAC's `(C + λI)⁻¹` for CG, or None (logged) when EKFAC cannot be fitted to this problem."""
        if source.problem is None:
            return None
        operator = source.hessian()  # first, so that a damping=None is chosen from the exact operator
        try:
            preconditioner = EKFAC().inverse(source).inverse()
        except _ROUTE_REFUSALS as e:
            _log.info("method='auto': CG without a preconditioner (EKFAC does not apply: %s)", e)
            return None
        _log.info("method='auto': CG preconditioned with EKFAC (%s)", getattr(operator, "name", "operator"))
        return preconditioner


class SolveAnnouncer:
    """Logs, before many iterative solves, how many there are and the cheaper route; then an ETA.

    Args:
      source: the `CurvatureSource` of the problem (for the plan's direct-route estimate).
      method: the prepared method object (announces only when `method.iterative`).
      count: the number of solves ahead.
      batches: in how many batches they run.
      what: what the solves are for ("self_influence").

    Example:
      >>> announcer = SolveAnnouncer(inf.source, inf.prepared().method, inf.n_train, batches=19)
      >>> announcer.batch_done()            # after each batch; the first logs the ETA
    """

    def __init__(self, source, method, count, *, batches, what="self_influence"):
        self.active = bool(getattr(method, "iterative", False))
        self.count, self.batches, self.done = count, batches, 0
        self._start = time.perf_counter()
        if not self.active:
            return
        name = getattr(method, "name", type(method).__name__)
        _log.warning("%s runs %d %s solves (iterative, each several curvature passes) in %d batches; timing the "
                     "first batch for an ETA.%s", what, count, name, batches, _cheaper(source, what))

    def batch_done(self):
        """Call after each batch; after the first, logs the estimated time of the rest."""
        self.done += 1
        if self.active and self.done == 1 and self.batches > 1:
            took = time.perf_counter() - self._start
            _log.warning("first batch took %.1f s; ETA for the remaining %d batches: %.0f s.", took,
                         self.batches - 1, took * (self.batches - 1))


def _cheaper(source, what):
    """A sentence naming the direct route when it applies and is estimated cheaper, else ''."""
    try:
        plan = plan_routes(source, n_test=1, self_influence=True)
    except (InfluenceError, ValueError, TypeError, AttributeError) as e:  # an estimate never stops the solves
        _log.debug("no plan for the announcement: %s", e)
        return ""
    direct, cg = plan.route("direct"), plan.route("cg")
    if direct.applicable and direct.seconds < cg.seconds:
        return (f" method='direct' would be cheaper here (est. {direct.seconds:.2g} s for all {what} values vs "
                f"{cg.seconds:.2g} s by CG): one dense factorisation, then every solve is a triangular solve.")
    return ""
