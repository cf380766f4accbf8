"""Exact chain solve vs dense-Hessian solve vs CG, as the depth of a Dense chain grows.

Width 16, batch 4, tanh, softmax cross-entropy, float64. For each depth L the damping λ is the
smallest power of two times 1e-3 that makes `H + λI` positive definite (read off the chain solver's
inertia), so CG applies; CG runs to a relative residual of 1e-10 (the chain solve reaches ~1e-15),
twice: the project's `cg` on `tfi.HessianOperator`, and `tf.linalg.experimental.conjugate_gradient`
in one `tf.function` with a hand-compiled forward-over-back HVP on the single batch (a lean baseline).
Times are wall-clock seconds after a warm-up (tracing excluded); the chain time includes building
the blocks from the model, the factorization and the solve.

Run: python benchmarks/chain.py [--depths 4 8 16 32 64] [--max-dense 5000] [--repeats 3]
     python benchmarks/chain.py --curvature gauss_newton --damping 1e-4 --skip-tfi-cg
"""

import argparse
import time

import _timing
import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from tf_influence.solvers.cg import cg
from tf_influence.solvers.chain import ChainHessian

WIDTH, BATCH, CLASSES = 16, 4, 4


def build(depth, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((WIDTH,), dtype="float64")]
    layers += [keras.layers.Dense(WIDTH, activation="tanh", dtype="float64") for _ in range(depth - 1)]
    layers.append(keras.layers.Dense(CLASSES, dtype="float64"))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(seed)
    return model, rng.standard_normal((BATCH, WIDTH)), rng.integers(0, CLASSES, BATCH)


def positive_damping(model, loss, data, curvature):
    damping = 1e-3
    while ChainHessian(model, loss, data, damping=damping, curvature=curvature).inertia:
        damping *= 2
    return damping


def dense_solve(model, loss, x, y, damping, b):
    tf_vars = [v.value for v in model.trainable_variables]
    x, y = tf.constant(x), tf.constant(y)

    @tf.function
    def solve(b):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = tf.reduce_mean(loss.call(y, model(x)))
            flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(value, tf_vars)], 0)
        blocks = outer.jacobian(flat, tf_vars, experimental_use_pfor=True)
        hessian = tf.concat([tf.reshape(t, [flat.shape[0], -1]) for t in blocks], 1)
        return tf.linalg.solve(hessian + damping * tf.eye(flat.shape[0], dtype=tf.float64), b[:, tf.newaxis])[:, 0]

    return solve


class _CompiledHessian(tf.linalg.LinearOperator):
    """`H + λI` by a hand-compiled forward-over-back HVP on the one batch: a lean CG baseline."""

    def __init__(self, model, loss, x, y, damping, curvature):
        self._gauss_newton = curvature == "gauss_newton"
        self._vars = [v.value for v in model.trainable_variables]
        self._space = tfi.ParameterSpace(model.trainable_variables)
        self._x, self._y, self._damping, self._model, self._loss = tf.constant(x), tf.constant(y), damping, model, loss
        super().__init__(dtype=tf.float64, is_self_adjoint=True, is_positive_definite=True, is_square=True)

    def _shape(self):
        return tf.TensorShape([self._space.size, self._space.size])

    def _matmul(self, v, adjoint=False, adjoint_arg=False):
        v = v[:, 0]
        if self._gauss_newton:
            return (self._gauss_newton_product(v) + self._damping * v)[:, tf.newaxis]
        with tf.autodiff.ForwardAccumulator(self._vars, self._space.unflatten(v)) as acc:
            with tf.GradientTape() as tape:
                value = tf.reduce_mean(self._loss.call(self._y, self._model(self._x)))
            grads = tape.gradient(value, self._vars)
        return (self._space.flatten(acc.jvp(grads)) + self._damping * v)[:, tf.newaxis]

    def _gauss_newton_product(self, v):
        with tf.GradientTape() as tape:
            with tf.autodiff.ForwardAccumulator(self._vars, self._space.unflatten(v)) as acc:
                logits = self._model(self._x)
            jv = acc.jvp(logits)
        out = tf.stop_gradient(logits)
        with tf.autodiff.ForwardAccumulator(out, jv) as acc_out:
            with tf.GradientTape() as out_tape:
                out_tape.watch(out)
                value = tf.reduce_mean(self._loss.call(self._y, out))
            grad = out_tape.gradient(value, out)
        return self._space.flatten(tape.gradient(logits, self._vars, output_gradients=acc_out.jvp(grad)))


