"""The adding problem: tanh RNN vs IRNN vs LSTM vs GRU as the sequence grows.

In the spirit of Le, Jaitly & Hinton (2015), "A Simple Way to Initialize Recurrent Networks of
Rectified Linear Units": each input step is (value ~ U[0, 1], marker); exactly two steps are
marked, one in each half, and the target at the last step is the sum of the two marked values.
Predicting the constant 1 gives MSE 1/6 ~ 0.167 (``tasks.ADDING_BASELINE_MSE``); a model *solves*
the task here when its test MSE is below ``SOLVED_FRACTION`` of that baseline.

The IRNN is ``elman_relu`` with ``recurrent_init="identity"`` and zero bias. Every model is
trained with full BPTT (the loss sits at the last step only, so truncating would cut the gradient
off from the first marker) by the ``--bptt`` implementation.

``--layers N``, ``--bidirectional``, ``--dropout p`` (between layers) and ``--residual`` (from the
second layer on) train stacked models (``jax_bptt.deep``, ``--bptt`` auto, manual or fast);
``--devices N`` trains data-parallel (``jax_bptt.parallel``; the batch must be a multiple of N).

    python experiments/adding_problem.py                          # full sweep: long on a CPU
    python experiments/adding_problem.py --lengths 50,100 --steps 1500

Outputs (``runs/adding_problem/<time>/`` or ``--out``): ``results.json``, ``results.md`` (the
table), ``adding_problem.png``, and each model's ``metrics.jsonl`` + checkpoint in a subfolder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
from common import (
    MODEL_DEFAULTS,
    MODELS,
    describe_model,
    device_info,
    eval_loss,
    fresh_dir,
    make_run_dir,
    markdown_table,
    parse_sweep_args,
    plot_curves,
    train_model,
    write_json,
)

from jax_bptt import tasks
from jax_bptt.cells import get_cell

SOLVED_FRACTION = 0.1  # solved: test MSE < 0.1 * baseline


@dataclasses.dataclass
class Config:
    models: tuple[str, ...] = ("tanh", "irnn", "lstm", "gru")
    lengths: tuple[int, ...] = (50, 100, 200, 400)
    steps: int = 4000
    batch: int = 50
    hidden: int = 100
    optimizer: str = "adam"
    lr: float = 1e-3
    # The IRNN's unbounded ReLU state wants a smaller step (Le et al. tune it per task too).
    lr_overrides: tuple[tuple[str, float], ...] = (("irnn", 1e-4),)
    clip_norm: float | None = 1.0
    test_size: int = 1000
    eval_every: int = 100
    bptt: str = "manual"
    seed: int = 0
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    residual: bool | str = False  # or "except_first": layers 1.. add their input
    devices: int | None = None  # data-parallel devices (None: one device, no mesh)


QUICK = dict(lengths=(8,), steps=10, batch=8, hidden=8, test_size=32, eval_every=5)


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    config, args = parse_sweep_args(
        argv,
        description=__doc__.split("\n\n")[0],
        defaults=Config(),
        quick=QUICK,
        sizes="lengths",
        sizes_help="comma-separated T, e.g. 50,100,200,400",
    )
    if min(config.lengths) < 2:
        raise SystemExit("error: --lengths must be >= 2")
    return config, args


def make_eval_fn(cell_name: str, xs, targets, residual=False):
    cell = get_cell(cell_name)

    @jax.jit
    def test_mse(params):
        return eval_loss(
            params, xs, targets, cell=cell, loss="mse", placement="last_step", residual=residual
        )

    return lambda params: {"test_mse": test_mse(params)}


def model_options(config: Config) -> dict:
    return {name: getattr(config, name) for name in MODEL_DEFAULTS}


def main(argv=None) -> dict:
    config, args = parse_args(argv)
    run_dir = fresh_dir(make_run_dir("adding_problem", args.out))
    baseline = tasks.ADDING_BASELINE_MSE
    threshold = SOLVED_FRACTION * baseline
    lrs = dict(config.lr_overrides)
    started = time.perf_counter()
    print(
        f"adding problem: models {config.models}, T in {config.lengths}, {config.steps} steps, "
        f"bptt={config.bptt}, {describe_model(model_options(config))}; baseline MSE "
        f"{baseline:.4f}, solved below {threshold:.4f}; writing to {run_dir}"
    )
    rows, curves = [], {}
    for seq_len in config.lengths:
        test_xs, test_ys = tasks.adding_problem(
            jax.random.key(10_000 + config.seed), config.test_size, seq_len
        )
        batch_fn = functools.partial(tasks.adding_problem, batch_size=config.batch, seq_len=seq_len)
        for model in config.models:
            cell_name = MODELS[model][0]
            outcome = train_model(
                run_dir=run_dir / f"{model}_T{seq_len}",
                model=model,
                input_size=2,
                output_size=1,
                hidden=config.hidden,
                loss="mse",
                placement="last_step",
                batch_fn=batch_fn,
                eval_fn=make_eval_fn(cell_name, test_xs, test_ys, config.residual),
                steps=config.steps,
                optimizer=config.optimizer,
                lr=lrs.get(model, config.lr),
                clip_norm=config.clip_norm,
                bptt=config.bptt,
                seed=config.seed,
                eval_every=config.eval_every,
                options=model_options(config),
                progress=not args.no_progress,
                desc=f"{model} T={seq_len}",
            )
            evals = outcome["evals"]
            mse = evals[-1]["test_mse"]
            solved_at = next((r["step"] for r in evals if r["test_mse"] < threshold), None)
            rows.append(
                {
                    "model": model,
                    "T": seq_len,
                    "test_mse": mse,
                    "mse_over_baseline": mse / baseline,
                    "best_test_mse": min(r["test_mse"] for r in evals),
                    "solved": mse < threshold,
                    "first_step_solved": solved_at,
                    "skipped_updates": outcome["skipped"],
                    "wall_s": outcome["wall_s"],
                }
            )
            curves[(model, seq_len)] = ([r["step"] for r in evals], [r["test_mse"] for r in evals])
            print(
                f"  {model:5s} T={seq_len:4d}: test MSE {mse:.4f} ({mse / baseline:.3f} x baseline)"
                f"{'  solved' if mse < threshold else ''}  [{outcome['wall_s']:.0f} s]"
            )

    table = markdown_table(
        ["model", "T", "test MSE", "MSE / baseline", "solved", "first step solved"],
        [
            [
                r["model"],
                r["T"],
                r["test_mse"],
                r["mse_over_baseline"],
                "yes" if r["solved"] else "no",
                r["first_step_solved"] if r["first_step_solved"] is not None else "-",
            ]
            for r in rows
        ],
    )
    summary = {
        "experiment": "adding_problem",
        "config": dataclasses.asdict(config),
        "bptt_mode": config.bptt,
        "model_options": model_options(config),
        "truncation": "none (full BPTT; the loss is at the last step only)",
        "baseline_mse": baseline,
        "solved_threshold_mse": threshold,
        "results": rows,
        "device": device_info(),
        "wall_time_s": time.perf_counter() - started,
        "argv": sys.argv if argv is None else list(argv),
    }
    write_json(run_dir / "results.json", summary)
    (run_dir / "results.md").write_text(
        f"Adding problem ({config.steps} steps, batch {config.batch}, hidden {config.hidden}, "
        f"{config.optimizer} lr {config.lr} (irnn {lrs.get('irnn', config.lr)}), bptt="
        f"{config.bptt}); baseline MSE {baseline:.4f}, solved: MSE < {threshold:.4f}\n\n"
        f"{table}\n",
        encoding="utf-8",
    )
    plot_curves(
        run_dir / "adding_problem.png",
        [
            {
                "title": f"T = {seq_len}",
                "xlabel": "step",
                "ylabel": "test MSE",
                "logy": True,
                "series": {m: curves[(m, seq_len)] for m in config.models},
                "hlines": {"baseline": baseline, "solved": threshold},
            }
            for seq_len in config.lengths
        ],
        title="Adding problem: test MSE (last step)",
    )
    print(table)
    print(f"outputs in {run_dir}")
    return summary


if __name__ == "__main__":
    main()
