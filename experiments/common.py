"""Shared helpers for the experiment scripts: CLI flags, output folders, JSON, tables, plots, and
the model options every training experiment shares (stacked/bidirectional layers, dropout,
residual connections, data-parallel devices) with the init, evaluation and sampling that follow
them."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jax_bptt import deep_unroll, init_deep, init_model, modes, readout, unroll
from jax_bptt.bptt import model_loss
from jax_bptt.cells import CELLS, get_cell
from jax_bptt.checkpoints import atomic_write_json
from jax_bptt.deep import deep_model_loss
from jax_bptt.generate import generate
from jax_bptt.train import (
    DEEP_BPTT_MODES,
    OPTIMIZERS,
    check_deep_options,
    is_deep,
    zero_carry,
)

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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model-shape and device flags: --layers, --bidirectional, --dropout, --residual, --devices."""
    parser.add_argument("--layers", type=int, default=None, help="stacked recurrent layers")
    parser.add_argument(
        "--bidirectional", action="store_true", help="a forward and a backward cell per layer"
    )
    parser.add_argument(
        "--dropout", type=float, default=None, help="dropout between layers (needs --layers >= 2)"
    )
    parser.add_argument(
        "--residual",
        action="store_true",
        help="add each layer's input to its output, from the second layer on (the first layer's "
        "input is the data, of another size)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="train data-parallel over this many devices (jax_bptt.parallel; the batch must be a "
        "multiple); default: one device, no mesh",
    )


# What a run records when the flags are not given (also for runs made before the flags existed).
MODEL_DEFAULTS = {
    "layers": 1,
    "bidirectional": False,
    "dropout": 0.0,
    "residual": False,
    "devices": None,
}


def parse_model_args(args, *, batch: int, bptt: str, defaults=None, causal: bool = False) -> dict:
    """The validated model options ``{layers, bidirectional, dropout, residual, devices}``.

    ``bptt``: the run's gradient mode (a stacked model needs one of ``DEEP_BPTT_MODES``).
    ``defaults``: the experiment's defaults for flags not given. ``residual`` is recorded as
    ``"except_first"`` (``jax_bptt.deep``'s setting) or False. ``causal``: the model predicts the
    next token, so a backward direction (which reads the future) is rejected.
    """
    options = {**MODEL_DEFAULTS, **(defaults or {})}
    if args.layers is not None:
        options["layers"] = args.layers
    if args.dropout is not None:
        options["dropout"] = args.dropout
    if args.bidirectional:
        if causal:
            raise SystemExit(
                "error: --bidirectional does not apply here: a causal language model predicts "
                "the next character, and a backward direction would read it from the future"
            )
        options["bidirectional"] = True
    if args.residual:
        options["residual"] = "except_first"
    if args.devices is not None:
        options["devices"] = args.devices
    if options["layers"] < 1:
        raise SystemExit(f"error: --layers must be >= 1, got {options['layers']}")
    if not 0.0 <= options["dropout"] < 1.0:
        raise SystemExit(f"error: --dropout must be in [0, 1), got {options['dropout']}")
    if options["layers"] == 1 and options["dropout"] > 0:
        raise SystemExit("error: --dropout acts between stacked layers: it needs --layers >= 2")
    if options["layers"] == 1 and options["residual"]:
        raise SystemExit(
            "error: --residual adds a layer's input to its output from the second layer on: it "
            "needs --layers >= 2"
        )
    if check_deep_options(**model_kwargs(options)) and bptt not in DEEP_BPTT_MODES:
        raise SystemExit(
            f"error: --bptt {bptt} has no stacked/bidirectional implementation; use one of "
            f"{tuple(DEEP_BPTT_MODES)} with --layers/--bidirectional/--residual"
        )
    devices = options["devices"]
    if devices is not None:
        if devices < 1:
            raise SystemExit(f"error: --devices must be >= 1, got {devices}")
        if batch % devices:
            raise SystemExit(
                f"error: the batch ({batch}) must be a multiple of --devices {devices}: each "
                "device trains on an equal share of it"
            )
        if devices > jax.device_count():
            raise SystemExit(
                f"error: --devices {devices} but JAX sees {jax.device_count()} device(s) "
                f"({jax.default_backend()}); on a CPU, XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} splits it into {devices}"
            )
    return options


def parse_sweep_args(argv, *, description: str, defaults, quick: dict, sizes: str, sizes_help: str):
    """The command line shared by the model sweeps (adding problem, copy memory).

    ``defaults`` is the experiment's config dataclass instance; ``sizes`` names its field of
    swept sequence lengths (``"lengths"``, ``"delays"``), exposed as ``--<sizes>``. Returns
    ``(config, args)``, ``config`` being ``defaults`` with the flags (and ``quick`` under
    ``--quick``) applied.
    """
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    add_model_args(parser)
    parser.add_argument("--models", default=",".join(defaults.models), help="tanh,irnn,lstm,gru")
    parser.add_argument(f"--{sizes}", default=None, help=sizes_help)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--optimizer", default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--lr-irnn", type=float, default=dict(defaults.lr_overrides)["irnn"])
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    parser.add_argument("--eval-every", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = dict(quick) if args.quick else {}
    if getattr(args, sizes) is not None:
        overrides[sizes] = tuple(parse_ints(f"--{sizes}", getattr(args, sizes)))
    for name in ("steps", "batch", "hidden", "eval_every"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = dataclasses.replace(
        defaults,
        **overrides,
        models=tuple(parse_models(args.models)),
        optimizer=check_optimizer(args.optimizer),
        lr=args.lr,
        lr_overrides=(("irnn", args.lr_irnn),),
        clip_norm=args.clip_norm if args.clip_norm and args.clip_norm > 0 else None,
        bptt=check_bptt(args.bptt or defaults.bptt),
        seed=args.seed,
    )
    options = parse_model_args(args, batch=config.batch, bptt=config.bptt)
    return dataclasses.replace(config, **options), args


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
    if options["devices"] is not None:
        parts.append(f"{options['devices']} device(s) data-parallel")
    return ", ".join(parts)


def model_kwargs(options: dict) -> dict:
    """``make_train_step``'s keyword arguments for the options of ``parse_model_args``."""
    return {
        "num_layers": options["layers"],
        "bidirectional": options["bidirectional"],
        "dropout": options["dropout"],
        "residual": options["residual"],
    }


def init_params(
    key, cell: str, input_size: int, hidden: int, output_size: int, options: dict, **init_kw
):
    """``init_model`` params, or ``init_deep`` params when the options ask for a deep model."""
    kwargs = model_kwargs(options)
    if not check_deep_options(**kwargs):
        return init_model(key, cell, input_size, hidden, output_size, **init_kw)
    return init_deep(
        key,
        cell,
        input_size,
        hidden,
        output_size,
        num_layers=kwargs["num_layers"],
        bidirectional=kwargs["bidirectional"],
        **init_kw,
    )


def place_step(train_step, options: dict, *, placement: str):
    """``train_step`` as it is, or data-parallel over ``options["devices"]`` devices
    (``jax_bptt.parallel.data_parallel_step``)."""
    if options["devices"] is None:
        return train_step
    from jax_bptt.parallel import data_parallel_step, make_mesh

    return data_parallel_step(train_step, make_mesh(options["devices"]), placement=placement)


def predict(params, xs, *, cell, residual=False):
    """Per-step readout ``(t b o)`` of either params layout, from a zero state."""
    if is_deep(params):
        outputs, _ = deep_unroll(cell, params, xs, residual=residual)
    else:
        outputs, _ = unroll(cell, params["cell"], xs)
    return readout(params["readout"], outputs)


def eval_loss(params, xs, targets, *, cell, loss: str, placement: str, residual=False):
    """The training loss (``reduction="mean"``) of either params layout on a batch ``xs (t b
    d)``, from a zero state and without dropout; jit-compatible."""
    cell = get_cell(cell)
    h0 = zero_carry(params, cell, xs.shape[1])
    if not is_deep(params):
        return model_loss(
            params,
            h0,
            xs,
            targets,
            None,
            cell=cell,
            loss=loss,
            placement=placement,
            reduction="mean",
        )
    return deep_model_loss(
        params,
        h0,
        xs,
        targets,
        None,
        None,
        cell=cell,
        loss=loss,
        placement=placement,
        reduction="mean",
        residual=residual,
    )


def sample(params, key, prompt_ids, length: int, *, cell, temperature: float, residual=False):
    """``length`` token ids continuing ``prompt_ids`` (``jax_bptt.generate.generate``; for deep
    unidirectional params the same sampler over the whole stack, ``sample_deep``)."""
    if not is_deep(params):
        return generate(params, key, prompt_ids, length, cell=cell, temperature=temperature)
    return sample_deep(
        params,
        key,
        jnp.asarray(prompt_ids, jnp.int32),
        cell=get_cell(cell),
        length=length,
        temperature=float(temperature),
        residual=residual,
    )


@functools.partial(jax.jit, static_argnames=("cell", "length", "temperature", "residual"))
def sample_deep(params, key, prompt, *, cell, length: int, temperature: float, residual=False):
    """``generate``'s sampler for ``init_deep`` params (unidirectional: a sampler cannot read the
    future): the prompt runs through ``deep_unroll``, then each sampled token is fed back one-hot
    for one ``deep_unroll`` step of the whole stack, carrying every layer's state. No dropout."""
    if "bwd" in params["layers"][0]:
        raise ValueError("sampling needs a unidirectional model; params are bidirectional")
    vocab_size = params["readout"]["W_hy"].shape[-1]
    dtype = params["readout"]["W_hy"].dtype
    outputs, states = deep_unroll(
        cell, params, jax.nn.one_hot(prompt, vocab_size, dtype=dtype), residual=residual
    )
    logits = readout(params["readout"], outputs[-1])

    def sample_step(carry, step_key):
        states, logits = carry
        if temperature == 0:
            token = jnp.argmax(logits).astype(jnp.int32)
        else:
            token = jax.random.categorical(step_key, logits / temperature).astype(jnp.int32)
        x = jax.nn.one_hot(token, vocab_size, dtype=dtype)[None]  # (1 v): one unbatched step
        outputs, states = deep_unroll(cell, params, x, h0=states, residual=residual)
        return (states, readout(params["readout"], outputs[0])), token

    _, tokens = jax.lax.scan(sample_step, (states, logits), jax.random.split(key, length))
    return tokens


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
    options: dict | None = None,
    log_every: int = 50,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """Train one ``MODELS`` entry with ``jax_bptt.train.fit``; return its eval records.

    ``batch_fn(key) -> (xs, targets)``; ``eval_fn(params) -> {name: float}``. ``options``: from
    ``parse_model_args`` (default: one layer, one device). The run's metrics and final checkpoint
    go to ``run_dir``.
    """
    import time

    from jax_bptt.train import fit, make_optimizer, make_train_step, run_signature

    options = {**MODEL_DEFAULTS, **(options or {})}
    cell, recurrent_init = MODELS[model]
    extra = {"forget_bias": 1.0} if cell == "lstm" else {}
    params = init_params(
        jax.random.key(seed),
        cell,
        input_size,
        hidden,
        output_size,
        options,
        recurrent_init=recurrent_init,
        **extra,
    )
    opt = make_optimizer(optimizer, lr, clip_norm=clip_norm)
    train_step = make_train_step(
        opt, cell=cell, loss=loss, placement=placement, mode=bptt, **model_kwargs(options)
    )
    train_step = place_step(train_step, options, placement=placement)

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
        signature=run_signature(params, cell, residual=options["residual"]),
        config={
            "model": model,
            "cell": cell,
            "recurrent_init": recurrent_init,
            "lr": lr,
            **options,
        },
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
