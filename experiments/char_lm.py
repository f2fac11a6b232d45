"""Character-level language model: a small LSTM trained with truncated BPTT on a text corpus.

The default corpus is CPython's bundled ``pydoc_data`` help text (no download); ``--text PATH``
trains on any UTF-8 file. The training split is laid out as ``batch`` contiguous streams
(``tasks.char_stream``); each step trains on the next window of the streams with BPTT(k1, k2) and
carries the hidden state into the next step (``jax_bptt.truncated``). ``--data windows`` trains on
random windows from a zero state instead (full BPTT per window, any ``--bptt`` mode).

Validation loss is the mean cross-entropy over the whole held-out tail of the text, read as
``eval_streams`` streams with the state carried from the first character, reported in nats and
bits per character next to a bigram baseline. Samples are printed as training goes, the prompt
in brackets followed by the sampled continuation, and kept in ``samples.txt`` (one entry per
evaluation, headed by its step; a resumed run drops the entries after its checkpoint, which it
makes again).

``--weight-dropout p`` drops entries of ``W_hh`` (one mask per step) and ``--output-dropout p``
units of the top layer's outputs before the readout: the default's regularisers (without them
the one-layer model overfits this small corpus). ``--layers N`` stacks
LSTMs, with ``--dropout p`` between them and ``--residual`` connections from the second layer on;
``--unroll k`` sets the scan unroll; ``--devices N`` trains data-parallel (``jax_bptt.parallel``,
the streams split over the devices). There is no ``--bidirectional``: a language model must not
read the character it predicts. The default stays one layer: measured on the 2-core CPU, a 2-layer
H=256 model reached 1.369 nats/char after the same 1200 steps but took 2.7x the wall time (243 s
against 91 s), and at 91 s it was near 1.8 nats/char.

Training stops after ``--max-minutes`` (then ``--resume`` continues it) and checkpoints every
``--checkpoint-minutes`` (and every ``checkpoint_every`` steps), so a killed run loses little.
``--sample --out RUN`` prints a sample from a trained run folder without training.

    python experiments/char_lm.py                     # default run: a few minutes on 2 CPU cores
    python experiments/char_lm.py --steps 12000 --hidden 384 --out runs/char_lm/long
    python experiments/char_lm.py --out runs/char_lm/long --resume   # continue a stopped run
    python experiments/char_lm.py --out runs/char_lm/long --sample --temperature 0.5

Outputs (``runs/char_lm/<time>/`` or ``--out``): ``config.json``, ``metrics.jsonl``,
``samples.txt``, ``summary.json``, ``loss_curve.png`` and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    MODEL_DEFAULTS,
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    POSITIVE_FLOAT,
    Parser,
    config_from_args,
    describe_model,
    device_info,
    float_in,
    fresh_dir,
    make_run_dir,
    model_kwargs,
    model_options,
    parse_model_args,
    place_step,
    plot_curves,
    scan_options,
    training_parser,
)

import jax_bptt as jb
from jax_bptt import tasks
from jax_bptt.checkpoints import (
    atomic_write_bytes,
    atomic_write_json,
    has_checkpoint,
    load_checkpoint,
    model_signature,
    read_metadata,
)
from jax_bptt.train import METRICS
from jax_bptt.truncated import window_bounds

LOSS = jb.Loss("cross_entropy")


@dataclasses.dataclass
class Config:
    cell: str = "lstm"
    hidden: int = 256
    batch: int = 32  # streams (or random windows) per step
    k1: int = 32  # steps per training window (the chunk that carries the loss)
    k2: int | None = None  # steps to backpropagate; default k1
    data: str = "stream"  # "stream" (truncated BPTT, state carried) or "windows"
    steps: int = 7000  # 249 s on the project's quiet 2-core CPU (README)
    max_minutes: float | None = 6.0  # the budget: stop early (then --resume) on a slower machine
    checkpoint_minutes: float | None = 1.0  # and checkpoint this often
    optimizer: str = "adam"
    lr: float = 4e-3  # the peak of the schedule
    schedule: str = "cosine"  # linear warm-up, cosine decay to lr/20 at --steps; or "constant"
    warmup: int = 100  # steps of linear warm-up (cosine schedule)
    clip_norm: float | None = 1.0
    clip_value: float | None = None
    weight_decay: float | None = None  # adamw's decoupled weight decay
    forget_bias: float | None = 1.0
    bptt: str = "fast"  # the hand-written backward: the fastest step (bench_char_lm.py)
    val_fraction: float = 0.1
    eval_streams: int = 32
    eval_every: int = 500
    log_every: int = 25
    checkpoint_every: int = 500
    sample_length: int = 200
    temperature: float = 0.7
    prompt: str = "The "
    seed: int = 0
    text: str | None = None  # path to a UTF-8 file; None: pydoc_data topics
    layers: int = 1
    bidirectional: bool = False  # always: a causal language model cannot read the future
    dropout: float = 0.0  # between layers
    output_dropout: float = 0.2  # on the top layer's outputs, before the readout (README)
    weight_dropout: float = 0.25  # DropConnect on W_hh (AWD-LSTM's weight drop; README)
    residual: bool | str = False  # or "except_first": layers 1.. add their input
    devices: int | None = None  # data-parallel devices (None: one device, no mesh)
    unroll: int | None = None  # lax.scan unroll (None: the platform's default)
    dtype: str = "float32"  # GEMM operands: float32 or bfloat16 (params stay float32)


QUICK = dict(
    hidden=32, batch=8, k1=16, steps=30, eval_every=15, log_every=5, sample_length=40,
    checkpoint_every=20,
)  # fmt: skip
QUICK_VAL_CHARS = 4000  # --quick validates on the first characters of the held-out text only

# What a resumed run may change: how long and how often, not what it computes.
RESUMABLE_CHANGES = {
    "steps",
    "max_minutes",
    "checkpoint_minutes",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "devices",
}


class Corpus(NamedTuple):
    text: str
    vocab: tasks.CharVocab
    train_ids: np.ndarray
    val_ids: np.ndarray


def make_parser() -> Parser:
    defaults = Config()
    parser = training_parser(__doc__.split("\n\n")[0], defaults)
    parser.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc topics)")
    parser.add_argument("--cell", default=defaults.cell, choices=tuple(jb.CELLS))
    parser.add_argument("--hidden", type=POSITIVE, default=None)
    parser.add_argument("--batch", type=POSITIVE, default=None)
    parser.add_argument(
        "--k1", type=POSITIVE, default=None,
        help="steps per chunk (the part of a window that carries the loss)",
    )  # fmt: skip
    parser.add_argument("--k2", type=POSITIVE, default=None, help="steps to backpropagate (>= k1)")
    parser.add_argument("--data", choices=("stream", "windows"), default=defaults.data)
    parser.add_argument("--steps", type=POSITIVE, default=None)
    parser.add_argument(
        "--output-dropout", type=float_in(0.0, 1.0), default=defaults.output_dropout,
        help="dropout on the top layer's outputs, before the readout (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--weight-dropout", type=float_in(0.0, 1.0), default=defaults.weight_dropout,
        help="DropConnect on the recurrent weights W_hh, one mask per step (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--schedule", choices=("cosine", "constant"), default=defaults.schedule,
        help="learning rate: warm-up then cosine decay over --steps, or constant --lr",
    )  # fmt: skip
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=defaults.warmup)
    parser.add_argument("--clip-value", type=NON_NEGATIVE_FLOAT, default=0.0, help="0: none")
    parser.add_argument(
        "--weight-decay", type=POSITIVE_FLOAT, default=defaults.weight_decay,
        help="decoupled weight decay (with --optimizer adamw)",
    )  # fmt: skip
    parser.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=defaults.temperature)
    parser.add_argument("--eval-every", type=NON_NEGATIVE, default=None, help="0: at the end")
    parser.add_argument(
        "--max-minutes", type=NON_NEGATIVE_FLOAT, default=defaults.max_minutes,
        help="stop training after this many minutes even before --steps (0: no limit); "
        "--resume continues a stopped run",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-minutes", type=NON_NEGATIVE_FLOAT, default=defaults.checkpoint_minutes,
        help="also checkpoint every this many minutes (0: only every checkpoint_every steps and "
        "at the end)",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--sample", action="store_true",
        help="print a sample from the trained run in --out (its checkpoint) and exit",
    )  # fmt: skip
    return parser


def parse_args(argv=None) -> tuple[Config | None, object]:
    """``(config, args)``; ``args.corpus`` holds the loaded text. Every bad flag, also a text
    too short for the streams, exits with one line and code 2 before any work. With ``--sample``
    the config is None (it comes from the run folder)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.sample:
        if args.out is None:
            parser.error("--sample needs --out, the folder of a trained run")
        if not has_checkpoint(args.out):
            parser.error(f"--sample: no checkpoint in {args.out} (train a run there first)")
        return None, args
    if args.resume and args.out is None:
        parser.error("--resume needs the --out folder of the run to continue")
    defaults = Config()
    # the flags that were given; those whose default is the Config's (or None) change nothing
    flags = ("hidden", "batch", "k1", "k2", "steps", "eval_every", "cell", "data", "text", "warmup")
    flags += ("weight_decay", "schedule", "output_dropout", "weight_dropout", "temperature")
    config = config_from_args(
        defaults, args, quick=QUICK, flags=flags, clip_value=args.clip_value or None,
        max_minutes=args.max_minutes or None, checkpoint_minutes=args.checkpoint_minutes or None,
        forget_bias=defaults.forget_bias if args.cell == "lstm" else None,
    )  # fmt: skip
    if config.k2 is None:
        config = dataclasses.replace(config, k2=config.k1)
    if config.weight_decay is not None and config.optimizer != "adamw":
        parser.error(f"--weight-decay needs --optimizer adamw, got {config.optimizer}")
    if args.bidirectional:
        parser.error(
            "--bidirectional does not apply here: a causal language model predicts the next "
            "character, and a backward direction would read it from the future"
        )
    options = parse_model_args(parser, args, batch=config.batch)
    config = dataclasses.replace(config, **options)
    if config.k2 < config.k1:
        parser.error(
            f"--k2 (steps to backpropagate) must be >= --k1, got k1={config.k1}, k2={config.k2}"
        )
    if config.data == "windows" and config.k2 != config.k1:
        parser.error("--data windows trains full windows of k1 steps; drop --k2")
    args.corpus = load_corpus(parser, config, quick=args.quick)
    if args.resume:
        check_same_config(parser, Path(args.out), config)
    return config, args


