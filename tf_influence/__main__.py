"""Command line: `python -m tf_influence {demo, explain, export}`.

  python -m tf_influence demo [--plot demo.png] [--overwrite]
  python -m tf_influence explain --model M.keras --train train.npz --test test.npz \\
      [--loss NAME | --loss module:function | --loss path/to/file.py:function] [--custom-objects module:NAME ...] \\
      [--method auto] [--damping auto|NUMBER] [--curvature hessian|gauss_newton] [--top-k 10] \\
      [--variables LAYER ...] [--measurement loss|margin|logit|probability|OUTPUT|module:function] \\
      [--output influence_scores.npz] [--overwrite]
  python -m tf_influence export --model M.keras --train train.npz --out DIR \\
      [--method direct] [--store auto] [... the model and curvature flags of explain ...] [--overwrite]

.npz files hold arrays `x`, `y` and optionally `w` (sample weights). Every path is checked before
anything is computed. A user error (a bad path, file, flag, or an input the library refuses)
prints one line `error: ...` to stderr and exits with status 2; `--debug` shows the traceback.
Unexpected internal errors keep their traceback (status 1).
"""

import argparse
import json
import math
import os
import sys

from tf_influence import cli_io
from tf_influence.errors import InfluenceError, InputError

_OUTPUT_KEYS = ("scores", "predicted_change", "helpful_indices", "helpful_scores", "harmful_indices",
                "harmful_scores")
_METHOD_HELP = ("IHVP method: auto (the cheapest that applies, see tfi.solvers.plan), direct, cg, lissa, ekfac, "
                "kfac, chain, scipy (see tfi.solvers.SOLVERS)")
_SOLVER_HINT = ("On the command line: --damping auto (the default) or a larger --damping, or "
                "--curvature gauss_newton (positive semi-definite).")
