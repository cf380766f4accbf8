"""Finite-difference curvature products by assigning `θ ± r·v` to the variables (tf-keras models, eager).

A Keras 3 model is evaluated at `θ ± r·v` without touching its variables (`Objective.outputs`), so
its finite differences are traceable and per batch (`curvature.products.finite_difference`). A
tf-keras model cannot be: its variables are assigned `θ + r·v`, then `θ − r·v`, the full gradient is
taken at each, and the original values are restored even when an error interrupts the product.
"""

import numpy as np
import tensorflow as tf


def default_step(space, tf_vars):
    """The step for a unit vector, `ε^(1/3)·(1 + ‖θ‖)` (divide by ‖v‖ otherwise), as a Python float."""
    theta = space.flatten([tf.convert_to_tensor(v) for v in tf_vars])
    return np.finfo(space.dtype.as_numpy_dtype).eps ** (1 / 3) * (1 + float(tf.linalg.norm(theta)))


def assigned_finite_differences(gradient, space, tf_vars, rows, *, step=None):
    """`(∇L(θ + r v) − ∇L(θ − r v)) / 2r` for each row v of `rows` `[k, p]`, assigning the variables.

    Args:
      gradient: `fn() -> [p]`, the full gradient at the variables' current values.
      space: the `ParameterSpace` of `tf_vars`.
      tf_vars: the selected variables (assigned, then restored).
      rows: `[k, p]` tangent vectors; a zero row gives zeros.
      step: a fixed step r, or None for `default_step / ‖v‖`.

    Returns:
      `[k, p]` products.

    Example:
      >>> hv = assigned_finite_differences(operator.gradient, operator.space, problem.tf_variables, rows)
    """
    originals = [tf.identity(v) for v in tf_vars]
    unit_step = default_step(space, tf_vars)
    results = []
    try:
        for v in tf.unstack(rows):
            v_norm = float(tf.linalg.norm(v))
            if v_norm == 0:
                results.append(tf.zeros_like(v))
                continue
            r = step if step is not None else unit_step / v_norm
            delta = space.unflatten(r * v)
            for var, orig, d in zip(tf_vars, originals, delta):
                var.assign(orig + d)
            g_plus = gradient()
            for var, orig, d in zip(tf_vars, originals, delta):
                var.assign(orig - d)
            g_minus = gradient()
            results.append((g_plus - g_minus) / (2 * r))
    finally:
        for var, orig in zip(tf_vars, originals):
            var.assign(orig)
    return tf.stack(results)
