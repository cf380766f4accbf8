"""`CurvatureSource`: the curvature operators of one problem, each built only when a method asks for it.

A method declares what it needs by what it asks the source for: exact curvature products
(`hessian()`), Kronecker factors (`ekfac(settings)`), or the chain solver's blocks (`chain(...)`).
Nothing is built before it is asked for, so `method="ekfac"` on a transformer never builds (or
checks the second derivatives of) a Hessian operator. Everything built is kept for later requests.

All operators from one source share the damping λ and the meaning of `(H + λI) x = b`: the EKFAC
operator approximates `H + λI` with `C + (λ + l2)·I`, since the l2 term's curvature is exactly l2·I.
With `damping=None` λ is chosen once, from the spectrum of the first curvature a method asks for
(Lanczos on the exact operator, or the factored eigenvalues for EKFAC/KFAC, which build no exact
products; see `tf_influence.operators.damping`), and every later operator uses that same λ.
Factors and chain blocks are computed from the model's current weights and cached under their
fingerprint, so they are refitted (not silently reused) after the weights change; the Hessian
operator computes every product afresh and is built once.
"""

import warnings

from tf_influence import arguments
from tf_influence.curvature.factors import FactorSettings, fit_factors
from tf_influence.errors import InputError
from tf_influence.operators.chain import ChainHessian
from tf_influence.operators.damping import DampingChoice, factor_damping
from tf_influence.operators.ekfac import EKFACOperator
from tf_influence.operators.hessian import HessianOperator


class CurvatureSource:
    """Builds (once) the curvature operators a method asks for, from a `Problem` and curvature options.

    Args:
      problem: a `tfi.Problem`, or None for a source that only wraps a given operator (`of`).
      damping: λ ≥ 0; every operator represents `(curvature) + λI`. None: chosen from the
        curvature's spectrum when the first operator is built (`damping_choice` says how).
      curvature: "hessian" or "gauss_newton" (for the exact operators).
      **hessian_options: more `HessianOperator` options (mode, jit_compile, on_unsafe_layers, step).

    Example:
      >>> source = CurvatureSource(problem, damping=1e-3)
      >>> H = source.hessian()                      # built now, on first request
      >>> C = source.ekfac(FactorSettings())        # factors fitted now
      >>> source.built                              # ['hessian', 'ekfac']
    """

    def __init__(self, problem, *, damping=0.0, curvature="hessian", **hessian_options):
        self.problem = problem
        self.requested_damping = damping
        self.damping_choice = None if damping is None else DampingChoice.given(
            arguments.nonnegative_float(damping, "damping"))
        self.curvature = curvature
        self.hessian_options = hessian_options
        self._hessian = None
        self._factors = {}
        self._chain = {}
        self.built = []

    @classmethod
    def of(cls, operator):
        """A source around an existing operator: `hessian()` returns it; factors and chain blocks come
        from its problem when it is a `HessianOperator`."""
        problem = getattr(operator, "problem", None)
        if isinstance(operator, HessianOperator):
            source = cls(problem, damping=operator.damping, curvature=operator.curvature)
            source.damping_choice = operator.damping_choice
        else:
            source = cls(problem, damping=float(getattr(operator, "damping", 0.0) or 0.0))
        existing = getattr(operator, "source", None)
        if isinstance(existing, CurvatureSource) and existing._hessian is operator:
            return existing
        source._hessian = operator
        if isinstance(operator, HessianOperator):
            operator.source = source  # later calls with this operator reuse the fitted factors
        return source

    @property
    def damping(self):
        """λ. With `damping=None` and nothing built yet, it is chosen now (Lanczos on the exact operator)."""
        if self.damping_choice is None:
            self.hessian()
        return self.damping_choice.value

    def hessian(self):
        """`H + λI` (or the Gauss-Newton matrix + λI) as a `HessianOperator` (exact products)."""
        if self._hessian is None:
            self._hessian = HessianOperator(self._needs_problem("exact curvature products"),
                                            damping=self.damping_choice, curvature=self.curvature,
                                            **self.hessian_options)
            self._hessian.source = self
            self.damping_choice = self._hessian.damping_choice
            self.built.append("hessian")
        return self._hessian

    def factors(self, settings):
        """KFAC/EKFAC `Factors` fitted with `settings` (a `FactorSettings`), once per settings."""
        if not isinstance(settings, FactorSettings):
            raise InputError(f"settings must be a FactorSettings. Received {type(settings).__name__}.")
        problem = self._needs_problem(f"{settings.method.upper()} factors")
        key = (settings, problem.fingerprint())
        if key not in self._factors:
            self._factors = {key: fit_factors(problem, settings=settings)}  # only the current weights' factors
            self.built.append(settings.method)
        return self._factors[key]

    def ekfac(self, settings):
        """`C + (λ + l2)·I` as an `EKFACOperator` (its `solve_rows` is the approximate inverse)."""
        factors = self.factors(settings)
        objective = self.problem.objective
        if objective.has_weight_regularizers:
            warnings.warn(
                "The model has weight regularisers (model.losses); KFAC/EKFAC leave out their curvature "
                "(only l2= is added exactly). Use the objective's l2 option instead, or a CG/direct solve.",
                stacklevel=3)
        return EKFACOperator(factors, damping=self.factored_damping(factors) + float(objective.l2),
                             dtype=self.problem.dtype)

    def factored_damping(self, factors):
        """λ for an operator built from `factors`; with `damping=None` still open, chosen from their eigenvalues."""
        if self.damping_choice is None:
            l2 = self.problem.objective.l2 if self.problem is not None else 0.0
            self.damping_choice = factor_damping(factors.eigenvalues(), l2=l2, method=factors.method)
        return self.damping_choice.value

    def chain(self, *, dtype="float64", max_memory_bytes=None):
        """`H + λI` as a `ChainHessian` (exact products and exact solves for Dense chains)."""
        problem = self._needs_problem("the chain solver's blocks")
        key = (str(dtype), max_memory_bytes, problem.fingerprint())
        if key not in self._chain:
            options = {} if max_memory_bytes is None else dict(max_memory_bytes=max_memory_bytes)
            self._chain = {key: ChainHessian(problem, damping=self.damping, curvature=self.curvature, dtype=dtype,
                                             **options)}
            self.built.append("chain")
        return self._chain[key]

    def _needs_problem(self, what):
        if self.problem is None:
            raise InputError(
                f"{what} are computed from a model and its data, but this operator "
                f"({type(self._hessian).__name__}) has none. Pass a tfi.HessianOperator, or use tfi.Influence.")
        return self.problem
