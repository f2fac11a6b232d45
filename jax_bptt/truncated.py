"""Truncated BPTT, BPTT(k1, k2) in Williams & Peng's (1990) sense, over long streams.

A stream ``xs: (T, B, D)`` with per-step targets is cut into ``T / k1`` chunks of ``k1`` steps.
For chunk ``j`` (steps ``[j k1, (j + 1) k1)``) the forward runs over the *window*

    [s_j, e_j) = [max(0, e_j - k2), e_j),   e_j = (j + 1) k1,   length W_j = e_j - s_j <= k2

starting from the state after step ``s_j - 1`` (the stream's ``h0`` when ``s_j = 0``), with
``stop_gradient`` on that incoming state: gradients flow back at most ``k2`` steps. Only the last
``k1`` steps of the window (the chunk itself) contribute loss terms, so every step's loss is
counted exactly once over the stream; the first ``k2 - k1`` steps of a window only carry the
gradient further back. ``k1 = k2`` is the common "split into chunks and carry the state" scheme;
``k1 = k2 = T`` is full BPTT.

What is summed/averaged (``reduction``, as in ``jax_bptt.losses``):

- chunk loss ``L_j``: the ``sequence_loss`` of the chunk's ``k1 * B`` per-step terms
  (``"mean"``: divided by ``k1 * B``; ``"sum"``: summed);
- stream loss (``truncated_bptt``): ``"mean"``: ``(1 / n) sum_j L_j`` with ``n = T / k1`` chunks,
  which equals the mean over all ``T * B`` terms; ``"sum"``: ``sum_j L_j``. The gradient is the same
  combination of the chunk gradients ``dL_j/dparams``, each truncated to its window.

The carry between windows is the state the next window starts from, after step ``s_{j+1} - 1``,
local index ``W_j + k1 - k2 - 1`` of this window (``k1 - 1`` for a full window; the final state
when ``k1 = k2``); when that index is negative the next window also starts at step 0 and the carry
is the stream's ``h0``.

Gradients: ``mode="auto"`` is ``jax.value_and_grad`` of the window loss. Any other name in
``jax_bptt.modes.BPTT_MODES`` (``"manual"``, ...) runs that implementation on the chunk with
``h0`` = the state entering the chunk, then backpropagates the returned ``d h0`` through the
window's first ``W - k1`` steps with ``backward_scan``; one extra forward over the chunk gives the
carry, because the BPTT functions do not return the final state.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt import modes
from jax_bptt.bptt import backward_scan, prepare
from jax_bptt.cells import Cell, get_cell, project_inputs
from jax_bptt.losses import sequence_loss
from jax_bptt.model import readout
from jax_bptt.unroll import scan_states


class Truncation(NamedTuple):
    """BPTT(k1, k2): every ``k1`` steps, backpropagate ``k2`` steps (``k2 >= k1 >= 1``)."""

    k1: int
    k2: int


class WindowResult(NamedTuple):
    """One window's loss (its last ``k1`` steps), gradients and the next window's start state."""

    loss: jax.Array
    params: dict  # gradient pytree, structure of the model params
    carry: Any  # state (leaves (b h)), stop-gradient


class TruncatedGradients(NamedTuple):
    """A whole stream at fixed params: combined loss and gradients, and the last carry."""

    loss: jax.Array
    params: dict
    carry: Any


def check_truncation(k1, k2, num_steps: int | None = None) -> Truncation:
    """Validate ``k1``/``k2`` (and, given the stream length ``T``, that they fit it)."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if k1 < 1:
        raise ValueError(f"k1 (steps per chunk) must be >= 1, got k1={k1}")
    if k2 < k1:
        raise ValueError(
            f"k2 (steps to backpropagate) must be >= k1 (steps per chunk), got k1={k1}, k2={k2}"
        )
    if num_steps is not None:
        if num_steps % k1 != 0:
            raise ValueError(
                f"the sequence length T={num_steps} must be a multiple of k1={k1} "
                "(every chunk has k1 steps)"
            )
        if k2 > num_steps:
            raise ValueError(f"k2={k2} must be <= the sequence length T={num_steps}")
    return Truncation(k1, k2)


