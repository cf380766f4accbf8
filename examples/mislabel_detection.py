"""Mislabel detection: what self-influence adds over the training loss, measured over several seeds.

5% of the 1,200 training labels of scikit-learn's bundled digits are flipped at random, a 64-32-10
tanh MLP is trained (`tf_influence.demo.train_classifier`), and the training examples are ranked by
four criteria; the table counts the flipped labels among the top 5%, 10% and 20% (the review
budget), averaged over seeds (each seed: another split, noise and initialisation):

* training loss — the baseline every influence method must beat;
* gradient norm² `‖gᵢ‖²` over the last layer — self-influence without the curvature;
* self-influence `gᵢᵀ (H + λI)⁻¹ gᵢ` over the last layer (λ = 1e-3, exact `method="direct"`);
* validation influence — minus the sum of the example's influence scores on 300 clean validation
  points (how much it is predicted to raise the validation loss).

Three settings: the plain one; the same with 10% of the training images replaced by ambiguous
blends `0.55·xᵢ + 0.45·xⱼ` of two digits of different classes that keep the label of the majority
digit (hard but correctly labelled examples, which a loss ranking also flags); and a model that
memorises its training set (no weight decay, 300 epochs), so flipped labels end with low loss.

RESULTS_PLACEHOLDER

Run: python examples/mislabel_detection.py [--seeds 3] [--settings plain blends memorising]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_influence as tfi  # noqa: E402
from tf_influence.demo import load_digits_with_flipped_labels, train_classifier  # noqa: E402

BUDGETS = (0.05, 0.10, 0.20)
SETTINGS = {
    "plain": dict(blends=0, l2=1e-3, epochs=40),
    "blends": dict(blends=120, l2=1e-3, epochs=40),
    "memorising": dict(blends=0, l2=0.0, epochs=300),
}
DESCRIPTIONS = {
    "plain": "5% random flips, weight decay 1e-3, 40 epochs",
    "blends": "5% random flips + 120 ambiguous, correctly labelled blends",
    "memorising": "5% random flips, no weight decay, 300 epochs (fits the flipped labels)",
}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def make_data(seed, blends):
    """Training data with 5% flipped labels (and `blends` ambiguous correctly labelled images), validation set."""
    x, y, x_rest, y_rest, flipped = load_digits_with_flipped_labels(flip_fraction=0.05, seed=seed)
    if blends:
        rng = np.random.default_rng(100 + seed)
        chosen = rng.choice(np.setdiff1d(np.arange(len(y)), flipped), size=blends, replace=False)
        partners = np.array([rng.choice(np.flatnonzero(y != y[i])) for i in chosen])
        x = x.copy()
        x[chosen] = 0.55 * x[chosen] + 0.45 * x[partners]
    return (x, y), (x_rest[:300], y_rest[:300]), flipped


def last_layer_gradient_norms(model, train):
    """`‖∇ℓᵢ‖²` over the last layer's kernel and bias, per training example."""
    variables = [v.value for v in model.layers[-1].trainable_variables]
    with tf.GradientTape() as tape:
        losses = LOSS(train[1], model(train[0]))
    jacobians = tape.jacobian(losses, variables)
    return sum(tf.reduce_sum(tf.reshape(j, [len(train[1]), -1]) ** 2, axis=1) for j in jacobians).numpy()


def suspicion(model, train, validation):
    """For each criterion, a score per training example: higher = more likely mislabeled."""
    inf = tfi.Influence(model, LOSS, train, variables=model.layers[-1], method="direct", damping=1e-3,
                        progress=False)
    return {
        "training loss": LOSS(train[1], model(train[0])).numpy(),
        "gradient norm² (last layer)": last_layer_gradient_norms(model, train),
        "self-influence (last layer)": inf.self_influence(),
        "validation influence (last layer)": -inf.scores(validation).sum(axis=0),
    }


def run_setting(name, seeds, log=print):
    """`{criterion: [seeds, budgets]}` counts of flipped labels found."""
    settings = SETTINGS[name]
    found = {}
    for seed in seeds:
        train, validation, flipped = make_data(seed, settings["blends"])
        model = train_classifier(*train, seed=seed, l2=settings["l2"], epochs=settings["epochs"])
        for criterion, score in suspicion(model, train, validation).items():
            order = np.argsort(-score, kind="stable")
            found.setdefault(criterion, []).append(
                [len(np.intersect1d(order[:int(b * len(order))], flipped)) for b in BUDGETS])
        log(f"  {name}, seed {seed}: " + "; ".join(f"{c} {f[-1]}" for c, f in found.items()))
    return {c: np.array(f) for c, f in found.items()}, len(flipped)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {}
    for name in args.settings:
        results[name], n_flipped = run_setting(name, range(args.seeds))
        header = " | ".join(f"top {b:.0%} ({int(b * 1200)})" for b in BUDGETS)
        print(f"\n{DESCRIPTIONS[name]}: flipped labels found of {n_flipped} (mean ± s.e. over {args.seeds} seeds)")
        print(f"| criterion | {header} |")
        print("|---|" + "---|" * len(BUDGETS))
        for criterion, counts in results[name].items():
            se = counts.std(axis=0, ddof=1) / np.sqrt(len(counts)) if len(counts) > 1 else np.zeros(len(BUDGETS))
            print(f"| {criterion} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(counts.mean(0), se)) + " |")
        print("| random (expected) | " + " | ".join(f"{b * n_flipped:.1f}" for b in BUDGETS) + " |")
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return results


if __name__ == "__main__":
    main()
