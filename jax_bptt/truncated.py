"""Truncated BPTT, BPTT(k1, k2) in Williams & Peng's (1990) sense, over long streams.

A stream ``xs: (T, B, D)`` with per-step targets is cut into ``T / k1`` blocks of ``k1`` steps.
For block ``j`` (steps ``[j k1, (j + 1) k1)``) the forward runs over the *window*

    [s_j, e_j) = [max(0, e_j - k2), e_j),   e_j = (j + 1) k1,   length W_j = e_j - s_j <= k2

starting from the state after step ``s_j - 1`` (the stream's ``h0`` when ``s_j = 0``), with
``stop_gradient`` on that incoming state: gradients flow back at most ``k2`` steps. Only the
last ``k1`` steps of the window (the block itself, its *tail*) contribute loss terms, so every
step's loss is counted exactly once over the stream; the first ``k2 - k1`` steps of a window only
carry the gradient further back. ``k1 = k2`` is the common "split into blocks and carry the
state" scheme; ``k1 = k2 = T`` is full BPTT.

What is summed/averaged (``reduction``, as in ``jax_bptt.losses``):

- block loss ``L_j``: the ``sequence_loss`` of the block's ``k1 * B`` per-step terms
  (``"mean"``: divided by ``k1 * B``; ``"sum"``: summed);
- stream loss (``truncated_bptt``): ``"mean"``: ``(1 / n) sum_j L_j`` with ``n = T / k1`` blocks,
  which equals the mean over all ``T * B`` terms; ``"sum"``: ``sum_j L_j``. The gradient is the same
  combination of the block gradients ``dL_j/dparams``, each truncated to its window.

The model may have any depth (unidirectional: a backward direction would need the future). The
carry between windows is every layer's state the next window starts from, after step
``s_{j+1} - 1``, local index ``W_j + k1 - k2 - 1`` of this window (``k1 - 1`` for a full window;
the final state when ``k1 = k2``); when that index is negative the next window also starts at
step 0 and the carry is the stream's ``h0``.

Gradients: with ``k1 = k2`` the window is the block, and the mode's own core gives the loss, the
gradients and the final states (the carry) in one pass. With ``k1 < k2``, ``mode="auto"`` is
``jax.value_and_grad`` of the window loss; any other mode runs on the tail with ``h0`` = the
states entering it, and ``model.stack_backward`` carries the returned ``d h0`` back through the
window's first ``W - k1`` steps (no loss terms there, so only that cotangent flows); one taped
forward over the window gives those steps' saved values and the carry.

Resets (segment starts inside the stream, as for ``jax_bptt.unroll``) are sliced per window, and
a restart returns to the stream's initial state (``h_reset``, stop-gradient), not to the carry: a
window whose first step starts a segment drops the carried state too.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt.cells import is_token_ids
from jax_bptt.losses import Loss, check_loss, sequence_loss
from jax_bptt.model import (
    prepare,
    readout,
    run_scan,
    stack_backward,
    stack_forward,
    to_time_major,
)
from jax_bptt.modes import CORES
from jax_bptt.validation import check_choice, check_state, check_targets


class Truncation(NamedTuple):
    """BPTT(k1, k2): every ``k1`` steps, backpropagate ``k2`` steps (``k2 >= k1 >= 1``)."""

    k1: int
    k2: int


class WindowResult(NamedTuple):
    """One window's loss (its last ``k1`` steps), gradients and the next window's start states."""

    loss: jax.Array
    params: dict  # gradient pytree, structure of the model params
    carry: Any  # one {"fwd": state} per layer (leaves (b h)), stop-gradient


def check_truncation(k1, k2, num_steps: int | None = None) -> Truncation:
    """Validate ``k1``/``k2`` (and, given the stream length ``T``, that they fit it)."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if k1 < 1:
        raise ValueError(f"k1 (steps per block) must be >= 1, got k1={k1}")
    if k2 < k1:
        raise ValueError(
            f"k2 (steps to backpropagate) must be >= k1 (steps per block), got k1={k1}, k2={k2}"
        )
    if num_steps is not None:
        if num_steps % k1 != 0:
            raise ValueError(
                f"the sequence length T={num_steps} must be a multiple of k1={k1} "
                "(every block has k1 steps)"
            )
        if k2 > num_steps:
            raise ValueError(f"k2={k2} must be <= the sequence length T={num_steps}")
    return Truncation(k1, k2)


def window_bounds(block: int, k1: int, k2: int) -> tuple[int, int]:
    """``(start, end)`` of block ``block``'s window in stream steps: ``[max(0, e - k2), e)``."""
    end = (block + 1) * k1
    return max(0, end - k2), end


def _states_at(tapes, h_start, index: int) -> list:
    """Every layer's state after window-local step ``index``; ``h_start`` when ``index < 0``."""
    if index < 0:
        return h_start
    return [{"fwd": jax.tree_util.tree_map(lambda s: s[index], t.runs["fwd"][0])} for t in tapes]


