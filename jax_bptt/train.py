"""Training: a jitted optax train step over any BPTT mode, and a fit loop around it.

The train step is one ``jax.jit``-compiled function ``(params, opt_state, xs, targets, h0,
lengths, key) -> (params, opt_state, StepInfo)``, built from three small parts:

- a gradient function: ``jax_bptt.bptt`` in the chosen mode, or one truncated-BPTT window
  (``jax_bptt.truncated.window_grads``) whose carry feeds the next step;
- the optax update;
- ``keep_if_finite``: a step whose loss or gradient is not finite leaves params and optimizer
  state bitwise unchanged and resets the carry to zeros. (``optax.apply_if_finite`` guards only on
  the gradients, changes the optimizer state's layout and cannot reset a carry, so the guard is
  this module's own.)

The model may have any depth and direction (params from ``init_model``); ``dropout`` between
layers draws its masks from the step's ``key``.

``fit`` runs the step in a loop with a progress bar, JSON-lines metrics, periodic evaluation and
atomic checkpoints (``jax_bptt.checkpoints``); it is deterministic given its key (the batch of
step ``s`` comes from ``step_key = jax.random.fold_in(key, s)``, its dropout masks from
``jax.random.fold_in(step_key, DROPOUT_KEY_TAG)``), so a resumed run ends bitwise where an
uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax_bptt.backends import check_options
from jax_bptt.cells import get_cell
from jax_bptt.checkpoints import (
    METADATA,
    Checkpoint,
    atomic_write_bytes,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from jax_bptt.model import inverted_dropout_mask
from jax_bptt.modes import bptt
from jax_bptt.truncated import Truncation, check_mode_and_loss, check_truncation, window_grads
from jax_bptt.validation import check_choice, check_residual

METRICS = "metrics.jsonl"

# fit's dropout key for step s is fold_in(fold_in(key, s), DROPOUT_KEY_TAG): a stream apart from
# the batch's data key fold_in(key, s), which batch_fn may use as it likes.
DROPOUT_KEY_TAG = 0x64726F70  # "drop"
# weight dropout's masks come from fold_in(key, WEIGHT_DROPOUT_TAG): apart from the layers' masks
WEIGHT_DROPOUT_TAG = 0x77647270  # "wdrp"

# name -> factory(learning_rate); "momentum" is SGD with Nesterov-free momentum 0.9.
OPTIMIZERS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
}


def _check_positive_float(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def make_optimizer(
    name: str = "adam",
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    weight_decay: float | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer from ``OPTIMIZERS`` with optional gradient clipping in front.

    Args:
      learning_rate: a finite float > 0, or an optax schedule (e.g.
        ``optax.warmup_cosine_decay_schedule``).
      clip_value: clip every gradient entry to ``[-clip_value, clip_value]`` (``optax.clip``,
        classic char-rnn).
      clip_norm: rescale the whole gradient to global norm at most ``clip_norm``
        (``optax.clip_by_global_norm``, Pascanu et al. 2013). Applied after ``clip_value``.
      weight_decay: ``"adamw"`` only, its decoupled decay rate (Loshchilov & Hutter 2019; optax's
        default 1e-4 when None).

    Example:
      >>> opt = make_optimizer("adam", 1e-2, clip_norm=1.0)
    """
    check_choice("optimizer", name, tuple(OPTIMIZERS))
    if not callable(learning_rate):
        _check_positive_float("learning_rate", learning_rate)
    _check_positive_float("clip_norm", clip_norm, allow_none=True)
    _check_positive_float("clip_value", clip_value, allow_none=True)
    _check_positive_float("weight_decay", weight_decay, allow_none=True)
    if weight_decay is not None and name != "adamw":
        raise ValueError(f"weight_decay applies to optimizer 'adamw' only, got {name!r}")
    chain = []
    if clip_value is not None:
        chain.append(optax.clip(clip_value))
    if clip_norm is not None:
        chain.append(optax.clip_by_global_norm(clip_norm))
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    chain.append(OPTIMIZERS[name](learning_rate, **decay))
    return optax.chain(*chain) if len(chain) > 1 else chain[0]