def load_corpus(parser: Parser, config: Config, *, quick: bool) -> Corpus:
    """The text, its vocabulary and splits; ``parser.error`` for a missing, empty, binary or
    too short file."""
    try:
        text = tasks.load_corpus(config.text)
    except (OSError, ValueError) as err:
        parser.error(f"--text: {err}")
    if "\x00" in text:
        parser.error(f"--text: {config.text!r} looks binary (it holds NUL characters)")
    vocab = tasks.build_vocab(text)
    try:
        train_ids, val_ids = tasks.split_train_val(vocab.encode(text), config.val_fraction)
    except ValueError as err:
        parser.error(f"--text: too short: {err}")
    if quick:
        val_ids = val_ids[:QUICK_VAL_CHARS]
    stream_length = len(train_ids) // config.batch  # steps of each training stream
    if config.data == "stream" and stream_length - 1 < max(config.k1, config.k2):
        parser.error(
            f"the training text ({len(train_ids)} characters) is too short for --batch "
            f"{config.batch} streams with k1={config.k1}, k2={config.k2}"
        )
    if config.data == "windows" and len(train_ids) < config.k1 + 1:
        parser.error(f"the training text ({len(train_ids)} characters) is shorter than k1 + 1")
    if len(val_ids) // config.eval_streams < 2:
        parser.error(
            f"the validation text ({len(val_ids)} characters) is too short for "
            f"{config.eval_streams} streams"
        )
    return Corpus(text, vocab, train_ids, val_ids)


