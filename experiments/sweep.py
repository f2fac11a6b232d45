"""The model sweep behind ``adding_problem.py`` and ``copy_memory.py``: every ``MODELS`` entry
trained at every swept sequence size with full BPTT, one command line, one results table, one
plot.

A task is a ``Sweep`` subclass that says only what is its own: its defaults, its data and
evaluation, the columns of its table, and the lines of its plot. ``Sweep.main`` does the rest:
parse and range-check the flags, train each (model, size) with ``jax_bptt.fit`` (its
``metrics.jsonl`` and checkpoint in a subfolder ``<model>_T<size>``), then write
``results.json``, ``results.md`` and ``<name>.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
from common import (
    MODELS,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT,
    choice_list,
    config_from_args,
    describe_model,
    device_info,
    fresh_dir,
    int_list,
    make_run_dir,
    markdown_table,
    model_kwargs,
    model_options,
    parse_model_args,
    place_step,
    plot_curves,
    scan_options,
    training_parser,
)

import jax_bptt as jb
from jax_bptt.checkpoints import atomic_write_json, model_signature


@dataclasses.dataclass
class Config:
    """A sweep's settings; ``sizes`` is written out under the task's name for them
    (``"lengths"``, ``"delays"``)."""

    models: tuple[str, ...] = ("tanh", "irnn", "lstm", "gru")
    sizes: tuple[int, ...] = (50, 100)
    steps: int = 3000
    batch: int = 64
    hidden: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    # The IRNN's unbounded ReLU state wants a smaller step (Le et al. tune it per task too).
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
    unroll: int | None = None  # lax.scan unroll (None: the platform's default)
    dtype: str = "float32"  # GEMM operands: float32 or bfloat16 (params stay float32)

    @property
    def model_options(self) -> dict:
        return model_options(self)

    @property
    def lrs(self) -> dict:
        return dict(self.lr_overrides)


class Sweep:
    """A task of the sweep. Subclasses set the attributes and the methods below ``main``."""

    name = ""  # output folder and summary["experiment"]
    sizes_name = "lengths"  # the --<sizes_name> flag and the config key of the swept sizes
    sizes_help = ""
    min_size = 1
    defaults: dict = {}  # this task's Config values
    quick: dict = {}  # --quick's
    loss = jb.Loss()
    input_size = output_size = 1
    metric = ""  # the eval record that is plotted
    plot = {"ylabel": "", "logy": False, "title": ""}
    truncation = "none (full BPTT over the whole sequence)"
    headers: list[str] = []  # the results table's columns
    title = ""  # of results.md (default: the name)
    note = ""  # after results.md's settings line
    intro = ""  # more of the first printed line (baselines, thresholds)
    extra: dict = {}  # more summary fields

    def __init__(self, doc: str):
        self.description = doc.split("\n\n")[0]

    # ----------------------------------------------------------------------------------------
    # The shared part

    def parse_args(self, argv=None):
        """``(Config, argparse.Namespace)``; a bad flag exits with one line and code 2."""
        defaults = Config(**self.defaults)
        parser = training_parser(self.description, defaults)
        parser.add_argument("--models", type=choice_list(MODELS), default=defaults.models)
        parser.add_argument(
            f"--{self.sizes_name}", type=int_list(self.min_size), default=None,
            help=self.sizes_help,
        )  # fmt: skip
        parser.add_argument("--steps", type=POSITIVE, default=None)
        parser.add_argument("--batch", type=POSITIVE, default=None)
        parser.add_argument("--hidden", type=POSITIVE, default=None)
        parser.add_argument("--lr-irnn", type=POSITIVE_FLOAT, default=defaults.lrs["irnn"])
        parser.add_argument(
            "--eval-every", type=NON_NEGATIVE, default=None, help="0: only at the end"
        )
        args = parser.parse_args(argv)
        args.sizes = getattr(args, self.sizes_name)
        flags = ("sizes", "steps", "batch", "hidden", "eval_every")
        config = config_from_args(
            defaults, args, quick=self.quick, flags=flags, models=args.models,
            lr_overrides=(("irnn", args.lr_irnn),),
        )  # fmt: skip
        options = parse_model_args(parser, args, batch=config.batch)
        return dataclasses.replace(config, **options), args

    def main(self, argv=None) -> dict:
        config, args = self.parse_args(argv)
        run_dir = fresh_dir(make_run_dir(self.name, args.out))
        started = time.perf_counter()
        print(
            f"{self.name}: models {config.models}, {self.sizes_name} {config.sizes}, "
            f"{config.steps} steps, bptt={config.bptt}, {describe_model(config.model_options)}"
            f"{self.intro}; writing to {run_dir}"
        )
        rows, curves = [], {}
        for size in config.sizes:
            batch_fn, test = self.data(config, size)
            for model in config.models:
                model_args = model_kwargs(MODELS[model][0], config.model_options)
                evaluate = functools.partial(self.evaluate, test=test, **model_args)
                outcome = self.train(
                    config, model, batch_fn, evaluate, run_dir=run_dir / f"{model}_T{size}",
                    progress=not args.no_progress, desc=f"{model} T={size}",
                )  # fmt: skip
                evals = outcome["evals"]
                row = {"model": model, "T": size, **self.result(size, evals)}
                row.update(skipped_updates=outcome["skipped"], wall_s=outcome["wall_s"])
                rows.append(row)
                curves[model, size] = ([r["step"] for r in evals], [r[self.metric] for r in evals])
                print(f"  {model:5s} T={size:4d}: {self.describe(row)}  [{row['wall_s']:.0f} s]")

        table = markdown_table(self.headers, [self.table_row(row) for row in rows])
        record = dataclasses.asdict(config)
        record[self.sizes_name] = record.pop("sizes")
        summary = {
            "experiment": self.name, "config": record,
            "bptt_mode": config.bptt, "model_options": config.model_options,
            "truncation": self.truncation, **self.extra, "results": rows,
            "device": device_info(), "wall_time_s": time.perf_counter() - started,
            "argv": sys.argv if argv is None else list(argv),
        }  # fmt: skip
        atomic_write_json(run_dir / "results.json", summary)
        (run_dir / "results.md").write_text(
            f"{self.title or self.name} ({config.steps} steps, batch {config.batch}, hidden "
            f"{config.hidden}, {config.optimizer} lr {config.lr} (irnn "
            f"{config.lrs.get('irnn', config.lr)}), bptt={config.bptt}); {self.note}"
            f"\n\n{table}\n",
            encoding="utf-8",
        )
        panels = [
            {"title": f"T = {size}", "xlabel": "step", "ylabel": self.plot["ylabel"],
             "logy": self.plot["logy"], "series": {m: curves[m, size] for m in config.models},
             "hlines": self.hlines(size)}
            for size in config.sizes
        ]  # fmt: skip
        plot_curves(run_dir / f"{self.name}.png", panels, title=self.plot["title"])
        print(table)
        print(f"outputs in {run_dir}")
        return summary

    def train(self, config: Config, model: str, batch_fn, eval_fn, *, run_dir, progress, desc):
        """Train one ``MODELS`` entry with ``jax_bptt.fit``; return its eval records.

        ``batch_fn(key) -> (xs, targets)``; ``eval_fn(params) -> {name: float}``. The run's
        metrics and final checkpoint go to ``run_dir``.
        """
        options = config.model_options
        cell, recurrent_init = MODELS[model]
        lr = config.lrs.get(model, config.lr)
        params = jb.init_model(
            jax.random.key(config.seed), cell, self.input_size, config.hidden, self.output_size,
            num_layers=config.layers, bidirectional=config.bidirectional,
            recurrent_init=recurrent_init, forget_bias=1.0 if cell == "lstm" else None,
        )  # fmt: skip
        optimizer = jb.make_optimizer(config.optimizer, lr, clip_norm=config.clip_norm)
        train_step = jb.make_train_step(
            optimizer, cell=cell, loss=self.loss, mode=config.bptt, options=scan_options(options),
            dropout=config.dropout, residual=config.residual,
        )  # fmt: skip

        def batch_kwargs(key, step, carry):
            del step, carry
            xs, targets = batch_fn(key)
            return {"xs": xs, "targets": targets}

        started = time.perf_counter()
        run_config = {"model": model, "cell": cell, "recurrent_init": recurrent_init, "lr": lr}
        result = jb.fit(
            place_step(train_step, options, loss=self.loss), params, optimizer, batch_kwargs,
            num_steps=config.steps, key=jax.random.fold_in(jax.random.key(config.seed), 1),
            run_dir=run_dir, signature=model_signature(params, cell, residual=config.residual),
            config=run_config | options, eval_fn=eval_fn, eval_every=config.eval_every,
            log_every=50, progress=progress, desc=desc,
        )  # fmt: skip
        return {
            "evals": [r for r in result.history if r["kind"] == "eval"],
            "skipped": result.skipped,
            "wall_s": time.perf_counter() - started,
        }

    # ----------------------------------------------------------------------------------------
    # The task's own part

    def data(self, config: Config, size: int):
        """``(batch_fn(key) -> (xs, targets), test set)`` for one swept size."""
        raise NotImplementedError

    def evaluate(self, params, test, *, cell, residual, options) -> dict:
        """The eval record of ``params`` on the test set (``self.metric`` among its names)."""
        raise NotImplementedError

    def result(self, size: int, evals: list[dict]) -> dict:
        """The task's columns of a results row, from the model's eval records."""
        raise NotImplementedError

    def describe(self, row: dict) -> str:
        raise NotImplementedError

    def table_row(self, row: dict) -> list:
        raise NotImplementedError

    def hlines(self, size: int) -> dict:
        return {}
