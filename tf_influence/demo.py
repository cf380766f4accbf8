"""The demo: influential and mislabeled training examples of a digits classifier.

Trains a small Keras MLP on scikit-learn's bundled 8x8 digits (no download), flips 5% of the
training labels, then shows (a) the most helpful and harmful training examples for a few test
predictions and (b) how many flipped labels self-influence ranks in its top 10%. It prints the time
spent training and the time spent on influence (method="auto": the exact direct route here), and
their ratio.
"""

import time

import numpy as np


def load_digits_with_flipped_labels(*, flip_fraction=0.05, n_train=1200, seed=0):
    """Digits split into train/test, with `flip_fraction` of the training labels changed at random.

    Returns `(x_train, y_train_noisy, x_test, y_test, flipped_indices)`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    x = (digits.data / 16.0).astype("float32")[order]
    y = digits.target.astype("int64")[order]
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train].copy(), x[n_train:], y[n_train:]
    flipped = np.sort(rng.choice(n_train, size=int(round(flip_fraction * n_train)), replace=False))
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    return x_train, y_train, x_test, y_test, flipped


def train_classifier(x, y, *, l2=1e-3, epochs=40, seed=0):
    """A 64-32-10 tanh MLP trained with Adam; `l2` is its kernel weight decay."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(32, activation="tanh", kernel_regularizer=keras.regularizers.L2(l2 / 2), name="hidden"),
        keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(l2 / 2), name="head"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def run(*, plot=None, method="auto", num_test=3, seed=0, progress=False, out=print):
    """Runs the demo and prints its findings; saves a figure to `plot` if given. Returns a summary dict."""
    import keras

    import tf_influence as tfi

    start = time.perf_counter()
    x_train, y_train, x_test, y_test, flipped = load_digits_with_flipped_labels(seed=seed)
    model = train_classifier(x_train, y_train, seed=seed)
    training_seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    predictions = np.argmax(model.predict(x_test[:num_test], verbose=0), axis=1)
    out(f"Trained a 64-32-10 MLP on {len(y_train)} digits ({len(flipped)} labels flipped); "
        f"test accuracy {accuracy:.3f}.")

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    influence_start = time.perf_counter()
    inf = tfi.Influence(model, loss, (x_train, y_train), variables="head", method=method,
                        damping=1e-3, progress=progress)
    test = (x_test[:num_test], y_test[:num_test])
    top = inf.top_k(test, k=3)
    influence_seconds = time.perf_counter() - influence_start
    route = inf.prepared().method.name
    chosen = f"method={inf.method!r} (route: {route})" if route != inf.method else f"method={inf.method!r}"
    out(f"\nInfluence over the last layer ({inf.space.size} parameters), {chosen}, "
        f"damping={inf.damping}. Positive score = the training example helped the prediction.")
    for t in range(num_test):
        out(f"\nTest example {t}: label {y_test[t]}, predicted {predictions[t]}")
        for kind, idx, sc in (("helpful", top.helpful_indices[t], top.helpful_scores[t]),
                              ("harmful", top.harmful_indices[t], top.harmful_scores[t])):
            items = ", ".join(f"#{i} (label {y_train[i]}{', FLIPPED' if i in flipped else ''}, "
                              f"score {s:+.3g})" for i, s in zip(idx, sc))
            out(f"  most {kind}: {items}")

    self_start = time.perf_counter()
    self_inf = inf.self_influence()
    influence_seconds += time.perf_counter() - self_start
    top_decile = np.argsort(-self_inf)[: len(y_train) // 10]
    found = np.intersect1d(top_decile, flipped)
    out(f"\nSelf-influence: {len(found)} of {len(flipped)} flipped labels are in its top 10% "
        f"({len(top_decile)} examples); random ranking would find about {len(flipped) // 10}.")
    if plot:
        _plot(plot, x_train, y_train, x_test, y_test, predictions, top, flipped, self_inf)
        out(f"Figure saved to {plot}")
    out(f"\nTime: training {training_seconds:.1f} s (data included), influence {influence_seconds:.1f} s "
        f"(top-k and self-influence, {route}): ratio {influence_seconds / training_seconds:.2f}. "
        f"Done in {time.perf_counter() - start:.1f} s.")
    return {"accuracy": accuracy, "flipped": flipped, "found": found, "top_k": top,
            "self_influence": self_inf, "training_seconds": training_seconds, "influence_seconds": influence_seconds,
            "method": route}


def _plot(path, x_train, y_train, x_test, y_test, predictions, top, flipped, self_inf):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(predictions)
    fig, axes = plt.subplots(rows + 1, 7, figsize=(11, 1.9 * (rows + 1)))
    for t in range(rows):
        cells = [(x_test[t], f"test: {y_test[t]}\npred {predictions[t]}", "black")]
        cells += [(x_train[i], f"+{s:.2g} (y={y_train[i]})", "red" if i in flipped else "green")
                  for i, s in zip(top.helpful_indices[t], top.helpful_scores[t])]
        cells += [(x_train[i], f"{s:.2g} (y={y_train[i]})", "red" if i in flipped else "black")
                  for i, s in zip(top.harmful_indices[t], top.harmful_scores[t])]
        for ax, (image, title, color) in zip(axes[t], cells):
            ax.imshow(image.reshape(8, 8), cmap="gray_r")
            ax.set_title(title, fontsize=8, color=color)
            ax.axis("off")
    worst = np.argsort(-self_inf)[:7]
    for ax, i in zip(axes[rows], worst):
        ax.imshow(x_train[i].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"self-inf #{i}\ny={y_train[i]}{' FLIP' if i in flipped else ''}", fontsize=8,
                     color="red" if i in flipped else "black")
        ax.axis("off")
    fig.suptitle("Each row: a test digit, its 3 most helpful and 3 most harmful training digits (score, label).\n"
                 "Bottom row: highest self-influence. Red = flipped training label.", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
