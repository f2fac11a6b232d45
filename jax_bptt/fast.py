"""The fast path: ``jax.grad`` runs the hand-written reverse scan (one recurrence, cell level).

``fast_scan`` is the recurrence wrapped in a ``jax.custom_vjp``. Its forward is one GEMM for the
input projection of all steps (``project_inputs``) followed by the backend's ``scan_states``,
which keeps each step's state and saved values; its backward is the backend's
``backward_deltas``, which carries only ``d state``, followed by one GEMM per weight gradient and
one for ``d xs`` (``cell_grads``). The gradient w.r.t. params, ``xs`` and ``h0`` is exact,
including the final state's cotangent. ``jax.jvp`` (forward mode) is not available through a
``custom_vjp``. With ``chunk_length < T`` the backward runs chunk by chunk: a chunk's reverse
scan, then its weight-gradient GEMMs while its ``d xp`` is still in cache, carrying ``d state`` to
the next chunk (the same sums in another order). With ``all_states`` both return every step's
whole state (leaves ``(t b h)``, zero past each length) instead of ``hs``, and their backward takes
a cotangent for each of them. ``options.compute_dtype`` sets the GEMMs' operand dtype
(``jax_bptt.scan``).

``checkpointed_scan`` trades compute for memory on long sequences: the forward keeps only the
state at each segment boundary (``ceil(T / K)`` of them); the backward is a reverse scan over
segments that recomputes one segment's forward from its boundary state and runs the hand-written
backward on it. ``T`` not divisible by ``K`` is padded with masked steps, which freeze the state
and pass ``d state`` through, so the result is exact. Its outputs ``hs`` are still ``(T, B, H)``.

Both take an optional ``restart (t b)`` and the state ``h_reset`` it restarts from
(``jax_bptt.scan``); ``h_reset`` gets its own gradient (the sum over restarts), also when a chunk
or segment starts from another state.

Both take validated, batched inputs and resolved ``ScanOptions`` (``jax_bptt.backends``); the
model (``jax_bptt.model``) calls them once per layer and direction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_bptt.backends import get_backend
from jax_bptt.cells import project_inputs
from jax_bptt.scan import cell_grads, length_mask, masked_hidden

# --------------------------------------------------------------------------------------------
# fast_scan: custom_vjp whose backward is the hand-written reverse scan


def backend_kwargs(options, restart=None, h_reset=None) -> dict:
    """A backend's optional keywords, only those in use (so a backend of your own that takes
    neither restarts nor a compute dtype runs as before)."""
    kwargs = {} if restart is None else {"restart": restart, "h_reset": h_reset}
    if options.compute_dtype is not None:
        kwargs["compute_dtype"] = options.compute_dtype
    return kwargs


def _recurrence(cell, options, reverse, params, h_reset):
    """``(forward, backward)`` of one recurrence, or of a chunk or segment of one, on the backend
    ``options.backend`` (module docstring): both custom VJPs below are made of these two."""
    impl = get_backend(options.backend)

    def forward(before, xs, mask, restart):
        """``(final_state, (states, saved))`` from the state ``before``."""
        xp = project_inputs(params, xs, options.compute_dtype)  # one GEMM for all of xs's steps
        return impl.scan_states(
            cell, params, xp, before, mask, reverse, options.unroll,
            **backend_kwargs(options, restart, h_reset),
        )  # fmt: skip

    def backward(d_state, before, xs, mask, states, saved, d_hs, restart):
        """``(d before, (d_params, d_h_reset), d_xs)`` from the forward's values and the final
        state's cotangent ``d_state`` (``d_h_reset`` None without restarts)."""
        deltas = impl.backward_deltas(
            cell, params, before, mask, states, saved, d_hs, d_state,
            reverse=reverse, unroll=options.unroll, **backend_kwargs(options, restart, h_reset),
        )  # fmt: skip
        d_params, d_xs = cell_grads(cell, params, xs, deltas, options.compute_dtype)
        return deltas.d_h0, (d_params, deltas.d_reset), d_xs

    return forward, backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def fast_scan(
    cell, options, reverse, all_states, params, xs, h0, lengths, restart=None, h_reset=None
):
    """``(hs (t b h), final_state)`` of one recurrence on validated, batched inputs ``xs (t b d)``,
    ``lengths (b,)`` or None, ``restart (t b)`` or None; ``options`` resolved (``chunk_length``
    only schedules the backward). With ``all_states``, every step's state pytree in place of
    ``hs``. Its VJP is the hand-written reverse scan."""
    args = (params, xs, h0, lengths, restart, h_reset)
    return _fast_fwd(cell, options, reverse, all_states, *args)[0]