def _window_loss(
    params, h_start, xs, targets, drops, resets, h_reset, *, cell, loss, residual, options, k1
):
    """Loss of the last ``k1`` steps of the window ``xs: (W b d)``, and the window's tapes."""
    outputs, _, tapes = stack_forward(
        cell, options, params["layers"], h_start, xs, None, drops, residual, run_scan, resets,
        h_reset,
    )  # fmt: skip
    ys = readout(params["readout"], outputs[-k1:])
    return sequence_loss(ys, targets[-k1:], loss), tapes


_STATIC = ("cell", "loss", "residual", "options", "k1", "k2", "mode")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _window_core(
    params, h_start, xs, targets, drops, resets, h_reset, *, cell, loss, residual, options, k1,
    k2, mode,
):  # fmt: skip
    h_start, h_reset = jax.lax.stop_gradient((h_start, h_reset))
    num_steps = xs.shape[0]
    carry_index = num_steps + k1 - k2 - 1
    static = dict(cell=cell, loss=loss, residual=residual, options=options)
    if k1 == k2:  # the whole window carries the loss and the carry is its final state
        grads, finals = CORES[mode](
            params, h_start, xs, targets, None, drops, resets, h_reset, **static
        )
        return WindowResult(grads.loss, grads.params, jax.lax.stop_gradient(finals))
    if mode == "auto":
        (value, tapes), grads = jax.value_and_grad(
            functools.partial(_window_loss, k1=k1, **static), has_aux=True
        )(params, h_start, xs, targets, drops, resets, h_reset)
        return WindowResult(
            value, grads, jax.lax.stop_gradient(_states_at(tapes, h_start, carry_index))
        )

    _, tapes = _window_loss(params, h_start, xs, targets, drops, resets, h_reset, k1=k1, **static)
    prefix = num_steps - k1  # steps that only carry the gradient further back

    def head(tree):  # the prefix's steps of every leaf (None stays None)
        return jax.tree.map(lambda a: a[:prefix], tree)

    def tail(tree):
        return jax.tree.map(lambda a: a[prefix:], tree)

    h_tail = _states_at(tapes, h_start, prefix - 1)
    grads, _ = CORES[mode](
        params, h_tail, tail(xs), tail(targets), None, tail(drops), tail(resets), h_reset, **static
    )
    d_params = grads.params
    if prefix > 0:  # no loss term before the tail: only d h_tail flows back through the prefix
        features = params["readout"]["W_hy"].shape[0]
        d_layers, _, _ = stack_backward(
            cell, options, params["layers"], h_start, head(tapes), None, head(drops), residual,
            jnp.zeros((prefix, xs.shape[1], features), xs.dtype), grads.h0, head(resets), h_reset,
        )  # fmt: skip
        d_params = {
            **d_params,
            "layers": jax.tree_util.tree_map(jnp.add, d_params["layers"], d_layers),
        }
    carry = _states_at(tapes, h_start, carry_index)
    return WindowResult(grads.loss, d_params, jax.lax.stop_gradient(carry))


def check_mode_and_loss(mode, loss, truncated: bool = True) -> Loss:
    """``mode`` one of ``CORES``; the checked ``loss``, per-step when ``truncated``."""
    check_choice("mode", mode, tuple(CORES))
    loss = check_loss(loss)
    if truncated and loss.placement != "per_step":
        raise ValueError(f"truncated BPTT needs loss.placement='per_step', got {loss.placement!r}")
    return loss


