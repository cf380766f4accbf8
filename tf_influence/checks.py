"""`check_hvp`: compares a Hessian-vector product to central finite differences."""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_influence.operators import HessianOperator


@dataclasses.dataclass(frozen=True)
class HVPCheck:
    """Relative errors ‖Hv − H_fd v‖ / ‖H_fd v‖ for random unit vectors v."""

    mode: str
    relative_errors: tuple
    tolerance: float

    @property
    def max_relative_error(self):
        return max(self.relative_errors)

    @property
    def ok(self):
        return self.max_relative_error <= self.tolerance

    def __str__(self):
        verdict = "OK" if self.ok else "WRONG"
        return (f"{self.mode}: max relative error vs finite differences {self.max_relative_error:.2e} "
                f"(tolerance {self.tolerance:.0e}) -> {verdict}")


def check_hvp(model, loss=None, data=None, variables=None, *, mode="forward_over_back",
              num_vectors=3, seed=0, step=None, tolerance=None, **operator_options):
    """Compares `mode`'s Hessian-vector products with central finite differences.

    Finite differences use only first derivatives, so they stay right where TensorFlow's second
    derivatives are wrong (e.g. through LayerNormalization); a large error flags such a case.

    Args:
      model: a Keras model, or a `HessianOperator` (then `loss`, `data`, `variables` are unused).
      loss, data, variables: as for `HessianOperator`.
      mode: the HVP mode under test.
      num_vectors: number of random test vectors.
      seed: seed for the test vectors.
      step: finite-difference step (default scales with ε^(1/3)).
      tolerance: error above which `ok` is False (default 1e-4 in float64, 1e-2 in float32).
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
    reference = op.with_options(mode="finite_difference", step=step)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((num_vectors, op.space.size))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v = tf.constant(v, dtype=op.dtype)
    got = op.apply(v).numpy()
    ref = reference.apply(v).numpy()
    errors = tuple(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300)) for g, r in zip(got, ref))
    if tolerance is None:
        tolerance = 1e-4 if op.dtype == tf.float64 else 1e-2
    return HVPCheck(mode=mode, relative_errors=errors, tolerance=tolerance)
