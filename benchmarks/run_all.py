"""Runs every benchmark script and prints one summary table with machine info.

Each script runs in its own process (so timings and peak memory are its own); its full output is
kept, and the headline figures are pulled from its printed tables into one summary:
HVP/gradient ratio, CG iteration cost, scoring speed, EKFAC fit cost, chain-solver depth scaling,
large-model memory, distributed speed-up, LDS (attribution quality), time against pyDVL / kronfluence
(peers.py: its peer rows need run_all to run under the peers' venv, see README.md). Everything goes
to `benchmarks/RESULTS.md`, so a run on another machine can be compared line by line.

Run: python benchmarks/run_all.py [--quick] [--only hvp solvers ...] [--output RESULTS.md]
"""

import argparse
import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent

# script -> (full arguments, quick arguments)
SCRIPTS = {
    "hvp": ([], ["--repeats", "3"]),
    "solvers": ([], ["--quick"]),
    "influence": ([], ["--n-train", "2000", "--n-test", "20"]),
    "chain": ([], ["--depths", "4", "8", "16", "--repeats", "1", "--skip-tfi-cg"]),
    "ekfac": ([], ["--n-train", "2000", "--n-test", "100", "--cg-test", "4"]),
    "large": ([], ["--quick"]),
    "distribute": ([], ["--quick"]),
    "peers": ([], ["--quick"]),  # pyDVL / kronfluence rows only when run_all runs in the peers' venv
    "lds": ([], ["--quick"]),
}

_NOISE = re.compile(r"^(I0000|W0000|E0000|WARNING: All log|To enable the following)")


