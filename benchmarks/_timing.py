"""Shared timing helpers for the benchmark scripts."""

import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def median_time(fn, *, repeats=7, warmup=2):
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _block(result):
    import tensorflow as tf

    for t in tf.nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()


def machine_info():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (f"python {platform.python_version()}, tensorflow {tf.__version__}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, GPU: {', '.join(g.name for g in gpus) or 'none'}")


def print_table(title, header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(f"\n{title}")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