def check_same_config(parser: Parser, run_dir: Path, config: Config) -> None:
    """A resumed run must use the settings it started with (except how long it runs)."""
    path = run_dir / "config.json"
    if not path.is_file():
        parser.error(f"--resume: no char_lm run in {run_dir} ({path.name} missing)")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)["config"]
    # a run from before a setting existed ran with the setting's old default
    saved = {**MODEL_DEFAULTS, "output_dropout": 0.0, "weight_dropout": 0.0, **saved}
    changed = {
        name: (saved.get(name), value)
        for name, value in dataclasses.asdict(config).items()
        if name not in RESUMABLE_CHANGES and saved.get(name) != value
    }
    if changed:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        parser.error(f"--resume with different settings than the run in {run_dir}: {details}")


def token_ids(ids) -> jax.Array:
    """``(t b)`` int32 token ids: the model's input projection is then a row gather of ``W_xh``
    (and its gradient a scatter-add), not a GEMM with one-hot vectors."""
    return jnp.asarray(ids, jnp.int32)


def make_batch_fn(config: Config, train_ids: np.ndarray, zero_state):
    """``(key, step, carry) -> train_step kwargs`` for the chosen data layout, and the carry
    before step 0."""
    if config.data == "windows":
        ids = jnp.asarray(train_ids)

        def windows(key, step, carry):
            del step, carry
            xs, ys = tasks.sample_char_batch(key, ids, config.batch, config.k1)
            return {"xs": token_ids(xs), "targets": ys}

        return windows, None

    stream = np.asarray(tasks.char_stream(train_ids, config.batch))  # (L, B)
    chunks_per_epoch = (stream.shape[0] - 1) // config.k1

    def next_window(key, step, carry):
        del key  # the stream is read in order; the epoch restarts every chunks_per_epoch steps
        start, end = window_bounds(step % chunks_per_epoch, config.k1, config.k2)
        return {
            "xs": token_ids(stream[start:end]),
            "targets": stream[start + 1 : end + 1],
            "h0": zero_state if start == 0 else carry,
        }

    return next_window, zero_state


