"""`SolveInfo`: the diagnostics every IHVP solver returns next to its solution."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """What a solve of `(H + λI) x = b` did.

    Attributes:
      method: the solver's name ("cg", "direct", "lissa", ...).
      iterations: iterations (or HVP passes) used; 0 for one-shot direct methods.
      residual: final relative residual `max_j ‖(H + λI) x_j − b_j‖ / ‖b_j‖` (an estimate where
        the method cannot afford the exact value; see `residual_is_estimate`).
      converged: whether the method's stopping rule was met.
      seconds: wall-clock time of the solve.
      residual_is_estimate: True when `residual` was not computed with the exact operator.
      extra: method-specific details (e.g. the inertia for "chain", the damping used).
    """

    method: str
    iterations: int
    residual: float
    converged: bool
    seconds: float
    residual_is_estimate: bool = False
    extra: dict = dataclasses.field(default_factory=dict)
