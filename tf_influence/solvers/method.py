"""What every IHVP method object is: settings, one `prepare` step, and the state it prepares.

A method object (`Direct`, `CG`, `LiSSA`, `ScipyNCG`, `EKFAC`, `KFAC`, `Chain`, ...) is a frozen
dataclass of settings. Using it has two steps:

  prepared = method.prepare(source)     # asks the CurvatureSource for what it needs and keeps the
                                        # reusable state: a Cholesky factor, fitted factors, a
                                        # Riccati factorisation, a compiled loop
  x, info = prepared.solve(rows)        # (curvature + λI)⁻¹ for each row, as often as wanted

`Influence` prepares once per model state and reuses the prepared state for `scores`, `top_k`,
`self_influence`, `inverse_hvp` and export. `method.solve(operator, rows)` does both steps for a
single call on a given operator.

Capabilities are attributes of the method class, never name comparisons:
  `exact`      the solution is that of `(H + λI) x = b` to rounding or to the stated tolerance
               (False for EKFAC/KFAC, which invert an approximation, and for LiSSA's estimate);
  `iterative`  each solve runs several curvature passes (CG, LiSSA, scipy), so many solves cost many
               passes; direct, chain and EKFAC factor once and then solve cheaply;
  `factored`   the prepared state holds Kronecker factors (`prepared.inverse` is an `EKFACOperator`),
               which export can store as they are and scoring can use layer by layer.
"""

import dataclasses
import typing

from tf_influence.operators.source import CurvatureSource


class Method:
    """Base of the method objects. Subclasses are frozen dataclasses and implement `prepare`."""

    name: typing.ClassVar[str] = ""
    exact: typing.ClassVar[bool] = True
    iterative: typing.ClassVar[bool] = False
    factored: typing.ClassVar[bool] = False

    def prepare(self, source):
        """The reusable state for `source` (a `CurvatureSource`): a `Prepared`."""
        raise NotImplementedError

    def solve(self, operator, rows):
        """`(x, SolveInfo)` for rows `[k, p]` (or one vector `[p]`) with `operator` (`A`) in one call."""
        return self.prepare(CurvatureSource.of(operator)).solve(rows)

    def settings(self):
        """The method's settings as a dict (for fingerprints and exported metadata)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}


class Prepared:
    """A method's reusable state for one curvature.

    Attributes:
      method: the method object.
      operator: the operator the solutions are for (`H + λI`, or `C + λI` for EKFAC/KFAC).
      solve: `fn(rows) -> (x, SolveInfo)`, rows `[k, p]` or `[p]`.
      quadratic_forms: `fn(rows) -> [k]` NumPy values `rowᵀ (H + λI)⁻¹ row` computed from a
        factorisation without the solutions (exact factorised routes, e.g. `Direct`), or None.
      eigenbasis: the `EKFACOperator` whose eigenbasis form `solve` is exactly (one-shot KFAC/EKFAC),
        so that scores may be taken in that basis without solves (influence/eigenbasis_scores.py), or None.
      info: with `eigenbasis`, `fn(start, k) -> SolveInfo` of a solve of k rows begun at
        `time.perf_counter()` value `start`, for results computed in the eigenbasis.
    """

    def __init__(self, method, operator, solve, quadratic_forms=None):
        self.method = method
        self.operator = operator
        self.solve = solve
        self.quadratic_forms = quadratic_forms
        self.eigenbasis = None
        self.info = None

    def __repr__(self):
        return f"Prepared({self.method!r}, operator={getattr(self.operator, 'name', type(self.operator).__name__)})"
