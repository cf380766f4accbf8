"""Shared test references: one relative error, one dense-Hessian reference, and small float64 problems.

`dense_hessian` is independent of the library (nested GradientTape jacobians of the weighted mean
objective over all data at once); `softmax_regression` has a closed-form Hessian; `mlp` has an
indefinite Hessian made positive definite by a known damping.
"""

import dataclasses
import functools
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi

sce = functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def script_environment(**overrides):
    """`os.environ` for a test script run in a subprocess, with this checkout's tf_influence importable
    whether or not the package is installed (the script's own folder, not the repository, heads sys.path)."""
    path = os.pathsep.join(p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **overrides}


N = 200  # training examples of the solver problems
D = 6  # features
CLASSES = 3


def relative_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense_hessian(model, loss_fn, x, y, w=None, *, variables=None, l2=0.0):
    """Reference Hessian of the mean objective by nested GradientTape jacobians (all data at once).

    Independent of the library: weighted mean of per-example losses + model.losses + (l2/2)||θ||².
    """
    variables = list(variables if variables is not None else model.trainable_variables)
    tf_vars = [v if isinstance(v, tf.Variable) else v.value for v in variables]
    n = len(tf.nest.flatten(y)[0])
    w = tf.ones([n], tf.float64) if w is None else tf.constant(w, tf.float64)
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            losses = tf.cast(loss_fn(y, model(x, training=False)), tf.float64)
            objective = tf.reduce_sum(w * losses) / tf.reduce_sum(w)
            objective += tf.add_n([tf.cast(t, tf.float64) for t in model.losses] or [tf.constant(0.0, tf.float64)])
            objective += 0.5 * l2 * tf.add_n([tf.reduce_sum(tf.cast(v, tf.float64) ** 2) for v in tf_vars])
        grads = inner.gradient(objective, tf_vars, unconnected_gradients="zero")
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], 0)
    blocks = outer.jacobian(flat, tf_vars, unconnected_gradients="zero", experimental_use_pfor=False)
    return tf.concat([tf.reshape(b, [flat.shape[0], -1]) for b in blocks], 1).numpy()


def per_example_gradients(objective, variables, x, y):
    """`[n, p]` loss gradients of each example, by one tape jacobian (independent of the library's)."""
    space = tfi.ParameterSpace(variables)
    with tf.GradientTape() as tape:
        losses = objective.per_example_loss(y, objective.outputs(x))
    jacobian = tape.jacobian(losses, [v.value if hasattr(v, "value") else v for v in variables])
    return space.flatten(jacobian, batch_dims=1).numpy()


def spd_system(seed=1, p=20, k=4):
    """A random symmetric positive definite `a` [p, p], right-hand sides `b` [k, p], `a` as an operator
    (self-adjoint, positive definite hints) and the dense solution `a⁻¹ bᵀ` as rows."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((p, p))
    a = m @ m.T + 0.5 * np.eye(p)
    b = rng.standard_normal((k, p))
    op = dense_operator(a, is_self_adjoint=True, is_positive_definite=True)
    return a, b, op, np.linalg.solve(a, b.T).T


def dense_operator(matrix, **hints):
    return tf.linalg.LinearOperatorFullMatrix(tf.constant(matrix, tf.float64), **hints)


@dataclasses.dataclass
class SolverProblem:
    name: str
    model: keras.Model
    x: np.ndarray
    y: np.ndarray
    operator: tfi.HessianOperator  # H + damping·I
    dense: np.ndarray  # the same matrix, dense
    b: np.ndarray  # [3, p] right-hand sides
    l2: float = 0.0

    def solve(self, b):
        return np.linalg.solve(self.dense, np.asarray(b).T).T


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)) * np.linspace(0.5, 2.0, D)  # unequal feature scales
    w = rng.standard_normal((D, CLASSES))
    y = np.argmax(x @ w + 1.5 * rng.standard_normal((N, CLASSES)), axis=1)  # not separable
    return x, y


def softmax_regression(seed=0):
    """Multinomial logistic regression (convex) with l2 = 0.01; dense reference in closed form."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((D,), dtype="float64"),
                              keras.layers.Dense(CLASSES, dtype="float64", name="logits")])
    x, y = data(seed)
    model.layers[0].kernel.assign(np.random.default_rng(seed + 1).standard_normal((D, CLASSES)) * 0.3)
    l2 = 0.01
    operator = tfi.HessianOperator(model, sce, (x, y), l2=l2, batch_size=64, mode="back_over_back")
    dense = softmax_regression_hessian(model, x, l2)
    b = np.random.default_rng(seed + 2).standard_normal((3, operator.space.size))
    return SolverProblem("softmax_regression", model, x, y, operator, dense, b, l2)


def softmax_regression_hessian(model, x, l2):
    """Closed form: mean_i (diag πᵢ − πᵢπᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + l2·I, ordered kernel [D, C] then bias [C]."""
    kernel, bias = (np.asarray(v) for v in model.layers[0].weights)
    logits = x @ kernel + bias
    pi = np.exp(logits - logits.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)
    xt = np.hstack([x, np.ones((len(x), 1))])  # bias as feature D, so its index is D·C + j
    s = np.einsum("ij,jk->ijk", pi, np.eye(CLASSES)) - np.einsum("ij,ik->ijk", pi, pi)
    h = np.einsum("ia,ib,ijk->ajbk", xt, xt, s) / len(x)
    p = (D + 1) * CLASSES
    return h.reshape(p, p) + l2 * np.eye(p)


def mlp(seed=0, margin=0.05):
    """A tanh MLP at a random point: H is indefinite; damping = −λ_min(H) + margin makes it PD."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((D,), dtype="float64"),
                              keras.layers.Dense(8, activation="tanh", dtype="float64", name="hidden"),
                              keras.layers.Dense(CLASSES, dtype="float64", name="head")])
    x, y = data(seed)
    undamped = tfi.HessianOperator(model, sce, (x, y), batch_size=64, mode="back_over_back")
    h = dense_hessian(model, sce, x, y)  # nested tapes, independent of the library
    smallest = float(np.linalg.eigvalsh(h)[0])
    assert smallest < 0, "the MLP problem is meant to have an indefinite Hessian"
    damping = -smallest + margin
    operator = undamped.with_options(damping=damping)
    b = np.random.default_rng(seed + 2).standard_normal((3, operator.space.size))
    problem = SolverProblem("mlp", model, x, y, operator, h + damping * np.eye(len(h)), b)
    problem.undamped = undamped
    problem.undamped_dense = h
    return problem
