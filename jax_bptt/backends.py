"""How a recurrence runs: the backend registry and the scan options, with per-platform defaults.

A ``Backend`` is the pair of recurrences the fast path calls: a forward with the signature of
``jax_bptt.scan.scan_states`` and a backward with that of ``jax_bptt.scan.backward_deltas``.
``"xla"`` (``lax.scan``) is built in; ``"pallas"`` (fused GPU kernels, ``jax_bptt.pallas_rnn``)
is imported the first time it is asked for; ``register_backend`` adds a user's own. This module
imports nothing above ``scan``, so any module may import it.

``ScanOptions`` collects the knobs that change how a recurrence is scheduled: the ``lax.scan``
unroll, the backend, the fast backward's chunk length and the checkpointed segment length, which
change the result only by summation order; and ``compute_dtype``, the one knob that changes what
is computed: the GEMMs' operand precision (bf16 mixed precision). ``None`` means "this platform's
default" (``PLATFORM_DEFAULTS``), resolved once per call by ``resolve_options`` before anything is
traced.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt.cells import Cell
from jax_bptt.scan import backward_deltas, scan_states


class Backend(NamedTuple):
    """The two recurrences of the fast path.

    Attributes:
      scan_states: ``(cell, params, xp, h0, mask=None, reverse=False, unroll=1)
        -> (final_state, (states, saved))``, as ``jax_bptt.scan.scan_states``.
      backward_deltas: ``(cell, params, h0, mask, states, saved, d_hs, d_final, *, reverse,
        unroll) -> Deltas``, as ``jax_bptt.scan.backward_deltas``.

    With resets inside a sequence (and only then) both are also called with the keywords
    ``restart`` and ``h_reset``, as the ``jax_bptt.scan`` functions take them.
    Both are also passed ``compute_dtype=`` when ``ScanOptions.compute_dtype`` is set (the
    built-in ``"xla"`` backend takes it; ``"pallas"`` refuses mixed precision). Under
    ``unroll(..., return_states=True)`` the backward's ``d_hs`` is a state pytree (a cotangent
    for every step's whole state); ``"pallas"`` takes that only for ``h``-only states.
    """

    scan_states: Callable
    backward_deltas: Callable


class PlatformDefaults(NamedTuple):
    """What ``None`` in ``ScanOptions`` means on one platform."""

    unroll: int  # lax.scan unroll of both recurrences
    chunk_bytes: int | None  # bytes of d xp per backward chunk; None: the backward in one chunk


# cpu: unroll 1 was the best k in {1, 2, 4, 8, 16} for the fast path in experiments/bench.py's
# --quick grid; a chunk of 2 MiB of d xp keeps the chunk's weight-gradient GEMMs in cache (a sweep
# of 0.5-8 MiB put the best at 1-3 MiB; up to 10% faster and 22-36% less temporary memory than one
# chunk where the (T, B, G) buffer exceeds 2 MiB, experiments/results/bench_cpu.txt).
# gpu/tpu: one chunk (there the single large GEMMs are the point); unroll 8 is NOT measured yet
# (no accelerator was available): it amortises the per-iteration loop overhead.
PLATFORM_DEFAULTS = {
    "cpu": PlatformDefaults(unroll=1, chunk_bytes=2 * 2**20),
    "gpu": PlatformDefaults(unroll=8, chunk_bytes=None),
    "tpu": PlatformDefaults(unroll=8, chunk_bytes=None),
}


class ScanOptions(NamedTuple):
    """How the recurrences are scheduled (the results are the same up to summation order), and
    in what precision their GEMMs run (``compute_dtype``, which does change the result).

    Attributes:
      unroll: steps per ``lax.scan`` iteration (an int >= 1, capped at T, or True for all);
        None: the platform's default.
      backend: a name in ``backend_names()`` or ``"auto"`` (Pallas where its kernels fit on a
        GPU, XLA elsewhere).
      chunk_length: the fast backward runs its reverse scan and weight-gradient GEMMs this many
        steps at a time, carrying ``d state``; None: about ``chunk_bytes`` of ``d xp`` per chunk.
      chunk_bytes: the budget behind ``chunk_length=None``; None: the platform's default (on a CPU
        mesh, ``chunk_bytes=0`` keeps one chunk: XLA all-reduces the chunk loop's gradient carry
        once per chunk).
      segment_length: checkpointed mode's segment (``ceil(sqrt(T))`` when None).
      compute_dtype: a float dtype (name), e.g. ``"bfloat16"``: the operands of the input
        projection, the recurrent ``h @ W_hh``, ``d hp @ W_hh^T`` and the weight-gradient and
        ``d xs`` GEMMs are cast to it, accumulating in the params' dtype; pointwise math, states,
        gradients and their sums over time stay in the params' dtype, as do the params and the
        returned gradients. None (or the params' dtype): everything in the params' dtype. Every
        mode but ``"parallel"``; the ``"xla"`` backend only.
    """

    unroll: int | bool | None = None
    backend: str = "xla"
    chunk_length: int | None = None
    chunk_bytes: int | None = None
    segment_length: int | None = None
    compute_dtype: str | None = None


@functools.cache  # built once, on first use: every trace then gets the same kernels
def _pallas() -> Backend:
    from jax_bptt import pallas_rnn  # imported on demand: Pallas is heavy and GPU-only in use

    kernels = pallas_rnn.make_pallas_backend(with_d_states=False)  # the fast path never reads them
    return Backend(kernels.scan_states, kernels.backward_deltas)


# the built-in backends' makers (Pallas's kernels are built on first use)
_BUILTIN = {"xla": lambda: Backend(scan_states, backward_deltas), "pallas": _pallas}
_REGISTERED: dict[str, Backend] = {}


def backend_names() -> tuple[str, ...]:
    return (*_BUILTIN, *_REGISTERED)


def register_backend(name: str, backend: Backend) -> None:
    """Make ``ScanOptions(backend=name)`` available for a ``Backend`` of your own."""
    if not isinstance(name, str) or not name or name in (*_BUILTIN, "auto"):
        raise ValueError(f"backend name must be a new non-empty str, got {name!r}")
    if not isinstance(backend, Backend) or not all(map(callable, backend)):
        raise TypeError(f"backend must be a Backend of two callables, got {backend!r}")
    _REGISTERED[name] = backend


def get_backend(name: str) -> Backend:
    if name in _BUILTIN:
        return _BUILTIN[name]()
    if name in _REGISTERED:
        return _REGISTERED[name]
    raise ValueError(f"backend must be 'auto' or one of {backend_names()}, got {name!r}")


def _int_or_none(name: str, value, minimum: int = 1) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ):
        raise ValueError(f"ScanOptions.{name} must be None or an int >= {minimum}, got {value!r}")


def check_options(options) -> ScanOptions:
    """Validate ``options`` (None: all defaults) before any work."""
    if options is None:
        return ScanOptions()
    if not isinstance(options, ScanOptions):
        raise TypeError(f"options must be a jax_bptt.ScanOptions, got {type(options).__name__}")
    if options.unroll is not True:
        _int_or_none("unroll", options.unroll)
    _int_or_none("chunk_length", options.chunk_length)
    _int_or_none("segment_length", options.segment_length)
    _int_or_none("chunk_bytes", options.chunk_bytes, minimum=0)
    if options.compute_dtype is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(options.compute_dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(
                "ScanOptions.compute_dtype must be None or a float dtype such as 'bfloat16', "
                f"got {options.compute_dtype!r}"
            )
    if options.backend != "auto":
        get_backend(options.backend)
    return options


def default_chunk_length(
    num_steps: int, batch_size: int, gate_width: int, itemsize: int, chunk_bytes: int | None
) -> int:
    """The largest power of two ``K`` with ``K * B * G * itemsize <= chunk_bytes``, or ``T`` (one
    chunk) for ``chunk_bytes`` None or 0, or where ``K >= T``."""
    if not chunk_bytes or num_steps == 0:
        return max(num_steps, 1)
    per_step = max(1, batch_size * gate_width * itemsize)
    chunk = 1 << max(0, (chunk_bytes // per_step).bit_length() - 1)
    return min(chunk, num_steps)


def default_segment_length(num_steps: int) -> int:
    """``ceil(sqrt(T))``: about ``2 sqrt(T)`` stored states in all (boundaries + one segment)."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def resolve_options(
    options: ScanOptions,
    cell: Cell,
    xs_shape: tuple[int, ...],
    hidden_size: int,
    dtype,
    platform: str | None = None,
    resets: bool = False,
) -> ScanOptions:
    """Every ``None`` replaced by this platform's value for a problem ``xs (T, B, D)`` (with
    ``resets``: restarts inside the sequence); the result is static (hashable ints and strings)
    and keys the compiled cores."""
    platform = jax.default_backend() if platform is None else platform
    defaults = PLATFORM_DEFAULTS.get(platform, PlatformDefaults(1, None))
    num_steps, batch_size = xs_shape[0], xs_shape[1]
    backend = options.backend
    if backend == "auto":
        from jax_bptt import pallas_rnn

        backend = pallas_rnn.preferred_backend(batch_size, hidden_size, num_steps, cell, dtype)
        backend = "xla" if resets else backend
    if backend == "pallas" and resets:
        raise ValueError(
            "backend 'pallas' cannot run resets: its kernels have no restarts inside a sequence; "
            "use backend='xla' (or 'auto')"
        )
    compute_dtype = None  # None or the params' own dtype: nothing to cast
    if options.compute_dtype is not None and jnp.dtype(options.compute_dtype) != jnp.dtype(dtype):
        compute_dtype = jnp.dtype(options.compute_dtype).name
    if backend == "pallas" and compute_dtype is not None:
        if options.backend != "auto":
            raise ValueError(
                f"backend 'pallas' cannot run ScanOptions.compute_dtype={compute_dtype!r} (its "
                "kernels compute in the params' dtype); use backend='xla'"
            )
        backend = "xla"
    if backend == "pallas" and cell.pointwise_params:
        raise ValueError(
            f"backend 'pallas' cannot run cell {cell.name!r}: its kernels take no gradients of "
            f"pointwise params {cell.pointwise_params}; use backend='xla'"
        )
    unroll = defaults.unroll if options.unroll is None else options.unroll
    if unroll is not True:  # an unroll beyond T only costs compile time and memory
        unroll = max(1, min(unroll, num_steps))
    chunk_bytes = defaults.chunk_bytes if options.chunk_bytes is None else options.chunk_bytes
    if options.chunk_length is None:
        gate_width = cell.num_gates * hidden_size
        itemsize = jnp.dtype(dtype).itemsize
        chunk_length = default_chunk_length(
            num_steps, batch_size, gate_width, itemsize, chunk_bytes
        )
    else:
        chunk_length = max(1, min(options.chunk_length, num_steps))
    if options.segment_length is None:
        segment_length = default_segment_length(num_steps)
    else:  # a segment longer than T would only pad
        segment_length = max(1, min(options.segment_length, num_steps))
    return ScanOptions(unroll, backend, chunk_length, chunk_bytes, segment_length, compute_dtype)
