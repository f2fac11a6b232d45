"""The fast BPTT path: plain ``jax.grad`` runs the hand-written reverse scan.

``unroll_fast`` is ``unroll`` wrapped in a ``jax.custom_vjp``. Its forward is one GEMM for the
input projection of all steps (``project_inputs``) followed by the recurrence (``scan_states``,
which keeps each step's state and residuals); its backward is the hand-written reverse scan
(``backward_deltas``), which carries only ``d state``, followed by one GEMM per weight gradient
and one for ``d xs`` (``cell_grads``). Users differentiate their own loss with ``jax.grad``; the
gradient w.r.t. params, ``xs`` and ``h0`` is exact, including the final state's cotangent.
``jax.jvp`` (forward mode) is not available through a ``custom_vjp``. On CPU the backward runs
in chunks of ``chunk_length`` steps (``default_chunk_length``): a chunk's reverse scan, then its
weight-gradient GEMMs while its ``d xp`` is still in cache, carrying ``d state`` to the next chunk.

``unroll_checkpointed`` trades compute for memory on long sequences: the forward keeps only the
state at each segment boundary (``ceil(T / K)`` of them, ``K = ceil(sqrt(T))`` by default); the
backward is a reverse scan over segments that recomputes one segment's forward from its boundary
state and runs the hand-written backward on it. ``T`` not divisible by ``K`` is padded with
masked steps, which freeze the state and pass ``d state`` through, so the result is exact. Its
outputs ``hs`` are still ``(T, B, H)``; ``bptt_checkpointed`` goes further and also forms the
readout and loss segment by segment, so its temporary memory is ``O(sqrt(T))``.

The two recurrences are a swappable ``Backend`` (default ``"xla"``: ``lax.scan``): any pair of
functions with the signatures of ``jax_bptt.unroll.scan_states`` and
``jax_bptt.bptt.backward_deltas`` can be registered with ``register_backend`` and picked with
``backend=`` (e.g. Pallas GPU kernels). ``backend="pallas"`` uses ``jax_bptt.pallas_rnn``'s fused
kernels; ``backend="auto"`` picks them where they fit on a GPU and the XLA scan elsewhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt.bptt import _STATIC, Gradients, _with_checks, backward_deltas, cell_grads
from jax_bptt.cells import get_cell, project_inputs
from jax_bptt.losses import sequence_loss, term_weights
from jax_bptt.model import readout
from jax_bptt.unroll import length_mask, masked_hidden, scan_states, unbatched_outputs
from jax_bptt.validation import check_inputs, check_model_params

# --------------------------------------------------------------------------------------------
# Backends


class Backend(NamedTuple):
    """The two recurrences of the fast path.

    Attributes:
      scan_states: ``(cell, params, xp, h0, mask=None, reverse=False, unroll=1)
        -> (final_state, (states, residuals))``, as ``jax_bptt.unroll.scan_states``.
      backward_deltas: ``(cell, params, h0, mask, states, residuals, d_hs, d_final, *, reverse,
        unroll) -> Deltas``, as ``jax_bptt.bptt.backward_deltas``.
      default_unroll: platform (``"cpu"``, ``"gpu"``, ``"tpu"``) -> the scan unroll used when
        the caller passes ``unroll=None``; platforms not listed get 1.
    """

    scan_states: Callable
    backward_deltas: Callable
    default_unroll: Mapping[str, int]


# cpu: the best k in {1, 2, 4, 8, 16} for the fast path in experiments/bench.py's --quick grid
# (experiments/results/bench_cpu.txt). gpu/tpu: NOT measured yet (no accelerator was available);
# 8 is a placeholder that amortises the per-iteration loop overhead, to be replaced by a GPU run.
XLA_DEFAULT_UNROLL = {"cpu": 1, "gpu": 8, "tpu": 8}

BACKENDS: dict[str, Backend] = {
    "xla": Backend(scan_states, backward_deltas, XLA_DEFAULT_UNROLL),
}


def register_backend(
    name: str,
    scan_states_fn: Callable,
    backward_deltas_fn: Callable,
    default_unroll: Mapping[str, int] | None = None,
) -> None:
    """Make ``backend=name`` available. Register before first use: compiled functions are cached
    by backend name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty str, got {name!r}")
    for arg, fn in (("scan_states_fn", scan_states_fn), ("backward_deltas_fn", backward_deltas_fn)):
        if not callable(fn):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    BACKENDS[name] = Backend(scan_states_fn, backward_deltas_fn, dict(default_unroll or {}))


