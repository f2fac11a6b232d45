"""Training: a jitted optax train step over any BPTT mode, and a fit loop around it.

The train step is one ``jax.jit``-compiled function ``(params, opt_state, xs, targets, h0,
lengths) -> (params, opt_state, StepInfo)``: gradients from ``jax_bptt.modes.BPTT_MODES[mode]``
(or a truncated-BPTT window, ``jax_bptt.truncated``), then any optax ``GradientTransformation``.
A step whose loss or gradient is not finite leaves params and optimizer state bitwise unchanged.

``fit`` runs the step in a loop with a tqdm progress bar, JSON-lines metrics, periodic evaluation
and atomic checkpoints (``jax_bptt.checkpoints``); it is deterministic given its key (the batch of
step ``s`` comes from ``jax.random.fold_in(key, s)``), so a resumed run ends bitwise where an
uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax_bptt import modes
from jax_bptt.cells import get_cell
from jax_bptt.checkpoints import (
    METADATA,
    atomic_write_bytes,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from jax_bptt.truncated import Truncation, check_truncation, window_grads
from jax_bptt.validation import LOSSES, PLACEMENTS, REDUCTIONS, check_choice

METRICS = "metrics.jsonl"

# name -> factory(learning_rate); "momentum" is SGD with Nesterov-free momentum 0.9.
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
}


def make_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    *,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer from ``OPTIMIZERS`` with optional gradient clipping in front.

    Args:
      clip_value: clip every gradient entry to ``[-clip_value, clip_value]`` (``optax.clip``,
        classic char-rnn).
      clip_norm: rescale the whole gradient to global norm at most ``clip_norm``
        (``optax.clip_by_global_norm``, Pascanu et al. 2013). Applied after ``clip_value``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    for arg, value in (("clip_norm", clip_norm), ("clip_value", clip_value)):
        if value is not None and not value > 0:
            raise ValueError(f"{arg} must be > 0 or None, got {value!r}")
    chain = []
    if clip_value is not None:
        chain.append(optax.clip(clip_value))
    if clip_norm is not None:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(OPTIMIZERS[name](learning_rate))
    return optax.chain(*chain) if len(chain) > 1 else chain[0]


class StepInfo(NamedTuple):
    """What a train step reports besides the new params and optimizer state."""

    loss: jax.Array  # scalar, before the update
    grad_norm: jax.Array  # global norm of the raw (unclipped) gradient
    finite: jax.Array  # bool: False means the update was skipped
    carry: Any  # truncated BPTT: the state the next window starts from (None otherwise)


def check_mode(mode: str) -> None:
    """``mode`` must name an entry of ``jax_bptt.modes.BPTT_MODES`` (looked up now, not cached)."""
    if mode not in modes.BPTT_MODES:
        raise ValueError(f"mode must be one of {tuple(modes.BPTT_MODES)}, got {mode!r}")


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    cell,
    loss: str = "mse",
    placement: str = "per_step",
    reduction: str = "mean",
    mode: str = "manual",
    unroll: int = 1,
    truncation: Truncation | tuple[int, int] | None = None,
):
    """Build a jitted ``train_step(params, opt_state, xs, targets, h0=None, lengths=None)``.

    Args:
      optimizer: any optax ``GradientTransformation`` (e.g. ``make_optimizer("adam", 1e-3)``).
      cell, loss, placement, reduction, unroll: as in ``jax_bptt.bptt_manual``.
      mode: a name in ``jax_bptt.modes.BPTT_MODES`` (``"auto"``, ``"manual"``, ...).
      truncation: ``(k1, k2)`` to train on truncated-BPTT windows: ``xs`` is then a window of
        ``k1 <= W <= k2`` steps whose last ``k1`` steps carry the loss, ``h0`` the state entering
        it, and ``StepInfo.carry`` the state the next window starts from
        (``jax_bptt.truncated``); ``placement`` must be ``"per_step"`` and ``lengths`` None.

    Returns:
      ``train_step -> (params, opt_state, StepInfo)``. When the loss or any gradient entry is not
      finite, params and opt_state come back unchanged, ``StepInfo.finite`` is False, and the carry
      is reset to zeros.

    Example:
      >>> opt = make_optimizer("adam", 1e-2, clip_norm=1.0)
      >>> step = make_train_step(opt, cell="gru", loss="mse", mode="manual")
      >>> params = init_model(jax.random.key(0), "gru", 2, 8, 1)
      >>> xs, ys = jnp.ones((5, 4, 2)), jnp.zeros((5, 4, 1))
      >>> params, opt_state, info = step(params, opt.init(params), xs, ys)
    """
    cell = get_cell(cell)
    check_mode(mode)
    check_choice("loss", loss, LOSSES)
    check_choice("placement", placement, PLACEMENTS)
    check_choice("reduction", reduction, REDUCTIONS)
    if truncation is not None:
        truncation = check_truncation(*truncation)
        if placement != "per_step":
            raise ValueError(f"truncated BPTT needs placement='per_step', got {placement!r}")
    bptt_fn = modes.BPTT_MODES[mode]

    def gradients(params, xs, targets, h0, lengths):
        if truncation is None:
            grads = bptt_fn(
                params,
                xs,
                targets,
                cell=cell,
                loss=loss,
                placement=placement,
                reduction=reduction,
                lengths=lengths,
                h0=h0,
                unroll=unroll,
            )
            return grads.loss, grads.params, None
        if lengths is not None:
            raise ValueError("lengths are not supported with truncated BPTT (streams are unpadded)")
        window = window_grads(
            params,
            xs,
            targets,
            cell=cell,
            k1=truncation.k1,
            k2=truncation.k2,
            loss=loss,
            reduction=reduction,
            h0=h0,
            mode=mode,
            unroll=unroll,
        )
        return window.loss, window.params, window.carry

    @jax.jit
    def train_step(params, opt_state, xs, targets, h0=None, lengths=None):
        value, grads, carry = gradients(params, xs, targets, h0, lengths)
        finite = jnp.isfinite(value) & _all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

        params = keep_if_finite(new_params, params)
        opt_state = keep_if_finite(new_opt_state, opt_state)
        if carry is not None:  # a NaN state would poison every later window: start afresh
            carry = jax.tree_util.tree_map(lambda c: jnp.where(finite, c, 0), carry)
        return params, opt_state, StepInfo(value, _global_norm(grads), finite, carry)

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


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run redoes those steps and logs them again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


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
    log_every: int = 10,
    resume: bool = False,
    progress: bool = True,
    tokens_per_step: int | None = None,
    time_limit_s: float | None = None,
    desc: str = "train",
) -> FitResult:
    """Train for ``num_steps`` steps (in total, counting steps done before a resume).

    Args:
      train_step: from ``make_train_step``.
      params: initial params; with ``resume`` also the template the checkpoint loads into.
      optimizer: the one ``train_step`` was built with (its ``init`` gives the state template).
      batch_fn: ``(data_key, step, carry) -> dict`` of ``train_step`` keyword arguments (``xs``,
        ``targets`` and optionally ``h0``, ``lengths``), where ``data_key =
        jax.random.fold_in(key, step)``; ``carry`` is the previous ``StepInfo.carry`` (or
        ``init_carry``), e.g. to pass as ``h0`` of the next truncated-BPTT window.
      key: the run's key; on resume the checkpoint's key is used.
      run_dir: where ``metrics.jsonl`` and the checkpoint go. Must not already hold a run unless
        ``resume`` is set.
      signature: ``jax_bptt.checkpoints.model_signature(params, cell)``.
      config: JSON-serialisable configuration stored with each checkpoint.
      init_carry: the carry before step 0 (also the template for restoring it).
      eval_fn: ``params -> {name: float}``, run every ``eval_every`` steps and at the end.
      checkpoint_every: steps between checkpoints (0: only at the end).
      log_every: steps per ``"train"`` metrics record (mean loss over those steps).
      tokens_per_step: for the throughput figure (e.g. ``T * B``).
      time_limit_s: stop (evaluate, checkpoint) once this many seconds have passed, even before
        ``num_steps``; ``FitResult.stopped_early`` says so, and a resume finishes the run. A run
        that is stopped this way is not bitwise reproducible in its step count, only in its path.

    Metrics records (one JSON object per line), all with ``"step"`` (steps done):
      ``{"kind": "train", "loss", "grad_norm", "skipped", "steps_per_s", "tokens_per_s",
      "elapsed_s"}``, ``{"kind": "eval", **eval_fn(params)}``, ``{"kind": "nonfinite",
      "loss"}`` for each skipped update, and ``{"kind": "stopped", "reason"}``.
    """
    from tqdm.auto import tqdm  # an "experiments" extra; imported only when training

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS
    if not resume and (metrics_path.exists() or (run_dir / METADATA).exists()):
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True to continue it or choose a new "
            "directory"
        )
    opt_state = optimizer.init(params)
    carry, start, skipped = init_carry, 0, 0
    if resume and has_checkpoint(run_dir):
        restored = load_checkpoint(
            run_dir,
            params_template=params,
            opt_state_template=opt_state,
            signature=signature,
            carry_template=init_carry,
        )
        params, opt_state, carry = restored.params, restored.opt_state, restored.carry
        start, skipped, key = restored.step, restored.skipped, restored.key
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _truncate_metrics(metrics_path, start)

    history: list[dict] = []
    metrics_file = open(metrics_path, "a", encoding="utf-8")

    def log(record: dict) -> None:
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def evaluate(step: int) -> None:
        results = {name: float(value) for name, value in eval_fn(params).items()}
        log({"kind": "eval", "step": step, **results})
        shown = {name: f"{value:.4f}" for name, value in results.items()}
        bar.set_postfix(loss=f"{last_loss:.4f}", **shown)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            run_dir,
            step=step,
            params=params,
            opt_state=opt_state,
            key=key,
            signature=signature,
            carry=carry,
            skipped=skipped,
            config=config,
        )

    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    window_losses, window_norms, last_loss = [], [], float("nan")
    started = window_start = time.perf_counter()
    window_first = done = start
    stopped_early = False
    last_eval = None
    try:
        for step in range(start, num_steps):
            batch = batch_fn(jax.random.fold_in(key, step), step, carry)
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
                last_loss = float(loss)
            bar.update(1)
            out_of_time = time_limit_s is not None and time.perf_counter() - started > time_limit_s
            if done % log_every == 0 or done == num_steps or out_of_time:
                now = time.perf_counter()
                rate = (done - window_first) / max(now - window_start, 1e-9)
                record = {
                    "kind": "train",
                    "step": done,
                    "loss": _json_float(sum(window_losses) / max(len(window_losses), 1)),
                    "grad_norm": _json_float(sum(window_norms) / max(len(window_norms), 1)),
                    "skipped": skipped,
                    "steps_per_s": rate,
                    "elapsed_s": now - started,
                }
                if tokens_per_step:
                    record["tokens_per_s"] = rate * tokens_per_step
                log(record)
                postfix = {"loss": f"{record['loss'] or float('nan'):.4f}"}
                if tokens_per_step:
                    postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
                bar.set_postfix(postfix)
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
            if checkpoint_every and done % checkpoint_every == 0 and done < num_steps:
                checkpoint(done)
        if eval_fn is not None and last_eval != done:
            evaluate(done)
        checkpoint(done)
    finally:
        bar.close()
        metrics_file.close()
    return FitResult(params, opt_state, carry, done, skipped, stopped_early, history, run_dir)