# --------------------------------------------------------------------------------------------
# Samples


# An entry's header; runs from before the step was recorded wrote "=== val ..." (kept on resume).
SAMPLE_HEADER = re.compile(r"^=== (?:step (\d+): )?val ", re.MULTILINE)


def sample_text(params, config: Config, vocab, key, temperature: float) -> str:
    """``[prompt]continuation``: the prompt once, in brackets, then the sampled characters."""
    prompt = config.prompt if set(config.prompt) <= set(vocab.chars) else vocab.chars[0]
    tokens = jb.generate(
        params, key, vocab.encode(prompt), config.sample_length,
        cell=config.cell, residual=config.residual, temperature=temperature,
    )  # fmt: skip
    return f"[{prompt}]{vocab.decode(np.asarray(tokens))}"


def truncate_samples(path: Path, last_step: int) -> int:
    """Keep the entries of ``samples.txt`` up to ``last_step`` (a resumed run makes the later ones
    again, as ``fit`` drops their metrics); return how many are kept."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    headers = list(SAMPLE_HEADER.finditer(text))
    ends = [m.start() for m in headers[1:]] + [len(text)]
    kept = [
        text[m.start() : end]
        for m, end in zip(headers, ends, strict=True)
        if m.group(1) is None or int(m.group(1)) <= last_step
    ]
    atomic_write_bytes(path, "".join(kept).encode())
    return len(kept)


def make_eval_fn(config, corpus: Corpus, run_dir: Path, progress_write, steps_done, evals_done=0):
    """Validation loss over the whole held-out text, plus a printed sample.

    ``steps_done()`` is the step the evaluation is at. Each evaluation samples with its own key,
    ``fold_in(key(seed + 1), evaluations so far)``: one fixed key would start every sample with
    the same noise (with seed 0 the first draw favours "T" so strongly that every sample of the
    default run continued "The " with "The").
    """
    vocab = corpus.vocab
    stream = np.asarray(tasks.char_stream(corpus.val_ids, config.eval_streams))
    xs, ys = token_ids(stream[:-1]), jnp.asarray(stream[1:])
    model = model_kwargs(config.cell, model_options(config))
    sample_key = jax.random.key(config.seed + 1)
    count = [evals_done]

    def evaluate(params):
        nats = float(jb.model_loss(params, xs, ys, loss=LOSS, **model))
        key = jax.random.fold_in(sample_key, count[0])
        count[0] += 1
        text = sample_text(params, config, vocab, key, config.temperature)
        progress_write(f"--- val {nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char ---")
        progress_write(text)
        with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {steps_done()}: val {nats:.4f} nats/char ===\n{text}\n\n")
        return {"val_nats": nats, "val_bits": nats / math.log(2)}

    return evaluate


def init_params(config: Config, vocab_size: int, key):
    return jb.init_model(
        key, config.cell, vocab_size, config.hidden, vocab_size,
        num_layers=config.layers, forget_bias=config.forget_bias,
    )  # fmt: skip


def make_optimizer(config: Config):
    """The optimizer with its learning-rate schedule: a warm-up keeps the first, noisy Adam steps
    small, and decaying to lr/20 at the last step lets the model settle (optax schedules)."""
    lr = config.lr
    if config.schedule == "cosine":
        warmup = min(config.warmup, max(config.steps - 1, 0))
        lr = optax.warmup_cosine_decay_schedule(
            0.0, config.lr, warmup, max(config.steps, warmup + 1), end_value=config.lr / 20
        )
    return jb.make_optimizer(
        config.optimizer, lr, clip_norm=config.clip_norm, clip_value=config.clip_value,
        weight_decay=config.weight_decay,
    )  # fmt: skip


def sample_run(args) -> dict:
    """``--sample``: load the run's checkpoint (its config, vocabulary and params) and print a
    sample; nothing is trained or written."""
    saved = read_metadata(args.out)["config"]
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{name: value for name, value in saved.items() if name in fields})
    if "vocab" in saved:
        vocab = tasks.CharVocab(saved["vocab"])
    else:  # a run from before the vocabulary was saved: rebuild it from its corpus
        vocab = tasks.build_vocab(tasks.load_corpus(config.text))
    params = init_params(config, vocab.size, jax.random.key(0))  # the template: shapes only
    carry = None
    if config.data == "stream":
        carry = jb.init_state(params, config.batch, cell=config.cell)
    ckpt = load_checkpoint(
        args.out,
        params_template=params,
        opt_state_template=make_optimizer(config).init(params),
        signature=model_signature(params, config.cell, residual=config.residual),
        carry_template=carry,
    )
    key = jax.random.fold_in(jax.random.key(args.seed), ckpt.step)
    text = sample_text(ckpt.params, config, vocab, key, args.temperature)
    print(f"sample from {args.out} at step {ckpt.step} (temperature {args.temperature}):")
    print(text)
    return {"run_dir": str(args.out), "step": ckpt.step, "sample": text}


# --------------------------------------------------------------------------------------------
# Training


def main(argv=None) -> dict:
    config, args = parse_args(argv)
    if args.sample:
        return sample_run(args)
    run_dir = make_run_dir("char_lm", args.out)
    if not args.resume:
        fresh_dir(run_dir)
    started = time.perf_counter()

    corpus = args.corpus
    vocab, train_ids, val_ids = corpus.vocab, corpus.train_ids, corpus.val_ids
    bigram = tasks.bigram_baseline_nats(train_ids, val_ids, vocab.size)
    unigram = tasks.unigram_baseline_nats(train_ids, val_ids, vocab.size)

    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    options = model_options(config)
    params = init_params(config, vocab.size, init_key)
    zero_state = jb.init_state(params, config.batch, cell=config.cell)
    optimizer = make_optimizer(config)
    truncation = (config.k1, config.k2) if config.data == "stream" else None
    train_step = jb.make_train_step(
        optimizer, cell=config.cell, loss=LOSS, mode=config.bptt, options=scan_options(options),
        truncation=truncation, dropout=config.dropout, residual=config.residual,
        output_dropout=config.output_dropout,
        weight_dropout=config.weight_dropout,
    )  # fmt: skip
    train_step = place_step(train_step, options, loss=LOSS)
    batch_fn, init_carry = make_batch_fn(config, train_ids, zero_state)

    from tqdm.auto import tqdm

    record = {
        "experiment": "char_lm",
        "config": dataclasses.asdict(config),
        "bptt_mode": config.bptt,
        "model_options": options,
        "truncation": {  # --data windows: k2 == k1 (parse_args)
            "k1": config.k1,
            "k2": config.k2,
            "state": "carried across windows" if truncation else "zero at every random window",
        },
        "corpus": config.text or "pydoc_data.topics",
        "corpus_chars": len(corpus.text),
        "vocab_size": vocab.size,
        "train_chars": int(train_ids.shape[0]),
        "val_chars": int(val_ids.shape[0]),
        "baselines_nats": {"bigram": bigram, "unigram": unigram},
        "device": device_info(),
        "argv": sys.argv if argv is None else list(argv),
    }
    start_step = 0
    if args.resume:
        start_step = read_metadata(run_dir)["step"] if has_checkpoint(run_dir) else 0
    else:
        atomic_write_json(run_dir / "config.json", record)
    evals_done = truncate_samples(run_dir / "samples.txt", start_step)
    print(
        f"char_lm: {config.cell} H={config.hidden}, {describe_model(options)}, {vocab.size} chars, "
        f"{train_ids.shape[0]} train / {val_ids.shape[0]} val; bigram baseline {bigram:.3f} "
        f"nats/char; bptt={config.bptt}, data={config.data}, k1={config.k1}, k2={config.k2}; "
        f"writing to {run_dir}"
    )
    steps_done = [start_step]

    def counted_batch_fn(key, step, carry):
        steps_done[0] = step + 1  # the step an evaluation after this train step is at
        return batch_fn(key, step, carry)

    result = jb.fit(
        train_step,
        params,
        optimizer,
        counted_batch_fn,
        num_steps=config.steps,
        key=data_key,
        run_dir=run_dir,
        signature=model_signature(params, config.cell, residual=config.residual),
        config={**dataclasses.asdict(config), "vocab": vocab.chars},
        init_carry=init_carry,
        eval_fn=make_eval_fn(
            config, corpus, run_dir, tqdm.write, lambda: steps_done[0], evals_done=evals_done
        ),
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        checkpoint_every_s=None
        if config.checkpoint_minutes is None
        else 60.0 * config.checkpoint_minutes,
        log_every=config.log_every,
        resume=args.resume,
        progress=not args.no_progress,
        tokens_per_step=config.batch * config.k1,
        time_limit_s=None if config.max_minutes is None else 60.0 * config.max_minutes,
        desc="char_lm",
    )
    with open(run_dir / METRICS, encoding="utf-8") as f:  # the whole run, also across resumes
        history = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in history if r["kind"] == "eval"]
    trains = [r for r in history if r["kind"] == "train" and r["loss"] is not None]
    final = evals[-1]
    summary = {
        **record,
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "skipped_updates": result.skipped,
        "final_val_nats": final["val_nats"],
        "final_val_bits": final["val_bits"],
        "beats_bigram": final["val_nats"] < bigram,
        "wall_time_s": time.perf_counter() - started,
        "train_tokens_per_s_last": trains[-1].get("tokens_per_s") if trains else None,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    plot_curves(
        run_dir / "loss_curve.png",
        [
            {
                "title": f"char_lm ({config.cell}, H={config.hidden}, L={config.layers}, "
                f"bptt={config.bptt}, k1={config.k1}, k2={config.k2})",
                "xlabel": "step",
                "ylabel": "cross-entropy (nats/char)",
                "series": {
                    "train": ([r["step"] for r in trains], [r["loss"] for r in trains]),
                    "validation": ([r["step"] for r in evals], [r["val_nats"] for r in evals]),
                },
                "hlines": {f"bigram {bigram:.2f}": bigram},
            }
        ],
    )
    if result.stopped_early:
        status = (
            f"stopped by the time limit at step {result.step} of {config.steps} (--max-minutes "
            f"{config.max_minutes}; continue with --resume --out {run_dir})"
        )
    else:
        status = f"done: {result.step} of {config.steps} steps"
    rate = [r["steps_per_s"] for r in trains[-5:]]
    steps_per_s = sorted(rate)[len(rate) // 2] if rate else float("nan")
    print(
        f"{status}; final validation {final['val_nats']:.4f} nats/char = "
        f"{final['val_bits']:.4f} bits/char (bigram baseline {bigram:.4f}); "
        f"{summary['wall_time_s']:.0f} s wall, {steps_per_s:.1f} steps/s; outputs in {run_dir}\n"
        f"sample again: python experiments/char_lm.py --sample --out {run_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