def check_backend(backend: str) -> str:
    if backend == "pallas" and backend not in BACKENDS:
        import jax_bptt.pallas_rnn  # noqa: F401  (registers "pallas" on import)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


def choose_backend(backend: str, cell, params, xs) -> str:
    """Resolve ``backend="auto"``: the fused Pallas kernels where ``pallas_rnn.choose_backend``
    says they fit (GPU, float32/bfloat16, power-of-2 hidden sizes), the XLA scan elsewhere.

    The default stays ``"xla"`` until the GPU crossover is measured (see pallas_rnn).
    """
    if backend != "auto":
        return check_backend(backend)
    from jax_bptt import pallas_rnn

    shape = jnp.shape(xs)  # (T, B, D) or (T, D); bad shapes are rejected by the caller's checks
    num_steps, batch_size = shape[0], (shape[1] if len(shape) == 3 else 1)
    hidden_size = params["W_hh"].shape[0]
    return check_backend(
        pallas_rnn.choose_backend(batch_size, hidden_size, num_steps, get_cell(cell), xs.dtype)
    )


def resolve_unroll(unroll: int | bool | None, backend: str = "xla", platform: str | None = None):
    """The scan unroll to use: ``unroll`` itself (an int >= 1, or True for a full unroll), or for
    None the backend's default on ``platform`` (default: ``jax.default_backend()``)."""
    check_backend(backend)
    if unroll is None:
        platform = jax.default_backend() if platform is None else platform
        return int(BACKENDS[backend].default_unroll.get(platform, 1))
    if isinstance(unroll, bool):
        return unroll
    if not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be None, True or an int >= 1, got {unroll!r}")
    return unroll


# The fast path's backward runs the reverse scan and the weight-gradient GEMMs chunk by chunk where
# the platform has an entry: a chunk's ``d xp`` (chunk_length, B, G) is then still in cache when
# its GEMMs read it. cpu: 2 MiB per chunk (a sweep of 0.5-8 MiB put the best at 1-3 MiB). Against
# one chunk (``experiments/results/bench_cpu.txt``, fast vs fast_one_chunk): up to 10% faster and
# 22-36% less temporary memory where the ``(T, B, G)`` buffer exceeds 2 MiB, within +-5% elsewhere.
# gpu/tpu: not listed, so one chunk: there the single large GEMMs are the point. Under data
# parallelism XLA all-reduces the chunk loop's replicated gradient carry once per chunk (once in
# all for one chunk); ``CHUNK_BYTES.pop("cpu")`` before tracing keeps one chunk on a CPU mesh.
CHUNK_BYTES = {"cpu": 2 * 2**20}


