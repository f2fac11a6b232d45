"""The model: a stack of recurrent layers (1..N, uni- or bidirectional) and a linear readout.

One params layout at every depth (a single-layer model is a stack of one)::

    {"layers": [{"fwd": cell_params, "bwd": cell_params}, ...],   # "bwd" only if bidirectional
     "readout": {"W_hy": (dirs*h o), "b_y": (o,)}}

Layer 0 reads ``xs (t b d)``; layer ``l`` reads layer ``l-1``'s output ``(t b dirs*h)``. A layer's
output is ``[fwd hs, bwd hs]`` concatenated over features (zero past each length; the backward
direction is the same recurrence with ``reverse=True`` and the same length mask, so a padded
sequence's backward pass starts at its last valid step, as with PyTorch's packed sequences), plus
the layer's input when the layer has a residual connection. Between layers (after every layer but
the last) comes inverted dropout, as PyTorch's ``dropout`` argument: kept units are scaled by
``1 / (1 - dropout)``; the masks are drawn from an explicit ``key``. ``output_dropout`` drops
units of the top layer's output, what the readout reads (regularizes a one-layer model too).

``residual``: ``False``; ``True`` on every layer (layer 0 then needs ``input_size == dirs*h``);
``"except_first"`` on layers ``1..L-1``, whose input and output sizes always match.

States (``h0`` and the final states) are lists with one ``{"fwd": state, "bwd": state}`` per
layer, each state as in ``jax_bptt.cells`` (leaves ``(b h)``). A backward direction's final state
is its state after step 0.

``resets (t b)`` bool marks segment starts: before such a step every layer's forward direction
restarts from ``h0``, and a backward direction restarts where the *next* step starts a segment
(``scan.restart_mask``), so a row packed with several sequences runs each on its own, in both
directions. No gradient crosses a restart; ``d h0`` sums the restarts' gradients.

``placement="last_step"`` (many-to-one) reads the readout off a summary of the top layer's output:
its forward half at ``t = length - 1`` and, when bidirectional, its backward half at ``t = 0``
(where the backward pass ends). Without residual connections that is PyTorch's
``concat(h_n[-2], h_n[-1])``. A length-0 sequence contributes no term.

Each layer and direction runs through one of ``RUNS`` (how its gradient is formed); with
``all_states`` a run returns every step's whole state (leaves ``(t b h)``, zero past each length)
in place of ``hs``, differentiable like ``hs``:

- ``"auto"``: ``scan_hidden``, differentiated by ``jax.grad`` (``run_scan`` is the same forward
  keeping the tape that the hand-written ``stack_backward`` reads);
- ``"fast"``: ``fast_scan``, whose VJP is the hand-written reverse scan;
- ``"checkpointed"``: ``checkpointed_scan``, which also recomputes segments in the backward;
- ``"parallel"``: ``deer_unroll``, all steps at once by Newton (``jax_bptt.deer``).

``stack_backward`` is the hand-written BPTT through the stack: from the top, ``dL/d outputs`` of a
layer is split per direction, ``backward_scan`` turns each into weight gradients and
``d inputs``, whose sum (plus the residual path) times the dropout mask is ``dL/d outputs`` of the
layer below.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_bptt.backends import ScanOptions, check_options, resolve_options
from jax_bptt.cells import Cell, get_cell, is_token_ids, project_inputs, uniform_init
from jax_bptt.deer import deer_unroll
from jax_bptt.fast import checkpointed_scan, fast_scan
from jax_bptt.losses import Loss, sequence_loss
from jax_bptt.scan import (
    backward_scan,
    length_mask,
    masked,
    masked_hidden,
    restart_mask,
    scan_hidden,
    scan_states,
)
from jax_bptt.validation import (
    DIRECTIONS,
    Batch,
    ModelShape,
    check_choice,
    check_inputs,
    check_positive_int,
    check_stack_options,
)

# --------------------------------------------------------------------------------------------
# Init


@functools.partial(jax.jit, static_argnums=tuple(range(1, 10)))
def _init(key, cell, input_size, hidden_size, output_size, num_layers, directions, dtype, *init):
    *layer_keys, k_readout = jax.random.split(key, num_layers * directions + 1)
    layers, layer_input = [], input_size
    for layer in range(num_layers):
        keys = layer_keys[layer * directions : (layer + 1) * directions]
        layers.append(
            {
                name: cell.init(k, layer_input, hidden_size, dtype, *init)
                for (name, _), k in zip(DIRECTIONS[:directions], keys, strict=True)
            }
        )
        layer_input = directions * hidden_size
    shapes = {"W_hy": (layer_input, output_size), "b_y": (output_size,)}
    readout = uniform_init(k_readout, shapes, layer_input, dtype)  # fan-in dirs*H
    return {"layers": layers, "readout": readout}


def init_model(
    key: jax.Array,
    cell: str | Cell,
    input_size: int,
    hidden_size: int,
    output_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dtype=jnp.float32,
    recurrent_init: str = "uniform",
    forget_bias: float | None = None,
) -> dict:
    """A stack of ``num_layers`` cells (two per layer if ``bidirectional``) and a readout, in one
    compiled call.

    Every cell and the readout get PyTorch's default ``U(-1/sqrt(H), 1/sqrt(H))`` (the readout's
    bound uses its fan-in ``dirs*H``).

    Args:
      cell: a name in ``jax_bptt.CELLS`` or a ``Cell``.
      recurrent_init: ``"uniform"`` (PyTorch), ``"orthogonal"`` or ``"identity"`` (IRNN: use with
        ``"elman_relu"``; the recurrent bias is then zero).
      forget_bias: LSTM only, a constant for the forget-gate bias (1.0 is the usual choice).

    Returns:
      ``{"layers": [{"fwd": ..., "bwd"?: ...}, ...], "readout": {"W_hy", "b_y"}}``.

    Example:
      >>> params = init_model(jax.random.key(0), "gru", 3, 8, 2, num_layers=2, bidirectional=True)
      >>> params["layers"][1]["bwd"]["W_xh"].shape, params["readout"]["W_hy"].shape
      ((16, 24), (16, 2))
    """
    for name, value in (
        ("input_size", input_size),
        ("hidden_size", hidden_size),
        ("output_size", output_size),
        ("num_layers", num_layers),
    ):
        check_positive_int(name, value)
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
    cell = get_cell(cell)
    check_choice("recurrent_init", recurrent_init, ("uniform", "orthogonal", "identity"))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}")
    if forget_bias is not None and cell.name != "lstm":
        raise ValueError(f"forget_bias applies to the lstm cell only, got cell={cell.name!r}")
    init = (recurrent_init,) if forget_bias is None else (recurrent_init, float(forget_bias))
    directions = 2 if bidirectional else 1
    return _init(
        key, cell, input_size, hidden_size, output_size, num_layers, directions, jnp.dtype(dtype),
        *init,
    )  # fmt: skip


def readout(params: dict, features: jax.Array) -> jax.Array:
    """``(..., f) -> (..., o)``: ``features @ W_hy + b_y``."""
    return features @ params["W_hy"] + params["b_y"]


# --------------------------------------------------------------------------------------------
# One direction of one layer, three ways to differentiate it


def run_auto(
    cell: Cell, options: ScanOptions, params, inputs, h0, lengths, reverse, all_states=False,
    restart=None, h_reset=None,
):  # fmt: skip
    """``(hs (t b h), final, None)`` by ``scan_hidden``, for ``jax.grad`` to differentiate."""
    mask = length_mask(lengths, inputs.shape[0])
    cd = options.compute_dtype
    # float inputs: one GEMM for every step; token ids: a row gather per step (``scan_hidden``)
    xp = inputs if is_token_ids(inputs) else project_inputs(params, inputs, cd)
    final, hs = scan_hidden(
        cell, params, xp, h0, mask, reverse, options.unroll, restart, h_reset,
        all_states=all_states, compute_dtype=cd,
    )  # fmt: skip
    return hs, final, None


def run_scan(
    cell: Cell, options: ScanOptions, params, inputs, h0, lengths, reverse, all_states=False,
    restart=None, h_reset=None,
):  # fmt: skip
    """``(hs (t b h), final, tape)`` by ``scan_states``: the tape ``(states, saved)`` is what
    ``backward_scan`` needs (the hand-written backward's forward)."""
    mask = length_mask(lengths, inputs.shape[0])
    cd = options.compute_dtype
    xp = project_inputs(params, inputs, cd)  # (t b g): one GEMM for every step
    final, tape = scan_states(
        cell, params, xp, h0, mask, reverse, options.unroll, restart, h_reset, compute_dtype=cd
    )
    return masked_hidden(cell, tape[0], mask, all_states), final, tape


def run_fast(
    cell: Cell, options: ScanOptions, params, inputs, h0, lengths, reverse, all_states=False,
    restart=None, h_reset=None, *, scan=fast_scan,
):  # fmt: skip
    """``fast_scan``: its VJP is the hand-written reverse scan (no tape outside it); with
    ``scan=checkpointed_scan`` (``run_checkpointed``) only segment boundaries are kept and each
    segment is recomputed in the backward."""
    hs, final = scan(
        cell, options, reverse, all_states, params, inputs, h0, lengths, restart, h_reset
    )
    return hs, final, None


run_checkpointed = functools.partial(run_fast, scan=checkpointed_scan)


def run_parallel(
    cell: Cell, options: ScanOptions, params, inputs, h0, lengths, reverse, all_states=False,
    restart=None, h_reset=None,
):  # fmt: skip
    """``deer_unroll``: all steps at once by Newton over associative scans (falling back to the
    sequential scan when it does not converge), with an exact adjoint (``jax_bptt.deer``)."""
    if options.compute_dtype is not None:
        raise ValueError(
            f"mode 'parallel' computes in the params' dtype: ScanOptions.compute_dtype="
            f"{options.compute_dtype!r} needs mode 'auto', 'manual', 'fast' or 'checkpointed'"
        )
    hs, final, _ = deer_unroll(
        cell,
        params,
        inputs,
        h0,
        lengths,
        reverse=reverse,
        restart=restart,
        h_reset=h_reset,
        all_states=all_states,
    )
    return hs, final, None


RUNS = {
    "auto": run_auto,
    "fast": run_fast,
    "checkpointed": run_checkpointed,
    "parallel": run_parallel,
}


# --------------------------------------------------------------------------------------------
# The stack, forward and backward


def has_residual(residual, layer: int) -> bool:
    return residual is True or (residual == "except_first" and layer > 0)


def _directions(layer: dict):
    return [(name, reverse) for name, reverse in DIRECTIONS if name in layer]


def inverted_dropout_mask(key, p: float, shape, dtype) -> jax.Array:
    """Entries 0 (probability ``p``) or ``1 / (1 - p)``, so the mask keeps expectations."""
    return jax.random.bernoulli(key, 1.0 - p, shape).astype(dtype) / (1 - p)


def dropout_masks(key, dropout: float, layers, xs, output_dropout: float = 0.0) -> list | None:
    """Inverted-dropout masks ``(t b f_l)`` for the outputs of every layer but the last (None
    for each when ``dropout == 0``), then, when ``output_dropout > 0``, one more for the top
    layer's outputs (what the readout reads).

    Entries are 0 or ``1 / (1 - p)``; one key per layer between layers, split from ``key``, and
    ``fold_in(key, num_layers)`` for the top (so adding it leaves the other masks as they were).
    Drawn outside the compiled cores, so every mode sees the same masks and none compiles the PRNG.
    """
    between = dropout > 0 and len(layers) > 1
    if not between and output_dropout == 0:
        return None
    dtype = layers[0]["fwd"]["W_hh"].dtype  # xs may be token ids

    def mask(k, p, features):
        if p == 0:  # output dropout alone: the layers in between keep every unit
            return None
        return inverted_dropout_mask(k, p, (*xs.shape[:2], features), dtype)

    keys = jax.random.split(key, len(layers) - 1) if len(layers) > 1 else []
    masks = [mask(k, dropout, _features(layer)) for k, layer in zip(keys, layers[:-1], strict=True)]
    if output_dropout > 0:
        top = jax.random.fold_in(key, len(layers))
        masks.append(mask(top, output_dropout, _features(layers[-1])))
    return masks


def _features(layer: dict) -> int:
    return sum(p["W_hh"].shape[0] for p in layer.values())


class LayerTape(NamedTuple):
    """What a layer's hand-written backward needs from its forward."""

    inputs: jax.Array  # (t b f_in), after the previous layer's dropout
    runs: dict  # direction -> run_scan's tape (None for the fast and checkpointed runs)
    states: dict | None = None  # direction -> every step's state, with all_states


def stack_forward(
    cell, options, layers, h0, xs, lengths, drops, residual, run=run_scan, resets=None,
    h_reset=None, *, all_states=False,
):  # fmt: skip
    """``(outputs (t b f), final states, tapes)`` of the whole stack; ``run`` (one of ``RUNS``) is
    called once per layer and direction. ``resets (t b)``: segment starts, where every layer
    restarts from ``h_reset`` (states like ``h0``; None: ``h0`` itself). With ``all_states`` each
    tape also holds its layer's states at every step (``LayerTape.states``)."""
    mask = length_mask(lengths, xs.shape[0])
    # Inputs past a length must not reach anything: a NaN there would make 0 * NaN in the weight
    # gradients (PyTorch's packed sequences never read padding either).
    inputs, finals, tapes = masked(mask, xs), [], []
    for i, layer in enumerate(layers):
        outs, runs, final, states = [], {}, {}, {}
        for name, reverse in _directions(layer):
            reset_to = None if resets is None else (h0 if h_reset is None else h_reset)[i][name]
            stacked, final[name], runs[name] = run(
                cell, options, layer[name], inputs, h0[i][name], lengths, reverse, all_states,
                restart_mask(resets, reverse), reset_to,
            )  # fmt: skip
            states[name] = stacked
            outs.append(cell.hidden(stacked) if all_states else stacked)
        out = jnp.concatenate(outs, axis=-1)
        if has_residual(residual, i):  # masked so outputs past a length stay zero
            out = out + masked(mask, inputs)
        tapes.append(LayerTape(inputs, runs, states if all_states else None))
        finals.append(final)
        if drops is not None and i < len(drops) and drops[i] is not None:  # top: output dropout
            out = out * drops[i]
        inputs = out
    return inputs, finals, tapes


def stack_backward(
    cell, options, layers, h0, tapes, lengths, drops, residual, d_outputs, d_finals, resets=None,
    h_reset=None,
):  # fmt: skip
    """Hand-written BPTT through the stack from ``dL/d outputs (t b f)`` and ``dL/d final states``
    (None: zeros): ``(d_layers, d_h0, d_xs)``, layer by layer from the top. With ``resets``,
    ``d_h0`` includes the gradient of every restart when ``h_reset`` is None (restarts from
    ``h0``), and excludes it when ``h_reset`` is a state of its own."""
    mask = length_mask(lengths, d_outputs.shape[0])
    d_layers, d_h0 = [None] * len(layers), [None] * len(layers)
    d_out = d_outputs
    if drops is not None and len(drops) == len(layers):  # output dropout on the top layer
        d_out = d_out * drops[-1]
    for i in reversed(range(len(layers))):
        layer, tape = layers[i], tapes[i]
        d_inputs = masked(mask, d_out) if has_residual(residual, i) else 0.0
        d_layers[i], d_h0[i], offset = {}, {}, 0
        for name, reverse in _directions(layer):
            p = layer[name]
            size = p["W_hh"].shape[0]
            states, saved = tape.runs[name]
            d_final = (
                jax.tree_util.tree_map(jnp.zeros_like, h0[i][name])
                if d_finals is None
                else d_finals[i][name]
            )
            d_layers[i][name], d_h0[i][name], d_x = backward_scan(
                cell, p, tape.inputs, h0[i][name], mask, states, saved,
                d_out[..., offset : offset + size], d_final, reverse=reverse,
                unroll=options.unroll, restart=restart_mask(resets, reverse),
                h_reset=None if h_reset is None else h_reset[i][name],
                compute_dtype=options.compute_dtype,
            )  # fmt: skip
            d_inputs = None if d_x is None else d_inputs + d_x  # token ids have no gradient
            offset += size
        d_out = (
            d_inputs if drops is None or i == 0 or drops[i - 1] is None else d_inputs * drops[i - 1]
        )
    return d_layers, d_h0, d_out


# --------------------------------------------------------------------------------------------
# Readout and loss


def last_step_weights(lengths, num_steps: int, batch_size: int, dtype) -> jax.Array:
    """``(t b)`` one-hot of ``t = max(length, 1) - 1`` (length 0 has no loss term anyway)."""
    last = num_steps - 1 if lengths is None else jnp.maximum(lengths, 1) - 1
    last = jnp.broadcast_to(last, (batch_size,))
    return (jnp.arange(num_steps)[:, None] == last[None, :]).astype(dtype)


def last_step_summary(outputs, lengths, forward_size: int) -> jax.Array:
    """``(t b f) -> (b f)``: the forward half at ``t = length - 1``, the rest at ``t = 0``.

    ``forward_size`` is the forward direction's hidden size (``f`` for a unidirectional stack).
    """
    num_steps, batch_size, features = outputs.shape
    if num_steps == 0:
        return jnp.zeros((batch_size, features), outputs.dtype)
    picked = last_step_weights(lengths, num_steps, batch_size, outputs.dtype)
    fwd = jnp.einsum("tb,tbf->bf", picked, outputs[..., :forward_size])
    return jnp.concatenate([fwd, outputs[0, :, forward_size:]], axis=-1)


def loss_features(outputs, lengths, placement: str, forward_size: int):
    """What the readout reads: all outputs (per step) or the summary as one step (last step),
    with the lengths ``sequence_loss`` needs for it."""
    if placement == "per_step":
        return outputs, lengths
    summary = last_step_summary(outputs, lengths, forward_size)[None]  # (1 b f)
    if outputs.shape[0] == 0:  # no step, no term
        return summary, jnp.zeros(outputs.shape[1], jnp.int32)
    return summary, None if lengths is None else jnp.minimum(lengths, 1)


def stack_loss_and_finals(
    params, h0, xs, targets, lengths, drops, resets=None, h_reset=None, *, cell, loss: Loss,
    residual, options, run=run_auto,
):  # fmt: skip
    """``(scalar loss, final states)`` on batched, validated inputs (what ``jax.grad`` sees)."""
    layers = params["layers"]
    outputs, finals, _ = stack_forward(
        cell, options, layers, h0, xs, lengths, drops, residual, run, resets, h_reset
    )
    forward_size = layers[-1]["fwd"]["W_hh"].shape[0]
    features, loss_lengths = loss_features(outputs, lengths, loss.placement, forward_size)
    value = sequence_loss(readout(params["readout"], features), targets, loss, loss_lengths)
    return value, finals


def stack_loss(params, h0, xs, targets, lengths, drops, resets=None, **static) -> jax.Array:
    """The scalar loss of ``stack_loss_and_finals``."""
    return stack_loss_and_finals(params, h0, xs, targets, lengths, drops, resets, **static)[0]


# --------------------------------------------------------------------------------------------
# Public: run the model


class Prepared(NamedTuple):
    """A model call's validated arguments: what every public function hands its compiled core."""

    cell: Cell
    shape: ModelShape
    batch: Batch
    drops: list | None
    options: ScanOptions


def to_time_major(values, time_major: bool, batched_ndim: int):
    """``(B, T, ...) -> (T, B, ...)`` for batch-major arrays (and back: the swap is its own
    inverse); ``values`` with fewer than ``batched_ndim`` axes have no batch axis to move."""
    if not isinstance(time_major, bool):
        raise TypeError(f"time_major must be a bool, got {time_major!r}")
    if time_major or values is None or getattr(values, "ndim", 0) < batched_ndim:
        return values
    return jnp.swapaxes(values, 0, 1)


def prepare(
    params, xs, *, cell, lengths, h0, dropout, key, residual, options, time_major=True,
    resets=None,
    output_dropout=0.0,
) -> Prepared:  # fmt: skip
    """Validate a model call once and resolve its options (outside any jit); batch-major ``xs``
    and ``resets`` (``time_major=False``) are brought to the time-major layout here."""
    cell = get_cell(cell)
    if hasattr(xs, "dtype"):
        xs = to_time_major(xs, time_major, 2 if is_token_ids(xs) else 3)
        resets = to_time_major(resets, time_major, 2)
    shape, batch = check_inputs(params, xs, cell=cell, lengths=lengths, h0=h0, resets=resets)
    check_stack_options(
        shape, dropout, key, residual, token_ids=is_token_ids(batch.xs),
        output_dropout=output_dropout,
    )  # fmt: skip
    options = resolve_options(
        check_options(options), cell, batch.xs.shape, shape.hidden_size, shape.dtype,
        resets=batch.resets is not None,
    )  # fmt: skip
    drops = dropout_masks(key, dropout, params["layers"], batch.xs, output_dropout)
    return Prepared(cell, shape, batch, drops, options)


def unbatch(tree, batched: bool):
    """Drop the leading batch axis that validation added to a single sequence's states."""
    return tree if batched else jax.tree_util.tree_map(lambda a: a[0], tree)


@functools.partial(
    jax.jit, static_argnames=("cell", "residual", "options", "mode", "return_states")
)
def _unroll_core(
    layers, h0, xs, lengths, drops, resets, *, cell, residual, options, mode, return_states
):
    outputs, finals, tapes = stack_forward(
        cell, options, layers, h0, xs, lengths, drops, residual, RUNS[mode], resets,
        all_states=return_states,
    )  # fmt: skip
    return outputs, finals, [tape.states for tape in tapes] if return_states else None


UNROLL_MODES = tuple(RUNS)


def unroll(
    params,
    xs,
    *,
    cell,
    h0=None,
    lengths=None,
    dropout: float = 0.0,
    key=None,
    residual=False,
    mode: str = "auto",
    options: ScanOptions | None = None,
    time_major: bool = True,
    resets=None,
    return_states: bool = False,
):
    """Run the model's layers over a sequence.

    Args:
      params: ``init_model(...)`` (only ``"layers"`` is used).
      xs: ``(T, B, D)``, or ``(T, D)`` for one sequence.
      cell: the model's cell, a name in ``jax_bptt.CELLS`` or a ``Cell``.
      h0: ``[{"fwd": state, "bwd"?: state}, ...]`` one per layer, default zeros.
      lengths: ``(B,)`` valid lengths in ``[0, T]``, default all ``T``.
      dropout: probability of zeroing a unit between layers (training); needs ``key``.
      key: PRNG key for the dropout masks.
      residual: ``False``, ``True`` or ``"except_first"`` (module docstring).
      mode: how ``jax.grad`` of a loss of the outputs is formed: ``"auto"`` (autodiff through
        ``lax.scan``), ``"fast"`` (the hand-written reverse scan), ``"checkpointed"`` (that,
        recomputing segments: memory ``O(sqrt T)`` per recurrence besides the outputs) or
        ``"parallel"`` (parallel in time, ``jax_bptt.deer``; float inputs).
      options: ``ScanOptions`` (scan unroll, backend, chunk and segment lengths, GEMM precision).
      time_major: False for batch-major ``xs (B, T, D)`` and outputs ``(B, T, dirs*H)``.
      resets: bool ``(T, B)`` (``(B, T)`` batch-major, ``(T,)`` unbatched): where set, every
        layer restarts from ``h0`` before that step, and no gradient crosses the boundary (a
        backward direction restarts at the end of each segment). Default: no restarts.
      return_states: also return every step's whole state (the LSTM's ``c_t`` too).

    Returns:
      ``(outputs, final_states)``: ``outputs (T, B, dirs*H)`` of the top layer (zero past each
      length), ``final_states`` like ``h0``. With ``return_states``, ``(outputs, final_states,
      states)``: ``states`` like ``h0`` with a leading time axis on every leaf, ``(T, B, H)``
      (``(B, T, H)`` batch-major, ``(T, H)`` for one sequence): layer ``l``'s state after step
      ``t`` in each direction (a backward direction's entry ``t`` is its state after reading step
      ``t``), zero where ``t >= length``. Differentiable in every mode.

    Example:
      >>> params = init_model(jax.random.key(0), "gru", 3, 8, 2, num_layers=2, bidirectional=True)
      >>> outputs, finals = unroll(params, jnp.ones((5, 4, 3)), cell="gru")
      >>> outputs.shape, finals[1]["bwd"].shape
      ((5, 4, 16), (4, 8))
    """
    check_choice("mode", mode, UNROLL_MODES)
    if not isinstance(return_states, bool):
        raise TypeError(f"return_states must be a bool, got {return_states!r}")
    run = prepare(
        params, xs, cell=cell, lengths=lengths, h0=h0, dropout=dropout, key=key,
        residual=residual, options=options, time_major=time_major, resets=resets,
    )  # fmt: skip
    state_leaves = len(jax.tree_util.tree_leaves(run.batch.h0[0]["fwd"]))
    hand_written = mode in ("fast", "checkpointed")  # the modes that run the backend's backward
    if return_states and hand_written and run.options.backend == "pallas" and state_leaves > 1:
        raise ValueError(
            f"return_states with backend 'pallas' needs an h-only state; cell {run.cell.name!r} "
            "carries more (its kernels take no cotangent for it): use backend='xla'"
        )
    outputs, finals, states = _unroll_core(
        params["layers"], run.batch.h0, run.batch.xs, run.batch.lengths, run.drops,
        run.batch.resets, cell=run.cell, residual=residual, options=run.options, mode=mode,
        return_states=return_states,
    )  # fmt: skip
    if run.batch.batched:
        outputs = to_time_major(outputs, time_major, 3)
        states = jax.tree_util.tree_map(lambda s: to_time_major(s, time_major, 3), states)
    else:  # the time axis stays first
        outputs, finals = outputs[:, 0], unbatch(finals, False)
        states = jax.tree_util.tree_map(lambda s: s[:, 0], states)
    return (outputs, finals, states) if return_states else (outputs, finals)


def predict(
    params, xs, *, cell, h0=None, lengths=None, residual=False, options=None, time_major=True,
    resets=None,
):  # fmt: skip
    """The readout at every step, ``(T, B, O)`` (``(T, O)`` unbatched, ``(B, T, O)`` batch-major):
    logits for cross-entropy, predictions for mse. No dropout (evaluation). ``resets`` as for
    ``unroll``."""
    outputs, _ = unroll(
        params, xs, cell=cell, h0=h0, lengths=lengths, residual=residual, options=options,
        time_major=time_major, resets=resets,
    )  # fmt: skip
    return readout(params["readout"], outputs)