def _fast_fwd(
    cell, options, reverse, all_states, params, xs, h0, lengths, restart=None, h_reset=None
):
    mask = length_mask(lengths, xs.shape[0])
    forward, _ = _recurrence(cell, options, reverse, params, h_reset)
    final, (states, saved) = forward(h0, xs, mask, restart)
    residuals = (params, xs, h0, lengths, states, saved, restart, h_reset)
    return (masked_hidden(cell, states, mask, all_states), final), residuals


def _fast_bwd(cell, options, reverse, all_states, residuals, cotangents):
    params, xs, h0, lengths, states, saved, restart, h_reset = residuals
    d_hs, d_final = cotangents
    mask = length_mask(lengths, xs.shape[0])
    _, backward = _recurrence(cell, options, reverse, params, h_reset)
    per_step = (xs, mask, states, saved, d_hs, restart)
    if options.chunk_length >= xs.shape[0]:
        d_h0, (d_params, d_reset), d_xs = backward(d_final, h0, *per_step)
    else:
        zeros = jax.tree.map(jnp.zeros_like, (params, None if restart is None else h_reset))
        d_h0, (d_params, d_reset), d_xs = _in_chunks(
            backward, options.chunk_length, reverse, h0, (d_final, zeros), per_step
        )
    return d_params, d_xs, d_h0, None, None, d_reset  # lengths, restarts: integers, booleans


def _in_chunks(backward, chunk_length: int, reverse: bool, h0, carry, per_step):
    """Run ``backward`` over ``chunk_length``-step chunks in the backward's order, carrying
    ``(d state, summed weight gradients)`` from ``carry``: the same sums as one chunk, in a
    different order. ``T = S * K + R``: a ``lax.scan`` over the S full chunks, and the R-step rest
    on its own (first when the backward runs from the end, last when it runs from step 0)."""
    tree_map = jax.tree.map
    num_steps = per_step[0].shape[0]
    num_chunks = num_steps // chunk_length
    split = num_chunks * chunk_length
    states = per_step[2]
    # The state before each chunk's first step in the forward's order.
    k = chunk_length
    if reverse:  # chunk [a, b) starts at b - 1: state_b, or h0 for b = T
        boundaries = tree_map(
            lambda s0, s: jnp.concatenate([s, s0[None]])[k : split + 1 : k], h0, states
        )
        rest_before = h0
    else:  # chunk [a, b) starts at a: state_{a-1}, or h0 for a = 0
        boundaries = tree_map(
            lambda s0, s: jnp.concatenate([s0[None], s[k - 1 : split - 1 : k]]), h0, states
        )
        rest_before = tree_map(lambda s: s[split - 1], states)
    full = tree_map(lambda a: a[:split].reshape(num_chunks, chunk_length, *a.shape[1:]), per_step)
    rest = (rest_before, *tree_map(lambda a: a[split:], per_step))

    def body(carry, inputs):
        d_state, d_params = carry
        d_state, d_params_k, d_xs_k = backward(d_state, *inputs)
        return (d_state, tree_map(jnp.add, d_params, d_params_k)), d_xs_k

    has_rest = split < num_steps
    if has_rest and not reverse:  # the backward runs from the end: the rest first
        carry, d_xs_rest = body(carry, rest)
    carry, d_xs = jax.lax.scan(body, carry, (boundaries, *full), reverse=not reverse)
    d_xs = tree_map(lambda a: a.reshape(split, *a.shape[2:]), d_xs)  # None for token ids
    if has_rest and reverse:  # the backward runs from step 0: the rest last
        carry, d_xs_rest = body(carry, rest)
    if has_rest:
        d_xs = tree_map(lambda a, b: jnp.concatenate([a, b]), d_xs, d_xs_rest)
    d_state, d_params = carry
    return d_state, d_params, d_xs


fast_scan.defvjp(_fast_fwd, _fast_bwd)


