"""Shared helpers for the experiment scripts: a command line whose errors are one line (exit
code 2) with range-checked numbers, the model flags every training experiment shares, output
folders, the benchmarks' --json and --txt files, tables and plots.

The model itself (init, loss, prediction, sampling) is the package's public API: ``init_model``,
``model_loss``, ``predict``, ``generate``; nothing model-shaped lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

import jax

import jax_bptt as jb
from jax_bptt.check import relative_error
from jax_bptt.train import OPTIMIZERS

REPO_ROOT = Path(__file__).resolve().parents[1]

# name on the command line -> (cell, recurrent_init); "irnn" is Le, Jaitly & Hinton's IRNN.
MODELS = {
    "tanh": ("elman_tanh", "uniform"),
    "irnn": ("elman_relu", "identity"),
    "lstm": ("lstm", "uniform"),
    "gru": ("gru", "uniform"),
}

# --------------------------------------------------------------------------------------------
# Command line: one-line errors, range-checked numbers


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line on stderr (``prog: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(minimum: int):
    """An argparse ``type``: an int ``>= minimum``."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """An argparse ``type``: a finite float in ``[low, high)`` (``low_open``: ``(low, high)``)."""
    span = f"{'(' if low_open else '['}{low}, {high})"

    def parse(text: str) -> float:
        value = _number(float, text)
        if not ((low < value) if low_open else (low <= value)) or not value < high:
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text!r}")
        return value

    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
POSITIVE_FLOAT = float_in(0.0, low_open=True)
NON_NEGATIVE_FLOAT = float_in(0.0)


def int_list(minimum: int = 1, *, length: int | None = None):
    """An argparse ``type``: comma-separated ints, each ``>= minimum`` (exactly ``length`` of
    them if given)."""
    what = "comma-separated integers" if length is None else f"{length} comma-separated integers"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not values or (length is not None and len(values) != length):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"must be integers >= {minimum}, got {text!r}")
        return values

    return parse


def choice_list(choices, what: str = "model"):
    """An argparse ``type``: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        for name in names or ("",):
            if name not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r}; choose from {sorted(choices)}"
                )
        return names

    return parse


def training_parser(description: str, defaults) -> Parser:
    """A ``Parser`` with the flags every training experiment has: --quick, --out, --seed, --bptt,
    --no-progress; the model-shape, scan and device flags --layers, --bidirectional, --dropout,
    --residual, --unroll, --dtype, --devices; and --optimizer, --lr, --clip-norm. ``defaults``
    (the experiment's config dataclass) gives --bptt's, --lr's and --clip-norm's defaults."""
    parser = Parser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/<experiment>/<time>)"
    )
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0)
    parser.add_argument("--bptt", default=defaults.bptt, choices=jb.BPTT_MODES)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--layers", type=POSITIVE, default=None, help="stacked recurrent layers")
    parser.add_argument(
        "--bidirectional", action="store_true", help="a forward and a backward cell per layer"
    )
    parser.add_argument(
        "--dropout",
        type=float_in(0.0, 1.0),
        default=None,
        help="dropout between layers (needs --layers >= 2)",
    )
    parser.add_argument(
        "--residual",
        action="store_true",
        help="add each layer's input to its output, from the second layer on (the first layer's "
        "input is the data, of another size)",
    )
    parser.add_argument(
        "--unroll",
        type=POSITIVE,
        default=None,
        help="time steps per lax.scan iteration (jax_bptt.ScanOptions(unroll=k)); default: the "
        "platform's",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="the recurrences' GEMM operands (jax_bptt.ScanOptions(compute_dtype=...)); params, "
        "states and gradients stay float32; default float32",
    )
    parser.add_argument(
        "--devices",
        type=POSITIVE,
        default=None,
        help="train data-parallel over this many devices (jax_bptt.parallel; the batch must be a "
        "multiple); default: one device, no mesh",
    )
    parser.add_argument("--optimizer", default="adam", choices=tuple(OPTIMIZERS))
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=defaults.lr, help="learning rate")
    parser.add_argument(
        "--clip-norm", type=NON_NEGATIVE_FLOAT, default=defaults.clip_norm, help="0: no clipping"
    )
    return parser


# What a run records when the flags are not given (also for runs made before the flags existed).
MODEL_DEFAULTS = {
    "layers": 1,
    "bidirectional": False,
    "dropout": 0.0,
    "residual": False,
    "devices": None,
    "unroll": None,
    "dtype": "float32",
}


