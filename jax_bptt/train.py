"""Training: a jitted optax train step over any BPTT mode, and a fit loop around it.

The train step is one ``jax.jit``-compiled function ``(params, opt_state, xs, targets, h0,
lengths, key) -> (params, opt_state, StepInfo)``: gradients from ``jax_bptt.modes.BPTT_MODES[mode]``
(or a truncated-BPTT window, ``jax_bptt.truncated``), then any optax ``GradientTransformation``.
A step whose loss or gradient is not finite leaves params and optimizer state bitwise unchanged.
Stacked, bidirectional, residual models with dropout between layers (``jax_bptt.deep``, params
from ``init_deep``) train through the same step, their gradients from ``DEEP_BPTT_MODES[mode]``.

``fit`` runs the step in a loop with a tqdm progress bar, JSON-lines metrics, periodic evaluation
and atomic checkpoints (``jax_bptt.checkpoints``); it is deterministic given its key (the batch of
step ``s`` comes from ``step_key = jax.random.fold_in(key, s)``, its dropout masks from
``jax.random.fold_in(step_key, DROPOUT_KEY_TAG)``), so a resumed run ends bitwise where an
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
import numpy as np
import optax

from jax_bptt import modes
from jax_bptt.cells import get_cell
from jax_bptt.checkpoints import (
    METADATA,
    atomic_write_bytes,
    has_checkpoint,
    load_checkpoint,
    model_signature,
    save_checkpoint,
)
from jax_bptt.deep import RESIDUALS, deep_bptt_auto, deep_bptt_fast, deep_bptt_manual, deep_unroll
from jax_bptt.truncated import Truncation, check_truncation, window_grads
from jax_bptt.validation import LOSSES, PLACEMENTS, REDUCTIONS, check_choice

METRICS = "metrics.jsonl"

# The modes with a stacked/bidirectional implementation (``jax_bptt.deep``).
DEEP_BPTT_MODES = {"auto": deep_bptt_auto, "manual": deep_bptt_manual, "fast": deep_bptt_fast}

# fit's dropout key for step s is fold_in(fold_in(key, s), DROPOUT_KEY_TAG): a stream apart from
# the batch's data key fold_in(key, s), which batch_fn may use as it likes.
DROPOUT_KEY_TAG = 0x64726F70  # "drop"

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


def check_deep_options(num_layers, bidirectional, dropout, residual) -> bool:
    """Validate the deep-model options; True when they ask for a ``jax_bptt.deep`` model."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int (>= 1), got {num_layers!r}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1) (the probability of zeroing), got {dropout}")
    if not any(residual is choice for choice in RESIDUALS[:2]) and residual != RESIDUALS[2]:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    if dropout > 0 and num_layers == 1:
        raise ValueError(
            f"dropout={dropout} acts between stacked layers, so it needs num_layers >= 2, got "
            "num_layers=1"
        )
    return num_layers > 1 or bidirectional or residual is not False


def is_deep(params) -> bool:
    """Whether ``params`` are ``init_deep``'s layout (``{"layers": [...], "readout"}``)."""
    return isinstance(params, dict) and "layers" in params


def zero_carry(params, cell, batch_size: int):
    """The zero state entering a sequence, in the layout ``train_step``'s ``h0`` takes: a cell
    state (leaves ``(batch_size, h)``) for ``init_model`` params, one ``{"fwd", "bwd"?}`` dict of
    them per layer for ``init_deep`` params. The dtype is the params'."""
    cell = get_cell(cell)
    if not is_deep(params):
        w_hh = params["cell"]["W_hh"]
        return cell.zero_state((batch_size,), w_hh.shape[0], w_hh.dtype)
    return [
        {
            name: cell.zero_state((batch_size,), p["W_hh"].shape[0], p["W_hh"].dtype)
            for name, p in layer.items()
        }
        for layer in params["layers"]
    ]