_HINTS = {  # the library's advice is in API terms; these say it in flags
    "NegativeCurvatureError": _SOLVER_HINT,
    "DivergenceError": _SOLVER_HINT,
    "ResourceError": "On the command line: fewer --variables, --store preconditioned, --method ekfac, or a "
                     "larger --max-parameters.",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's default prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def main(argv=None):
    """Runs the command line on `argv` (default `sys.argv[1:]`); returns 0, or exits 2 on a user error."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return {"demo": _demo, "explain": _explain, "export": _export}[args.command](args)
    except InfluenceError as e:
        if args.debug:
            raise
        hint = _HINTS.get(type(e).__name__, "")
        print(f"error: {' '.join(str(e).split())} {hint}".rstrip(), file=sys.stderr)
        sys.exit(2)


def build_parser():
    """The argument parser of `python -m tf_influence` (flags are checked here, paths later)."""
    parser = _Parser(prog="python -m tf_influence", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    demo = commands.add_parser("demo", parents=[common],
                               help="train a digits classifier and show influential examples")
    demo.add_argument("--plot", help="save a figure to this file (PNG, PDF, SVG, ...)")
    demo.add_argument("--method", type=_method, default="auto", help=_METHOD_HELP)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")

    model = _Parser(add_help=False)
    model.add_argument("--model", required=True, help="a .keras model file (or legacy .h5)")
    model.add_argument("--train", required=True, help=".npz with arrays x, y (and w)")
    model.add_argument("--loss", help="Keras loss name, or module:function / path/to/file.py:function for your own "
                                      "loss (default: the loss the model was compiled with)")
    model.add_argument("--custom-objects", nargs="+", metavar="module:NAME", default=[],
                       help="custom layers or functions the model needs to load")
    model.add_argument("--damping", type=_damping, default="auto",
                       help="λ ≥ 0 added to the curvature, or 'auto' (chosen from its spectrum; the default)")
    model.add_argument("--curvature", choices=("hessian", "gauss_newton"), default="hessian",
                       help="gauss_newton is positive semi-definite: safer for ReLU networks away from a minimum")
    model.add_argument("--l2", type=_non_negative, default=0.0, help="extra (l2/2)·‖θ‖² in the objective")
    model.add_argument("--variables", nargs="*", help="layer names (default: all trainable)")
    model.add_argument("--batch-size", type=_positive_int, default=None)
    model.add_argument("--measurement", default="loss",
                       help="what is attributed on the test side: loss (default), margin, logit, probability, an "
                            "output name of a multi-output model, or module:function / path/to/file.py:function "
                            "(fn(y_true, y_pred) -> per-example values, higher is better; or a tfi.Measurement)")
    model.add_argument("--overwrite", action="store_true", help="replace an existing output")

    explain = commands.add_parser("explain", parents=[common, model], help="score a saved Keras model's training data")
    explain.add_argument("--test", required=True, help=".npz with arrays x, y")
    explain.add_argument("--method", type=_method, default="auto", help=_METHOD_HELP)
    explain.add_argument("--top-k", type=_positive_int, default=10, help="helpful/harmful examples kept per test point")
    explain.add_argument("--output", default="influence_scores.npz",
                         help=".npz to write (an earlier output is replaced; another file needs --overwrite)")
    explain.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser("export", parents=[common, model],
                                 help="write a SavedModel that answers influence queries")
    export.add_argument("--out", required=True, help="SavedModel directory to write")
    export.add_argument("--method", type=_method, default="direct", help=_METHOD_HELP)
    export.add_argument("--store", choices=("auto", "inverse", "factors", "preconditioned"), default="auto")
    export.add_argument("--max-parameters", type=_positive_int, default=8192, help="largest p for a dense inverse")
    return parser


# -- Commands -------------------------------------------------------------------------------------


def _demo(args):
    if args.plot:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError as e:
            raise InputError("--plot needs matplotlib: pip install matplotlib.") from e
        formats = sorted(FigureCanvasAgg.get_supported_filetypes())
        suffix = os.path.splitext(args.plot)[1].lower().lstrip(".")
        if suffix not in formats:
            raise InputError(f"--plot {args.plot!r}: unknown image format {suffix or '(no suffix)'!r}; "
                             f"use one of {formats}, e.g. --plot demo.png.")
        cli_io.check_output_file(args.plot, "--plot", overwrite=args.overwrite)
    from tf_influence import demo

    demo.run(plot=args.plot, method=args.method, seed=args.seed)
    return 0


def _explain(args):
    import numpy as np

    cli_io.check_model_file(args.model)
    train = cli_io.load_data(args.train, "--train")
    test = cli_io.load_data(args.test, "--test")
    cli_io.check_output_file(args.output, "--output", overwrite=args.overwrite, suffix=".npz",
                             inputs=(args.model, args.train, args.test), is_previous_output=_is_previous_output)
    inf, loss_name = _influence(args, train, test=test, progress=not args.quiet)

    scores = inf.scores(test[:2])
    weights = train[2].astype(np.float64) if len(train) == 3 else np.ones(inf.n_train)
    change = inf.measurement.orientation * scores * weights / weights.sum()
    k = min(args.top_k, inf.n_train)
    helpful = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # as Influence.top_k, without a second pass
    harmful = np.argsort(scores, axis=1, kind="stable")[:, :k]
    settings = {"command": "explain", "model": os.path.abspath(args.model), "train": os.path.abspath(args.train),
                "test": os.path.abspath(args.test), "loss": loss_name, "method": inf.method,
                "damping": _number(inf.damping), "curvature": args.curvature, "l2": args.l2,
                "variables": args.variables or None, "n_train": int(scores.shape[1]), "n_test": int(scores.shape[0]),
                "measurement": inf.measurement.name, "sign": _sign_text(inf.measurement)}
    arrays = {"scores": scores, "predicted_change": change,
              "helpful_indices": helpful, "helpful_scores": np.take_along_axis(scores, helpful, 1),
              "harmful_indices": harmful, "harmful_scores": np.take_along_axis(scores, harmful, 1),
              "settings": np.array(json.dumps(settings))}
    if inf.measurement.is_loss:
        arrays["predicted_loss_change"] = change
    cli_io.write_npz(args.output, arrays)
    print(f"Scored {scores.shape[0]} test x {scores.shape[1]} training examples with method={inf.method!r}, "
          f"damping={_number(inf.damping)}, curvature={args.curvature!r}, measurement={inf.measurement.name!r}; "
          f"wrote {args.output} (scores, predicted_change, helpful/harmful indices and scores, settings).")
    for t in range(min(3, scores.shape[0])):
        print(f"test {t}: most helpful {helpful[t][:5].tolist()}, most harmful {harmful[t][:5].tolist()}")
    return 0


def _export(args):
    import tf_influence as tfi

    cli_io.check_model_file(args.model)
    train = cli_io.load_data(args.train, "--train")
    cli_io.check_output_dir(args.out, "--out", overwrite=args.overwrite)
    inf, _ = _influence(args, train)
    info = tfi.export_saved_model(inf, args.out, overwrite=args.overwrite, store=args.store,
                                  max_parameters=args.max_parameters)
    signatures = ", ".join(s for s in ("influence", "top_k", "self_influence", "serving_default")
                           if s in info["signatures"])
    print(f"Wrote {info['path']} ({info['bytes'] / 2**20:.2f} MiB, store={info['store']!r}): signatures "
          f"{signatures} over {info['parameters']} parameters and {info['n_train']} training examples.")
    return 0


# -- Shared steps ---------------------------------------------------------------------------------


def _influence(args, train, *, test=None, progress=True):
    """Loads the model and loss, checks the data against them (one forward pass each), builds Influence."""
    import tf_influence as tfi
    from tf_influence.data import first_batch

    loss, loss_name, custom_objects = _loss_and_custom_objects(args)
    model = cli_io.load_model(args.model, custom_objects=custom_objects, compile=loss is None)
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise InputError(f"--model {args.model!r} was saved without a compiled loss; pass --loss NAME (a Keras "
                             "loss such as sparse_categorical_crossentropy) or --loss module:function.")
        loss_name = getattr(loss, "name", None) or getattr(loss, "__name__", None) or str(loss)
    if args.variables:
        try:
            tfi.select_variables(model, args.variables)
        except InputError as e:
            raise InputError(f"--variables {' '.join(args.variables)}: {e}") from e
    objective = tfi.Objective(model, loss, l2=args.l2)
    for flag, path, data in (("--train", args.train, train), ("--test", getattr(args, "test", None), test)):
        if data is not None:
            batch = first_batch(tfi.as_dataset(data, batch_size=args.batch_size, name=flag), flag)
            objective.validate(batch, f"{flag} {path!r}")
    measurement = args.measurement
    if ":" in measurement:
        measurement = cli_io.import_object(measurement, "--measurement")
        if not callable(measurement):
            raise InputError(f"--measurement {args.measurement!r} is a {type(measurement).__name__}, not a function "
                             "fn(y_true, y_pred) -> per-example values or a tfi.Measurement.")
    try:
        tfi.measurements.resolve_measurement(measurement, objective)
    except InputError as e:
        raise InputError(f"--measurement {args.measurement}: {e}") from e
    influence = tfi.Influence(model, loss, train, variables=args.variables or None, method=args.method,
                              damping=None if args.damping == "auto" else args.damping, curvature=args.curvature,
                              l2=args.l2, batch_size=args.batch_size, progress=progress, measurement=measurement)
    return influence, loss_name


def _loss_and_custom_objects(args):
    """`(loss or None, its name, custom_objects)` from --loss and --custom-objects."""
    import keras

    custom_objects = {}
    for spec in args.custom_objects:
        obj = cli_io.import_object(spec, "--custom-objects")
        custom_objects[spec.rpartition(":")[2]] = obj
        custom_objects.setdefault(getattr(obj, "__name__", spec.rpartition(":")[2]), obj)
    if args.loss is None:
        return None, None, custom_objects
    if ":" not in args.loss:
        try:
            known = keras.losses.get(args.loss) is not None
        except (ValueError, TypeError):
            known = False
        if not known:
            raise InputError(f"--loss {args.loss!r} is not a Keras loss name (e.g. sparse_categorical_crossentropy, "
                             "categorical_crossentropy, binary_crossentropy, mse); for your own loss function pass "
                             "--loss module:function or --loss path/to/file.py:function.")
        return args.loss, args.loss, custom_objects
    loss = cli_io.import_object(args.loss, "--loss")
    name = args.loss.rpartition(":")[2]
    custom_objects[name] = loss
    custom_objects.setdefault(getattr(loss, "__name__", name), loss)
    if isinstance(loss, type):
        if not issubclass(loss, keras.losses.Loss):
            raise InputError(f"--loss {args.loss!r} is the class {loss.__name__}, not a keras.losses.Loss subclass "
                             "or a function fn(y_true, y_pred) -> per-example losses.")
        try:
            loss = loss()
        except TypeError as e:
            raise InputError(f"--loss {args.loss!r}: the loss class cannot be built without arguments ({e}); wrap "
                             "it in a function fn(y_true, y_pred) in your module and pass that.") from e
    elif not callable(loss):
        raise InputError(f"--loss {args.loss!r} is a {type(loss).__name__}, not a function "
                         "fn(y_true, y_pred) -> per-example losses.")
    return loss, args.loss, custom_objects


def _sign_text(measurement):
    effect = "lowers" if measurement.higher_is_better else "raises"
    return f"positive score = the training example helped (its removal {effect} the test {measurement.name})"


def _is_previous_output(path):
    keys = cli_io.npz_keys(path)
    return keys is not None and set(_OUTPUT_KEYS) <= keys


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None if value is None else str(value)


# -- Flag types (argparse turns ArgumentTypeError into a one-line usage error) ---------------------


def _damping(text):
    if text.strip().lower() == "auto":
        return "auto"
    value = _float(text, "a number ≥ 0 or 'auto'")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0 or 'auto'. Received: {text!r}")
    return value


def _non_negative(text):
    value = _float(text, "a number ≥ 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0. Received: {text!r}")
    return value


def _float(text, expected):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}. Received: {text!r}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer. Received: {text!r}")
    return value


def _method(text):
    from tf_influence.solvers import SOLVERS

    if text.lower() not in SOLVERS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; expected one of {sorted(SOLVERS)}")
    return text.lower()


if __name__ == "__main__":
    sys.exit(main())