# --------------------------------------------------------------------------------------------
# checkpointed_scan: boundary states only; each segment's forward recomputed in the backward


def split_segments(a, num_segments: int, segment_length: int):
    """``(t ...) -> (s k ...)``, zero-padded at the end to ``s * k`` steps."""
    pad = num_segments * segment_length - a.shape[0]
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(num_segments, segment_length, *a.shape[1:])


def merge_segments(a, num_steps: int):
    """``(s k ...) -> (t ...)``, dropping the padding."""
    return a.reshape(-1, *a.shape[2:])[:num_steps]


def _segments(lengths, segment_length: int, *per_step):
    """The mask ``(s k b)``, which also switches the padding steps off, followed by each of
    ``per_step`` (``xs`` first; pytrees of ``(t b ...)`` arrays, or None) split into segments
    with ``split_segments`` (so padding never restarts)."""
    num_steps, batch_size = per_step[0].shape[:2]
    num_segments = -(-num_steps // segment_length)
    padded = num_segments * segment_length
    if lengths is None and padded > num_steps:
        lengths = jnp.full((batch_size,), num_steps)
    mask = length_mask(lengths, padded)  # past a length (so on every padding step): frozen
    if mask is not None:
        mask = mask.reshape(num_segments, segment_length, batch_size)
    return mask, *jax.tree.map(lambda a: split_segments(a, num_segments, segment_length), per_step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def checkpointed_scan(
    cell, options, reverse, all_states, params, xs, h0, lengths, restart=None, h_reset=None
):
    """``fast_scan`` that saves only the states at boundaries of ``options.segment_length``-step
    segments and recomputes each segment's forward in the backward."""
    args = (params, xs, h0, lengths, restart, h_reset)
    return _checkpointed_fwd(cell, options, reverse, all_states, *args)[0]


def _checkpointed_fwd(
    cell, options, reverse, all_states, params, xs, h0, lengths, restart=None, h_reset=None
):
    mask_seg, xs_seg, restart_seg = _segments(lengths, options.segment_length, xs, restart)
    forward, _ = _recurrence(cell, options, reverse, params, h_reset)

    def forward_segment(state, inputs):
        xs_k, mask_k, restart_k = inputs
        # projected per segment, so no (t b g) buffer is ever live
        final, (states, _) = forward(state, xs_k, mask_k, restart_k)
        return final, (state, masked_hidden(cell, states, mask_k, all_states))

    final, (boundaries, hs) = jax.lax.scan(
        forward_segment, h0, (xs_seg, mask_seg, restart_seg), reverse=reverse
    )
    hs = jax.tree.map(lambda a: merge_segments(a, xs.shape[0]), hs)
    return (hs, final), (params, xs, lengths, boundaries, restart, h_reset)


def _checkpointed_bwd(cell, options, reverse, all_states, residuals, cotangents):
    params, xs, lengths, boundaries, restart, h_reset = residuals
    d_hs, d_final = cotangents
    mask_seg, xs_seg, restart_seg, d_hs_seg = _segments(
        lengths, options.segment_length, xs, restart, d_hs
    )
    forward, backward = _recurrence(cell, options, reverse, params, h_reset)

    def backward_segment(carry, inputs):
        """One segment: its forward recomputed from its boundary state, then its backward."""
        d_state, d_params = carry
        xs_k, mask_k, state0, d_hs_k, restart_k = inputs
        _, (states, saved) = forward(state0, xs_k, mask_k, restart_k)
        per_step = (xs_k, mask_k, states, saved, d_hs_k, restart_k)
        d_state, d_params_k, d_xs_k = backward(d_state, state0, *per_step)
        return (d_state, jax.tree.map(jnp.add, d_params, d_params_k)), d_xs_k

    zeros = jax.tree.map(jnp.zeros_like, (params, None if restart is None else h_reset))
    (d_h0, (d_params, d_reset)), d_xs = jax.lax.scan(
        backward_segment,
        (d_final, zeros),
        (xs_seg, mask_seg, boundaries, d_hs_seg, restart_seg),
        reverse=not reverse,
    )
    d_xs = jax.tree.map(lambda a: merge_segments(a, xs.shape[0]), d_xs)  # None: ids
    return d_params, d_xs, d_h0, None, None, d_reset


checkpointed_scan.defvjp(_checkpointed_fwd, _checkpointed_bwd)
