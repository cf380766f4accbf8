"""Remove the training examples most harmful to a validation set, retrain, and compare test accuracy.

Digits (scikit-learn's bundled 8x8 images), 1,200 training examples, the other 597 split into a
validation half (used to choose what to remove) and a test half (used only to measure). A 64-32-10
tanh MLP is trained with Adam (`tf_influence.demo.train_classifier`). Each training example gets
the sum of its influence scores over the validation points, `Σ_v g_vᵀ (H + λI)⁻¹ gᵢ` (λ = 1e-3):
its predicted contribution to lowering the total validation loss; the most negative are the most
harmful. The k most harmful are removed and the model retrained from the same seed; this is
compared with removing the k highest-training-loss examples and k random examples, for k = 0, 1,
2, 5, 10% of the training set, averaged over seeds (each seed: a different split, label noise and
initialisation).

RESULTS_PLACEHOLDER

Run: python examples/remove_harmful.py [--seeds 5] [--plot docs/remove_harmful.png]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_influence as tfi  # noqa: E402
from tf_influence.demo import load_digits_with_flipped_labels, train_classifier  # noqa: E402

SIZES = (0.0, 0.01, 0.02, 0.05, 0.10)
SETTINGS = {"10% flipped labels": 0.10, "clean labels": 0.0}
CRITERIA = ("influence on validation", "training loss", "random")
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def split(seed, flip_fraction):
    """Train (with `flip_fraction` of its labels flipped), validation and test sets, and the flipped indices."""
    x, y, x_rest, y_rest, flipped = load_digits_with_flipped_labels(flip_fraction=flip_fraction, seed=seed)
    half = len(y_rest) // 2
    return (x, y), (x_rest[:half], y_rest[:half]), (x_rest[half:], y_rest[half:]), flipped


def removal_orders(model, train, validation, seed):
    """For each criterion, the training indices in the order they would be removed (first = first removed)."""
    inf = tfi.Influence(model, LOSS, train, variables="head", method="direct", damping=1e-3, progress=False)
    helpfulness = inf.scores(validation).sum(axis=0)  # > 0: helps the validation set, < 0: harms it
    training_loss = LOSS(train[1], model(train[0])).numpy()
    return {"influence on validation": np.argsort(helpfulness, kind="stable"),
            "training loss": np.argsort(-training_loss, kind="stable"),
            "random": np.random.default_rng(1000 + seed).permutation(len(train[1]))}


def test_metrics(model, test):
    logits = model(test[0])
    return float(np.mean(np.argmax(logits, axis=1) == test[1])), float(np.mean(LOSS(test[1], logits)))


def run_seed(seed, flip_fraction, log=print):
    """Records `(criterion, size, accuracy, loss, flipped among removed)` for one seed and setting."""
    train, validation, test, flipped = split(seed, flip_fraction)
    model = train_classifier(*train, seed=seed)
    records = [(c, 0.0, *test_metrics(model, test), 0) for c in CRITERIA]
    orders = removal_orders(model, train, validation, seed)
    for criterion, order in orders.items():
        for size in SIZES[1:]:
            removed = order[:int(round(size * len(order)))]
            keep = np.setdiff1d(np.arange(len(order)), removed)
            retrained = train_classifier(train[0][keep], train[1][keep], seed=seed)
            records.append((criterion, size, *test_metrics(retrained, test), len(np.intersect1d(removed, flipped))))
    log(f"  seed {seed}: base test accuracy {records[0][2]:.3f}; after removing 5%: " + ", ".join(
        f"{c} {a:.3f}" for c, s, a, _, _ in records if s == 0.05))
    return records


def summarise(records):
    """{(criterion, size): (mean acc, s.e. acc, mean loss, s.e. loss, mean flipped removed)} over seeds."""
    out = {}
    for criterion in CRITERIA:
        for size in SIZES:
            rows = np.array([r[2:] for r in records if r[0] == criterion and r[1] == size], dtype=float)
            se = rows.std(axis=0, ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else np.zeros(3)
            out[criterion, size] = (rows[:, 0].mean(), se[0], rows[:, 1].mean(), se[1], rows[:, 2].mean())
    return out


def print_table(setting, summary, n_seeds, n_flipped):
    print(f"\n{setting} ({n_seeds} seeds; {n_flipped} flipped of 1200; mean ± s.e. over seeds)")
    print("| removed | criterion | test accuracy | test loss | flipped among removed |")
    print("|---|---|---|---|---|")
    for size in SIZES:
        for criterion in CRITERIA[:1] if size == 0 else CRITERIA:
            acc, acc_se, loss, loss_se, found = summary[criterion, size]
            name = "(none removed)" if size == 0 else criterion
            print(f"| {size:.0%} ({int(round(size * 1200))}) | {name} | {acc:.4f} ± {acc_se:.4f} | "
                  f"{loss:.4f} ± {loss_se:.4f} | {found:.1f} |")


def plot(path, summaries):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(summaries), figsize=(5.2 * len(summaries), 7), squeeze=False)
    for column, (setting, summary) in enumerate(summaries.items()):
        for row, (index, label) in enumerate(((0, "test accuracy"), (2, "test loss"))):
            ax = axes[row, column]
            for criterion, marker in zip(CRITERIA, "osd"):
                mean = [summary[criterion, s][index] for s in SIZES]
                err = [summary[criterion, s][index + 1] for s in SIZES]
                ax.errorbar([100 * s for s in SIZES], mean, yerr=err, marker=marker, capsize=3, label=criterion)
            ax.set_xlabel("training examples removed (%)")
            ax.set_ylabel(label)
            ax.set_title(setting)
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("Digits MLP: remove the most harmful training examples and retrain (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs", "remove_harmful.png"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summaries = {}
    for setting, flip_fraction in SETTINGS.items():
        print(f"{setting}:")
        records = [r for seed in range(args.seeds) for r in run_seed(seed, flip_fraction)]
        summaries[setting] = summarise(records)
        print_table(setting, summaries[setting], args.seeds, int(round(flip_fraction * 1200)))
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(args.plot, summaries)
        print(f"\nFigure saved to {args.plot}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return summaries


if __name__ == "__main__":
    main()
