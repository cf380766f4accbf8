"""`RowsOperator`: the shared base of the library's curvature operators, and row-wise products for any operator.

The library works with many vectors at once stored as rows: `[k, p]` (k right-hand sides, test
gradients, ...). Every operator here offers the same vocabulary:

  matmul_rows(rows)   `A rᵢ` for every row rᵢ, `[k, p] -> [k, p]` (one data pass for all k rows)
  solve_rows(rows)    `A⁻¹ rᵢ` for every row, where the operator can invert itself exactly or
                      cheaply (EKFAC, chain); `has_solve_rows` says whether it can

and `tf.linalg.LinearOperator`'s column-wise `matmul` / `solve` are derived from them. The module
functions `matmul_rows(operator, rows)` and `solve_rows(...)` apply the same vocabulary to any
`tf.linalg.LinearOperator` (or a callable on rows), so solvers accept every kind of operator.
"""

from typing import Any, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from tf_influence.errors import InputError


class RowsOperator(tf.linalg.LinearOperator):
    """A square `tf.linalg.LinearOperator` of static size p defined by its products on rows.

    Subclasses set `self.size` (p) before calling `super().__init__` and implement
    `_matmul_rows(rows)`; `_solve_rows(rows)` where they can invert. Hints are promises, as in
    `tf.linalg`: pass them honestly.
    """

    def matmul_rows(self, rows):
        """`A rᵢ` for each row of `rows` `[k, p]`; returns `[k, p]`."""
        return self._matmul_rows(self._as_rows(rows))

    def solve_rows(self, rows):
        """`A⁻¹ rᵢ` for each row of `rows` `[k, p]`; returns `[k, p]`."""
        if not self.has_solve_rows:
            raise InputError(f"{self.name} has no direct inverse; use a solver (e.g. tfi.solvers.cg).")
        return self._solve_rows(self._as_rows(rows))

    @property
    def has_solve_rows(self):
        return type(self)._solve_rows is not RowsOperator._solve_rows

    def _matmul_rows(self, rows):
        raise NotImplementedError

    def _solve_rows(self, rows):
        raise NotImplementedError

    def _as_rows(self, rows):
        rows = tf.convert_to_tensor(rows, dtype=self.dtype)
        if rows.shape.rank != 2 or rows.shape[-1] != self.size:
            raise InputError(f"{self.name} takes rows [k, {self.size}]. Received shape {tuple(rows.shape)}.")
        return rows

    # -- tf.linalg.LinearOperator interface ---------------------------------------------------

    # NumPy arrays and lists are converted to the operator's dtype (a float64 NumPy vector for a
    # float32 model); tensors and operators keep tf.linalg's own handling and dtype check.
    def matvec(self, x, adjoint=False, name="matvec"):
        return super().matvec(self._converted(x), adjoint=adjoint, name=name)

    def matmul(self, x, adjoint=False, adjoint_arg=False, name="matmul"):
        return super().matmul(self._converted(x), adjoint=adjoint, adjoint_arg=adjoint_arg, name=name)

    def solvevec(self, rhs, adjoint=False, name="solve"):
        return super().solvevec(self._converted(rhs), adjoint=adjoint, name=name)

    def solve(self, rhs, adjoint=False, adjoint_arg=False, name="solve"):
        return super().solve(self._converted(rhs), adjoint=adjoint, adjoint_arg=adjoint_arg, name=name)

    def _converted(self, x):
        if tf.is_tensor(x) or isinstance(x, (tf.Variable, tf.linalg.LinearOperator)):
            return x
        return tf.convert_to_tensor(np.asarray(x), dtype=self.dtype)

    def _shape(self):
        return tf.TensorShape([self.size, self.size])

    def _shape_tensor(self):
        return tf.constant([self.size, self.size], dtype=tf.int32)

    def _columns_as_rows(self, x, adjoint_arg):
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        if x.shape.rank != 2:
            raise InputError(f"{self.name} supports no batch shape; received a tensor of shape {x.shape}.")
        return tf.transpose(x)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        return tf.transpose(self.matmul_rows(self._columns_as_rows(x, adjoint_arg)))

    def _solve(self, rhs, adjoint=False, adjoint_arg=False):
        if not self.has_solve_rows:
            return super()._solve(rhs, adjoint=adjoint, adjoint_arg=adjoint_arg)
        return tf.transpose(self.solve_rows(self._columns_as_rows(rhs, adjoint_arg)))


def matmul_rows(operator, rows):
    """`A rᵢ` for each row `rᵢ` of `rows` `[k, p]`, for any operator, in one call.

    Uses `operator.matmul_rows` when there is one (every operator of this library), calls a plain
    callable on the rows, and otherwise uses `matmul` on the transposed rows.
    """
    method = getattr(operator, "matmul_rows", None)
    if callable(method):
        return method(rows)
    if isinstance(operator, tf.linalg.LinearOperator):
        return tf.linalg.matrix_transpose(operator.matmul(rows, adjoint_arg=True))
    if callable(operator):
        return tf.convert_to_tensor(operator(rows), dtype=rows.dtype)
    raise InputError(
        "Expected a tf.linalg.LinearOperator (or a callable mapping rows [k, p] to rows [k, p]). "
        f"Received {type(operator).__name__}."
    )


class TracedProduct(NamedTuple):
    """An operator's product in the form a compiled solver loop shares across operators.

    `matmul(inputs, rows)` is traceable and reads the operator's state only from `inputs` (a nest of
    tensors and data sets: the training data, the damping) and from what `identity` (objects, by
    identity) and `options` (hashable values) identify. Two operators with the same identity and
    options are interchangeable in a traced loop: it is traced once and called with each one's inputs.
    """
    identity: list
    options: tuple
    inputs: Any
    matmul: Callable

    @classmethod
    def by_identity(cls, operator):
        """The operator itself as the key, no inputs: a loop traced for it serves only it."""
        return cls([operator], (), (), lambda inputs, rows: matmul_rows(operator, rows))


def traced_product(operator):
    """`operator.traced_product()` where the operator offers one (`HessianOperator`), else the
    operator by identity with no inputs (a loop traced for it serves only it)."""
    method = getattr(operator, "traced_product", None)
    if callable(method):
        return method()
    return TracedProduct.by_identity(operator)


def operator_size(operator):
    """The side p of a square operator, with a clear error for anything else."""
    shape = getattr(operator, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or shape[-1] is None:
        raise InputError(
            "Expected a square tf.linalg.LinearOperator of static shape [p, p] (e.g. "
            f"tfi.HessianOperator). Received {type(operator).__name__} of shape {shape}."
        )
    return int(shape[-1])
