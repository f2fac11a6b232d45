"""The main job's train step against plain JAX: is the library's step as fast as the code it
replaces?

Both train the char LM's model (LSTM, token ids in, a readout, cross-entropy, Adam, clip-norm 1)
on one truncated-BPTT window of the bundled text per step, carrying the state:

- ``plain``: 40 lines of plain JAX: an embedding-row gather for the input projection, a
  ``lax.scan`` of the LSTM step, ``jax.value_and_grad``, optax; nothing else.
- ``library/<mode>``: ``jax_bptt.make_train_step(..., truncation=(k1, k1), mode=...)``, which adds
  the non-finite guard, the gradient norm and the carry.
- ``library/fast+drop``: the fast step with the char LM's default regularisers (weight dropout
  0.25 on ``W_hh``, output dropout 0.2): what they cost per step.

Wall and process-CPU time per step: warm-up, ``block_until_ready``, median over interleaved rounds
(every candidate once per round, same order), in one process. Prints the CPU and versions.

    python experiments/bench_char_lm.py --json experiments/results/bench_char_lm_cpu.json \\
        --txt experiments/results/bench_char_lm_cpu.txt
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench import interleaved_medians, jax_timer
from common import device_info, set_cpu_threads, write_outputs

import jax_bptt as jb
from jax_bptt import tasks


def plain_step(vocab_size: int, hidden: int, optimizer):
    """The plain-JAX train step: params ``{"emb", "W_hh", "b", "W_hy", "b_y"}``."""

    def loss_fn(params, h0, xs, ys):
        def step(state, x):
            h, c = state
            a = params["emb"][x] + h @ params["W_hh"] + params["b"]  # (b 4h): gather, no one-hot
            i, f, g, o = jnp.split(a, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        final, hs = jax.lax.scan(step, h0, xs)
        logits = hs @ params["W_hy"] + params["b_y"]
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), ys[..., None], -1).mean()
        return loss, final

    @jax.jit
    def train_step(params, opt_state, xs, ys, h0):
        (loss, final), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, h0, xs, ys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jax.lax.stop_gradient(final)

    return train_step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k1", type=int, default=32)  # char_lm.py's default window
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="XLA CPU threads (0: XLA's own)")
    parser.add_argument("--modes", default="auto,manual,fast")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--txt", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        set_cpu_threads(args.threads)
    text = tasks.load_corpus(None)
    vocab = tasks.build_vocab(text)
    stream = np.asarray(tasks.char_stream(vocab.encode(text), args.batch))
    xs = jnp.asarray(stream[: args.k1], jnp.int32)
    ys = jnp.asarray(stream[1 : args.k1 + 1], jnp.int32)
    params = jb.init_model(jax.random.key(0), "lstm", vocab.size, args.hidden, vocab.size)
    layer = params["layers"][0]["fwd"]
    plain_params = {
        "emb": layer["W_xh"], "W_hh": layer["W_hh"], "b": layer["b_h"],
        "W_hy": params["readout"]["W_hy"], "b_y": params["readout"]["b_y"],
    }  # fmt: skip
    optimizer = jb.make_optimizer("adam", 3e-3, clip_norm=1.0)
    zeros = jnp.zeros((args.batch, args.hidden))

    plain = plain_step(vocab.size, args.hidden, optimizer)
    plain_state = optimizer.init(plain_params)
    runs = {"plain": jax_timer(plain, (plain_params, plain_state, xs, ys, (zeros, zeros)))}
    h0 = jb.init_state(params, args.batch, cell="lstm")
    for mode in args.modes.split(","):
        step = jb.make_train_step(
            optimizer, cell="lstm", loss="cross_entropy", mode=mode, truncation=(args.k1, args.k1)
        )
        runs[f"library/{mode}"] = jax_timer(step, (params, optimizer.init(params), xs, ys, h0))
    # what the char LM's default regularisers (char_lm.Config) add to the fastest step
    step = jb.make_train_step(
        optimizer, cell="lstm", loss="cross_entropy", mode="fast", truncation=(args.k1, args.k1),
        output_dropout=0.2, weight_dropout=0.25,
    )  # fmt: skip
    runs["library/fast+drop"] = jax_timer(
        functools.partial(step, key=jax.random.key(1)), (params, optimizer.init(params), xs, ys, h0)
    )
    # the same loss at the same params: both compute the same model
    plain_loss = float(plain(plain_params, plain_state, xs, ys, (zeros, zeros))[2])
    library_loss = float(jb.model_loss(params, xs, ys, cell="lstm", loss="cross_entropy"))
    assert abs(plain_loss - library_loss) < 1e-5 * abs(plain_loss), (plain_loss, library_loss)
    medians = interleaved_medians(runs, args.repeats)
    info = device_info()
    lines = [
        f"device: {info['cpu']} ({info['cpu_count']} cores), jax {info['jax']}, optax "
        f"{info['optax']}; LSTM H={args.hidden}, {args.batch} streams, k1=k2={args.k1}, "
        f"vocab {vocab.size}, Adam + clip-norm 1; median of {args.repeats} interleaved rounds",
        f"{'step':16s} {'wall ms':>9s} {'cpu ms':>9s} {'steps/s':>8s} {'vs plain':>9s}",
    ]
    base = medians["plain"][0]
    for name, (wall, cpu) in medians.items():
        lines.append(f"{name:16s} {wall:9.2f} {cpu:9.2f} {1e3 / wall:8.2f} {wall / base:8.2f}x")
    report = "\n".join(lines)
    print(report)
    result = {
        "device": info,
        "config": vars(args) | {"json": None, "txt": None},
        "medians_ms": {k: {"wall": w, "cpu": c} for k, (w, c) in medians.items()},
    }
    write_outputs(args, result, report + "\n", indent=2)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
