"""Backpropagation through time of the model, four ways that must give the same answer.

- ``"auto"``: ``jax.value_and_grad`` through the ``lax.scan`` of every layer: the reference.
- ``"manual"``: hand-written BPTT: the forward keeps each recurrence's states, the readout and
  loss are differentiated by hand (``jax_bptt.losses``), and ``model.stack_backward`` runs the
  reverse scans from the top layer down; every weight gradient is a single GEMM over all steps.
- ``"fast"``: ``jax.value_and_grad`` with every recurrence run by ``fast_scan``, whose VJP is the
  hand-written reverse scan; autodiff handles only what lies between (readout, concatenation,
  residual add, dropout).
- ``"parallel"``: every layer's recurrence solved for all steps at once by Newton over
  associative scans (``jax_bptt.deer``), with an exact adjoint; meant for long sequences on
  parallel hardware, slower than the sequential modes on a CPU
  (``experiments/results/bench_parallel_cpu.txt``).
- ``"checkpointed"``: memory ``O(sqrt T)``: the forward keeps only segment-boundary states. For a
  unidirectional stack the whole model (every layer, readout and loss) runs segment by segment
  under ``jax.checkpoint``; a bidirectional layer recomputes its segments per direction.

Every mode takes ``resets`` (segment starts, ``jax_bptt.model``): the hand-written backward stops
at a restart and adds its gradient to ``d h0``; DEER zeroes that step's Jacobian.

All return ``Gradients(loss, params, h0, xs)``: the gradient pytree of the model params plus the
gradients with respect to the initial states and the inputs (what truncated BPTT needs). Each
validates its inputs once and then runs one ``jax.jit``-compiled core; they also work inside a
caller's ``jax.jit``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt.cells import is_token_ids
from jax_bptt.fast import split_segments
from jax_bptt.losses import Loss, check_loss, sequence_loss, sequence_loss_grad, term_weights
from jax_bptt.model import (
    last_step_weights,
    loss_features,
    prepare,
    readout,
    run_auto,
    run_checkpointed,
    run_fast,
    run_parallel,
    stack_backward,
    stack_forward,
    stack_loss,
    stack_loss_and_finals,
    to_time_major,
    unbatch,
)
from jax_bptt.scan import sum_outer
from jax_bptt.validation import check_batch_targets, check_choice


class Gradients(NamedTuple):
    """Loss value and its gradients. ``params`` and ``h0`` have the layouts of the inputs."""

    loss: jax.Array
    params: dict
    h0: Any  # one {"fwd", "bwd"?} state dict per layer; leaves (b h), or (h,) unbatched
    xs: jax.Array | None  # (t b d), or (t d) unbatched; None for token ids


_STATIC = ("cell", "loss", "residual", "options")


# Each core returns ``(Gradients, final states)``: the final states cost nothing extra, and
# truncated BPTT carries them into the next window. ``resets (t b)`` are segment starts, where
# every layer restarts from ``h_reset`` (None: from ``h0``, whose gradient then includes every
# restart's; truncated BPTT restarts from the stream's initial state instead of the carry).


def _value_and_grad(loss_fn, params, h0, xs, targets, lengths, drops, resets, h_reset):
    """``loss_fn -> (loss, finals)`` differentiated: ``(Gradients, finals)``."""
    argnums = (0, 1) if is_token_ids(xs) else (0, 1, 2)  # token ids have no gradient
    (value, finals), (d_params, d_h0, *d_xs) = jax.value_and_grad(
        loss_fn, argnums=argnums, has_aux=True
    )(params, h0, xs, targets, lengths, drops, resets, h_reset)
    return Gradients(value, d_params, d_h0, d_xs[0] if d_xs else None), finals


def _autodiff_core(run):
    """A jitted core: ``jax.value_and_grad`` of the stack whose recurrences ``run`` evaluates."""

    @functools.partial(jax.jit, static_argnames=_STATIC)
    def core(params, h0, xs, targets, lengths, drops, resets=None, h_reset=None, **static):
        loss_fn = functools.partial(stack_loss_and_finals, run=run, **static)
        return _value_and_grad(loss_fn, params, h0, xs, targets, lengths, drops, resets, h_reset)

    return core


@functools.partial(jax.jit, static_argnames=_STATIC)
def _manual_core(
    params, h0, xs, targets, lengths, drops, resets=None, h_reset=None, *, cell, loss, residual,
    options,
):  # fmt: skip
    layers, ro = params["layers"], params["readout"]
    restarts = dict(resets=resets, h_reset=h_reset)
    outputs, finals, tapes = stack_forward(
        cell, options, layers, h0, xs, lengths, drops, residual, **restarts
    )

    # Readout and loss: dL/dy by hand, then one GEMM each for the readout weights and dL/d features.
    forward_size = layers[-1]["fwd"]["W_hh"].shape[0]
    features, loss_lengths = loss_features(outputs, lengths, loss.placement, forward_size)
    ys = readout(ro, features)
    value = sequence_loss(ys, targets, loss, loss_lengths)
    d_ys = sequence_loss_grad(ys, targets, loss, loss_lengths)
    d_readout = {"W_hy": sum_outer(features, d_ys), "b_y": d_ys.sum((0, 1))}
    d_features = d_ys @ ro["W_hy"].T
    if loss.placement == "per_step":
        d_out = d_features
    elif outputs.shape[0] == 0:
        d_out = jnp.zeros_like(outputs)
    else:  # scatter the summary's gradient back to the steps it was read from
        d_summary = d_features[0]
        picked = last_step_weights(lengths, *outputs.shape[:2], outputs.dtype)
        d_out = jnp.einsum("tb,bf->tbf", picked, d_summary[:, :forward_size])
        d_out = jnp.concatenate([d_out, jnp.zeros_like(outputs[..., forward_size:])], axis=-1)
        d_out = d_out.at[0, :, forward_size:].add(d_summary[:, forward_size:])

    d_layers, d_h0, d_xs = stack_backward(
        cell, options, layers, h0, tapes, lengths, drops, residual, d_out, None, **restarts
    )
    return Gradients(value, {"layers": d_layers, "readout": d_readout}, d_h0, d_xs), finals


def _segmented_loss(
    params, h0, xs, targets, lengths, drops, resets=None, h_reset=None, *, cell, loss, residual,
    options,
):  # fmt: skip
    """``stack_loss_and_finals`` of a unidirectional stack, formed segment by segment under
    ``jax.checkpoint``.

    A segment's layers, readout and loss terms are computed (and, in the backward, recomputed)
    together from the segment's boundary states, so nothing of size T but the inputs (and dropout
    masks) and their gradients is stored: the backward is a reverse scan over segments, each
    running ``fast_scan``'s hand-written backward per layer. Each segment's loss is the ``"sum"``
    reduction over its own steps (lengths made local: ``length - start``, which ``length_mask``
    and ``term_weights`` read correctly also when negative or beyond the segment); ``"mean"`` then
    divides by the number of counted terms, as ``jax_bptt.losses`` defines it. Restarts inside a
    segment return to ``h_reset`` (``h0`` when None), not to the segment's boundary state.
    """
    num_steps, batch_size = xs.shape[:2]
    segment_length = options.segment_length
    num_segments = -(-num_steps // segment_length)
    per_step = loss.placement == "per_step"
    padded = num_segments * segment_length > num_steps
    if lengths is None and (padded or not per_step):
        # the padding must be masked, and a segment finds the last step only by its local length
        lengths = jnp.full((batch_size,), num_steps)
    split = functools.partial(
        split_segments, num_segments=num_segments, segment_length=segment_length
    )
    inputs = (
        split(xs),
        split(targets) if per_step else None,
        jax.tree.map(split, drops),
        jnp.arange(num_segments) * segment_length,
        None if resets is None else split(resets),
    )
    h_reset = h0 if h_reset is None else h_reset
    one_chunk = options._replace(chunk_length=segment_length)  # the segment is short already
    sum_loss = loss._replace(reduction="sum")

    @jax.checkpoint
    def segment(states, inputs):
        xs_k, targets_k, drops_k, start, resets_k = inputs
        local = None if lengths is None else lengths - start
        outputs, finals, _ = stack_forward(
            cell, one_chunk, params["layers"], states, xs_k, local, drops_k, residual, run_fast,
            resets_k, h_reset,
        )  # fmt: skip
        ys = readout(params["readout"], outputs)
        return finals, sequence_loss(ys, targets_k if per_step else targets, sum_loss, local)

    finals, values = jax.lax.scan(segment, h0, inputs)
    total = values.sum()
    if loss.reduction == "sum":
        return total, finals
    count = term_weights(loss.placement, num_steps, batch_size, lengths, total.dtype).sum()
    return total / jnp.maximum(count, 1.0), finals


@functools.partial(jax.jit, static_argnames=_STATIC)
def _checkpointed_core(
    params, h0, xs, targets, lengths, drops, resets=None, h_reset=None, **static
):
    if "bwd" in params["layers"][0]:  # a backward direction needs the whole future: per layer
        loss_fn = functools.partial(stack_loss_and_finals, run=run_checkpointed, **static)
    else:
        loss_fn = functools.partial(_segmented_loss, **static)
    return _value_and_grad(loss_fn, params, h0, xs, targets, lengths, drops, resets, h_reset)


CORES = {
    "auto": _autodiff_core(run_auto),
    "manual": _manual_core,
    "fast": _autodiff_core(run_fast),
    "checkpointed": _checkpointed_core,
    "parallel": _autodiff_core(run_parallel),
}
# The four exact sequential modes; "parallel" (Newton over associative scans, jax_bptt.deer)
# is exact at convergence and falls back to the sequential scan otherwise.
BPTT_MODES = ("auto", "manual", "fast", "checkpointed")


def bptt(
    params,
    xs,
    targets,
    *,
    cell,
    mode: str = "manual",
    loss: Loss | str = "mse",
    lengths=None,
    h0=None,
    dropout: float = 0.0,
    key=None,
    residual=False,
    options=None,
    time_major: bool = True,
    resets=None,
    output_dropout: float = 0.0,
) -> Gradients:
    """Loss and gradients of the model by BPTT.

    Args:
      params: ``init_model(...)`` pytree, any depth.
      xs: ``(T, B, D)`` inputs (or ``(T, D)`` unbatched), in the params' float dtype.
      targets: mse: ``(T, B, O)`` per step / ``(B, O)`` last step; cross_entropy: integer
        ``(T, B)`` / ``(B,)`` (``jax_bptt.losses``).
      cell: the model's cell (a name in ``jax_bptt.CELLS`` or a ``Cell``).
      mode: ``"auto"``, ``"manual"``, ``"fast"``, ``"checkpointed"`` (module docstring) or
        ``"parallel"`` (parallel in time, ``jax_bptt.deer``; float inputs).
      loss: a ``Loss`` (kind, placement, reduction); a string is ``Loss(kind)``.
      lengths: ``(B,)`` valid lengths; h0: initial states (default zeros).
      dropout, key, residual: as for ``jax_bptt.unroll``; the same key gives the same masks in
        every mode.
      options: ``ScanOptions`` (scan unroll, backend, chunk and segment lengths).
      time_major: False for batch-major ``xs (B, T, D)`` and per-step targets ``(B, T, ...)``
        (the returned ``xs`` gradient is batch-major too).
      resets: bool ``(T, B)`` segment starts, as for ``jax_bptt.unroll``; the ``h0`` gradient
        then sums every restart's.
      output_dropout: probability of zeroing a unit of the top layer's outputs before the
        readout (training, any depth); needs ``key``.

    Returns:
      ``Gradients(loss, params, h0, xs)``.

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 3, 16, 2, num_layers=2)
      >>> xs, ys = jnp.ones((20, 4, 3)), jnp.zeros((20, 4, 2))
      >>> manual = bptt(params, xs, ys, cell="lstm", mode="manual")
      >>> auto = bptt(params, xs, ys, cell="lstm", mode="auto")
      >>> compare_gradients(manual, auto).ok
      True
    """
    check_choice("mode", mode, tuple(CORES))
    loss, run, targets = _prepare_with_targets(
        params, xs, targets, loss, cell=cell, lengths=lengths, h0=h0, dropout=dropout, key=key,
        residual=residual, options=options, time_major=time_major, resets=resets,
        output_dropout=output_dropout,
    )  # fmt: skip
    grads, _ = CORES[mode](
        params, run.batch.h0, run.batch.xs, targets, run.batch.lengths, run.drops,
        run.batch.resets, cell=run.cell, loss=loss, residual=residual, options=run.options,
    )  # fmt: skip
    if run.batch.batched:
        return grads._replace(xs=to_time_major(grads.xs, time_major, 2))
    return grads._replace(
        h0=unbatch(grads.h0, False), xs=None if grads.xs is None else grads.xs[:, 0]
    )


def _prepare_with_targets(params, xs, targets, loss, *, time_major, **kwargs):
    """``(loss, model.prepare(...), targets)``, the targets checked against the loss and brought
    to the batched, time-major layout (per-step ``(B, T, ...)`` transposed when batch-major)."""
    loss = check_loss(loss)
    run = prepare(params, xs, time_major=time_major, **kwargs)
    if not time_major and loss.placement == "per_step" and hasattr(targets, "ndim"):
        targets = to_time_major(targets, False, 3 if loss.kind == "mse" else 2)
    return loss, run, check_batch_targets(targets, loss, run.shape, run.batch)


def bptt_auto(
    params, xs, targets, *, cell, loss="mse", lengths=None, h0=None, dropout=0.0, key=None,
    residual=False, options=None, time_major=True, resets=None,
    output_dropout=0.0,
) -> Gradients:  # fmt: skip
    """``bptt(..., mode="auto")``: ``jax.value_and_grad`` through the scans (the reference)."""
    return bptt(
        params, xs, targets, cell=cell, mode="auto", loss=loss, lengths=lengths, h0=h0,
        dropout=dropout, key=key, residual=residual, options=options, time_major=time_major,
        resets=resets, output_dropout=output_dropout,
    )  # fmt: skip


def bptt_manual(
    params, xs, targets, *, cell, loss="mse", lengths=None, h0=None, dropout=0.0, key=None,
    residual=False, options=None, time_major=True, resets=None,
    output_dropout=0.0,
) -> Gradients:  # fmt: skip
    """``bptt(..., mode="manual")``: hand-written BPTT, layer by layer from the top."""
    return bptt(
        params, xs, targets, cell=cell, mode="manual", loss=loss, lengths=lengths, h0=h0,
        dropout=dropout, key=key, residual=residual, options=options, time_major=time_major,
        resets=resets, output_dropout=output_dropout,
    )  # fmt: skip


def bptt_fast(
    params, xs, targets, *, cell, loss="mse", lengths=None, h0=None, dropout=0.0, key=None,
    residual=False, options=None, time_major=True, resets=None,
    output_dropout=0.0,
) -> Gradients:  # fmt: skip
    """``bptt(..., mode="fast")``: ``jax.grad`` whose recurrences run the hand-written reverse
    scan (``fast_scan``); ``options`` picks the unroll, backend and backward chunk length."""
    return bptt(
        params, xs, targets, cell=cell, mode="fast", loss=loss, lengths=lengths, h0=h0,
        dropout=dropout, key=key, residual=residual, options=options, time_major=time_major,
        resets=resets, output_dropout=output_dropout,
    )  # fmt: skip


def bptt_checkpointed(
    params, xs, targets, *, cell, loss="mse", lengths=None, h0=None, dropout=0.0, key=None,
    residual=False, options=None, time_major=True, resets=None,
    output_dropout=0.0,
) -> Gradients:  # fmt: skip
    """``bptt(..., mode="checkpointed")``: memory ``O(sqrt T)`` for one extra forward; the
    segment length is ``options.segment_length`` (default ``ceil(sqrt(T))``)."""
    return bptt(
        params, xs, targets, cell=cell, mode="checkpointed", loss=loss, lengths=lengths, h0=h0,
        dropout=dropout, key=key, residual=residual, options=options, time_major=time_major,
        resets=resets, output_dropout=output_dropout,
    )  # fmt: skip


def model_loss(
    params, xs, targets, *, cell, loss="mse", lengths=None, h0=None, residual=False, options=None,
    time_major=True, resets=None,
) -> jax.Array:  # fmt: skip
    """The scalar loss of the model without gradients (evaluation: no dropout); arguments as for
    ``bptt``."""
    loss, run, targets = _prepare_with_targets(
        params, xs, targets, loss, cell=cell, lengths=lengths, h0=h0, dropout=0.0, key=None,
        residual=residual, options=options, time_major=time_major, resets=resets,
    )  # fmt: skip
    return _loss_core(
        params, run.batch.h0, run.batch.xs, targets, run.batch.lengths, run.batch.resets,
        cell=run.cell, loss=loss, residual=residual, options=run.options,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss_core(params, h0, xs, targets, lengths, resets, **static):
    return stack_loss(params, h0, xs, targets, lengths, None, resets, **static)
