"""HVPs, CG and influence scores under tf.distribute.MirroredStrategy equal single-device results.

Logical devices must be configured before TensorFlow initialises, so every check runs in ONE
fresh subprocess that splits the CPU into 2 logical devices, builds the same float64 MLP with and
without a strategy (same weights) and prints the relative differences as JSON.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import script_environment

TOL = 1e-10

SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"


@pytest.fixture(scope="module")
def mirrored_results():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "distribute_mirrored.py")], capture_output=True, text=True,
                          timeout=240, env=script_environment())
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
    env = script_environment(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "distribute_worker.py"), str(i), ports,
                               str(root / f"worker{i}.npz")],
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
