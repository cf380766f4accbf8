"""Command line: `python -m tf_influence {demo, explain, export}`.

  python -m tf_influence demo [--plot demo.png]
  python -m tf_influence explain --model M.keras --train train.npz --test test.npz \\
      --method cg --top-k 10 [--loss NAME] [--variables LAYER ...] [--damping 1e-3] [--output scores.npz]

  python -m tf_influence export --model M.keras --train train.npz --out DIR \\
      [--method direct] [--store auto] [--variables LAYER ...] [--damping 1e-3] [--overwrite]

.npz files hold arrays `x`, `y` and optionally `w` (sample weights).
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tf_influence", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a digits classifier and show influential examples")
    demo.add_argument("--plot", help="save a figure to this file (PNG)")
    demo.add_argument("--method", default="cg")
    demo.add_argument("--seed", type=int, default=0)

    explain = commands.add_parser("explain", help="score a saved Keras model's training data")
    explain.add_argument("--model", required=True, help="a .keras model file")
    explain.add_argument("--train", required=True, help=".npz with x, y (and w)")
    explain.add_argument("--test", required=True, help=".npz with x, y")
    explain.add_argument("--loss", help="loss name (default: the loss the model was compiled with)")
    explain.add_argument("--method", default="cg")
    explain.add_argument("--damping", type=float, default=1e-3)
    explain.add_argument("--l2", type=float, default=0.0)
    explain.add_argument("--variables", nargs="*", help="layer names (default: all trainable)")
    explain.add_argument("--top-k", type=int, default=10)
    explain.add_argument("--batch-size", type=int, default=None)
    explain.add_argument("--output", default="influence_scores.npz")
    explain.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser("export", help="write a SavedModel that answers influence queries")
    export.add_argument("--model", required=True, help="a .keras model file")
    export.add_argument("--train", required=True, help=".npz with x, y (and w)")
    export.add_argument("--out", required=True, help="SavedModel directory to write")
    export.add_argument("--loss", help="loss name (default: the loss the model was compiled with)")
    export.add_argument("--method", default="direct")
    export.add_argument("--damping", type=float, default=1e-3)
    export.add_argument("--l2", type=float, default=0.0)
    export.add_argument("--variables", nargs="*", help="layer names (default: all trainable)")
    export.add_argument("--batch-size", type=int, default=None)
    export.add_argument("--store", default="auto", help="auto | inverse | factors | preconditioned")
    export.add_argument("--max-parameters", type=int, default=8192, help="largest p for a dense inverse")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        from tf_influence import demo as demo_module

        demo_module.run(plot=args.plot, method=args.method, seed=args.seed)
        return 0
    if args.command == "export":
        return _export(args)
    return _explain(args)


def _load_npz(path, name):
    import numpy as np

    from tf_influence.errors import InputError

    if not os.path.exists(path):
        raise InputError(f"{name} file {path!r} does not exist.")
    with np.load(path) as data:
        missing = {"x", "y"} - set(data.files)
        if missing:
            raise InputError(f"{name} file {path!r} needs arrays 'x' and 'y'; it has {data.files}.")
        return tuple(data[k] for k in ("x", "y", "w") if k in data.files)


def _influence(args, progress=True):
    import keras

    import tf_influence as tfi

    model = keras.models.load_model(args.model)
    loss = args.loss or getattr(model, "loss", None)
    if loss is None:
        raise tfi.InputError("The model was saved without a compiled loss; pass --loss NAME.")
    train = _load_npz(args.train, "train")
    inf = tfi.Influence(model, loss, train, variables=args.variables or None, method=args.method,
                        damping=args.damping, l2=args.l2, batch_size=args.batch_size, progress=progress)
    return inf, train


def _export(args):
    import tf_influence as tfi

    inf, _ = _influence(args)
    info = tfi.export_saved_model(inf, args.out, overwrite=args.overwrite, store=args.store,
                                  max_parameters=args.max_parameters)
    signatures = ", ".join(s for s in ("influence", "top_k", "self_influence", "serving_default")
                           if s in info["signatures"])
    print(f"Wrote {info['path']} ({info['bytes'] / 2**20:.2f} MiB, store={info['store']!r}): signatures "
          f"{signatures} over {info['parameters']} parameters and {info['n_train']} training examples.")
    return 0


def _explain(args):
    import numpy as np

    inf, train = _influence(args, progress=not args.quiet)
    test = _load_npz(args.test, "test")
    scores = inf.scores(test[:2])
    top = inf.top_k(test[:2], min(args.top_k, inf.n_train))
    weights = train[2] if len(train) == 3 else np.ones(inf.n_train)
    np.savez(args.output, scores=scores, predicted_loss_change=scores * weights / weights.sum(),
             helpful_indices=top.helpful_indices, helpful_scores=top.helpful_scores,
             harmful_indices=top.harmful_indices, harmful_scores=top.harmful_scores)
    print(f"Scored {scores.shape[0]} test x {scores.shape[1]} training examples with method={inf.method!r}; "
          f"wrote {args.output} (scores, predicted_loss_change, helpful/harmful indices and scores).")
    for t in range(min(3, scores.shape[0])):
        print(f"test {t}: most helpful {top.helpful_indices[t][:5].tolist()}, "
              f"most harmful {top.harmful_indices[t][:5].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