def _rows(text):
    """Markdown table rows of a script's output as lists of cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|-")]


def _find(text, *labels, column=-1):
    """The cell `column` of the first table row whose cells contain every label."""
    for cells in _rows(text):
        if all(any(label == c or label in c for c in cells) for label in labels):
            return cells[column]
    return "n/a"


def _search(text, pattern):
    match = re.search(pattern, text)
    return match.group(1) if match else "n/a"


SUMMARY = [
    ("HVP / gradient, MLP 269k, tf.function, forward_over_back", "hvp",
     lambda t: _find(t, "MLP", "tf.function", "forward_over_back")),
    ("HVP / gradient, CNN, tf.function, forward_over_back", "hvp",
     lambda t: _find(t, "CNN", "tf.function", "forward_over_back")),
    ("HVP / gradient, MLP 269k, XLA, forward_over_back", "hvp", lambda t: _find(t, "MLP", "XLA", "forward_over_back")),
    ("one CG iteration (1 RHS) in full-data gradients", "solvers",
     lambda t: _find(t, "one CG iteration, 1 RHS (loop time / iterations)")),
    ("compiled CG speed-up over scipy fmin_ncg loop, 1 RHS", "solvers",
     lambda t: _search(t, r"CG speed-up over the scipy loop, 1 RHS: ([\d.]+x)")),
    ("jvp scoring speed-up over per-example gradients", "influence",
     lambda t: _find(t, "jvp speed-up over per-example gradients")),
    ("whole scores() call in training epochs", "influence", lambda t: _find(t, "whole scores() call")),
    ("chain solver t(64)/t(8) (linear = 8)", "chain", lambda t: _search(t, r"t\(64\)/t\(8\) = ([\d.]+)")),
    ("EKFAC factor fit in training epochs (MLP, 2nd call)", "ekfac",
     lambda t: _find(t, "MLP", "EKFAC factors, 2nd call (traces again)", column=-2)),
    ("EKFAC factor fit in training epochs (CNN, 2nd call)", "ekfac",
     lambda t: _find(t, "CNN", "EKFAC factors, 2nd call (traces again)", column=-2)),
    ("EKFAC vs CG scoring speed-up (MLP)", "ekfac", lambda t: _find(t, "MLP", "EKFAC vs CG speed-up", column=-3)),
    ("large CNN: peak RSS ratio, largest / smallest n_train", "large", lambda t: _last_column(t, "RSS ratio")),
    ("large CNN: training examples scored per second", "large", lambda t: _last_column(t, "train examples/s")),
    ("distributed speed-up (2 replicas)", "distribute", lambda t: _search(t, r"speed-up[^:]*: ([\d.]+x)")),
    ("peers: exact (direct) λ=0.1, tf_influence time / best peer", "peers",
     lambda t: _search(t, r"best peer, exact \(direct\) λ=0\.1: (\S+)")),
    ("peers: CG 1e-6 λ=0.1, tf_influence time / best peer", "peers",
     lambda t: _search(t, r"best peer, CG 1e-6 λ=0\.1: (\S+)")),
    ("peers: LiSSA λ=0.1, tf_influence time / best peer", "peers",
     lambda t: _search(t, r"best peer, LiSSA λ=0\.1: (\S+)")),
    ("peers: EKFAC λ=0.1, tf_influence time / best peer", "peers",
     lambda t: _search(t, r"best peer, EKFAC λ=0\.1: (\S+)")),
    ("peers: EKFAC at scale (301k MLP), tf_influence / kronfluence", "peers",
     lambda t: _search(t, r"at scale, MLP 64-512-512-10: (\S+)")),
    ("LDS, digits MLP, cg λ=1e-3 (exact solve)", "lds", lambda t: _find(t, "mlp", "cg", "0.001", column=3)),
    ("LDS, digits MLP, ekfac λ=1e-3", "lds", lambda t: _find(t, "mlp", "ekfac", "0.001", column=3)),
    ("LDS, digits MLP, gradient dot product (no curvature)", "lds",
     lambda t: _find(t, "mlp", "gradient dot product", column=3)),
    ("LDS, digits MLP, ceiling (agreement of 2 initialisations)", "lds",
     lambda t: _search(t, r"ceiling \(mlp\)[^=]*= ([\d.]+)")),
]


def _last_column(text, header):
    rows = _rows(text)
    for i, cells in enumerate(rows):
        if header in cells:
            column = cells.index(header)
            values = [r[column] for r in rows[i + 1:] if len(r) == len(cells)]
            return values[-1] if values else "n/a"
    return "n/a"


def machine_info():
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    gpus = tf.config.list_physical_devices("GPU")
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}; GPU: {', '.join(g.name for g in gpus) or 'none'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (minutes, not an hour)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="run only these scripts")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    outputs, seconds = {}, {}
    for name in args.only or SCRIPTS:
        script = HERE / f"{name}.py"
        if not script.exists():
            outputs[name] = f"({script.name} does not exist)"
            continue
        full, quick = SCRIPTS[name]
        print(f"running {script.name} {' '.join(quick if args.quick else full)} ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), *(quick if args.quick else full)], cwd=HERE,
                              capture_output=True, text=True)
        seconds[name] = time.perf_counter() - start
        text = "\n".join(line for line in proc.stdout.splitlines() if not _NOISE.match(line))
        if proc.returncode != 0:
            text += f"\n\nFAILED (exit {proc.returncode}):\n" + proc.stderr[-2000:]
        outputs[name] = text

    summary = [(what, extract(outputs[name]) if name in outputs else "not run", name)
               for what, name, extract in SUMMARY]
    widths = [max(len(r[i]) for r in summary + [("figure", "value", "script")]) for i in range(3)]
    lines = [f"# Benchmark results ({'quick' if args.quick else 'full'} run, "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})", "", machine_info(), "",
             "| " + " | ".join(h.ljust(w) for h, w in zip(("figure", "value", "script"), widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in summary]
    for name, text in outputs.items():
        took = f" ({seconds[name]:.0f} s)" if name in seconds else ""
        lines += ["", f"## {name}.py{took}", "", "```", text.strip(), "```"]
    report = "\n".join(lines) + "\n"
    print(report)
    pathlib.Path(args.output).write_text(report)
    return summary


if __name__ == "__main__":
    main()
