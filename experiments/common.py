"""Shared helpers for the experiment scripts: CLI flags, output folders, JSON, tables, plots."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import jax

from jax_bptt import modes
from jax_bptt.cells import CELLS
from jax_bptt.checkpoints import atomic_write_json
from jax_bptt.train import OPTIMIZERS

REPO_ROOT = Path(__file__).resolve().parents[1]

# name on the command line -> (cell, recurrent_init); "irnn" is Le, Jaitly & Hinton's IRNN.
MODELS = {
    "tanh": ("elman_tanh", "uniform"),
    "irnn": ("elman_relu", "identity"),
    "lstm": ("lstm", "uniform"),
    "gru": ("gru", "uniform"),
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every experiment has: --quick, --out, --seed, --bptt, --no-progress."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/<experiment>/<time>)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bptt",
        default=None,
        help=f"gradient implementation, one of jax_bptt.modes.BPTT_MODES {tuple(modes.BPTT_MODES)}",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_name(kind: str, value: str, choices) -> str:
    """Exit with a clear message when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise SystemExit(f"error: unknown {kind} {value!r}; choose one of {sorted(choices)}")
    return value


def check_bptt(mode: str) -> str:
    return check_name("--bptt mode", mode, tuple(modes.BPTT_MODES))


def check_cell(cell: str) -> str:
    return check_name("cell", cell, CELLS)


def check_optimizer(name: str) -> str:
    return check_name("optimizer", name, OPTIMIZERS)


def parse_models(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        check_name("model", name, MODELS)
    return names


def parse_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: {flag} must be positive integers, got {text!r}")
    return values


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


def device_info() -> dict:
    """The CPU model (or accelerator) and library versions, recorded next to every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import optax

    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "optax": optax.__version__,
    }


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` written by ``jax_bptt.train.fit``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    path: Path,
    panels: list[dict],
    *,
    title: str = "",
) -> None:
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


def train_model(
    *,
    run_dir: Path,
    model: str,
    input_size: int,
    output_size: int,
    hidden: int,
    loss: str,
    placement: str,
    batch_fn,
    eval_fn,
    steps: int,
    optimizer: str,
    lr: float,
    clip_norm: float | None,
    bptt: str,
    seed: int,
    eval_every: int,
    log_every: int = 50,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """Train one ``MODELS`` entry with ``jax_bptt.train.fit``; return its eval records.

    ``batch_fn(key) -> (xs, targets)``; ``eval_fn(params) -> {name: float}``. The run's metrics
    and final checkpoint go to ``run_dir``.
    """
    import time

    from jax_bptt import init_model
    from jax_bptt.checkpoints import model_signature
    from jax_bptt.train import fit, make_optimizer, make_train_step

    cell, recurrent_init = MODELS[model]
    extra = {"forget_bias": 1.0} if cell == "lstm" else {}
    params = init_model(
        jax.random.key(seed),
        cell,
        input_size,
        hidden,
        output_size,
        recurrent_init=recurrent_init,
        **extra,
    )
    opt = make_optimizer(optimizer, lr, clip_norm=clip_norm)
    train_step = make_train_step(opt, cell=cell, loss=loss, placement=placement, mode=bptt)

    def batch_kwargs(key, step, carry):
        del step, carry
        xs, targets = batch_fn(key)
        return {"xs": xs, "targets": targets}

    started = time.perf_counter()
    result = fit(
        train_step,
        params,
        opt,
        batch_kwargs,
        num_steps=steps,
        key=jax.random.fold_in(jax.random.key(seed), 1),
        run_dir=run_dir,
        signature=model_signature(params, cell),
        config={"model": model, "cell": cell, "recurrent_init": recurrent_init, "lr": lr},
        eval_fn=eval_fn,
        eval_every=eval_every,
        log_every=log_every,
        progress=progress,
        desc=desc or model,
    )
    return {
        "evals": [r for r in result.history if r["kind"] == "eval"],
        "skipped": result.skipped,
        "wall_s": time.perf_counter() - started,
    }