def run_signature(params, cell, *, residual=False) -> dict:
    """``jax_bptt.checkpoints.model_signature`` for either layout: unchanged for ``init_model``
    params; for ``init_deep`` params also the layer count, directions and residual setting, so a
    checkpoint only resumes into the same stack (a 1-layer run never loads into a 2-layer one)."""
    if not is_deep(params):
        return model_signature(params, cell)
    layers, w_hy = params["layers"], params["readout"]["W_hy"]
    first = layers[0]["fwd"]
    return {
        "cell": get_cell(cell).name,
        "num_layers": len(layers),
        "bidirectional": "bwd" in layers[0],
        "residual": residual,
        "input_size": int(first["W_xh"].shape[0]),
        "hidden_size": int(first["W_hh"].shape[0]),
        "output_size": int(w_hy.shape[-1]),
        "dtype": str(first["W_xh"].dtype),
        "tree": str(jax.tree_util.tree_structure(params)),
        "shapes": {
            jax.tree_util.keystr(path): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        },
    }


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
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    residual: bool | str = False,
):
    """Build a jitted ``train_step(params, opt_state, xs, targets, h0=None, lengths=None,
    key=None)``.

    Args:
      optimizer: any optax ``GradientTransformation`` (e.g. ``make_optimizer("adam", 1e-3)``).
      cell, loss, placement, reduction, unroll: as in ``jax_bptt.bptt_manual``.
      mode: a name in ``jax_bptt.modes.BPTT_MODES`` (``"auto"``, ``"manual"``, ...); for a deep
        model one of ``DEEP_BPTT_MODES``.
      truncation: ``(k1, k2)`` to train on truncated-BPTT windows: ``xs`` is then a window of
        ``k1 <= W <= k2`` steps whose last ``k1`` steps carry the loss, ``h0`` the state entering
        it, and ``StepInfo.carry`` the state the next window starts from
        (``jax_bptt.truncated``); ``placement`` must be ``"per_step"`` and ``lengths`` None. A
        deep model takes ``k1 == k2`` only (windows of ``k1`` steps; the carry is every layer's
        final state) and must be unidirectional (a backward direction has no state to carry).
      num_layers, bidirectional, dropout, residual: a deep model (``jax_bptt.deep``; params from
        ``init_deep``, ``h0`` one ``{"fwd", "bwd"?}`` state dict per layer) unless
        ``num_layers == 1``, not ``bidirectional`` and ``residual is False``: then the
        single-layer path (params from ``init_model``). ``dropout`` (between layers, so
        ``num_layers >= 2``) draws its masks from ``train_step``'s ``key``, which it then requires.

    Returns:
      ``train_step -> (params, opt_state, StepInfo)``. When the loss or any gradient entry is not
      finite, params and opt_state come back unchanged, ``StepInfo.finite`` is False, and the carry
      is reset to zeros. ``train_step.needs_key`` says whether it takes a ``key`` (``fit`` passes
      one derived from the step's key).

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
    deep = check_deep_options(num_layers, bidirectional, dropout, residual)
    if truncation is not None:
        truncation = check_truncation(*truncation)
        if placement != "per_step":
            raise ValueError(f"truncated BPTT needs placement='per_step', got {placement!r}")
    if deep:
        if mode not in DEEP_BPTT_MODES:
            raise ValueError(
                f"mode={mode!r} has no deep-model implementation (num_layers={num_layers}, "
                f"bidirectional={bidirectional}, residual={residual!r}); use one of "
                f"{tuple(DEEP_BPTT_MODES)}"
            )
        if truncation is not None and truncation.k1 != truncation.k2:
            raise ValueError(
                f"truncated BPTT of a deep model needs k1 == k2 (windows that carry the loss on "
                f"every step), got k1={truncation.k1}, k2={truncation.k2}"
            )
        if truncation is not None and bidirectional:
            raise ValueError(
                "truncated BPTT needs bidirectional=False: a backward direction would have to "
                "start from the future, which a carried state cannot give"
            )
    bptt_fn = modes.BPTT_MODES[mode]
    deep_fn = DEEP_BPTT_MODES.get(mode)

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

    def check_deep_params(params):
        layers = params.get("layers") if isinstance(params, dict) else None
        if not isinstance(layers, list | tuple):
            got = f"keys {sorted(params)}" if isinstance(params, dict) else type(params).__name__
            raise TypeError(
                f"a deep train step (num_layers={num_layers}, bidirectional={bidirectional}) "
                f"takes init_deep params {{'layers': [...], 'readout': ...}}, got {got}"
            )
        directions = 2 if bidirectional else 1
        got_directions = len(layers[0]) if layers and isinstance(layers[0], dict) else None
        if len(layers) != num_layers or got_directions != directions:
            raise ValueError(
                f"params have {len(layers)} layers with {got_directions} direction(s), but the "
                f"train step was built for num_layers={num_layers}, bidirectional={bidirectional}"
            )

    def deep_gradients(params, xs, targets, h0, lengths, key):
        check_deep_params(params)
        kwargs = dict(cell=cell, dropout=dropout, key=key, residual=residual, unroll=unroll)
        if truncation is None:
            grads = deep_fn(
                params,
                xs,
                targets,
                loss=loss,
                placement=placement,
                reduction=reduction,
                lengths=lengths,
                h0=h0,
                **kwargs,
            )
            return grads.loss, grads.params, None
        if lengths is not None:
            raise ValueError("lengths are not supported with truncated BPTT (streams are unpadded)")
        if np.ndim(xs) != 3 or np.shape(xs)[0] != truncation.k1:
            raise ValueError(
                f"xs must be a (k1, B, D) window with k1={truncation.k1} for truncated BPTT of a "
                f"deep model, got shape {np.shape(xs)}"
            )
        h0 = None if h0 is None else jax.lax.stop_gradient(h0)
        grads = deep_fn(
            params,
            xs,
            targets,
            loss=loss,
            placement="per_step",
            reduction=reduction,
            h0=h0,
            **kwargs,
        )
        # The BPTT functions return no final state: one more forward, with the same dropout masks.
        _, finals = deep_unroll(params=params, xs=xs, h0=h0, **kwargs)
        return grads.loss, grads.params, jax.lax.stop_gradient(finals)

    needs_key = deep and dropout > 0

    @jax.jit
    def train_step(params, opt_state, xs, targets, h0=None, lengths=None, key=None):
        if deep:
            if needs_key and key is None:
                raise ValueError(
                    f"dropout={dropout} needs a PRNG key per step for its masks: pass "
                    "train_step(..., key=jax.random.key(...)) (fit derives one from the step's key)"
                )
            value, grads, carry = deep_gradients(params, xs, targets, h0, lengths, key)
        else:
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
      train_step: from ``make_train_step``. When it has ``needs_key`` set (dropout), each step
        gets ``key=jax.random.fold_in(data_key, DROPOUT_KEY_TAG)`` unless ``batch_fn`` gives one.
      params: initial params; with ``resume`` also the template the checkpoint loads into.
      optimizer: the one ``train_step`` was built with (its ``init`` gives the state template).
      batch_fn: ``(data_key, step, carry) -> dict`` of ``train_step`` keyword arguments (``xs``,
        ``targets`` and optionally ``h0``, ``lengths``), where ``data_key =
        jax.random.fold_in(key, step)``; ``carry`` is the previous ``StepInfo.carry`` (or
        ``init_carry``), e.g. to pass as ``h0`` of the next truncated-BPTT window.
      key: the run's key; on resume the checkpoint's key is used.
      run_dir: where ``metrics.jsonl`` and the checkpoint go. Must not already hold a run unless
        ``resume`` is set.
      signature: ``run_signature(params, cell)`` (``jax_bptt.checkpoints.model_signature`` for
        ``init_model`` params).
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

    needs_key = getattr(train_step, "needs_key", False)
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
