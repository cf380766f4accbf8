"""Where TensorFlow spends its time: op-type totals from a TF profiler trace (no TensorBoard needed)."""

import collections
import glob
import os
import tempfile

import tensorflow as tf


def op_times(fn):
    """Runs `fn()` under the TF profiler; returns `{op type: seconds}` summed over every CPU thread.

    Only TensorFlow kernels are counted (events named `name:Type`); Python and tf.data time is not.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="tfi_profile_")
    tf.profiler.experimental.start(logdir)
    try:
        fn()
    finally:
        tf.profiler.experimental.stop()
    totals = collections.Counter()
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    if ":" in name and not name.startswith("__inference"):
                        totals[name.rsplit(":", 1)[-1]] += event.duration_ps / 1e12
    return totals


def print_op_times(title, totals, top=10):
    kernels = {k: v for k, v in totals.items() if k not in ("Run", "Process")}
    total = sum(kernels.values()) or 1.0
    print(f"\n{title} (kernel time summed over threads: {total:.2f} s)")
    for op, seconds in collections.Counter(kernels).most_common(top):
        print(f"  {op:28s} {seconds:8.3f} s  {100 * seconds / total:5.1f} %")