def run_tfi_cg(model, loss, data, damping, curvature, b, x_chain):
    """The project's `cg` on `tfi.HessianOperator`: seconds, iterations, error relative to the chain solution."""
    operator = tfi.HessianOperator(model, loss, data, batch_size=BATCH, damping=damping, curvature=curvature,
                                   is_positive_definite=True)
    cg(operator, b, tol=1e-10, maxiter=2)  # traces the compiled loop
    start = time.perf_counter()
    x_cg, info = cg(operator, b, tol=1e-10, maxiter=20000)
    seconds = time.perf_counter() - start
    return f"{seconds:.3f}", info.iterations, f"{float(tf.norm(x_cg - x_chain) / tf.norm(x_chain)):.1e}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--max-dense", type=int, default=5000, help="largest p for the dense solve")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curvature", default="hessian", choices=["hessian", "gauss_newton"])
    parser.add_argument("--damping", type=float, default=None,
                        help="fixed damping (default: the smallest 1e-3·2^j giving a positive definite H + λI)")
    parser.add_argument("--skip-tfi-cg", action="store_true", help="skip the (slow) cg on tfi.HessianOperator")
    args = parser.parse_args()
    keras.backend.set_floatx("float64")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows, chain_times = [], {}
    for depth in args.depths:
        model, x, y = build(depth)
        data = (x, y)
        damping = args.damping if args.damping is not None else positive_damping(model, loss, data, args.curvature)
        p = model.count_params()
        b = tf.constant(np.random.default_rng(1).standard_normal(p))

        def chain():
            return ChainHessian(model, loss, data, damping=damping, curvature=args.curvature).solvevec(b)

        x_chain = chain()
        t_chain = _timing.median_time(chain, repeats=args.repeats, warmup=1)
        chain_times[depth] = t_chain
        hessian = ChainHessian(model, loss, data, damping=damping, curvature=args.curvature)
        residual = float(tf.norm(hessian.matvec(x_chain) - b) / tf.norm(b))

        t_dense, dense_err = "-", "-"
        if p <= args.max_dense and args.curvature == "hessian":
            solve = dense_solve(model, loss, x, y, damping, b)
            x_dense = solve(b)  # traces
            t_dense = f"{_timing.median_time(lambda: solve(b), repeats=1, warmup=0):.3f}"
            dense_err = f"{float(tf.norm(x_dense - x_chain) / tf.norm(x_chain)):.1e}"

        t_cg, cg_iters, cg_err = "-", "-", "-"
        if not args.skip_tfi_cg:
            t_cg, cg_iters, cg_err = run_tfi_cg(model, loss, data, damping, args.curvature, b, x_chain)

        lean = _CompiledHessian(model, loss, x, y, damping, args.curvature)
        lean_cg = tf.function(lambda b: tf.linalg.experimental.conjugate_gradient(lean, b, tol=1e-10, max_iter=20000))
        lean_cg(b)  # traces
        t_lean = _timing.median_time(lambda: lean_cg(b).x, repeats=args.repeats, warmup=0)
        result = lean_cg(b)
        lean_err = float(tf.norm(result.x - x_chain) / tf.norm(x_chain))
        rows.append((depth, f"{p:,}", f"{damping:g}", f"{t_chain:.3f}", f"{residual:.1e}", t_dense, dense_err,
                     t_cg, cg_iters, cg_err, f"{t_lean:.3f}", int(result.i), f"{lean_err:.1e}"))
    _timing.print_table(
        f"Exact chain solve vs dense vs CG ({args.curvature}, width {WIDTH}, batch {BATCH}, tanh, float64); "
        f"{_timing.machine_info()}",
        ("depth L", "p", "damping", "chain s", "chain resid", "dense s", "dense vs chain", "tfi.cg s", "iters",
         "tfi.cg vs chain", "CG compiled-HVP s", "iters", "vs chain"), rows)
    if 8 in chain_times and 64 in chain_times:
        print(f"\nchain t(64)/t(8) = {chain_times[64] / chain_times[8]:.2f}  (linear in depth: 8)")


if __name__ == "__main__":
    main()
