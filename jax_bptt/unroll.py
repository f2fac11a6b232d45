"""The unrolled network is a ``lax.scan`` over time, not copies of the weights.

Inputs are time-major, ``xs: (t b d)``. With ``lengths`` a sequence's state is frozen past its
length (the mask is ``t < length``, so the final state is the state at its length) and its outputs
there are zero. ``reverse=True`` scans from ``T - 1`` down to 0 with the same mask, so a padded
sequence's reverse pass starts at its last valid step, like PyTorch's packed sequences.

``T = 0`` is allowed: the outputs are empty ``(0, b, h)`` and the final state is ``h0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_bptt.cells import Cell, get_cell, project_inputs
from jax_bptt.validation import check_inputs


def length_mask(lengths: jax.Array | None, num_steps: int) -> jax.Array | None:
    """``(b,) -> (t b)`` bool, True where step ``t`` is inside the sequence; None stays None."""
    if lengths is None:
        return None
    return jnp.arange(num_steps)[:, None] < lengths[None, :]


def select(mask_t: jax.Array | None, new, old):
    """Per-sequence ``where`` over a state pytree; ``mask_t: (b,)``, None means all True."""
    if mask_t is None:
        return new
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask_t[:, None], a, b), new, old)


def scan_states(cell: Cell, params, xp, h0, mask=None, reverse=False, unroll=1):
    """The recurrence on projected inputs ``xp: (t b g)``.

    Returns ``(final_state, (states, residuals))`` stacked over t: ``states`` are the (frozen past
    the length) states after each step, ``residuals`` what ``cell.backward`` needs.
    """

    def body(state, inputs):
        xp_t, mask_t = inputs
        hp_t = cell.hidden(state) @ params["W_hh"]
        new_state, residuals = cell.forward(params, xp_t, hp_t, state)
        new_state = select(mask_t, new_state, state)
        return new_state, (new_state, residuals)

    return jax.lax.scan(body, h0, (xp, mask), reverse=reverse, unroll=unroll)


def masked_hidden(cell: Cell, states, mask) -> jax.Array:
    """``(t b h)`` hidden outputs, zero past each sequence's length."""
    hs = cell.hidden(states)
    return hs if mask is None else jnp.where(mask[..., None], hs, 0)


def unroll(cell, params, xs, h0=None, lengths=None, *, reverse=False, unroll=1):
    """Run a cell over a sequence.

    Args:
      cell: a name in ``jax_bptt.CELLS`` or a ``Cell``.
      params: the cell's params (``init_model(...)["cell"]``).
      xs: ``(T, B, D)``, or ``(T, D)`` for a single sequence.
      h0: initial state (leaves ``(B, H)``), default zeros.
      lengths: ``(B,)`` valid lengths in ``[0, T]``, default all ``T``.
      reverse: scan from the last step to the first.
      unroll: steps per loop iteration passed to ``lax.scan`` (trades compile time for speed).

    Returns:
      ``(hs, final_state)``: ``hs`` is ``(T, B, H)`` (zero past each length), ``final_state`` the
      state at each sequence's end (with ``reverse``, after step 0).

    Example:
      >>> params = init_model(jax.random.key(0), "gru", 3, 8, 2)
      >>> hs, h_T = unroll("gru", params["cell"], jnp.ones((5, 4, 3)))
      >>> hs.shape, h_T.shape
      ((5, 4, 8), (4, 8))
    """
    cell = get_cell(cell)
    batch = check_inputs(cell, params, xs, h0, lengths)
    mask = length_mask(batch.lengths, batch.xs.shape[0])
    final, (states, _) = scan_states(
        cell, params, project_inputs(params, batch.xs), batch.h0, mask, reverse, unroll
    )
    return unbatched_outputs(masked_hidden(cell, states, mask), final, batch.batched)


def unbatched_outputs(hs, final, batched: bool):
    """Drop the batch axis ``check_inputs`` added to a single ``(T, D)`` sequence."""
    if batched:
        return hs, final
    return hs[:, 0], jax.tree_util.tree_map(lambda a: a[0], final)
