"""Copy memory: which recurrent models beat the memoryless baseline at delays T = 50 and 100?

The task of Arjovsky, Shah & Bengio (2016): read ``copy_length = 10`` random symbols out of 8,
wait ``T`` blank steps (the last one a "go" marker), then output the 10 symbols in order. The
loss is cross-entropy over every step (``T + 20`` of them); a model that remembers nothing can do
no better than ``10 ln 8 / (T + 20)`` nats per step (``tasks.copy_memory_baseline``). A model
*beats* the baseline here when its test loss is below ``BEATS_FRACTION`` of it; the recall
accuracy (argmax over the last 10 steps; chance 1/8) is reported too.

Inputs are one-hot encoded token ids (the core API takes float inputs); targets are integer ids.
Every model is trained with full BPTT by the ``--bptt`` implementation (no truncation: the
symbols must be carried across the whole delay).

``--layers N``, ``--bidirectional``, ``--dropout p`` (between layers) and ``--residual`` (from the
second layer on) train stacked models (``jax_bptt.deep``, ``--bptt`` auto, manual or fast);
``--devices N`` trains data-parallel (``jax_bptt.parallel``; the batch must be a multiple of N).

    python experiments/copy_memory.py                            # T = 50 and 100
    python experiments/copy_memory.py --delays 50 --steps 2000 --models lstm,gru

Outputs (``runs/copy_memory/<time>/`` or ``--out``): ``results.json``, ``results.md``,
``copy_memory.png``, and each model's ``metrics.jsonl`` + checkpoint in a subfolder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from common import (
    MODEL_DEFAULTS,
    MODELS,
    describe_model,
    device_info,
    fresh_dir,
    make_run_dir,
    markdown_table,
    parse_sweep_args,
    plot_curves,
    predict,
    train_model,
    write_json,
)

from jax_bptt import tasks
from jax_bptt.cells import get_cell
from jax_bptt.losses import sequence_loss

BEATS_FRACTION = 0.9  # beats the baseline: test loss < 0.9 * baseline
NUM_SYMBOLS, COPY_LENGTH = 8, 10


@dataclasses.dataclass
class Config:
    models: tuple[str, ...] = ("tanh", "irnn", "lstm", "gru")
    delays: tuple[int, ...] = (50, 100)
    steps: int = 3000
    batch: int = 64
    hidden: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_overrides: tuple[tuple[str, float], ...] = (("irnn", 1e-4),)
    clip_norm: float | None = 1.0
    test_size: int = 500
    eval_every: int = 100
    bptt: str = "manual"
    seed: int = 0
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    residual: bool | str = False  # or "except_first": layers 1.. add their input
    devices: int | None = None  # data-parallel devices (None: one device, no mesh)


QUICK = dict(delays=(5,), steps=10, batch=8, hidden=8, test_size=32, eval_every=5)


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    config, args = parse_sweep_args(
        argv,
        description=__doc__.split("\n\n")[0],
        defaults=Config(),
        quick=QUICK,
        sizes="delays",
        sizes_help="comma-separated T, e.g. 50,100",
    )
    return config, args


VOCAB = tasks.copy_memory_vocab_size(NUM_SYMBOLS)


def encode(ids):
    """int ``(t b)`` -> one-hot float32 ``(t b v)``."""
    return jax.nn.one_hot(ids, VOCAB, dtype=jnp.float32)


def make_batch_fn(batch: int, delay: int):
    @jax.jit
    def batch_fn(key):
        inputs, targets = tasks.copy_memory(key, batch, delay, NUM_SYMBOLS, COPY_LENGTH)
        return encode(inputs), targets

    return batch_fn


def make_eval_fn(cell_name: str, inputs, targets, residual=False):
    cell = get_cell(cell_name)
    xs = encode(inputs)

    @jax.jit
    def evaluate(params):
        ys = predict(params, xs, cell=cell, residual=residual)
        loss = sequence_loss(
            ys, targets, loss="cross_entropy", placement="per_step", reduction="mean"
        )
        recall = jnp.argmax(ys[-COPY_LENGTH:], axis=-1) == targets[-COPY_LENGTH:]
        return {"test_loss": loss, "recall_accuracy": jnp.mean(recall)}

    return evaluate


def model_options(config: Config) -> dict:
    return {name: getattr(config, name) for name in MODEL_DEFAULTS}


def main(argv=None) -> dict:
    config, args = parse_args(argv)
    run_dir = fresh_dir(make_run_dir("copy_memory", args.out))
    lrs = dict(config.lr_overrides)
    started = time.perf_counter()
    print(
        f"copy memory: models {config.models}, delays {config.delays}, {config.steps} steps, "
        f"bptt={config.bptt}, {describe_model(model_options(config))}; writing to {run_dir}"
    )
    rows, curves = [], {}
    for delay in config.delays:
        baseline = tasks.copy_memory_baseline(delay, NUM_SYMBOLS, COPY_LENGTH)
        test_inputs, test_targets = tasks.copy_memory(
            jax.random.key(10_000 + config.seed), config.test_size, delay, NUM_SYMBOLS, COPY_LENGTH
        )
        batch_fn = make_batch_fn(config.batch, delay)
        for model in config.models:
            outcome = train_model(
                run_dir=run_dir / f"{model}_T{delay}",
                model=model,
                input_size=VOCAB,
                output_size=VOCAB,
                hidden=config.hidden,
                loss="cross_entropy",
                placement="per_step",
                batch_fn=batch_fn,
                eval_fn=make_eval_fn(MODELS[model][0], test_inputs, test_targets, config.residual),
                steps=config.steps,
                optimizer=config.optimizer,
                lr=lrs.get(model, config.lr),
                clip_norm=config.clip_norm,
                bptt=config.bptt,
                seed=config.seed,
                eval_every=config.eval_every,
                options=model_options(config),
                progress=not args.no_progress,
                desc=f"{model} T={delay}",
            )
            final = outcome["evals"][-1]
            loss = final["test_loss"]
            beats = loss < BEATS_FRACTION * baseline
            rows.append(
                {
                    "model": model,
                    "T": delay,
                    "baseline": baseline,
                    "test_loss": loss,
                    "loss_over_baseline": loss / baseline,
                    "recall_accuracy": final["recall_accuracy"],
                    "beats_baseline": beats,
                    "skipped_updates": outcome["skipped"],
                    "wall_s": outcome["wall_s"],
                }
            )
            curves[(model, delay)] = (
                [r["step"] for r in outcome["evals"]],
                [r["test_loss"] for r in outcome["evals"]],
            )
            print(
                f"  {model:5s} T={delay:4d}: test loss {loss:.4f} ({loss / baseline:.3f} x "
                f"baseline), recall accuracy {final['recall_accuracy']:.3f}"
                f"{'  beats baseline' if beats else ''}  [{outcome['wall_s']:.0f} s]"
            )

    table = markdown_table(
        ["model", "T", "test loss", "baseline", "loss / baseline", "recall acc.", "beats"],
        [
            [
                r["model"],
                r["T"],
                r["test_loss"],
                r["baseline"],
                r["loss_over_baseline"],
                r["recall_accuracy"],
                "yes" if r["beats_baseline"] else "no",
            ]
            for r in rows
        ],
    )
    summary = {
        "experiment": "copy_memory",
        "config": dataclasses.asdict(config),
        "bptt_mode": config.bptt,
        "model_options": model_options(config),
        "truncation": "none (full BPTT over the whole sequence)",
        "beats_fraction": BEATS_FRACTION,
        "results": rows,
        "device": device_info(),
        "wall_time_s": time.perf_counter() - started,
        "argv": sys.argv if argv is None else list(argv),
    }
    write_json(run_dir / "results.json", summary)
    (run_dir / "results.md").write_text(
        f"Copy memory ({config.steps} steps, batch {config.batch}, hidden {config.hidden}, "
        f"{config.optimizer} lr {config.lr} (irnn {lrs.get('irnn', config.lr)}), bptt="
        f"{config.bptt}); beats: test loss < {BEATS_FRACTION} x baseline; recall chance "
        f"{1 / NUM_SYMBOLS:.3f}\n\n{table}\n",
        encoding="utf-8",
    )
    plot_curves(
        run_dir / "copy_memory.png",
        [
            {
                "title": f"T = {delay}",
                "xlabel": "step",
                "ylabel": "test cross-entropy (nats/step)",
                "series": {m: curves[(m, delay)] for m in config.models},
                "hlines": {
                    "memoryless baseline": tasks.copy_memory_baseline(
                        delay, NUM_SYMBOLS, COPY_LENGTH
                    )
                },
            }
            for delay in config.delays
        ],
        title="Copy memory",
    )
    print(table)
    print(f"outputs in {run_dir}")
    return summary


if __name__ == "__main__":
    main()
