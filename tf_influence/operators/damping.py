"""The default damping (`damping=None`): λ chosen from the spectrum of the curvature, and how it was chosen.

Rule (the same for every method): with `μ_max`, `μ_min` the largest and smallest eigenvalues of the
undamped curvature `C` (Hessian or Gauss-Newton of the mean objective, l2 included),

    λ = max(0, ε·μ_max − μ_min),        ε = RELATIVE_MARGIN = 0.01

the smallest damping that lifts every eigenvalue of `C + λI` to at least `ε·μ_max`: `C + λI` is
positive definite with condition number at most about `1/ε = 100`, and a curvature that already
is (a well-conditioned convex problem) is left undamped. The margin also absorbs the error of the
estimate: Lanczos finds the extremes first, but its smallest Ritz value can lie above `μ_min` by
a small fraction of `μ_max`.

Where the extremes come from depends on what the method builds (nothing extra is built for it):
  "lanczos"  methods with exact products (direct, cg, lissa, chain, ...): `LANCZOS_ITERATIONS`
             Lanczos steps on the undamped operator (each one curvature pass over the data);
  "factors"  EKFAC/KFAC, which never build exact products: the exact extremes of their own
             curvature, the factored eigenvalues `Λ` (+ l2), so λ = ε·max Λ − min Λ.

Example:
  >>> choice = choose_damping(largest=4.0, smallest=-0.3, source="lanczos", what="...")
  >>> choice.value            # 0.01·4 + 0.3
  0.34
"""

import dataclasses
import logging
import math

import numpy as np
import tensorflow as tf

from tf_influence.errors import NotFiniteError
from tf_influence.linalg.lanczos import extreme_eigenvalues

_log = logging.getLogger(__name__)

RELATIVE_MARGIN = 0.01
LANCZOS_ITERATIONS = 30


@dataclasses.dataclass(frozen=True)
class DampingChoice:
    """A damping λ and where it came from.

    Attributes:
      value: λ ≥ 0.
      source: "given" (a number from the user), "lanczos" or "factors" (chosen, see the module doc).
      reason: one sentence saying how it was chosen, for logs and `SolveInfo.extra["damping_reason"]`.
      largest, smallest: the curvature's extreme eigenvalues it was chosen from (NaN when given).
    """

    value: float
    source: str
    reason: str
    largest: float = math.nan
    smallest: float = math.nan

    @classmethod
    def given(cls, value):
        return cls(float(value), "given", f"λ={float(value):g} as given")

    def report(self):
        """`{"damping", "damping_source", "damping_reason"}` for `SolveInfo.extra`."""
        return {"damping": self.value, "damping_source": self.source, "damping_reason": self.reason}


def choose_damping(largest, smallest, *, source, what):
    """The `DampingChoice` of the rule in the module doc for extremes `largest` ≥ `smallest` of `what`."""
    largest, smallest = float(largest), float(smallest)
    if not (np.isfinite(largest) and np.isfinite(smallest)):
        raise NotFiniteError(
            f"damping=None: the extreme eigenvalues of {what} are not finite ({smallest}, {largest}), so no damping "
            "can be chosen. Check the model and data for NaN/Inf, or pass damping=<number>.")
    top = largest if largest > 0 else max(abs(largest), abs(smallest))
    if top == 0:
        value = 1.0
        reason = (f"the curvature ({what}) is zero, so λ=1 was chosen: scores are then plain gradient dot products")
    else:
        floor = RELATIVE_MARGIN * top
        value = max(0.0, floor - smallest)
        state = ("is positive definite with condition ≤ 1/ε already, so no damping" if value == 0 else
                 f"λ = ε·λ_max − λ_min = {value:.4g} lifts every eigenvalue to ≥ ε·λ_max = {floor:.4g}")
        reason = (f"chosen from the spectrum of {what}: λ_max ≈ {largest:.4g}, λ_min ≈ {smallest:.4g}; with "
                  f"ε = {RELATIVE_MARGIN:g} the curvature {state} (H + λI positive definite, condition ≤ ~"
                  f"{1 / RELATIVE_MARGIN:.0f})")
    choice = DampingChoice(value, source, reason, largest, smallest)
    _log.info("damping=None -> λ=%.4g (%s)", value, reason)
    return choice


def lanczos_damping(operator, *, num_iterations=LANCZOS_ITERATIONS, seed=0):
    """The damping for an undamped self-adjoint operator, from a Lanczos estimate of its extremes."""
    spectrum = extreme_eigenvalues(operator, num_iterations=num_iterations, seed=seed)
    what = (f"the undamped {getattr(operator, 'curvature', 'curvature')} operator ({spectrum.iterations} Lanczos "
            "iterations)")
    return choose_damping(spectrum.largest, spectrum.smallest, source="lanczos", what=what)


def factor_damping(eigenvalues, *, l2=0.0, method="ekfac"):
    """The damping for a factored curvature from its per-layer eigenvalues (exact extremes, no data pass)."""
    largest = max(float(tf.reduce_max(e)) for e in eigenvalues) + float(l2)
    smallest = min(float(tf.reduce_min(e)) for e in eigenvalues) + float(l2)
    what = f"the {method.upper()} curvature (its factored eigenvalues + l2; no exact curvature products are built)"
    return choose_damping(largest, smallest, source="factors", what=what)