def window_bounds(chunk: int, k1: int, k2: int) -> tuple[int, int]:
    """``(start, end)`` of chunk ``chunk``'s window in stream steps: ``[max(0, e - k2), e)``."""
    end = (chunk + 1) * k1
    return max(0, end - k2), end


def _carry_from(states, h_start, index: int):
    """The state after window-local step ``index``; ``h_start`` when ``index < 0``."""
    if index < 0:
        return h_start
    return jax.tree_util.tree_map(lambda s: s[index], states)


def _window_loss(params, h_start, xs, targets, *, cell: Cell, loss, reduction, k1, unroll):
    """Loss of the last ``k1`` steps of the window ``xs: (W b d)``, and the window's states."""
    xp = project_inputs(params["cell"], xs)
    _, (states, _) = scan_states(cell, params["cell"], xp, h_start, unroll=unroll)
    ys = readout(params["readout"], cell.hidden(states)[-k1:])
    value = sequence_loss(ys, targets[-k1:], loss=loss, placement="per_step", reduction=reduction)
    return value, states


_STATIC = ("cell", "loss", "reduction", "k1", "k2", "mode", "unroll")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _window_core(params, h_start, xs, targets, *, cell, loss, reduction, k1, k2, mode, unroll):
    h_start = jax.lax.stop_gradient(h_start)
    num_steps = xs.shape[0]
    carry_index = num_steps + k1 - k2 - 1
    static = dict(cell=cell, loss=loss, reduction=reduction, k1=k1, unroll=unroll)
    if mode == "auto":
        (value, states), grads = jax.value_and_grad(
            functools.partial(_window_loss, **static), has_aux=True
        )(params, h_start, xs, targets)
        return WindowResult(value, grads, _carry_from(states, h_start, carry_index))

    p = params["cell"]
    prefix = num_steps - k1  # steps that only carry the gradient further back
    h_chunk, states_pre, res_pre = h_start, None, None
    if prefix > 0:
        _, (states_pre, res_pre) = scan_states(
            cell, p, project_inputs(p, xs[:prefix]), h_start, unroll=unroll
        )
        h_chunk = jax.tree_util.tree_map(lambda s: s[-1], states_pre)
    chunk = modes.BPTT_MODES[mode](
        params,
        xs[prefix:],
        targets[prefix:],
        cell=cell,
        loss=loss,
        placement="per_step",
        reduction=reduction,
        h0=h_chunk,
        unroll=unroll,
    )
    grads = chunk.params
    if prefix > 0:
        d_hs = jnp.zeros((prefix, *cell.hidden(h_start).shape), xs.dtype)
        d_cell_pre, _, _ = backward_scan(
            cell, p, xs[:prefix], h_start, None, states_pre, res_pre, d_hs, chunk.h0, unroll=unroll
        )
        grads = {**grads, "cell": jax.tree_util.tree_map(jnp.add, grads["cell"], d_cell_pre)}

    if carry_index < prefix:
        carry = _carry_from(states_pre, h_start, carry_index)
    else:  # inside the chunk: the mode does not return its states, so run the forward again
        _, (states_chunk, _) = scan_states(
            cell, p, project_inputs(p, xs[prefix:]), h_chunk, unroll=unroll
        )
        carry = _carry_from(states_chunk, h_chunk, carry_index - prefix)
    return WindowResult(chunk.loss, grads, jax.lax.stop_gradient(carry))


