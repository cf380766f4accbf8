"""HVPs, CG and influence scores under tf.distribute.MirroredStrategy equal single-device results.

Logical devices must be configured before TensorFlow initialises, so every check runs in ONE
fresh subprocess that splits the CPU into 2 logical devices, builds the same float64 MLP with and
without a strategy (same weights) and prints the relative differences as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

TOL = 1e-10

# The model, loss and data of both tests (every process and worker builds the same).
COMMON = textwrap.dedent(r"""
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
""")

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
""") + COMMON + textwrap.dedent(r"""

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
    from tf_influence import distribute
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
    from tf_influence.curvature import fit_factors
    from tf_influence.operators import EKFACOperator
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
                                 "batch_apply", "cg", "scores", "self_influence", "lissa_full",
                                 "lissa_minibatch", "ekfac_total_weight", "ekfac_eigenvalues", "ekfac_dense",
                                 "ekfac_scores"])
def test_distributed_equals_single_device(mirrored_results, key):
    assert mirrored_results[key] <= TOL, mirrored_results


def test_strategy_picked_up_from_scope(mirrored_results):
    assert mirrored_results["implicit_strategy"] is True


# -- MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 ---------------------------------

WORKER = textwrap.dedent(r"""
    import json, os, sys
    index, ports, out_path = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    })
    import numpy as np
    import tensorflow as tf
    import keras
    keras.config.set_floatx("float64")
    import tf_influence as tfi

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING))
    keras.utils.set_random_seed(0)
""") + COMMON + textwrap.dedent(r"""
    # Every worker holds the same data (COMMON) and computes only its replica's shard of each batch.
    single = mlp()
    with strategy.scope():
        mirrored = mlp()
    mirrored.set_weights(single.get_weights())
    options = dict(damping=0.5, l2=0.01, batch_size=10)
    op = tfi.HessianOperator(mirrored, sce, (x, y, w), strategy=strategy, **options)
    v = rng.standard_normal((3, op.space.size))
    b = rng.standard_normal((2, op.space.size))
    result = {"replicas": strategy.num_replicas_in_sync,
              "hvp": op.matmul_rows(v).numpy(),
              "cg": tfi.solvers.cg(op, b, tol=1e-12, maxiter=500)[0].numpy()}
    inf = tfi.Influence(mirrored, sce, (x, y, w), method="cg", tol=1e-12, maxiter=500, progress=False,
                        strategy=strategy, **options)
    result["scores"] = inf.scores((x_test, y_test))
    # Single-device reference in the same process: a model built outside every scope, no strategy.
    ref = tfi.HessianOperator(single, sce, (x, y, w), **options)
    result["hvp_ref"] = ref.matmul_rows(v).numpy()
    result["cg_ref"] = tfi.solvers.cg(ref, b, tol=1e-12, maxiter=500)[0].numpy()
    result["scores_ref"] = tfi.Influence(single, sce, (x, y, w), method="cg", tol=1e-12, maxiter=500,
                                         progress=False, **options).scores((x_test, y_test))
    np.savez(out_path, **result)
    print("WORKER DONE", index)
""")


def _free_ports(k):
    import socket
    sockets = [socket.socket() for _ in range(k)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def multi_worker_results(tmp_path_factory):
    import numpy as np
    root = tmp_path_factory.mktemp("mwms")
    ports = ",".join(str(p) for p in _free_ports(2))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), ports, str(root / f"worker{i}.npz")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    logs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            logs.append(f"rc={proc.returncode}\n{out[-2000:]}\n{err[-6000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)
    return [dict(np.load(root / f"worker{i}.npz")) for i in range(2)]


def _rel(a, b):
    import numpy as np
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_multi_worker_equals_single_device(multi_worker_results):
    differences = {}
    for i, result in enumerate(multi_worker_results):
        assert int(result["replicas"]) == 2
        for key in ("hvp", "cg", "scores"):
            differences[f"worker{i}_{key}"] = _rel(result[key], result[f"{key}_ref"])
    print(differences)
    assert max(differences.values()) <= TOL, differences
    # Both workers hold the same reduced result.
    assert _rel(multi_worker_results[0]["hvp"], multi_worker_results[1]["hvp"]) <= TOL
