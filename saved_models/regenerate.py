"""Regenerates `saved_models/digits_mlp` (the committed SavedModel example) and `digits_query.npz`.

The demo's digits MLP (64-32-10, 5% flipped labels, seed 0), influence over its last layer
(330 parameters) with method="direct", damping=1e-3, against its 1,200 training examples.
`digits_query.npz` holds 5 test digits (`x`, `y`) and the library's scores for them, so a query
of the exported model can be checked against the library.

Run: python saved_models/regenerate.py
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_influence as tfi  # noqa: E402
from tf_influence.demo import load_digits_with_flipped_labels, train_classifier  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def main():
    x_train, y_train, x_test, y_test, _ = load_digits_with_flipped_labels(seed=0)
    model = train_classifier(x_train, y_train, seed=0)
    inf = tfi.Influence(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x_train, y_train),
                        variables="head", method="direct", damping=1e-3, progress=False)
    info = tfi.export_saved_model(inf, HERE / "digits_mlp", overwrite=True)
    query = (x_test[:5], y_test[:5])
    np.savez(HERE / "digits_query.npz", x=query[0], y=query[1], scores=inf.scores(query))
    print(f"Wrote {info['path']} ({info['bytes'] / 2**20:.2f} MiB; {info['parameters']} parameters, "
          f"{info['n_train']} training examples) and digits_query.npz.")


if __name__ == "__main__":
    main()
