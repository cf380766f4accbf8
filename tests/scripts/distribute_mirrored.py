"""MirroredStrategy on 2 logical CPUs vs one device: prints the relative differences as RESULT <json>.

Logical devices must be configured before TensorFlow initialises, hence a separate process
(tests/test_distribute.py runs it).
"""

import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402  (after the logical devices are configured)

keras.config.set_floatx("float64")

import tf_influence as tfi  # noqa: E402
from tf_influence import distribute  # noqa: E402
from tf_influence.curvature import fit_factors  # noqa: E402
from tf_influence.operators import EKFACOperator  # noqa: E402
from distribute_common import data, mlp, rel, sce  # noqa: E402

keras.utils.set_random_seed(0)
rng, x, y, w, x_test, y_test = data()

single = mlp()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = mlp()
mirrored.set_weights(single.get_weights())
out = {"replicas": strategy.num_replicas_in_sync,
       "variable_type": type(mirrored.layers[0].kernel.value).__name__}

options = dict(damping=0.5, l2=0.01, batch_size=10)
op1 = tfi.HessianOperator(single, sce, (x, y, w), **options)
op2 = tfi.HessianOperator(mirrored, sce, (x, y, w), strategy=strategy, **options)
p = op1.space.size
v = rng.standard_normal((3, p))
out["matvec"] = rel(op2.matvec(tf.constant(v[0])), op1.matvec(tf.constant(v[0])))
out["apply_k3"] = rel(op2.matmul_rows(v), op1.matmul_rows(v))

out["operator_strategy"] = op2.problem.strategy is strategy and op1.problem.strategy is None
# Each batch really is split: replica shards of the first batch (10 rows) live on both devices.
first = next(iter(op2.problem.dataset))
shards = strategy.experimental_local_results(distribute.split_batch(strategy, first))
out["shard_rows"] = [int(s[2].shape[0]) for s in shards]
# ... and the compiled data pass places the curvature products on both devices.
graph_def = op2.data_pass.get_concrete_function(tf.TensorSpec([3, p], tf.float64)).graph.as_graph_def()
nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
out["pass_devices"] = sorted({n.device.split("/")[-1] for n in nodes if n.device})

# Batches of 12: the last batch has 1 example, so one replica gets an empty shard.
op1b = tfi.HessianOperator(single, sce, (x, y, w), damping=0.5, l2=0.01, batch_size=12)
op2b = tfi.HessianOperator(mirrored, sce, (x, y, w), damping=0.5, l2=0.01, batch_size=12,
                           strategy=strategy)
out["matvec_empty_shard"] = rel(op2b.matmul_rows(v), op1b.matmul_rows(v))
out["gradient"] = rel(op2.gradient(), op1.gradient())
out["batch_apply"] = rel(op2.batch_matmul_rows(first, v), op1.batch_matmul_rows(first, v))

# The operator built inside strategy.scope() picks the strategy up without the argument.
with strategy.scope():
    op3 = tfi.HessianOperator(mirrored, sce, (x, y, w), **options)
out["implicit_strategy"] = op3.problem.strategy is strategy
out["matvec_implicit"] = rel(op3.matmul_rows(v), op1.matmul_rows(v))

b = rng.standard_normal((2, p))
x1, _ = tfi.solvers.cg(op1, b, tol=1e-12, maxiter=500)
x2, info2 = tfi.solvers.cg(op2, b, tol=1e-12, maxiter=500)
out["cg"] = rel(x2, x1)
out["cg_iterations"] = int(info2.iterations)

inf1 = tfi.Influence(single, sce, (x, y, w), method="cg", tol=1e-12, maxiter=500,
                     progress=False, **options)
inf2 = tfi.Influence(mirrored, sce, (x, y, w), method="cg", tol=1e-12, maxiter=500,
                     progress=False, strategy=strategy, **options)
s1 = inf1.scores((x_test, y_test))
s2 = inf2.scores((x_test, y_test))
out["scores_shape"] = list(s2.shape)
out["scores"] = rel(s2, s1)
out["self_influence"] = rel(inf2.self_influence(), inf1.self_influence())

# LiSSA: exact products (batch_size=None) and seeded minibatches of 5 (split across replicas).
scale = 1.1 * tfi.extreme_eigenvalues(op1, num_iterations=20, seed=0).largest
for key, batch in (("lissa_full", None), ("lissa_minibatch", 5)):
    l1, _ = tfi.solvers.lissa(op1, b, scale=scale, batch_size=batch, recursion_depth=40, seed=3, progress=False)
    l2, _ = tfi.solvers.lissa(op2, b, scale=scale, batch_size=batch, recursion_depth=40, seed=3, progress=False)
    out[key] = rel(l2, l1)
    out[key + "_vs_cg"] = rel(l1, x1)  # the comparison is not between two unconverged garbage values

# EKFAC factors with labels sampled from the model (seeded), batches of 12 (an empty shard).
sce_keras = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # named: fisher="true" can sample
f1 = fit_factors(tfi.Problem(single, sce_keras, (x, y, w), batch_size=12), method="ekfac", fisher="true", seed=0)
f2 = fit_factors(tfi.Problem(mirrored, sce_keras, (x, y, w), batch_size=12, strategy=strategy), method="ekfac",
                 fisher="true", seed=0)
out["ekfac_total_weight"] = abs(f2.total_weight - f1.total_weight) / f1.total_weight
out["ekfac_eigenvalues"] = max(rel(np.sort(np.ravel(e2)), np.sort(np.ravel(e1)))
                               for e1, e2 in zip(f1.eigenvalues(), f2.eigenvalues()))
out["ekfac_dense"] = rel(EKFACOperator(f2, damping=1e-3).to_dense(), EKFACOperator(f1, damping=1e-3).to_dense())
inf1e = tfi.Influence(single, sce_keras, (x, y, w), method="ekfac", progress=False, **options)
inf2e = tfi.Influence(mirrored, sce_keras, (x, y, w), method="ekfac", progress=False, strategy=strategy, **options)
out["ekfac_scores"] = rel(inf2e.scores((x_test, y_test)), inf1e.scores((x_test, y_test)))
print("RESULT " + json.dumps(out))
