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
second layer on) train stacked models (any ``--bptt`` mode); ``--unroll k`` sets the scan unroll;
``--devices N`` trains data-parallel (``jax_bptt.parallel``; the batch must be a multiple of N).
The sweep itself (flags, training, table, plot) is ``sweep.py``'s.

    python experiments/copy_memory.py                            # T = 50 and 100
    python experiments/copy_memory.py --delays 50 --steps 2000 --models lstm,gru

Outputs (``runs/copy_memory/<time>/`` or ``--out``): ``results.json``, ``results.md``,
``copy_memory.png``, and each model's ``metrics.jsonl`` + checkpoint in a subfolder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from sweep import Sweep

import jax_bptt as jb
from jax_bptt import tasks
from jax_bptt.losses import sequence_loss

BEATS_FRACTION = 0.9  # beats the baseline: test loss < 0.9 * baseline
NUM_SYMBOLS, COPY_LENGTH = 8, 10
VOCAB = tasks.copy_memory_vocab_size(NUM_SYMBOLS)


def encode(ids):
    """int ``(t b)`` -> one-hot float32 ``(t b v)``."""
    return jax.nn.one_hot(ids, VOCAB, dtype=jnp.float32)


def baseline(delay: int) -> float:
    return tasks.copy_memory_baseline(delay, NUM_SYMBOLS, COPY_LENGTH)


class CopyMemory(Sweep):
    name = "copy_memory"
    sizes_name, sizes_help = "delays", "comma-separated T, e.g. 50,100"
    defaults = dict(sizes=(50, 100), steps=3000, batch=64, hidden=128, test_size=500)
    quick = dict(sizes=(5,), steps=10, batch=8, hidden=8, test_size=32, eval_every=5)
    loss = jb.Loss("cross_entropy")
    input_size = output_size = VOCAB
    metric = "test_loss"
    plot = {"ylabel": "test cross-entropy (nats/step)", "logy": False, "title": "Copy memory"}
    headers = ["model", "T", "test loss", "baseline", "loss / baseline", "recall acc.", "beats"]
    title = "Copy memory"
    note = f"beats: test loss < {BEATS_FRACTION} x baseline; recall chance {1 / NUM_SYMBOLS:.3f}"
    extra = {"beats_fraction": BEATS_FRACTION}

    def data(self, config, size):
        @jax.jit
        def batch_fn(key):
            inputs, targets = tasks.copy_memory(key, config.batch, size, NUM_SYMBOLS, COPY_LENGTH)
            return encode(inputs), targets

        inputs, targets = tasks.copy_memory(
            jax.random.key(10_000 + config.seed), config.test_size, size, NUM_SYMBOLS, COPY_LENGTH
        )
        return batch_fn, (encode(inputs), targets)

    def evaluate(self, params, test, **model) -> dict:
        xs, targets = test
        ys = jb.predict(params, xs, **model)
        recall = jnp.argmax(ys[-COPY_LENGTH:], axis=-1) == targets[-COPY_LENGTH:]
        return {
            "test_loss": sequence_loss(ys, targets, self.loss),
            "recall_accuracy": recall.mean(),
        }

    def result(self, size, evals) -> dict:
        final = evals[-1]
        loss = final["test_loss"]
        return {
            "baseline": baseline(size),
            "test_loss": loss,
            "loss_over_baseline": loss / baseline(size),
            "recall_accuracy": final["recall_accuracy"],
            "beats_baseline": loss < BEATS_FRACTION * baseline(size),
        }

    def describe(self, row) -> str:
        return (
            f"test loss {row['test_loss']:.4f} ({row['loss_over_baseline']:.3f} x baseline), "
            f"recall accuracy {row['recall_accuracy']:.3f}"
            f"{'  beats baseline' * row['beats_baseline']}"
        )

    def table_row(self, row) -> list:
        return [
            row["model"], row["T"], row["test_loss"], row["baseline"], row["loss_over_baseline"],
            row["recall_accuracy"], "yes" if row["beats_baseline"] else "no",
        ]  # fmt: skip

    def hlines(self, size) -> dict:
        return {"memoryless baseline": baseline(size)}


SWEEP = CopyMemory(__doc__)
parse_args, main = SWEEP.parse_args, SWEEP.main

if __name__ == "__main__":
    main()