def window_grads(
    params,
    xs,
    targets,
    *,
    cell,
    k1: int,
    k2: int,
    loss: Loss | str = "cross_entropy",
    h0=None,
    mode: str = "manual",
    dropout: float = 0.0,
    key=None,
    residual=False,
    options=None,
    time_major: bool = True,
    resets=None,
    h_reset=None,
    output_dropout: float = 0.0,
) -> WindowResult:
    """Loss and gradients of one truncated-BPTT window (the unit of one training step).

    Args:
      params: ``init_model(...)`` pytree, any depth, unidirectional.
      xs: ``(W, B, D)`` the window's inputs, ``k1 <= W <= k2`` (``W < k2`` only for windows that
        start at the stream's first step).
      targets: per-step targets for the window (``(W, B)`` int ids for cross_entropy,
        ``(W, B, O)`` for mse); only the last ``k1`` steps count.
      h0: the states entering the window (stop-gradient is applied), default zeros.
      mode: a name in ``jax_bptt.BPTT_MODES``.
      loss, dropout, key, residual, options, time_major, output_dropout: as for
        ``jax_bptt.bptt`` (per-step placement only).
      resets: bool ``(W, B)`` segment starts in the window (``(B, W)`` batch-major); a set
        ``resets[0]`` drops ``h0`` too.
      h_reset: the states a restart returns to (like ``h0``, stop-gradient), default zeros
        (``truncated_bptt`` passes the stream's initial states).

    Returns:
      ``WindowResult(loss, params, carry)`` where ``carry`` is the states the next window starts
      from (see the module docstring).
    """
    k1, k2 = check_truncation(k1, k2)
    loss = check_mode_and_loss(mode, loss)
    run = prepare(
        params, xs, cell=cell, lengths=None, h0=h0, dropout=dropout, key=key,
        residual=residual, options=options, time_major=time_major, resets=resets,
        output_dropout=output_dropout,
    )  # fmt: skip
    if run.batch.resets is not None:  # the restart state: validated like h0, zeros by default
        h_reset = check_state(h_reset, run.cell, run.shape, run.batch.xs.shape[1], True)
    elif h_reset is not None:
        raise ValueError("h_reset is the state a reset restarts from: it needs resets")
    if hasattr(targets, "ndim"):  # per-step targets (B, T, ...) -> (T, B, ...)
        targets = to_time_major(targets, time_major, 3 if loss.kind == "mse" else 2)
    if not run.batch.batched:
        raise ValueError(f"xs must be batched (W, B, D) for truncated BPTT, got shape {xs.shape}")
    if "bwd" in run.shape.directions:
        raise ValueError(
            "truncated BPTT needs a unidirectional model: a backward direction would have to "
            "start from the future, which a carried state cannot give"
        )
    num_steps, batch_size = run.batch.xs.shape[:2]
    if not k1 <= num_steps <= k2:
        raise ValueError(
            f"a window must have k1 <= W <= k2 steps, got W={num_steps} with k1={k1}, k2={k2}"
        )
    targets = check_targets(targets, loss, num_steps, batch_size, run.shape.output_size, True)
    return _window_core(
        params, run.batch.h0, run.batch.xs, targets, run.drops, run.batch.resets,
        None if run.batch.resets is None else h_reset,
        cell=run.cell, loss=loss, residual=residual, options=run.options, k1=k1, k2=k2, mode=mode,
    )  # fmt: skip


def truncated_bptt(
    params,
    xs,
    targets,
    *,
    cell,
    k1: int,
    k2: int,
    loss: Loss | str = "cross_entropy",
    h0=None,
    mode: str = "manual",
    residual=False,
    options=None,
    time_major: bool = True,
    resets=None,
) -> WindowResult:
    """BPTT(k1, k2) over a whole stream at fixed params (no updates between blocks).

    Args:
      xs: ``(T, B, D)`` stream (or token ids ``(T, B)``), ``T`` a multiple of ``k1``, ``k2 <= T``.
      targets: per-step targets ``(T, B)`` (cross_entropy ids) or ``(T, B, O)`` (mse).
      h0: the stream's initial states, default zeros.
      resets: bool ``(T, B)`` segment starts (``(B, T)`` batch-major): every layer restarts from
        ``h0`` there, also where a window starts (module docstring).
      Other arguments as in ``window_grads``.

    Returns:
      ``WindowResult(loss, params, carry)``: the block losses and gradients combined as the
      module docstring says (``k1 = k2 = T`` gives exactly full BPTT), and the last window's
      carry: the states after step ``T + k1 - k2 - 1``, where the window after the stream's
      last block would start (the final states when ``k1 = k2``).

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 3, 8, 3, num_layers=2)
      >>> xs, ys = jnp.ones((12, 2, 3)), jnp.zeros((12, 2), jnp.int32)
      >>> truncated_bptt(params, xs, ys, cell="lstm", k1=4, k2=6).loss.shape
      ()
    """
    shape = getattr(xs, "shape", ())
    if len(shape) != (2 if is_token_ids(xs) else 3):
        raise ValueError(
            f"xs must have shape (T, B, D) (or token ids (T, B)) for truncated BPTT, got {shape}"
        )
    loss = check_mode_and_loss(mode, loss)
    xs = to_time_major(xs, time_major, len(shape))
    targets = to_time_major(targets, time_major, 3 if loss.kind == "mse" else 2)
    resets = to_time_major(resets, time_major, 2)
    k1, k2 = check_truncation(k1, k2, xs.shape[0])
    num_blocks = xs.shape[0] // k1
    carry, total_loss, total_grads = h0, 0.0, None
    for block in range(num_blocks):
        # A short window (end < k2) starts at step 0; its carry is then the stream's h0 again.
        start, end = window_bounds(block, k1, k2)
        result = window_grads(
            params, xs[start:end], targets[start:end], cell=cell, k1=k1, k2=k2, loss=loss,
            h0=carry, mode=mode, residual=residual, options=options,
            resets=None if resets is None else resets[start:end],
            h_reset=None if resets is None else h0,
        )  # fmt: skip
        carry = result.carry
        total_loss = total_loss + result.loss
        total_grads = (
            result.params
            if total_grads is None
            else jax.tree_util.tree_map(jnp.add, total_grads, result.params)
        )
    scale = 1.0 / num_blocks if loss.reduction == "mean" else 1.0
    total_grads = jax.tree_util.tree_map(lambda g: g * scale, total_grads)
    return WindowResult(total_loss * scale, total_grads, carry)
