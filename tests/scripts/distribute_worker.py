"""One worker of a 2-worker MultiWorkerMirroredStrategy on 127.0.0.1; saves its results to an .npz.

Usage: python distribute_worker.py INDEX PORT0,PORT1 OUT.npz (tests/test_distribute.py starts both).
"""

import json
import os
import sys

index, ports, out_path = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
os.environ["TF_CONFIG"] = json.dumps({  # before TensorFlow starts
    "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
    "task": {"type": "worker", "index": index},
})

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras.config.set_floatx("float64")

import tf_influence as tfi  # noqa: E402
from distribute_common import data, mlp, sce  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING))
keras.utils.set_random_seed(0)
rng, x, y, w, x_test, y_test = data()

# Every worker holds the same data and computes only its replica's shard of each batch.
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