def window_grads(
    params,
    xs,
    targets,
    *,
    cell,
    k1: int,
    k2: int,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    h0=None,
    mode: str = "manual",
    unroll: int = 1,
) -> WindowResult:
    """Loss and gradients of one truncated-BPTT window (the unit of one training step).

    Args:
      params: ``init_model(...)`` pytree.
      xs: ``(W, B, D)`` the window's inputs, ``k1 <= W <= k2`` (``W < k2`` only for windows that
        start at the stream's first step).
      targets: per-step targets for the window (``(W, B)`` int ids for cross_entropy,
        ``(W, B, O)`` for mse); only the last ``k1`` steps count.
      h0: the state entering the window (stop-gradient is applied), default zeros.
      mode: ``"auto"`` or any other name in ``jax_bptt.modes.BPTT_MODES``.

    Returns:
      ``WindowResult(loss, params, carry)`` where ``carry`` is the state the next window starts
      from (see the module docstring).
    """
    k1, k2 = check_truncation(k1, k2)
    if mode != "auto" and mode not in modes.BPTT_MODES:
        raise ValueError(f"mode must be 'auto' or one of {tuple(modes.BPTT_MODES)}, got {mode!r}")
    cell, batch = prepare(
        params,
        xs,
        targets,
        cell=cell,
        loss=loss,
        placement="per_step",
        reduction=reduction,
        lengths=None,
        h0=h0,
    )
    if not batch.batched:
        raise ValueError(f"xs must be batched (W, B, D) for truncated BPTT, got shape {xs.shape}")
    num_steps = batch.xs.shape[0]
    if not k1 <= num_steps <= k2:
        raise ValueError(
            f"a window must have k1 <= W <= k2 steps, got W={num_steps} with k1={k1}, k2={k2}"
        )
    return _window_core(
        params,
        batch.h0,
        batch.xs,
        batch.targets,
        cell=get_cell(cell),
        loss=loss,
        reduction=reduction,
        k1=k1,
        k2=k2,
        mode=mode,
        unroll=unroll,
    )


def truncated_bptt(
    params,
    xs,
    targets,
    *,
    cell,
    k1: int,
    k2: int,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    h0=None,
    mode: str = "manual",
    unroll: int = 1,
) -> TruncatedGradients:
    """BPTT(k1, k2) over a whole stream at fixed params (no updates between chunks).

    Args:
      xs: ``(T, B, D)`` stream, ``T`` a multiple of ``k1`` and ``k2 <= T``.
      targets: per-step targets ``(T, B)`` (cross_entropy ids) or ``(T, B, O)`` (mse).
      h0: the stream's initial state, default zeros.
      Other arguments as in ``window_grads``.

    Returns:
      ``TruncatedGradients(loss, params, carry)``: the chunk losses and gradients combined as the
      module docstring says (``k1 = k2 = T`` gives exactly full BPTT), and the last window's
      carry: the state after step ``T + k1 - k2 - 1``, where the window after the stream's
      last chunk would start (the final state when ``k1 = k2``).

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 3, 8, 3)
      >>> xs, ys = jnp.ones((12, 2, 3)), jnp.zeros((12, 2), jnp.int32)
      >>> truncated_bptt(params, xs, ys, cell="lstm", k1=4, k2=6).loss.shape
      ()
    """
    shape = getattr(xs, "shape", ())
    if len(shape) != 3:
        raise ValueError(f"xs must have shape (T, B, D) for truncated BPTT, got shape {shape}")
    num_steps = shape[0]
    k1, k2 = check_truncation(k1, k2, num_steps)
    num_chunks = num_steps // k1
    carry, total_loss, total_grads = h0, 0.0, None
    for chunk in range(num_chunks):
        # A short window (end < k2) starts at step 0; its carry is then the stream's h0 again.
        start, end = window_bounds(chunk, k1, k2)
        result = window_grads(
            params,
            xs[start:end],
            targets[start:end],
            cell=cell,
            k1=k1,
            k2=k2,
            loss=loss,
            reduction=reduction,
            h0=carry,
            mode=mode,
            unroll=unroll,
        )
        carry = result.carry
        total_loss = total_loss + result.loss
        total_grads = (
            result.params
            if total_grads is None
            else jax.tree_util.tree_map(jnp.add, total_grads, result.params)
        )
    scale = 1.0 / num_chunks if reduction == "mean" else 1.0
    total_grads = jax.tree_util.tree_map(lambda g: g * scale, total_grads)
    return TruncatedGradients(total_loss * scale, total_grads, carry)