def default_chunk_length(
    num_steps: int, batch_size: int, gate_width: int, itemsize: int, platform: str | None = None
) -> int:
    """The largest power of two ``K`` with ``K * B * G * itemsize <= CHUNK_BYTES[platform]``,
    or ``T`` (one chunk) where the platform has no entry or ``K >= T``."""
    platform = jax.default_backend() if platform is None else platform
    budget = CHUNK_BYTES.get(platform)
    if budget is None or num_steps == 0:
        return max(num_steps, 1)
    per_step = max(1, batch_size * gate_width * itemsize)
    chunk = 1 << max(0, (budget // per_step).bit_length() - 1)
    return min(chunk, num_steps)


def check_chunk_length(chunk_length: int | None) -> None:
    if chunk_length is None:
        return
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"chunk_length must be None or an int >= 1, got {chunk_length!r}")


def resolve_chunk_length(chunk_length: int | None, params, xs) -> int:
    """``chunk_length`` itself (clipped to ``[1, T]``), or for None the platform's default for
    the validated, batched ``xs (T, B, D)`` and cell ``params``."""
    check_chunk_length(chunk_length)
    num_steps, batch_size = xs.shape[:2]
    if chunk_length is None:
        gate_width = params["W_hh"].shape[-1]
        return default_chunk_length(num_steps, batch_size, gate_width, xs.dtype.itemsize)
    return max(1, min(chunk_length, num_steps))


def default_segment_length(num_steps: int) -> int:
    """``ceil(sqrt(T))``: about ``2 sqrt(T)`` stored states in all (boundaries + one segment)."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def _resolve_segment_length(segment_length: int | None, num_steps: int) -> int:
    if segment_length is None:
        return default_segment_length(num_steps)
    if (
        isinstance(segment_length, bool)
        or not isinstance(segment_length, int)
        or segment_length < 1
    ):
        raise ValueError(f"segment_length must be None or an int >= 1, got {segment_length!r}")
    return max(1, min(segment_length, num_steps))  # a segment longer than T would only pad


# --------------------------------------------------------------------------------------------
# unroll_fast: custom_vjp whose backward is the hand-written reverse scan


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _fast_unroll(cell, backend, reverse, unroll, chunk_length, params, xs, h0, lengths):
    """``(hs, final_state)`` on validated, batched inputs: ``xs (t b d)``, ``lengths (b,)``/None.

    ``chunk_length`` (resolved, >= 1) only changes how the backward is scheduled."""
    return _fast_fwd(cell, backend, reverse, unroll, chunk_length, params, xs, h0, lengths)[0]


def _fast_fwd(cell, backend, reverse, unroll, chunk_length, params, xs, h0, lengths):
    del chunk_length
    mask = length_mask(lengths, xs.shape[0])
    xp = project_inputs(params, xs)  # (t b g): one GEMM for every step
    final, (states, residuals) = BACKENDS[backend].scan_states(
        cell, params, xp, h0, mask, reverse, unroll
    )
    saved = (params, xs, h0, lengths, states, residuals)
    return (masked_hidden(cell, states, mask), final), saved


def _fast_bwd(cell, backend, reverse, unroll, chunk_length, saved, cotangents):
    params, xs, h0, lengths, states, residuals = saved
    d_hs, d_final = cotangents
    mask = length_mask(lengths, xs.shape[0])

    def backward(d_state, before, xs_k, mask_k, states_k, residuals_k, d_hs_k):
        """One chunk: the reverse scan from ``d_state``, then its weight-gradient GEMMs."""
        deltas = BACKENDS[backend].backward_deltas(
            cell, params, before, mask_k, states_k, residuals_k, d_hs_k, d_state,
            reverse=reverse, unroll=unroll,
        )  # fmt: skip
        d_params, d_xs_k = cell_grads(cell, params, xs_k, deltas)
        return deltas.d_h0, d_params, d_xs_k

    per_step = (xs, mask, states, residuals, d_hs)
    if chunk_length >= xs.shape[0]:
        d_h0, d_params, d_xs = backward(d_final, h0, *per_step)
    else:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        d_h0, d_params, d_xs = _in_chunks(
            backward, chunk_length, reverse, h0, (d_final, zeros), per_step
        )
    return d_params, d_xs, d_h0, None  # lengths are integers: no cotangent


def _in_chunks(backward, chunk_length: int, reverse: bool, h0, carry, per_step):
    """Run ``backward`` over ``chunk_length``-step chunks in the backward's order, carrying
    ``(d state, summed weight gradients)`` from ``carry``: the same sums as one chunk, in a
    different order. ``T = S * K + R``: a ``lax.scan`` over the S full chunks, and the R-step rest
    on its own (first when the backward runs from the end, last when it runs from step 0)."""
    tree_map = jax.tree_util.tree_map
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
    d_xs = d_xs.reshape(split, *d_xs.shape[2:])
    if has_rest and reverse:  # the backward runs from step 0: the rest last
        carry, d_xs_rest = body(carry, rest)
    if has_rest:
        d_xs = jnp.concatenate([d_xs, d_xs_rest])
    d_state, d_params = carry
    return d_state, d_params, d_xs


_fast_unroll.defvjp(_fast_fwd, _fast_bwd)


# --------------------------------------------------------------------------------------------
# unroll_checkpointed: boundary states only; each segment's forward recomputed in the backward


def _split_segments(a, num_segments: int, segment_length: int):
    """``(t ...) -> (s k ...)``, zero-padded at the end to ``s * k`` steps."""
    pad = num_segments * segment_length - a.shape[0]
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(num_segments, segment_length, *a.shape[1:])


def _merge_segments(a, num_steps: int):
    """``(s k ...) -> (t ...)``, dropping the padding."""
    return a.reshape(-1, *a.shape[2:])[:num_steps]


def _segments(xs, lengths, segment_length: int):
    """``xs (s k b d)`` and the mask ``(s k b)`` that also switches the padding steps off."""
    num_steps, batch_size = xs.shape[:2]
    num_segments = -(-num_steps // segment_length)
    padded = num_segments * segment_length
    if lengths is None and padded > num_steps:
        lengths = jnp.full((batch_size,), num_steps)
    mask = length_mask(lengths, padded)  # past a length (so on every padding step): frozen
    if mask is not None:
        mask = mask.reshape(num_segments, segment_length, batch_size)
    return _split_segments(xs, num_segments, segment_length), mask, num_segments


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _checkpointed_unroll(cell, backend, reverse, unroll, segment_length, params, xs, h0, lengths):
    """``_fast_unroll`` that saves only segment-boundary states (``segment_length`` resolved)."""
    return _checkpointed_fwd(
        cell, backend, reverse, unroll, segment_length, params, xs, h0, lengths
    )[0]


def _checkpointed_fwd(cell, backend, reverse, unroll, segment_length, params, xs, h0, lengths):
    xs_seg, mask_seg, _ = _segments(xs, lengths, segment_length)
    run_states = BACKENDS[backend].scan_states

    def forward_segment(state, inputs):
        xs_k, mask_k = inputs
        xp = project_inputs(params, xs_k)  # per segment, so no (t b g) buffer is ever live
        final, (states, _) = run_states(cell, params, xp, state, mask_k, reverse, unroll)
        return final, (state, masked_hidden(cell, states, mask_k))

    final, (boundaries, hs) = jax.lax.scan(forward_segment, h0, (xs_seg, mask_seg), reverse=reverse)
    return (_merge_segments(hs, xs.shape[0]), final), (params, xs, lengths, boundaries)


def _checkpointed_bwd(cell, backend, reverse, unroll, segment_length, saved, cotangents):
    params, xs, lengths, boundaries = saved
    d_hs, d_final = cotangents
    xs_seg, mask_seg, num_segments = _segments(xs, lengths, segment_length)
    d_hs_seg = _split_segments(d_hs, num_segments, segment_length)
    impl = BACKENDS[backend]

    def backward_segment(carry, inputs):
        d_state, d_params = carry
        xs_k, mask_k, state0, d_hs_k = inputs
        xp = project_inputs(params, xs_k)
        _, (states, residuals) = impl.scan_states(cell, params, xp, state0, mask_k, reverse, unroll)
        deltas = impl.backward_deltas(
            cell, params, state0, mask_k, states, residuals, d_hs_k, d_state,
            reverse=reverse, unroll=unroll,
        )  # fmt: skip
        d_params_k, d_xs_k = cell_grads(cell, params, xs_k, deltas)
        d_params = jax.tree_util.tree_map(jnp.add, d_params, d_params_k)
        return (deltas.d_h0, d_params), d_xs_k

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (d_h0, d_params), d_xs = jax.lax.scan(
        backward_segment,
        (d_final, zeros),
        (xs_seg, mask_seg, boundaries, d_hs_seg),
        reverse=not reverse,
    )
    return d_params, _merge_segments(d_xs, xs.shape[0]), d_h0, None


_checkpointed_unroll.defvjp(_checkpointed_fwd, _checkpointed_bwd)


# --------------------------------------------------------------------------------------------
# Public unrolls (the API of jax_bptt.unroll.unroll)


def unroll_fast(
    cell,
    params,
    xs,
    h0=None,
    lengths=None,
    *,
    reverse=False,
    unroll=None,
    backend="xla",
    chunk_length=None,
):
    """``jax_bptt.unroll.unroll`` whose gradient (``jax.grad``/``jax.vjp``) is the hand-written
    reverse scan: same arguments, returns ``(hs (T, B, H), final_state)``.

    ``unroll=None`` picks the backend's default for the current platform (``resolve_unroll``);
    ``backend`` names an entry of ``BACKENDS``. ``chunk_length``: the backward runs its reverse
    scan and weight-gradient GEMMs this many steps at a time (the same sums in another order);
    None picks the platform's default (``default_chunk_length``: one chunk except on CPU).

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 3, 8, 2)["cell"]
      >>> loss = lambda p, xs: unroll_fast("lstm", p, xs)[0].sum()
      >>> jax.grad(loss)(params, jnp.ones((5, 4, 3)))["W_hh"].shape
      (8, 32)
    """
    backend = choose_backend(backend, cell, params, xs)
    unroll = resolve_unroll(unroll, backend)
    cell = get_cell(cell)
    batch = check_inputs(cell, params, xs, h0, lengths)
    chunk_length = resolve_chunk_length(chunk_length, params, batch.xs)
    hs, final = _fast_unroll(
        cell, backend, bool(reverse), unroll, chunk_length,
        params, batch.xs, batch.h0, batch.lengths,
    )  # fmt: skip
    return unbatched_outputs(hs, final, batch.batched)


def unroll_checkpointed(
    cell,
    params,
    xs,
    h0=None,
    lengths=None,
    *,
    reverse=False,
    unroll=None,
    segment_length=None,
    backend="xla",
):
    """``unroll_fast`` that stores only the states at segment boundaries and recomputes each
    segment's forward during the backward pass (``segment_length`` default ``ceil(sqrt(T))``).

    Returns ``(hs (T, B, H), final_state)`` like ``unroll``. The outputs ``hs`` are still
    ``(T, B, H)``; what is no longer stored are the per-step states, residuals and the
    ``(T, B, G)`` input projection (one GEMM per segment instead of one overall).
    """
    backend = choose_backend(backend, cell, params, xs)
    unroll = resolve_unroll(unroll, backend)
    cell = get_cell(cell)
    batch = check_inputs(cell, params, xs, h0, lengths)
    segment_length = _resolve_segment_length(segment_length, batch.xs.shape[0])
    hs, final = _checkpointed_unroll(
        cell, backend, bool(reverse), unroll, segment_length,
        params, batch.xs, batch.h0, batch.lengths,
    )  # fmt: skip
    return unbatched_outputs(hs, final, batch.batched)


# --------------------------------------------------------------------------------------------
# bptt_fast / bptt_checkpointed: the Gradients API of bptt_auto


def _loss_through(unroll_core, params, h0, xs, targets, lengths, *, loss, placement, reduction):
    """The model loss (readout + ``sequence_loss``) over hidden outputs from ``unroll_core``."""
    hs, _ = unroll_core(params["cell"], xs, h0, lengths)
    ys = readout(params["readout"], hs)
    return sequence_loss(
        ys, targets, loss=loss, placement=placement, reduction=reduction, lengths=lengths
    )


def _gradients(unroll_core, params, h0, xs, targets, lengths, **loss_kw) -> Gradients:
    value, (d_params, d_h0, d_xs) = jax.value_and_grad(
        functools.partial(_loss_through, unroll_core, **loss_kw), argnums=(0, 1, 2)
    )(params, h0, xs, targets, lengths)
    return Gradients(value, d_params, d_h0, d_xs)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "backend", "chunk_length"))
def _fast_core(
    params, h0, xs, targets, lengths, *, cell, loss, placement, reduction, unroll, backend,
    chunk_length,
):  # fmt: skip
    core = functools.partial(_fast_unroll, cell, backend, False, unroll, chunk_length)
    loss_kw = dict(loss=loss, placement=placement, reduction=reduction)
    return _gradients(core, params, h0, xs, targets, lengths, **loss_kw)


def _segmented_loss(
    params, h0, xs, targets, lengths, *, cell, loss, placement, reduction, unroll, backend,
    segment_length,
):  # fmt: skip
    """The model loss of ``_loss_through``, formed segment by segment under ``jax.checkpoint``.

    The readout and the loss terms of a segment are computed (and, in the backward, recomputed)
    with its recurrence, so nothing of size T but the inputs and their gradient is stored: the
    backward is a reverse scan over segments that recomputes a segment from its boundary state and
    runs ``_fast_unroll``'s hand-written backward on it. Each segment's loss is the ``"sum"``
    reduction over its own steps (lengths made local: ``length - start``, which ``length_mask``
    and ``term_weights`` read correctly also when negative or beyond the segment); ``"mean"`` then
    divides by the number of counted terms, as ``jax_bptt.losses`` defines it.
    """
    num_steps, batch_size = xs.shape[:2]
    num_segments = -(-num_steps // segment_length)
    padded = num_segments * segment_length > num_steps
    per_step = placement == "per_step"
    if lengths is None and padded:  # the padding steps must be masked
        lengths = jnp.full((batch_size,), num_steps)
    inputs = (
        _split_segments(xs, num_segments, segment_length),
        _split_segments(targets, num_segments, segment_length) if per_step else None,
        jnp.arange(num_segments) * segment_length,
    )

    @jax.checkpoint
    def segment(state, inputs):
        xs_k, targets_k, start = inputs
        local = None if lengths is None else lengths - start
        hs, final = _fast_unroll(
            cell, backend, False, unroll, segment_length, params["cell"], xs_k, state, local
        )  # one chunk: the segment is short already
        ys = readout(params["readout"], hs)
        value = sequence_loss(
            ys, targets_k if per_step else targets,
            loss=loss, placement=placement, reduction="sum", lengths=local,
        )  # fmt: skip
        return final, value

    _, values = jax.lax.scan(segment, h0, inputs)
    total = values.sum()
    if reduction == "sum":
        return total
    count = term_weights(placement, num_steps, batch_size, lengths, total.dtype).sum()
    return total / jnp.maximum(count, 1.0)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "backend", "segment_length"))
def _checkpointed_core(
    params, h0, xs, targets, lengths, *, cell, loss, placement, reduction, unroll, backend,
    segment_length,
):  # fmt: skip
    segment_length = _resolve_segment_length(segment_length, xs.shape[0])
    value, (d_params, d_h0, d_xs) = jax.value_and_grad(
        functools.partial(
            _segmented_loss,
            cell=cell,
            loss=loss,
            placement=placement,
            reduction=reduction,
            unroll=unroll,
            backend=backend,
            segment_length=segment_length,
        ),  # fmt: skip
        argnums=(0, 1, 2),
    )(params, h0, xs, targets, lengths)
    return Gradients(value, d_params, d_h0, d_xs)


def bptt_fast(
    params,
    xs,
    targets,
    *,
    cell,
    loss="mse",
    placement="per_step",
    reduction="mean",
    lengths=None,
    h0=None,
    unroll=None,
    backend="xla",
    chunk_length=None,
) -> Gradients:
    """Loss and gradients (API of ``bptt_auto``) by ``jax.value_and_grad`` through
    ``unroll_fast``. ``unroll=None``, ``chunk_length=None``: this platform's defaults."""
    check_model_params(params)
    check_chunk_length(chunk_length)
    backend = choose_backend(backend, cell, params["cell"], xs)
    unroll = resolve_unroll(unroll, backend)

    def core(params, h0, xs, targets, lengths, **static):
        # Resolved on the validated xs, outside the jit: the compiled core is keyed on the int.
        resolved = resolve_chunk_length(chunk_length, params["cell"], xs)
        return _fast_core(
            params, h0, xs, targets, lengths, backend=backend, chunk_length=resolved, **static
        )

    return _with_checks(core)(
        params, xs, targets, cell=cell, loss=loss, placement=placement, reduction=reduction,
        lengths=lengths, h0=h0, unroll=unroll,
    )  # fmt: skip


