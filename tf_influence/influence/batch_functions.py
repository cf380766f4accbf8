"""The compiled per-batch functions of `Influence`: gradients and gradient dots, traced once.

Every function is a `tf.function` with an input signature whose batch dimension (and number of
directions) is None, so the partial last batch, test batches and any number of test directions share
one trace; a batch with a different structure or dtype (e.g. test labels of another dtype) gets its
own signature, traced once too. The functions live as long as the `Influence` and are reused by every
call (`scores`, `top_k`, `self_influence`, `inverse_hvp`, streaming).

`gradient_dots(batch, directions)` — `⟨gᵢ, sⱼ⟩` for every example i and direction j — has two routes
(docs/mathematics.md gives the scores they compute):
  gradients: the batch's per-example gradients `[m, p]` (one vectorised jacobian), then one matrix
    product with all directions `[k, p]`. Cost ≈ one forward and backward pass plus `2·m·p·k` flops.
  forward: one forward-mode product (jvp of the per-example losses) per direction, never forming the
    `[m, p]` gradients. Cost ≈ `k` forward passes with tangents (≈ `2·k` forward passes).
A forward pass of a dense model costs about `2·m·p` flops (more with weight sharing), so the
gradients route is cheaper from about 4 directions on; it is taken then, the batch split into slices
whose `[m, p]` gradients fit in `memory_budget` bytes. One or few directions take the forward route.
"""

import tensorflow as tf

from tf_influence import distribute as _distribute
from tf_influence.compiled import shared_function
from tf_influence.influence import gradients as _gradients
from tf_influence.linalg.host_blas import matmul_transposed

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of per-example gradients formed at once
FORWARD_MAX_DIRECTIONS = 3  # up to this many directions, forward-mode products are cheaper


def relaxed_spec(batch):
    """The `TensorSpec` nest of `batch` with the leading (example) dimension set to None."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec([None] + list(t.shape[1:]), t.dtype), batch)


def dot_route(num_directions):
    """`"forward"` or `"gradients"`: the cheaper way to take `num_directions` dot products per example."""
    return "forward" if num_directions <= FORWARD_MAX_DIRECTIONS else "gradients"


class BatchFunctions:
    """Per-batch gradients and gradient dots of a `Problem`, compiled once per batch structure.

    Args:
      problem: the `tfi.Problem` (objective, selected variables, space, strategy).
      memory_budget: bytes of per-example gradients the gradients route forms at once.
      objective: the per-example objective differentiated (default `problem.objective`; e.g. a
        measurement of the test points).

    Attributes:
      traces: how many traces each function made (`{"gradients": n, "forward_dots": n}`), for tests
        and profiling.

    Example:
      >>> fns = BatchFunctions(problem)
      >>> fns.gradient_dots(batch, directions)     # [m, k]
    """

    def __init__(self, problem, *, memory_budget=DEFAULT_MEMORY_BUDGET, objective=None):
        self.problem = problem
        self.objective = objective if objective is not None else problem.objective
        self.memory_budget = memory_budget
        self.traces = {"gradients": 0, "forward_dots": 0}
        self._functions = {}

    def gradients(self, batch):
        """`[m, p]`: each example's loss gradient (no weights, no regulariser)."""
        return self._function("gradients", batch)(batch)

    def gradient_dots(self, batch, directions):
        """`[m, k]`: `⟨gᵢ, sⱼ⟩` for each example i of `batch` and row sⱼ of `directions` `[k, p]`."""
        directions = tf.convert_to_tensor(directions, self.problem.space.dtype)
        if dot_route(int(directions.shape[0])) == "forward":
            return self._function("forward_dots", batch)(batch, directions)
        # The traced per-example gradients (shared with `gradients`: one trace) times all directions.
        fn = self._function("gradients", batch)
        m = int(tf.nest.flatten(batch)[0].shape[0])
        step = max(1, self.memory_budget // (self.problem.space.size * self.problem.space.dtype.size))
        return tf.concat([matmul_transposed(fn(tf.nest.map_structure(lambda t: t[start:start + step], batch)),
                                            directions) for start in range(0, m, step)], axis=0)

    def _function(self, name, batch):
        spec = relaxed_spec(batch)
        key = (name, repr(spec))  # structure, shapes and dtypes
        if key not in self._functions:
            self._functions[key] = self._compile(name, spec)
        return self._functions[key]

    def _compile(self, name, spec):
        problem = self.problem
        signature = [spec]
        if name != "gradients":
            signature.append(tf.TensorSpec([None, problem.space.size], problem.space.dtype))
        # Shared by every BatchFunctions of the same model, loss, variables and batch structure
        # (`tf_influence.compiled`); a measured objective is its own (identity).
        identity, options = problem.compiled_key()
        if self.objective is not problem.objective:
            identity = identity + [self.objective]
        traced = {"gradients": _traced_gradients, "forward_dots": _traced_forward_dots}[name]
        return shared_function(traced, self, identity=identity, options=options, input_signature=signature,
                               autograph=problem.objective.needs_autograph)


def _traced_gradients(functions, batch):
    functions.traces["gradients"] += 1  # Python side effect: runs once per trace
    return _per_batch(functions, _gradients.per_example_gradients, batch)


def _traced_forward_dots(functions, batch, directions):
    functions.traces["forward_dots"] += 1
    return _per_batch(functions, _gradients.gradient_dot, batch, directions)


def _per_batch(functions, body, batch, *args):
    problem = functions.problem

    def per_example(batch, *args):
        return body(functions.objective, problem.tf_variables, problem.space, batch, *args)

    if problem.strategy is None:
        return per_example(batch, *args)
    return _distribute.batch_rows(problem.strategy, per_example, batch, *args)
