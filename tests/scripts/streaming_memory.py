"""Scores N training examples streamed to disk and prints the peak resident memory while scoring.

Usage: python streaming_memory.py N OUT.npy (tests/test_streaming.py compares N = 10,000 and 50,000).
"""


import os
import sys
import threading
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_influence as tfi  # noqa: E402

n = int(sys.argv[1])
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(16, activation="tanh"),
                          keras.layers.Dense(4, name="head")])


def example(i):
    g = tf.random.stateless_normal([32], seed=tf.stack([i, tf.constant(0, tf.int64)]))
    return g, tf.math.floormod(i, 4), tf.constant(1.0)


train = tf.data.Dataset.range(n).map(example).batch(1000)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
inf = tfi.Influence(model, loss, train, variables="head", method="direct", damping=0.1,
                    curvature="gauss_newton", progress=False)
test = tf.data.Dataset.range(n, n + 8).map(example).batch(8)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


peak, running = [rss()], True


def sample():  # the resident set while scoring (ru_maxrss would be the import-time peak)
    while running:
        peak.append(rss())
        time.sleep(0.005)


sampler = threading.Thread(target=sample)
sampler.start()
scores = tfi.score_to_file(inf, test, sys.argv[2])
running = False
sampler.join()
assert scores.shape == (8, n)
print(max(peak))