def config_from_args(defaults, args, *, quick: dict, flags, **values):
    """``defaults`` (an experiment's config dataclass) with, in this order, ``quick`` under
    ``--quick``, the ``flags`` that were given (not None), the flags every training experiment
    has (``--optimizer``, ``--lr``, ``--clip-norm`` (0: None), ``--bptt``, ``--seed``) and
    ``values``."""
    overrides = dict(quick) if args.quick else {}
    overrides.update(
        {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    )
    shared = dict(
        optimizer=args.optimizer, lr=args.lr, clip_norm=args.clip_norm or None, bptt=args.bptt,
        seed=args.seed,
    )  # fmt: skip
    return dataclasses.replace(defaults, **{**overrides, **shared, **values})


def model_options(config) -> dict:
    """A run config's ``MODEL_DEFAULTS`` fields, as ``parse_model_args`` returns them."""
    return {name: getattr(config, name) for name in MODEL_DEFAULTS}


def parse_model_args(parser, args, *, batch: int) -> dict:
    """The model options ``{layers, bidirectional, dropout, residual, devices, unroll}`` from
    ``training_parser``'s model flags (``MODEL_DEFAULTS`` for those not given), ``parser.error``
    on a bad combination. ``residual`` is recorded as ``"except_first"`` (layer 0 reads the data,
    of another size) or False.
    """
    options = dict(MODEL_DEFAULTS)
    for name in ("layers", "dropout", "devices", "unroll", "dtype"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.bidirectional:
        options["bidirectional"] = True
    if args.residual:
        options["residual"] = "except_first"
    if options["layers"] == 1 and options["dropout"] > 0:
        parser.error("--dropout acts between stacked layers: it needs --layers >= 2")
    if options["layers"] == 1 and options["residual"]:
        parser.error(
            "--residual adds a layer's input to its output from the second layer on: it needs "
            "--layers >= 2"
        )
    devices = options["devices"]
    if devices is not None:
        if batch % devices:
            parser.error(
                f"the batch ({batch}) must be a multiple of --devices {devices}: each device "
                "trains on an equal share of it"
            )
        if devices > jax.device_count():
            parser.error(
                f"--devices {devices} but JAX sees {jax.device_count()} device(s) "
                f"({jax.default_backend()}); on a CPU, XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} splits it into {devices}"
            )
    return options


def scan_options(options: dict) -> jb.ScanOptions:
    """``--unroll k`` and ``--dtype`` as ``jax_bptt.ScanOptions(unroll=k, compute_dtype=...)``
    (None: the platform's default unroll; float32: no mixed precision)."""
    dtype = options.get("dtype", "float32")
    return jb.ScanOptions(
        unroll=options.get("unroll"), compute_dtype=None if dtype == "float32" else dtype
    )


def model_kwargs(cell: str, options: dict) -> dict:
    """``cell``, ``residual`` and ``options`` (``ScanOptions``) of a run's model, as
    ``jax_bptt.model_loss`` and ``jax_bptt.predict`` take them."""
    return {"cell": cell, "residual": options["residual"], "options": scan_options(options)}


def describe_model(options: dict) -> str:
    """E.g. ``"2 layers, bidirectional, dropout 0.1, residual (except_first), 2 device(s)
    data-parallel"``."""
    parts = [f"{options['layers']} layer{'s' if options['layers'] > 1 else ''}"]
    if options["bidirectional"]:
        parts.append("bidirectional")
    if options["dropout"]:
        parts.append(f"dropout {options['dropout']}")
    if options["residual"]:
        parts.append(f"residual ({options['residual']})")
    if options.get("unroll"):
        parts.append(f"scan unroll {options['unroll']}")
    if options["devices"] is not None:
        parts.append(f"{options['devices']} device(s) data-parallel")
    return ", ".join(parts)


def place_step(train_step, options: dict, *, loss: jb.Loss):
    """``train_step`` as it is, or data-parallel over ``options["devices"]`` devices
    (``jax_bptt.parallel.data_parallel_step``)."""
    if options["devices"] is None:
        return train_step
    from jax_bptt.parallel import data_parallel_step, make_mesh

    return data_parallel_step(train_step, make_mesh(options["devices"]), placement=loss.placement)


# --------------------------------------------------------------------------------------------
# Output folders, records, tables, plots


def make_run_dir(experiment: str, out: Path | None) -> Path:
    """``out``, or ``runs/<experiment>/<timestamp>`` under the repository root (git-ignored)."""
    if out is not None:
        return Path(out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO_ROOT / "runs" / experiment / stamp


def fresh_dir(path: Path) -> Path:
    """Create ``path``; refuse to write into a folder that already holds results."""
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"error: {path} is not empty; pass another --out (or --resume)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(cores: str | None = None) -> str:
    """E.g. ``"cpu: AMD EPYC 7B13 (2 logical cores)"`` (``cores`` in place of the count in
    parentheses) or ``"gpu: NVIDIA H200"``."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu: {cpu_model()} ({cores or f'{os.cpu_count()} logical cores'})"
    return f"{device.platform}: {device.device_kind}"


def versions(packages=("jax", "jaxlib", "numpy", "optax")) -> dict:
    """Python's version and those of the installed ``packages``."""
    out = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> dict:
    """The CPU model (or accelerator) and library versions, recorded next to every result."""
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        **versions(("jax", "optax")),
    }


def set_cpu_threads(threads: int) -> None:
    """Ask XLA's CPU client for ``threads`` threads; acts only before JAX starts its backend
    (so from a script's command line, not after a computation in the same process)."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
        + f" intra_op_parallelism_threads={threads}"
    )


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def write_outputs(args, obj, text: str, indent: int = 1, **dumps) -> None:
    """Write ``text`` to ``args.txt`` and ``obj`` as JSON (``json.dumps(obj, indent=indent,
    **dumps)``) to ``args.json``, each if given."""
    if args.txt:
        write_text(args.txt, text)
    if args.json:
        write_text(args.json, json.dumps(obj, indent=indent, **dumps))


def max_relative_error(candidate, reference) -> float:
    """The largest ``jax_bptt.check.relative_error`` over the leaves of two like pytrees."""
    pairs = zip(
        jax.tree_util.tree_leaves(candidate), jax.tree_util.tree_leaves(reference), strict=True
    )
    return max(relative_error(a, b)[1] for a, b in pairs)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(path: Path, panels: list[dict], *, title: str = "") -> None:
    """Save a row of line plots to ``path`` (PNG).

    Each panel: ``{"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, "hlines": {label:
    y}, "logy": bool}``. matplotlib is imported here, with the Agg backend, so that scripts and
    tests run without a display and without matplotlib unless they plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, label=label)
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, color="gray", linestyle="--", linewidth=1)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), va="bottom")
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