class StepInfo(NamedTuple):
    """What a train step reports besides the new params and optimizer state."""

    loss: jax.Array  # scalar, before the update
    grad_norm: jax.Array  # global norm of the raw (unclipped) gradient
    finite: jax.Array  # bool: False means the update was skipped
    carry: Any  # truncated BPTT: the states the next window starts from (None otherwise)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def keep_if_finite(finite: jax.Array, new, old):
    """``new`` where ``finite`` else ``old``, leaf by leaf (bitwise ``old`` when skipped)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def _gradient_fn(
    *, cell, loss, mode, options, truncation, dropout, residual, time_major, output_dropout
):
    """``(params, xs, targets, h0, lengths, key, resets) -> (loss, grads, carry)`` for one
    step."""
    model = dict(
        cell=cell, loss=loss, mode=mode, dropout=dropout, residual=residual,
        time_major=time_major, output_dropout=output_dropout,
    )  # fmt: skip
    if truncation is None:

        def full_sequence(params, xs, targets, h0, lengths, key, resets):
            grads = bptt(
                params, xs, targets, lengths=lengths, h0=h0, key=key, options=options,
                resets=resets, **model,
            )  # fmt: skip
            return grads.loss, grads.params, None

        return full_sequence

    def window(params, xs, targets, h0, lengths, key, resets):
        if lengths is not None:
            raise ValueError("lengths are not supported with truncated BPTT (streams are unpadded)")
        result = window_grads(
            params, xs, targets, k1=truncation.k1, k2=truncation.k2, h0=h0, key=key,
            options=options, resets=resets, **model,
        )  # fmt: skip
        return result.loss, result.params, result.carry

    return window


def _with_weight_dropout(gradients, rate: float):
    """DropConnect on every recurrent matrix ``W_hh`` (the weight drop of Merity et al. 2018): one
    mask per train step, shared by every time step and row, kept weights scaled by
    ``1/(1-rate)``. By the chain rule a dropped weight's gradient is zero and a kept one's is
    scaled like its value."""

    def masked_gradients(params, xs, targets, h0, lengths, key, resets):
        if any("W_hh" not in cell for layer in params["layers"] for cell in layer.values()):
            raise ValueError("weight_dropout needs a W_hh in every cell's params")
        layer_keys = jax.random.split(
            jax.random.fold_in(key, WEIGHT_DROPOUT_TAG), len(params["layers"])
        )
        scales = [
            {
                name: inverted_dropout_mask(k, rate, cell["W_hh"].shape, cell["W_hh"].dtype)
                for (name, cell), k in zip(
                    layer.items(), jax.random.split(layer_key, len(layer)), strict=True
                )
            }
            for layer, layer_key in zip(params["layers"], layer_keys, strict=True)
        ]

        def scaled(tree):
            layers = [
                {name: {**cell, "W_hh": cell["W_hh"] * scale[name]} for name, cell in layer.items()}
                for layer, scale in zip(tree["layers"], scales, strict=True)
            ]
            return {**tree, "layers": layers}

        value, grads, carry = gradients(scaled(params), xs, targets, h0, lengths, key, resets)
        return value, scaled(grads), carry

    return masked_gradients


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    cell,
    loss="mse",
    mode: str = "manual",
    options=None,
    truncation: Truncation | tuple[int, int] | None = None,
    dropout: float = 0.0,
    residual=False,
    time_major: bool = True,
    output_dropout: float = 0.0,
    weight_dropout: float = 0.0,
):
    """Build a jitted ``train_step(params, opt_state, xs, targets, h0=None, lengths=None,
    key=None, resets=None)``: a batch may mark segment starts with ``resets`` (bool ``(T, B)``,
    as for ``jax_bptt.bptt``), e.g. several short sequences packed into one row.

    Args:
      optimizer: any optax ``GradientTransformation`` (e.g. ``make_optimizer("adam", 1e-3)``).
      cell, loss, residual, options: as in ``jax_bptt.bptt``; ``options=None`` keeps the
        platform's defaults (scan unroll, backward chunk).
      mode: a name in ``jax_bptt.BPTT_MODES``, or ``"parallel"`` (``jax_bptt.deer``).
      truncation: ``(k1, k2)`` to train on truncated-BPTT windows: ``xs`` is then a window of
        ``k1 <= W <= k2`` steps whose last ``k1`` steps carry the loss, ``h0`` the states entering
        it, and ``StepInfo.carry`` the states the next window starts from
        (``jax_bptt.truncated``); per-step loss, no ``lengths``, unidirectional models; a
        window's ``resets`` restart from zeros (not from the carry).
      dropout: between layers; its masks come from ``train_step``'s ``key``, which it then needs.
      time_major: False for batch-major ``xs (B, T, ...)`` and per-step targets.
      output_dropout: on the top layer's outputs before the readout (any depth: it regularizes
        a one-layer model too); needs a ``key`` like ``dropout``.
      weight_dropout: DropConnect on every ``W_hh`` (AWD-LSTM's weight drop): one mask per step
        for all time steps and rows; needs a ``key`` like ``dropout``. Unlike dropout on ``h``, it
        leaves the recurrence's state untouched between steps.

    Returns:
      ``train_step -> (params, opt_state, StepInfo)``; ``train_step.needs_key`` says whether it
      takes a ``key`` (``fit`` passes one derived from the step's key).

    Example:
      >>> opt = make_optimizer("adam", 1e-2, clip_norm=1.0)
      >>> step = make_train_step(opt, cell="gru", loss="mse", mode="manual")
      >>> params = init_model(jax.random.key(0), "gru", 2, 8, 1)
      >>> xs, ys = jnp.ones((5, 4, 2)), jnp.zeros((5, 4, 1))
      >>> params, opt_state, info = step(params, opt.init(params), xs, ys)
    """
    cell = get_cell(cell)
    loss = check_mode_and_loss(mode, loss, truncated=truncation is not None)
    options = check_options(options)
    rates = (("dropout", dropout), ("output_dropout", output_dropout))
    for name, value in (*rates, ("weight_dropout", weight_dropout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    check_residual(residual)
    if truncation is not None:
        truncation = check_truncation(*truncation)
    gradients = _gradient_fn(
        cell=cell, loss=loss, mode=mode, options=options, truncation=truncation,
        dropout=dropout, residual=residual, time_major=time_major, output_dropout=output_dropout,
    )  # fmt: skip
    if weight_dropout > 0:
        gradients = _with_weight_dropout(gradients, weight_dropout)
    needs_key = dropout > 0 or output_dropout > 0 or weight_dropout > 0

    @jax.jit
    def train_step(params, opt_state, xs, targets, h0=None, lengths=None, key=None, resets=None):
        if needs_key and key is None:
            raise ValueError(
                f"dropout={dropout} (output_dropout={output_dropout}, weight_dropout="
                f"{weight_dropout}) needs a PRNG key per step "
                "for its masks: pass train_step(..., key=jax.random.key(...)) (fit derives one "
                "from the step's key)"
            )
        value, grads, carry = gradients(params, xs, targets, h0, lengths, key, resets)
        finite = jnp.isfinite(value) & _all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        params = keep_if_finite(finite, optax.apply_updates(params, updates), params)
        opt_state = keep_if_finite(finite, new_opt_state, opt_state)
        if carry is not None:  # a NaN state would poison every later window: start afresh
            carry = jax.tree.map(lambda c: jnp.where(finite, c, 0), carry)
        return params, opt_state, StepInfo(value, optax.tree.norm(grads), finite, carry)

    train_step.needs_key = needs_key
    return train_step


# --------------------------------------------------------------------------------------------
# Fit loop


class FitResult(NamedTuple):
    params: Any
    opt_state: Any
    carry: Any
    step: int  # steps done
    skipped: int  # updates skipped for a non-finite loss or gradient
    stopped_early: bool  # the time limit ended the run before num_steps (resume to finish)
    history: list  # the metrics records written during this call
    run_dir: Path


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN/inf


def _mean_or_none(values: list) -> float | None:
    """The mean of a log window's finite steps; None when every step in it was skipped."""
    return _json_float(sum(values) / len(values)) if values else None


def _truncate_metrics(path: Path, last_step: int) -> int | None:
    """Drop records after ``last_step``: a resumed run redoes those steps and logs them again.
    Returns the step of the last kept evaluation (so a finished run is not evaluated twice)."""
    if not path.exists():
        return None
    kept, last_eval = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
            if record.get("kind") == "eval":
                last_eval = record["step"]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return last_eval


def _start(
    run_dir: Path, resume: bool, params, opt_state, key, signature, init_carry
) -> tuple[Checkpoint, int | None]:
    """Where a run starts: step 0, or (``resume``) the last checkpoint; and the step of the last
    evaluation already logged. The metrics after the start are dropped, since the resumed run
    redoes those steps and logs them again."""
    if not resume and ((run_dir / METRICS).exists() or (run_dir / METADATA).exists()):
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True to continue it or choose a new "
            "directory"
        )
    if resume and has_checkpoint(run_dir):
        start = load_checkpoint(
            run_dir,
            params_template=params,
            opt_state_template=opt_state,
            signature=signature,
            carry_template=init_carry,
        )
    else:
        start = Checkpoint(0, params, opt_state, init_carry, key, 0, {})
    run_dir.mkdir(parents=True, exist_ok=True)
    return start, (_truncate_metrics(run_dir / METRICS, start.step) if resume else None)


class _Progress:
    """A tqdm bar on a terminal; plain lines (one per logged window) when output is a file."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.enabled, self.desc, self.total = enabled, desc, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm  # an "experiments" extra; imported only for a terminal

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, done: int, shown: dict) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(shown)  # also refreshes the bar
        else:
            text = " ".join(f"{k}={v}" for k, v in shown.items())
            self.write(f"{self.desc} {done}/{self.total} {text}")

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(
    train_step: Callable,
    params,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[jax.Array, int, Any], dict],
    *,
    num_steps: int,
    key: jax.Array,
    run_dir: str | os.PathLike,
    signature: dict,
    config: dict | None = None,
    init_carry=None,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    checkpoint_every: int = 0,
    checkpoint_every_s: float | None = None,
    log_every: int = 10,
    resume: bool = False,
    progress: bool = True,
    tokens_per_step: int | None = None,
    time_limit_s: float | None = None,
    desc: str = "train",
) -> FitResult:
    """Train for ``num_steps`` steps (in total, counting steps done before a resume).

    Args:
      train_step: from ``make_train_step``. When it has ``needs_key`` set (dropout), each step
        gets ``key=jax.random.fold_in(data_key, DROPOUT_KEY_TAG)`` unless ``batch_fn`` gives one.
      params: initial params; with ``resume`` also the template the checkpoint loads into.
      optimizer: the one ``train_step`` was built with (its ``init`` gives the state template).
      batch_fn: ``(data_key, step, carry) -> dict`` of ``train_step`` keyword arguments (``xs``,
        ``targets`` and optionally ``h0``, ``lengths``, ``resets``), where ``data_key =
        jax.random.fold_in(key, step)``; ``carry`` is the previous ``StepInfo.carry`` (or
        ``init_carry``), e.g. to pass as ``h0`` of the next truncated-BPTT window.
      key: the run's key; on resume the checkpoint's key is used.
      run_dir: where ``metrics.jsonl`` and the checkpoint go. Must not already hold a run unless
        ``resume`` is set.
      signature: ``jax_bptt.checkpoints.model_signature(params, cell, residual=...)``.
      config: JSON-serialisable configuration stored with each checkpoint.
      init_carry: the carry before step 0 (also the template for restoring it).
      eval_fn: ``params -> {name: float}``, run every ``eval_every`` steps and at the end.
      checkpoint_every: steps between checkpoints; ``checkpoint_every_s``: seconds between them
        (whichever comes first; neither: only at the end).
      log_every: steps per ``"train"`` metrics record (mean loss over those steps).
      tokens_per_step: for the throughput figure (e.g. ``T * B``).
      time_limit_s: stop (evaluate, checkpoint) once this many seconds have passed, even before
        ``num_steps``; ``FitResult.stopped_early`` says so, and a resume finishes the run. A run
        that is stopped this way is not bitwise reproducible in its step count, only in its path.

    Metrics records (one JSON object per line), all with ``"step"`` (steps done):
      ``{"kind": "train", "loss", "grad_norm", "skipped", "steps_per_s", "tokens_per_s",
      "elapsed_s"}`` (means over the window's finite steps; null when all were skipped),
      ``{"kind": "eval", **eval_fn(params)}``, ``{"kind": "nonfinite", "loss"}`` for each skipped
      update, ``{"kind": "resumed"}`` and ``{"kind": "stopped", "reason"}``.
    """
    run_dir = Path(run_dir)
    state, last_eval = _start(
        run_dir, resume, params, optimizer.init(params), key, signature, init_carry
    )
    params, opt_state, carry, skipped, key = (
        state.params, state.opt_state, state.carry, state.skipped, state.key,
    )  # fmt: skip
    needs_key = getattr(train_step, "needs_key", False)
    history: list[dict] = []
    metrics_file = open(run_dir / METRICS, "a", encoding="utf-8")
    bar = _Progress(num_steps, state.step, desc, progress)

    def log(record: dict) -> None:
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def evaluate(step: int) -> None:
        results = {name: float(value) for name, value in eval_fn(params).items()}
        log({"kind": "eval", "step": step, **results})
        bar.update(step, {name: f"{value:.4f}" for name, value in results.items()})

    def checkpoint(step: int) -> None:
        save_checkpoint(
            run_dir, step=step, params=params, opt_state=opt_state, key=key, signature=signature,
            carry=carry, skipped=skipped, config=config,
        )  # fmt: skip

    if resume:
        log({"kind": "resumed", "step": state.step})
        bar.write(
            f"resuming {run_dir} at step {state.step} of {num_steps}"
            if state.step
            else f"no checkpoint in {run_dir}: starting at step 0"
        )
    window_losses, window_norms = [], []
    started = window_start = last_checkpoint = time.perf_counter()
    window_first = done = state.step
    stopped_early = False
    try:
        for step in range(state.step, num_steps):
            step_key = jax.random.fold_in(key, step)
            batch = batch_fn(step_key, step, carry)
            if needs_key and "key" not in batch:
                batch = {**batch, "key": jax.random.fold_in(step_key, DROPOUT_KEY_TAG)}
            params, opt_state, info = train_step(params, opt_state, **batch)
            if info.carry is not None:
                carry = info.carry
            loss, grad_norm, finite = jax.device_get((info.loss, info.grad_norm, info.finite))
            done = step + 1
            if not finite:
                skipped += 1
                log({"kind": "nonfinite", "step": done, "loss": _json_float(float(loss))})
                bar.write(f"step {done}: non-finite loss/gradient, update skipped ({skipped})")
            else:
                window_losses.append(float(loss))
                window_norms.append(float(grad_norm))
            now = time.perf_counter()
            out_of_time = time_limit_s is not None and now - started > time_limit_s
            if done % log_every == 0 or done == num_steps or out_of_time:
                rate = (done - window_first) / max(now - window_start, 1e-9)
                record = {
                    "kind": "train",
                    "step": done,
                    "loss": _mean_or_none(window_losses),
                    "grad_norm": _mean_or_none(window_norms),
                    "skipped": skipped,
                    "steps_per_s": rate,
                    "elapsed_s": now - started,
                }
                shown = {"loss": "nan" if record["loss"] is None else f"{record['loss']:.4f}"}
                if tokens_per_step:
                    record["tokens_per_s"] = rate * tokens_per_step
                    shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
                log(record)
                bar.update(done, shown)
                window_losses, window_norms = [], []
                window_start, window_first = now, done
            if eval_fn is not None and eval_every and done % eval_every == 0:
                evaluate(done)
                last_eval = done
            if out_of_time and done < num_steps:
                stopped_early = True
                log({"kind": "stopped", "step": done, "reason": f"time limit {time_limit_s} s"})
                bar.write(f"stopped at step {done} of {num_steps}: time limit {time_limit_s:.0f} s")
                break
            due = (checkpoint_every and done % checkpoint_every == 0) or (
                checkpoint_every_s is not None and now - last_checkpoint >= checkpoint_every_s
            )
            if due and done < num_steps:
                checkpoint(done)
                last_checkpoint = time.perf_counter()
        if eval_fn is not None and last_eval != done:
            evaluate(done)
        checkpoint(done)
    finally:
        bar.close()
        metrics_file.close()
    return FitResult(params, opt_state, carry, done, skipped, stopped_early, history, run_dir)
