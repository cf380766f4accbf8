"""`check_hvp`: compares a Hessian-vector product to central finite differences."""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_influence.operators.hessian import HessianOperator


@dataclasses.dataclass(frozen=True)
class HVPCheck:
    """Relative errors ‖Hv − H_fd v‖ / ‖H_fd v‖ for random unit vectors v.

    `settled[j]` says whether the finite-difference reference for vector j held across two step
    sizes. `ok` is True or False when every reference settled, and None (inconclusive) otherwise:
    then finite differences cannot judge the product (see `check_hvp`).
    """

    mode: str
    relative_errors: tuple
    tolerance: float
    settled: tuple = ()

    @property
    def max_relative_error(self):
        return max(self.relative_errors)

    @property
    def ok(self):
        if not all(self.settled):
            return None
        return self.max_relative_error <= self.tolerance

    def __str__(self):
        line = (f"{self.mode}: max relative error vs finite differences {self.max_relative_error:.2e} "
                f"(tolerance {self.tolerance:.0e}) -> ")
        if self.ok is None:
            return line + (
                "INCONCLUSIVE: the finite differences changed with the step size. Steps that cross "
                "kinks (ReLU, max pooling) add spurious terms, and in float32 often no step is both "
                "small enough to avoid them and large enough to beat rounding. Check a float64 copy "
                "of the model (see check_hvp's docstring), or allow more max_step_reductions.")
        return line + ("OK" if self.ok else "WRONG")


def check_hvp(model, loss=None, data=None, variables=None, *, mode="back_over_back",
              num_vectors=3, seed=0, step=None, tolerance=None, max_step_reductions=None,
              **operator_options):
    """Compares `mode`'s Hessian-vector products with central finite differences.

    Finite differences use only first derivatives, so they stay right where TensorFlow's second
    derivatives are wrong (e.g. through LayerNormalization); a large error flags such a case.
    A step that crosses a kink of the loss (a ReLU or max-pooling switch) adds a term of order
    1/step that the Hessian rightly lacks, so the reference is taken at steps r, r/4, r/16, …
    until two successive estimates agree to `tolerance / 4`. Where none agree (typical for ReLU
    or max-pooling models in float32), the check is inconclusive rather than a false alarm; run it
    on a float64 copy of the model instead:

      >>> copy = keras.models.clone_model(model, clone_function=lambda layer: layer.__class__
      ...     .from_config({**layer.get_config(), "dtype": "float64"}))
      >>> copy.set_weights(model.get_weights())

    Args:
      model: a Keras model, or a `HessianOperator` (then `loss`, `data`, `variables` are unused).
      loss, data, variables: as for `HessianOperator`.
      mode: the HVP mode under test.
      num_vectors: number of random test vectors.
      seed: seed for the test vectors.
      step: first finite-difference step r (default `ε^(1/3)·(1 + ‖θ‖)`).
      tolerance: error above which `ok` is False (default 1e-4 in float64, 1e-2 in float32).
      max_step_reductions: how many times the step may be divided by 4 (default 8 in float64,
        3 in float32, where rounding soon dominates). With 0 nothing can settle: the verdict is
        then always inconclusive.
      **operator_options: more `HessianOperator` options (l2, batch_size, curvature, ...).

    Returns:
      An `HVPCheck` with the relative errors; `print(check)` gives a one-line verdict.

    Example:
      >>> report = tfi.check_hvp(model, "mse", (x, y))
      >>> report.ok, report.max_relative_error
    """
    if isinstance(model, HessianOperator):
        op = model.with_options(mode=mode, on_unsafe_layers="ignore")
    else:
        op = HessianOperator(model, loss, data, variables, mode=mode, on_unsafe_layers="ignore",
                             **operator_options)
    float64 = op.dtype == tf.float64
    if tolerance is None:
        tolerance = 1e-4 if float64 else 1e-2
    if max_step_reductions is None:
        max_step_reductions = 8 if float64 else 3
    if step is None:
        step = op.default_step()
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((num_vectors, op.space.size))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v = tf.constant(v, dtype=op.dtype)
    got = op.matmul_rows(v).numpy()
    reference, settled = _settled_finite_differences(op, v, step, tolerance / 4, max_step_reductions)
    errors = tuple(float(_relative(g, r)) for g, r in zip(got, reference))
    return HVPCheck(mode=mode, relative_errors=errors, tolerance=tolerance, settled=tuple(settled))


def _settled_finite_differences(op, v, step, agreement, max_step_reductions):
    """Per vector, the first finite difference that agrees with the one at 4x its step."""
    previous = op.with_options(mode="finite_difference", step=step).matmul_rows(v).numpy()
    reference = previous.copy()
    settled = np.zeros(len(previous), dtype=bool)
    for _ in range(max_step_reductions):
        step /= 4
        pending = np.flatnonzero(~settled)  # settled vectors are not differenced again
        current = op.with_options(mode="finite_difference", step=step).matmul_rows(tf.gather(v, pending)).numpy()
        for row, j in enumerate(pending):
            settled[j] = _relative(previous[j], current[row]) <= agreement
        reference[pending] = previous[pending] = current
        if settled.all():
            break
    return reference, settled.tolist()


def _relative(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)
