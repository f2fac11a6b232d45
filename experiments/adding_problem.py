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
second layer on) train stacked models (any ``--bptt`` mode); ``--unroll k`` sets the scan unroll;
``--devices N`` trains data-parallel (``jax_bptt.parallel``; the batch must be a multiple of N).
The sweep itself (flags, training, table, plot) is ``sweep.py``'s.

    python experiments/adding_problem.py                          # full sweep: long on a CPU
    python experiments/adding_problem.py --lengths 50,100 --steps 1500

Outputs (``runs/adding_problem/<time>/`` or ``--out``): ``results.json``, ``results.md`` (the
table), ``adding_problem.png``, and each model's ``metrics.jsonl`` + checkpoint in a subfolder.
"""

from __future__ import annotations

import functools

import jax
from sweep import Sweep

import jax_bptt as jb
from jax_bptt import tasks

SOLVED_FRACTION = 0.1  # solved: test MSE < 0.1 * baseline
BASELINE = tasks.ADDING_BASELINE_MSE
THRESHOLD = SOLVED_FRACTION * BASELINE


class AddingProblem(Sweep):
    name = "adding_problem"
    sizes_name, sizes_help, min_size = "lengths", "comma-separated T >= 2, e.g. 50,100,200,400", 2
    defaults = dict(
        sizes=(50, 100, 200, 400), steps=4000, batch=50, hidden=100, test_size=1000,
    )  # fmt: skip
    quick = dict(sizes=(8,), steps=10, batch=8, hidden=8, test_size=32, eval_every=5)
    loss = jb.Loss("mse", "last_step")
    input_size, output_size = 2, 1
    metric = "test_mse"
    plot = {"ylabel": "test MSE", "logy": True, "title": "Adding problem: test MSE (last step)"}
    truncation = "none (full BPTT; the loss is at the last step only)"
    headers = ["model", "T", "test MSE", "MSE / baseline", "solved", "first step solved"]
    title = "Adding problem"
    note = f"baseline MSE {BASELINE:.4f}, solved: MSE < {THRESHOLD:.4f}"
    intro = f"; baseline MSE {BASELINE:.4f}, solved below {THRESHOLD:.4f}"
    extra = {"baseline_mse": BASELINE, "solved_threshold_mse": THRESHOLD}

    def data(self, config, size):
        test = tasks.adding_problem(jax.random.key(10_000 + config.seed), config.test_size, size)
        return functools.partial(tasks.adding_problem, batch_size=config.batch, seq_len=size), test

    def evaluate(self, params, test, **model) -> dict:
        return {"test_mse": jb.model_loss(params, *test, loss=self.loss, **model)}

    def result(self, size, evals) -> dict:
        mse = evals[-1]["test_mse"]
        return {
            "test_mse": mse,
            "mse_over_baseline": mse / BASELINE,
            "best_test_mse": min(r["test_mse"] for r in evals),
            "solved": mse < THRESHOLD,
            "first_step_solved": next(
                (r["step"] for r in evals if r["test_mse"] < THRESHOLD), None
            ),
        }

    def describe(self, row) -> str:
        mse = row["test_mse"]
        return f"test MSE {mse:.4f} ({mse / BASELINE:.3f} x baseline){'  solved' * row['solved']}"

    def table_row(self, row) -> list:
        solved_at = row["first_step_solved"]
        return [
            row["model"], row["T"], row["test_mse"], row["mse_over_baseline"],
            "yes" if row["solved"] else "no", "-" if solved_at is None else solved_at,
        ]  # fmt: skip

    def hlines(self, size) -> dict:
        return {"baseline": BASELINE, "solved": THRESHOLD}


SWEEP = AddingProblem(__doc__)
parse_args, main = SWEEP.parse_args, SWEEP.main

if __name__ == "__main__":
    main()