def bptt_checkpointed(
    params,
    xs,
    targets,
    *,
    cell,
    loss="mse",
    placement="per_step",
    reduction="mean",
    lengths=None,
    h0=None,
    unroll=None,
    segment_length=None,
    backend="xla",
) -> Gradients:
    """Loss and gradients (API of ``bptt_auto``) with memory ``O(sqrt(T))`` instead of ``O(T)``.

    The sequence is cut into segments of ``segment_length`` steps (default ``ceil(sqrt(T))``;
    ``T`` need not be a multiple). The forward keeps only each segment's initial state; the
    backward recomputes one segment at a time (recurrence, readout, loss) and runs the
    hand-written backward on it. Costs one extra forward pass. For a loss of your own, use
    ``unroll_checkpointed`` (its outputs ``hs`` are ``(T, B, H)``, so less is saved).
    """
    check_model_params(params)
    backend = choose_backend(backend, cell, params["cell"], xs)
    unroll = resolve_unroll(unroll, backend)
    if segment_length is not None:
        _resolve_segment_length(segment_length, 1)  # reject bad values before any work
    core = functools.partial(_checkpointed_core, backend=backend, segment_length=segment_length)
    return _with_checks(core)(
        params, xs, targets, cell=cell, loss=loss, placement=placement, reduction=reduction,
        lengths=lengths, h0=h0, unroll=unroll,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------


def compiled_temp_bytes(fn: Callable, *args) -> int | None:
    """Bytes of temporary buffers XLA allocates for ``jax.jit(fn)(*args)`` (not counting
    arguments and outputs), or None when the backend does not report a memory analysis."""
    try:
        analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    temp = getattr(analysis, "temp_size_in_bytes", None)
    return None if temp is None else int(temp)
