"""HVPs, CG and influence scores under tf.distribute.MirroredStrategy equal single-device results.

Logical devices must be configured before TensorFlow initialises, so every check runs in ONE
fresh subprocess that splits the CPU into 2 logical devices, builds the same float64 MLP with and
without a strategy (same weights) and prints the relative differences as JSON.
"""

import json
import subprocess
import sys
import textwrap

import pytest

TOL = 1e-10

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    keras.config.set_floatx("float64")
    import tf_influence as tfi
    keras.utils.set_random_seed(0)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    def mlp():
        return keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ])

    def sce(y, logits):
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    rng = np.random.default_rng(0)
    n = 37                                  # 37 = 4 batches of 10 (last partial, odd size)
    x = rng.standard_normal((n, 4))
    y = rng.integers(0, 3, size=n)
    w = rng.uniform(0.5, 2.0, size=n)       # sample weights: exact weighted means required
    x_test = rng.standard_normal((5, 4))
    y_test = rng.integers(0, 3, size=5)

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
    out["apply_k3"] = rel(op2.apply(v), op1.apply(v))

    out["operator_strategy"] = op2.strategy is strategy and op1.strategy is None
    # Each batch really is split: replica shards of the first batch (10 rows) live on both devices.
    from tf_influence import distribute
    first = next(iter(op2.dataset))
    shards = strategy.experimental_local_results(distribute.split_batch(strategy, first))
    out["shard_rows"] = [int(s[2].shape[0]) for s in shards]
    # ... and the compiled data pass places the curvature products on both devices.
    graph_def = op2._data_pass.get_concrete_function(tf.TensorSpec([3, p], tf.float64)).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    out["pass_devices"] = sorted({n.device.split("/")[-1] for n in nodes if n.device})

    # Batches of 12: the last batch has 1 example, so one replica gets an empty shard.
    op1b = tfi.HessianOperator(single, sce, (x, y, w), damping=0.5, l2=0.01, batch_size=12)
    op2b = tfi.HessianOperator(mirrored, sce, (x, y, w), damping=0.5, l2=0.01, batch_size=12,
                               strategy=strategy)
    out["matvec_empty_shard"] = rel(op2b.apply(v), op1b.apply(v))
    out["gradient"] = rel(op2.gradient(), op1.gradient())
    out["batch_apply"] = rel(op2.batch_apply(first, v), op1.batch_apply(first, v))

    # The operator built inside strategy.scope() picks the strategy up without the argument.
    with strategy.scope():
        op3 = tfi.HessianOperator(mirrored, sce, (x, y, w), **options)
    out["implicit_strategy"] = op3.strategy is strategy
    out["matvec_implicit"] = rel(op3.apply(v), op1.apply(v))

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
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def mirrored_results():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = json.loads(lines[-1][len("RESULT "):])
    print(results)
    return results


def test_two_replicas_and_mirrored_variables(mirrored_results):
    assert mirrored_results["replicas"] == 2
    assert mirrored_results["variable_type"] == "MirroredVariable"
    assert mirrored_results["operator_strategy"] is True


def test_each_batch_is_split_across_both_devices(mirrored_results):
    assert mirrored_results["shard_rows"] == [5, 5]
    assert mirrored_results["pass_devices"] == ["device:CPU:0", "device:CPU:1"]


def test_cg_ran(mirrored_results):
    assert mirrored_results["cg_iterations"] > 5
    assert mirrored_results["scores_shape"] == [5, 37]


@pytest.mark.parametrize("key", ["matvec", "apply_k3", "matvec_implicit", "matvec_empty_shard", "gradient",
                                 "batch_apply", "cg", "scores"])
def test_distributed_equals_single_device(mirrored_results, key):
    assert mirrored_results[key] <= TOL, mirrored_results


def test_strategy_picked_up_from_scope(mirrored_results):
    assert mirrored_results["implicit_strategy"] is True
