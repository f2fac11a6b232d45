"""One recurrence over time, forward and backward: the floor every BPTT mode stands on.

The forward is a ``lax.scan`` of the cell's step over projected inputs (``scan_states``); its
adjoint is a reverse ``lax.scan`` that carries only ``d state`` (``backward_deltas``); the weight
gradients are then one GEMM each over all steps (``cell_grads``). Everything here works on
validated, batched, time-major arrays (the dimension letters of ``jax_bptt.cells``).

Masks: with ``lengths`` a sequence's state is frozen past its length (the mask is
``t < length``, so the final state is the state at its length) and its outputs there are zero.
``reverse=True`` scans from ``T - 1`` down to 0 with the same mask, so a padded sequence's reverse
pass starts at its last valid step, like PyTorch's packed sequences. ``T = 0`` is allowed.

Restarts: ``restart (t b)`` bool, in the scan's own order, says that the state entering step
``t`` is ``h_reset`` instead of the state after the previous step (``restart_mask`` turns the
model's segment starts ``resets`` into that for either direction). No gradient crosses a restart;
``d h_reset`` sums the gradient of every restart. A frozen step (past the length) ignores its
restart. ``restart=None`` traces exactly the code without restarts.

``compute_dtype`` (e.g. ``"bfloat16"``): every GEMM here takes its operands in that dtype and
accumulates in the params' dtype (``jax_bptt.cells.matmul``); pointwise math, the carried states
and deltas, and the sums over time stay in the params' dtype. None: all in the params' dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt.cells import Cell, is_token_ids, matmul, project_inputs


def length_mask(lengths: jax.Array | None, num_steps: int) -> jax.Array | None:
    """``(b,) -> (t b)`` bool, True where step ``t`` is inside the sequence; None stays None."""
    if lengths is None:
        return None
    return jnp.arange(num_steps)[:, None] < lengths[None, :]


def select(mask_t: jax.Array | None, new, old):
    """Per-sequence ``where`` over a state pytree; ``mask_t: (b,)``, None means all True."""
    if mask_t is None:
        return new
    return jax.tree.map(lambda a, b: jnp.where(mask_t[:, None], a, b), new, old)


def masked(mask: jax.Array | None, values: jax.Array) -> jax.Array:
    """``values (t b f)`` (or token ids ``(t b)``) set to zero where ``mask (t b)`` is False
    (None: unchanged)."""
    if mask is None:
        return values
    return jnp.where(mask if values.ndim == mask.ndim else mask[..., None], values, 0)


def restart_mask(resets: jax.Array | None, reverse: bool) -> jax.Array | None:
    """Segment starts ``resets (t b)`` -> ``restart (t b)`` in the scan's order: forward, the state
    entering step t restarts where step t starts a segment; reverse, where step t + 1 does (the
    reverse pass restarts at the end of each segment). None stays None."""
    if resets is None or not reverse:
        return resets
    return jnp.concatenate([resets[1:], jnp.zeros_like(resets[:1])])


def restarted(restart_t: jax.Array | None, h_reset, state):
    """The state entering a step: ``h_reset`` where ``restart_t (b,)`` is set (None: ``state``)."""
    if restart_t is None:
        return state
    return select(restart_t, h_reset, state)


# --------------------------------------------------------------------------------------------
# Forward


def scan_states(
    cell: Cell, params, xp, h0, mask=None, reverse=False, unroll=1, restart=None, h_reset=None,
    *, compute_dtype=None,
):  # fmt: skip
    """The recurrence on projected inputs ``xp: (t b g)``; ``restart (t b)`` and ``h_reset`` as in
    the module docstring.

    Returns ``(final_state, (states, saved))`` stacked over t: ``states`` are the (frozen past
    the length) states after each step, ``saved`` what ``cell.backward`` needs from each step.
    """

    def body(state, inputs):
        xp_t, mask_t, restart_t = inputs
        prev = restarted(restart_t, h_reset, state)
        hp_t = matmul(cell.hidden(prev), params["W_hh"], compute_dtype)
        new_state, saved = cell.forward(params, xp_t, hp_t, prev)
        new_state = select(mask_t, new_state, state)
        return new_state, (new_state, saved)

    return jax.lax.scan(body, h0, (xp, mask, restart), reverse=reverse, unroll=unroll)


def scan_hidden(
    cell: Cell, params, xp, h0, mask=None, reverse=False, unroll=1, restart=None, h_reset=None,
    *, all_states=False, compute_dtype=None,
):  # fmt: skip
    """``scan_states`` that stacks only the hidden outputs, zero past each length: ``(final_state,
    hs (t b h))`` (with ``all_states``, every step's whole state, leaves ``(t b h)``). What
    ``jax.grad`` differentiates in the automatic mode: it saves what its own backward needs, and
    nothing else is written per step.

    ``xp`` may also be token ids ``(t b)``: each step then gathers its rows of ``W_xh`` itself.
    Under ``jax.grad`` on a CPU that is the faster step: a gather hoisted out of the scan (and its
    ``(t b g)`` gradient scattered after it) made a char-LM train step about 30% slower."""

    def body(state, inputs):
        xp_t, mask_t, restart_t = inputs
        if is_token_ids(xp_t):
            xp_t = project_inputs(params, xp_t)
        prev = restarted(restart_t, h_reset, state)
        hp_t = matmul(cell.hidden(prev), params["W_hh"], compute_dtype)
        new_state, _ = cell.forward(params, xp_t, hp_t, prev)
        new_state = select(mask_t, new_state, state)
        out = new_state if all_states else cell.hidden(new_state)
        zeros = jax.tree.map(jnp.zeros_like, out)
        return new_state, select(mask_t, out, zeros)

    return jax.lax.scan(body, h0, (xp, mask, restart), reverse=reverse, unroll=unroll)


def masked_hidden(cell: Cell, states, mask, all_states: bool = False) -> jax.Array:
    """``(t b h)`` hidden outputs (with ``all_states`` the whole stacked state pytree), zero past
    each sequence's length."""
    if all_states:
        return jax.tree.map(lambda s: masked(mask, s), states)
    return masked(mask, cell.hidden(states))


# --------------------------------------------------------------------------------------------
# Backward


def previous_states(h0, states, *, reverse: bool = False, restart=None, h_reset=None):
    """``state_{t-1}`` for every step: ``h0`` followed by the stored states (scan order), and
    ``h_reset`` where ``restart (t b)`` is set: the state each step started from."""
    if restart is not None:
        prev = previous_states(h0, states, reverse=reverse)
        return jax.tree.map(lambda r, p: jnp.where(restart[..., None], r[None], p), h_reset, prev)
    if reverse:
        return jax.tree.map(lambda s0, s: jnp.concatenate([s, s0[None]])[1:], h0, states)
    return jax.tree.map(lambda s0, s: jnp.concatenate([s0[None], s])[:-1], h0, states)


class Deltas(NamedTuple):
    """What the reverse scan produces, per step, before any weight gradient is formed."""

    d_h0: Any  # gradient w.r.t. the initial state
    d_xp: jax.Array  # (t b g) gradient w.r.t. the projected input xp_t = x_t W_xh + b_h
    d_hp: jax.Array  # (t b g) gradient w.r.t. the recurrent projection hp_t = h_{t-1} W_hh
    h_prev: jax.Array  # (t b h) h_{t-1} for every step
    d_states: Any = None  # state pytree, leaves (t b h): dL/d state_t arriving at each step
    d_pointwise: Any = None  # {name: summed gradient} of the cell's pointwise_params, if any
    d_reset: Any = None  # gradient w.r.t. h_reset (summed over restarts); None without restarts


def backward_deltas(
    cell: Cell,
    params,
    h0,
    mask,
    states,
    saved,
    d_hs,
    d_final,
    *,
    reverse: bool = False,
    unroll: int = 1,
    restart=None,
    h_reset=None,
    compute_dtype=None,
) -> Deltas:
    """The hand-written BPTT recurrence: only ``delta`` travels through the reverse scan.

    Args:
      params: cell params; h0 the initial state; mask ``(t b)`` or None.
      states, saved: what ``scan_states`` stacked over t.
      d_hs: ``(t b h)`` gradient of the loss w.r.t. the hidden outputs (``dL_t/dh_t``), or a
        state pytree (leaves ``(t b h)``): the gradient w.r.t. every step's whole state.
      d_final: gradient w.r.t. the final state (zeros when the loss ignores it).
      reverse: the direction the forward ran in; the backward runs the other way.
      restart, h_reset: as for ``scan_states``; a restarted step sends its ``d state_{t-1}`` to
        ``Deltas.d_reset`` and zero to the step before it.
      compute_dtype: the GEMM operands' dtype (module docstring); None: the params' dtype.
    """
    states_prev = previous_states(h0, states, reverse=reverse, restart=restart, h_reset=h_reset)
    whole = jax.tree.structure(d_hs) == jax.tree.structure(d_final)  # one leaf: the same thing
    # outputs past a length are constant zeros: no gradient flows back
    d_hs = jax.tree.map(lambda d: masked(mask, d), d_hs)

    def backward_step(carry, inputs):
        d_state, d_reset = carry
        d_hs_t, mask_t, state_prev, saved_t, restart_t = inputs
        if whole:
            d_state = jax.tree.map(jnp.add, d_state, d_hs_t)
        else:
            d_state = cell.with_hidden(d_state, cell.hidden(d_state) + d_hs_t)
        d_step = d_state
        if cell.pointwise_params and mask_t is not None:  # frozen rows give params no gradient
            d_step = select(mask_t, d_state, jax.tree.map(jnp.zeros_like, d_state))
        d_prev, d_xp, d_hp, *d_pointwise = cell.backward(params, saved_t, state_prev, d_step)
        d_h_prev = matmul(d_hp, params["W_hh"].T, compute_dtype)
        d_prev = cell.with_hidden(d_prev, cell.hidden(d_prev) + d_h_prev)
        shared = d_hp is d_xp  # Elman, LSTM: stack one (t b g) array over t, not two equal ones
        if mask_t is not None:  # past the length the state was frozen: pass d_state through
            d_prev = select(mask_t, d_prev, d_state)
            d_xp = jnp.where(mask_t[:, None], d_xp, 0)
            d_hp = d_xp if shared else jnp.where(mask_t[:, None], d_hp, 0)
        if restart_t is not None:  # a restarted step read h_reset, not the step before it
            hit = restart_t if mask_t is None else restart_t & mask_t
            zeros = jax.tree.map(jnp.zeros_like, d_prev)
            d_reset = jax.tree.map(jnp.add, d_reset, select(hit, d_prev, zeros))
            d_prev = select(hit, zeros, d_prev)
        return (d_prev, d_reset), (d_xp, None if shared else d_hp, d_state, d_pointwise)

    d_reset = None if restart is None else jax.tree.map(jnp.zeros_like, d_final)
    # d_states is dead code for callers that don't read it: XLA drops it from the loop.
    (d_h0, d_reset), (d_xp, d_hp, d_states, d_pointwise) = jax.lax.scan(
        backward_step,
        (d_final, d_reset),
        (d_hs, mask, states_prev, saved, restart),
        reverse=not reverse,
        unroll=unroll,
    )
    d_hp = d_xp if d_hp is None else d_hp
    d_pointwise = jax.tree.map(lambda g: g.sum(0), d_pointwise[0]) if d_pointwise else None
    return Deltas(d_h0, d_xp, d_hp, cell.hidden(states_prev), d_states, d_pointwise, d_reset)


def sum_outer(a: jax.Array, c: jax.Array, compute_dtype=None) -> jax.Array:
    """``sum_tb a_tb^T c_tb``: ``(t b m), (t b n) -> (m n)``, one GEMM over all ``(t, b)`` rows
    (operands in ``compute_dtype`` if given, accumulated in their own dtype).

    A ``dot_general`` contracting the leading axes in order (so a batch-sharded ``b`` becomes a
    partial sum plus one all-reduce, with no reshape across the sharded axis). The smaller
    operand goes first: XLA:CPU lays the first operand out transposed with a copy before the
    GEMM, and ``einsum("tbh,tbg->hg")`` (contracting ``b, t``) copies both, which made a weight
    gradient up to 2x slower (measured in jax 0.10.2).
    """
    leading = tuple(range(a.ndim - 1))
    dims = ((leading, leading), ((), ()))
    out = jnp.result_type(a, c)
    if compute_dtype is not None:
        a, c = a.astype(compute_dtype), c.astype(compute_dtype)
    # Mixed precision keeps the given order: XLA:CPU folds the ``.T`` below into a new bf16 dot
    # after its pass that widens bf16 dots, which then fails at run time (jax 0.10.2).
    if a.size <= c.size or compute_dtype is not None:
        return jax.lax.dot_general(a, c, dims, preferred_element_type=out)
    return jax.lax.dot_general(c, a, dims, preferred_element_type=out).T


def cell_grads(cell: Cell, params, xs, deltas: Deltas, compute_dtype=None):
    """``(d_params, d_xs)`` from the deltas: one GEMM each over all (t, b).

    dW_xh = sum_t x_t^T d xp_t,  dW_hh = sum_t h_{t-1}^T d hp_t,  db_h = sum_t d xp_t,
    dx_t  = d xp_t W_xh^T

    For token ids ``xs (t b)`` the first is a scatter-add of ``d xp_t`` into the rows ``x_t`` of
    ``dW_xh`` (the transpose of the gather), and ids have no gradient (``d_xs`` is None).
    ``compute_dtype``: the GEMM operands' dtype (module docstring).
    """
    if is_token_ids(xs):
        d_w_xh = jnp.zeros_like(params["W_xh"]).at[xs].add(deltas.d_xp)
        d_xs = None
    else:
        d_w_xh = sum_outer(xs, deltas.d_xp, compute_dtype)
        d_xs = matmul(deltas.d_xp, params["W_xh"].T, compute_dtype)
    d_params = {
        "W_xh": d_w_xh,
        "W_hh": sum_outer(deltas.h_prev, deltas.d_hp, compute_dtype),
        **cell.bias_grads(deltas.d_xp.sum((0, 1)), deltas.d_hp.sum((0, 1))),
        **(deltas.d_pointwise or {}),
    }
    return d_params, d_xs


def backward_scan(
    cell: Cell, params, xs, h0, mask, states, saved, d_hs, d_final, *, reverse=False, unroll=1,
    restart=None, h_reset=None, compute_dtype=None,
):  # fmt: skip
    """The VJP of one recurrence from its forward's saved values: ``(d_params, d_h0, d_xs)``.

    With ``restart``, ``h_reset=None`` restarts from ``h0`` and ``d_h0`` includes every
    restart's gradient; a state of its own is held constant (its gradient is not returned).
    """
    deltas = backward_deltas(
        cell, params, h0, mask, states, saved, d_hs, d_final, reverse=reverse, unroll=unroll,
        restart=restart, h_reset=h0 if h_reset is None else h_reset, compute_dtype=compute_dtype,
    )  # fmt: skip
    d_params, d_xs = cell_grads(cell, params, xs, deltas, compute_dtype)
    d_h0 = deltas.d_h0
    if restart is not None and h_reset is None:
        d_h0 = jax.tree.map(jnp.add, d_h0, deltas.d_reset)
    return d_params, d_h0, d_xs
