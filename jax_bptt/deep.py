"""Stacked and bidirectional RNNs of any cell, with hand-written BPTT through the stack.

Params are a plain dict pytree (``init_deep``; ``jax_bptt.torch_convert.from_torch(...,
deep=True)`` converts PyTorch's multi-layer / bidirectional modules to it)::

    {"layers": [{"fwd": cell_params, "bwd": cell_params}, ...],   # "bwd" only if bidirectional
     "readout": {"W_hy": (dirs*h o), "b_y": (o,)}}

Layer 0 reads ``xs (t b d)``; layer ``l`` reads layer ``l-1``'s output ``(t b dirs*h)``. A layer's
output is ``[fwd hs, bwd hs]`` concatenated over features (zero past each length; the backward
direction is ``scan_states(..., reverse=True)`` with the same length mask, so a padded sequence's
backward pass starts at its last valid step, as with PyTorch's packed sequences), plus the
layer's input when the layer has a residual connection. Between layers (after every layer but
the last) comes inverted dropout, as PyTorch's ``dropout`` argument: kept units are scaled by
``1 / (1 - dropout)``; the masks are drawn from an explicit ``key``, so pass ``dropout=0`` to
evaluate.

``residual``: ``False``; ``True`` on every layer (layer 0 then needs ``input_size == dirs*h``);
``"except_first"`` on layers ``1..L-1``, whose input and output sizes always match.

States (``h0`` and the final states) are lists with one ``{"fwd": state, "bwd": state}`` per
layer, each state as in ``jax_bptt.cells`` (leaves ``(b h)``). A backward direction's final state
is its state after step 0.

``placement="last_step"`` (many-to-one) reads the readout off a summary of the top layer's output:
its forward half at ``t = length - 1`` and, when bidirectional, its backward half at ``t = 0``
(where the backward pass ends). Without residual connections that is PyTorch's
``concat(h_n[-2], h_n[-1])``; for a unidirectional stack it is the output at the last valid step,
the same convention as ``bptt_manual``. A length-0 sequence contributes no term.

BPTT by hand (``deep_bptt_manual``): the forward runs each layer's ``scan_states`` and keeps its
states and residuals; the backward goes from the top: ``dL/d outputs`` of a layer is split per
direction, ``backward_scan`` turns each into weight gradients and ``d inputs``, whose sum (plus the
residual path) times the dropout mask is ``dL/d outputs`` of the layer below.

``deep_bptt_fast`` is ``jax.value_and_grad`` of the same forward with every layer and direction
run by ``jax_bptt.fast.unroll_fast``: each recurrence's backward is the hand-written reverse scan,
and autodiff only handles what lies between them (concatenation, residual add, dropout, readout).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.bptt import Gradients, _unbatch, backward_scan, sum_outer
from jax_bptt.cells import Cell, get_cell, project_inputs
from jax_bptt.fast import unroll_fast
from jax_bptt.losses import sequence_loss, sequence_loss_grad
from jax_bptt.model import readout
from jax_bptt.unroll import length_mask, masked_hidden, scan_states
from jax_bptt.validation import REDUCTIONS, check_choice, check_inputs, check_targets

DIRECTIONS = (("fwd", False), ("bwd", True))  # (name, reverse)
RESIDUALS = (False, True, "except_first")


# --------------------------------------------------------------------------------------------
# Init and validation


def init_deep(
    key: jax.Array,
    cell,
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
    """A stack of ``num_layers`` cells (two per layer if ``bidirectional``) and a readout.

    Every cell and the readout get PyTorch's default U(-1/sqrt(H), 1/sqrt(H)) init (the readout's
    bound uses its fan-in ``dirs*H``); ``recurrent_init`` and ``forget_bias`` as in ``init_model``.
    """
    for name, value in (
        ("input_size", input_size),
        ("hidden_size", hidden_size),
        ("output_size", output_size),
        ("num_layers", num_layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
    spec = get_cell(cell)
    if forget_bias is not None and spec.name != "lstm":
        raise ValueError(f"forget_bias applies to the lstm cell only, got cell={spec.name!r}")
    extra = {} if forget_bias is None else {"forget_bias": forget_bias}
    directions = [name for name, _ in DIRECTIONS][: 2 if bidirectional else 1]
    k_layers, k_w, k_b = jax.random.split(key, 3)
    layer_keys = jax.random.split(k_layers, num_layers * len(directions))
    layers, layer_input = [], input_size
    for layer in range(num_layers):
        layers.append(
            {
                name: spec.init(
                    layer_keys[layer * len(directions) + i],
                    layer_input,
                    hidden_size,
                    dtype,
                    recurrent_init,
                    **extra,
                )
                for i, name in enumerate(directions)
            }
        )
        layer_input = len(directions) * hidden_size
    bound = 1.0 / math.sqrt(layer_input)
    return {
        "layers": layers,
        "readout": {
            "W_hy": jax.random.uniform(k_w, (layer_input, output_size), dtype, -bound, bound),
            "b_y": jax.random.uniform(k_b, (output_size,), dtype, -bound, bound),
        },
    }


def _layers(params) -> list[dict]:
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, list | tuple) or not layers:
        got = f"keys {sorted(params)}" if isinstance(params, dict) else type(params).__name__
        raise TypeError(
            "params must be a dict {'layers': [{'fwd': cell_params, 'bwd'?: ...}, ...], "
            f"'readout': ...}} with at least one layer, as returned by init_deep, got {got}"
        )
    names = None
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or "fwd" not in layer or not set(layer) <= {"fwd", "bwd"}:
            got = f"keys {sorted(layer)}" if isinstance(layer, dict) else type(layer).__name__
            raise TypeError(
                f"params['layers'][{i}] must be a dict {{'fwd': cell_params}} or "
                f"{{'fwd': ..., 'bwd': ...}}, got {got}"
            )
        if names is not None and set(layer) != names:
            raise ValueError(
                f"params['layers'][{i}] has directions {sorted(layer)} but layer 0 has "
                f"{sorted(names)}: every layer must be bidirectional or none"
            )
        names = set(layer)
    return list(layers)


def _directions(layer: dict):
    return [(name, reverse) for name, reverse in DIRECTIONS if name in layer]


def _output_size(layer: dict) -> int:
    return sum(layer[name]["W_hh"].shape[0] for name, _ in _directions(layer))


def _has_residual(residual, layer: int) -> bool:
    return residual is True or (residual == "except_first" and layer > 0)


class DeepBatch(NamedTuple):
    xs: jax.Array  # (t b d)
    h0: list  # [{"fwd": state, "bwd": state}] with leaves (b h)
    lengths: jax.Array | None
    batched: bool


def check_deep_inputs(cell: Cell, params, xs, h0, lengths, dropout, key, residual) -> DeepBatch:
    """Validate a deep unroll's arguments; bring xs, h0 and lengths to the batched layout."""
    layers = _layers(params)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1) (the probability of zeroing), got {dropout}")
    if dropout > 0 and key is None:
        raise ValueError(
            f"dropout={dropout} needs a PRNG key for its masks: pass key=jax.random.key(...) "
            "(or dropout=0.0 to evaluate)"
        )
    if not any(residual is choice for choice in RESIDUALS[:2]) and residual != RESIDUALS[2]:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    batch = check_inputs(cell, layers[0]["fwd"], xs, None, lengths)
    xs = batch.xs
    batch_size = xs.shape[1]
    states = []
    if h0 is not None and (not isinstance(h0, list | tuple) or len(h0) != len(layers)):
        raise TypeError(
            f"h0 must be a list with one {{'fwd': state, 'bwd'?: state}} per layer "
            f"({len(layers)} layers), or None for zeros; got {type(h0).__name__}"
            f"{' of length ' + str(len(h0)) if isinstance(h0, list | tuple) else ''}"
        )
    layer_input = xs.shape[-1]
    for i, layer in enumerate(layers):
        size_out = _output_size(layer)
        for name, _ in _directions(layer):
            p = layer[name]
            if p["W_xh"].shape[0] != layer_input:
                raise ValueError(
                    f"params['layers'][{i}]['{name}']['W_xh'] has shape {tuple(p['W_xh'].shape)}, "
                    f"but layer {i} reads {layer_input} features"
                    + (" (the previous layer's hidden sizes, all directions)" if i else "")
                )
        if _has_residual(residual, i) and size_out != layer_input:
            raise ValueError(
                f"residual={residual!r} adds layer {i}'s input to its output, but layer {i} maps "
                f"{layer_input} features to {size_out} (hidden_size * num_directions); use "
                "residual='except_first' or make input_size equal hidden_size * num_directions"
            )
        if h0 is None:
            hidden_size = layer["fwd"]["W_hh"].shape[0]
            zero = cell.zero_state((batch_size,), hidden_size, xs.dtype)
            states.append({name: zero for name, _ in _directions(layer)})
        else:
            given = h0[i]
            if not isinstance(given, dict) or set(given) != set(layer):
                raise TypeError(
                    f"h0[{i}] must be a dict with keys {sorted(layer)} (the layer's directions), "
                    f"got {sorted(given) if isinstance(given, dict) else type(given).__name__}"
                )
            # T = 0 stand-in for this layer's input: check_inputs checks the state against it
            empty = np.zeros(
                (0, *xs.shape[1:2][: 1 if batch.batched else 0], layer_input), xs.dtype
            )
            states.append(
                {
                    name: check_inputs(cell, layer[name], empty, given[name]).h0
                    for name, _ in _directions(layer)
                }
            )
        layer_input = size_out
    return DeepBatch(xs, states, batch.lengths, batch.batched)


def _check_readout(params, features: int) -> int:
    ro = params.get("readout") if isinstance(params, dict) else None
    if not isinstance(ro, dict) or "W_hy" not in ro or "b_y" not in ro:
        raise TypeError("params must have a 'readout': {'W_hy': (dirs*h, o), 'b_y': (o,)}")
    if ro["W_hy"].ndim != 2 or ro["W_hy"].shape[0] != features:
        raise ValueError(
            f"params['readout']['W_hy'] has shape {tuple(ro['W_hy'].shape)}, but the top layer "
            f"outputs {features} features (hidden_size * num_directions)"
        )
    return ro["W_hy"].shape[1]


# --------------------------------------------------------------------------------------------
# Forward


def dropout_masks(key, dropout: float, layers, xs) -> list | None:
    """Inverted-dropout masks ``(t b f_l)`` for the outputs of every layer but the last.

    Entries are 0 or ``1 / (1 - dropout)``; one key per layer, split from ``key``.
    """
    if dropout == 0 or len(layers) == 1:
        return None
    keys = jax.random.split(key, len(layers) - 1)
    keep = 1.0 - dropout
    return [
        jax.random.bernoulli(k, keep, (*xs.shape[:2], _output_size(layer))).astype(xs.dtype) / keep
        for k, layer in zip(keys, layers[:-1], strict=True)
    ]


class LayerTape(NamedTuple):
    """What a layer's backward needs from its forward."""

    inputs: jax.Array  # (t b f_in), after the previous layer's dropout
    runs: dict  # direction -> (states, residuals) stacked over t by scan_states (None: fast path)


def _masked(mask, values):
    return values if mask is None else jnp.where(mask[..., None], values, 0)


def _scan_direction(cell: Cell, params, inputs, h0, lengths, reverse, unroll):
    """One direction by ``scan_states``: ``(hs (t b h), final, (states, residuals))``, the last
    being the tape ``backward_scan`` needs (and what ``jax.grad`` differentiates through)."""
    mask = length_mask(lengths, inputs.shape[0])
    xp = project_inputs(params, inputs)
    final, run = scan_states(cell, params, xp, h0, mask, reverse, unroll)
    return masked_hidden(cell, run[0], mask), final, run


def _fast_direction(cell: Cell, params, inputs, h0, lengths, reverse, unroll):
    """One direction by ``unroll_fast``, whose ``custom_vjp`` is the hand-written reverse scan;
    its states stay inside that rule, so there is no tape."""
    hs, final = unroll_fast(cell, params, inputs, h0, lengths, reverse=reverse, unroll=unroll)
    return hs, final, None


def _forward(cell: Cell, layers, h0, xs, lengths, drops, residual, unroll, run=_scan_direction):
    """``(outputs (t b f), final states, tapes)`` of the whole stack; ``run`` is
    ``_scan_direction`` or ``_fast_direction``, called once per layer and direction."""
    mask = length_mask(lengths, xs.shape[0])
    inputs, finals, tapes = xs, [], []
    for i, layer in enumerate(layers):
        outs, runs, final = [], {}, {}
        for name, reverse in _directions(layer):
            hs, final[name], runs[name] = run(
                cell, layer[name], inputs, h0[i][name], lengths, reverse, unroll
            )
            outs.append(hs)
        out = jnp.concatenate(outs, axis=-1)
        if _has_residual(residual, i):  # masked so outputs past a length stay zero
            out = out + _masked(mask, inputs)
        tapes.append(LayerTape(inputs, runs))
        finals.append(final)
        if drops is not None and i < len(layers) - 1:
            out = out * drops[i]
        inputs = out
    return inputs, finals, tapes


@functools.partial(jax.jit, static_argnames=("cell", "residual", "unroll"))
def _unroll_core(layers, h0, xs, lengths, drops, *, cell, residual, unroll):
    outputs, finals, _ = _forward(cell, layers, h0, xs, lengths, drops, residual, unroll)
    return outputs, finals


def deep_unroll(
    cell, params, xs, h0=None, lengths=None, *, dropout=0.0, key=None, residual=False, unroll=1
):
    """Run a stack of (bidirectional) layers over a sequence.

    Args:
      cell: a name in ``jax_bptt.CELLS`` or a ``Cell``.
      params: ``init_deep(...)`` (only ``"layers"`` is used).
      xs: ``(T, B, D)``, or ``(T, D)`` for one sequence.
      h0: ``[{"fwd": state, "bwd": state}, ...]`` one per layer, default zeros.
      lengths: ``(B,)`` valid lengths in ``[0, T]``, default all ``T``.
      dropout: probability of zeroing a unit between layers (training); needs ``key``.
      key: PRNG key for the dropout masks.
      residual: ``False``, ``True`` or ``"except_first"`` (module docstring).
      unroll: ``lax.scan`` unroll.

    Returns:
      ``(outputs, final_states)``: ``outputs (T, B, dirs*H)`` of the top layer (zero past each
      length), ``final_states`` like ``h0``.

    Example:
      >>> params = init_deep(jax.random.key(0), "gru", 3, 8, 2, num_layers=2, bidirectional=True)
      >>> outputs, finals = deep_unroll("gru", params, jnp.ones((5, 4, 3)))
      >>> outputs.shape, finals[1]["bwd"].shape
      ((5, 4, 16), (4, 8))
    """
    cell = get_cell(cell)
    batch = check_deep_inputs(cell, params, xs, h0, lengths, dropout, key, residual)
    layers = _layers(params)
    outputs, finals = _unroll_core(
        layers,
        batch.h0,
        batch.xs,
        batch.lengths,
        dropout_masks(key, dropout, layers, batch.xs),
        cell=cell,
        residual=residual,
        unroll=unroll,
    )
    if not batch.batched:
        outputs = outputs[:, 0]
        finals = jax.tree_util.tree_map(lambda a: a[0], finals)
    return outputs, finals


# --------------------------------------------------------------------------------------------
# Loss


def last_step_summary(outputs, lengths, forward_size: int) -> jax.Array:
    """``(t b f) -> (b f)``: the forward half at ``t = length - 1``, the rest at ``t = 0``.

    ``forward_size`` is the forward direction's hidden size (``f`` for a unidirectional stack).
    """
    num_steps, batch_size, features = outputs.shape
    if num_steps == 0:
        return jnp.zeros((batch_size, features), outputs.dtype)
    picked = _last_step_weights(lengths, num_steps, batch_size, outputs.dtype)
    fwd = jnp.einsum("tb,tbf->bf", picked, outputs[..., :forward_size])
    return jnp.concatenate([fwd, outputs[0, :, forward_size:]], axis=-1)


def _last_step_weights(lengths, num_steps, batch_size, dtype):
    """``(t b)`` one-hot of ``t = max(length, 1) - 1`` (length 0 has no loss term anyway)."""
    last = num_steps - 1 if lengths is None else jnp.maximum(lengths, 1) - 1
    last = jnp.broadcast_to(last, (batch_size,))
    return (jnp.arange(num_steps)[:, None] == last[None, :]).astype(dtype)


def _loss_features(outputs, lengths, placement, forward_size):
    """What the readout reads: all outputs (per step) or the summary as one step (last step),
    with the lengths ``sequence_loss`` needs for it."""
    if placement == "per_step":
        return outputs, lengths
    summary = last_step_summary(outputs, lengths, forward_size)[None]  # (1 b f)
    if outputs.shape[0] == 0:  # no step, no term (as in bptt_manual)
        return summary, jnp.zeros(outputs.shape[1], jnp.int32)
    return summary, None if lengths is None else jnp.minimum(lengths, 1)


def deep_model_loss(
    params,
    h0,
    xs,
    targets,
    lengths,
    drops=None,
    *,
    cell: Cell,
    loss,
    placement,
    reduction,
    residual=False,
    unroll=1,
    fast=False,
) -> jax.Array:
    """The scalar loss on batched, validated inputs (the function ``jax.grad`` sees).

    ``drops``: the dropout masks from ``dropout_masks`` (None: no dropout, e.g. to evaluate).
    ``fast``: run each layer and direction by ``unroll_fast`` (same value; its gradient is the
    hand-written reverse scan).
    """
    layers = params["layers"]
    run = _fast_direction if fast else _scan_direction
    outputs, _, _ = _forward(cell, layers, h0, xs, lengths, drops, residual, unroll, run)
    features, loss_lengths = _loss_features(
        outputs, lengths, placement, layers[-1]["fwd"]["W_hh"].shape[0]
    )
    ys = readout(params["readout"], features)
    return sequence_loss(
        ys, targets, loss=loss, placement=placement, reduction=reduction, lengths=loss_lengths
    )


# --------------------------------------------------------------------------------------------
# BPTT through the stack

_STATIC = ("cell", "loss", "placement", "reduction", "residual", "unroll")


def _value_and_grad(params, h0, xs, targets, lengths, drops, **static) -> Gradients:
    value, (d_params, d_h0, d_xs) = jax.value_and_grad(
        functools.partial(deep_model_loss, **static), argnums=(0, 1, 2)
    )(params, h0, xs, targets, lengths, drops)
    return Gradients(value, d_params, d_h0, d_xs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _deep_auto_core(params, h0, xs, targets, lengths, drops, **static) -> Gradients:
    return _value_and_grad(params, h0, xs, targets, lengths, drops, **static)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _deep_fast_core(params, h0, xs, targets, lengths, drops, **static) -> Gradients:
    return _value_and_grad(params, h0, xs, targets, lengths, drops, fast=True, **static)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _deep_manual_core(
    params,
    h0,
    xs,
    targets,
    lengths,
    drops,
    *,
    cell: Cell,
    loss,
    placement,
    reduction,
    residual,
    unroll,
) -> Gradients:
    layers, ro = params["layers"], params["readout"]
    mask = length_mask(lengths, xs.shape[0])
    outputs, _, tapes = _forward(cell, layers, h0, xs, lengths, drops, residual, unroll)

    # Readout and loss: dL/dy by hand, then one GEMM each for the readout weights and dL/d features.
    forward_size = layers[-1]["fwd"]["W_hh"].shape[0]
    features, loss_lengths = _loss_features(outputs, lengths, placement, forward_size)
    ys = readout(ro, features)
    loss_kw = dict(loss=loss, placement=placement, reduction=reduction, lengths=loss_lengths)
    value = sequence_loss(ys, targets, **loss_kw)
    d_ys = sequence_loss_grad(ys, targets, **loss_kw)
    d_readout = {"W_hy": sum_outer(features, d_ys), "b_y": d_ys.sum((0, 1))}
    d_features = d_ys @ ro["W_hy"].T
    if placement == "per_step":
        d_out = d_features
    elif outputs.shape[0] == 0:
        d_out = jnp.zeros_like(outputs)
    else:  # scatter the summary's gradient back to the steps it was read from
        d_summary = d_features[0]
        picked = _last_step_weights(lengths, *outputs.shape[:2], outputs.dtype)
        d_out = jnp.einsum("tb,bf->tbf", picked, d_summary[:, :forward_size])
        d_out = jnp.concatenate([d_out, jnp.zeros_like(outputs[..., forward_size:])], axis=-1)
        d_out = d_out.at[0, :, forward_size:].add(d_summary[:, forward_size:])

    # Layers from the top down: a layer's d inputs is the layer below's d outputs.
    d_layers, d_h0 = [None] * len(layers), [None] * len(layers)
    for i in reversed(range(len(layers))):
        layer, tape = layers[i], tapes[i]
        d_inputs = _masked(mask, d_out) if _has_residual(residual, i) else 0.0
        d_layers[i], d_h0[i], offset = {}, {}, 0
        for name, reverse in _directions(layer):
            p = layer[name]
            size = p["W_hh"].shape[0]
            states, residuals = tape.runs[name]
            d_final = jax.tree_util.tree_map(jnp.zeros_like, h0[i][name])
            d_layers[i][name], d_h0[i][name], d_x = backward_scan(
                cell,
                p,
                tape.inputs,
                h0[i][name],
                mask,
                states,
                residuals,
                d_out[..., offset : offset + size],
                d_final,
                reverse=reverse,
                unroll=unroll,
            )
            d_inputs = d_inputs + d_x
            offset += size
        d_out = d_inputs if drops is None or i == 0 else d_inputs * drops[i - 1]
    return Gradients(value, {"layers": d_layers, "readout": d_readout}, d_h0, d_inputs)


def _with_deep_checks(core):
    @functools.wraps(core)
    def run(
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
        dropout=0.0,
        key=None,
        residual=False,
        unroll=1,
    ) -> Gradients:
        cell = get_cell(cell)
        check_choice("reduction", reduction, REDUCTIONS)
        batch = check_deep_inputs(cell, params, xs, h0, lengths, dropout, key, residual)
        layers = _layers(params)
        output_size = _check_readout(params, _output_size(layers[-1]))
        num_steps, batch_size = batch.xs.shape[:2]
        targets = check_targets(
            targets, loss, placement, num_steps, batch_size, output_size, batch.batched
        )
        grads = core(
            {"layers": layers, "readout": params["readout"]},
            batch.h0,
            batch.xs,
            targets,
            batch.lengths,
            # drawn outside the jitted cores: both see the same masks, neither compiles the PRNG
            dropout_masks(key, dropout, layers, batch.xs),
            cell=cell,
            loss=loss,
            placement=placement,
            reduction=reduction,
            residual=residual,
            unroll=unroll,
        )
        return _unbatch(grads, batch.batched)

    return run


_ARGS_DOC = """
Args:
  params: ``init_deep(...)`` pytree.
  xs: ``(T, B, D)`` (or ``(T, D)``); targets as for ``bptt_manual`` (``jax_bptt.losses``).
  cell, loss, placement, reduction, lengths, unroll: as for ``bptt_manual``; ``last_step`` reads
    the summary described in the module docstring.
  h0: ``[{"fwd": state, "bwd": state}, ...]``, default zeros.
  dropout, key, residual: as for ``deep_unroll``; the same key gives the same masks in both
    implementations.

Returns:
  ``Gradients(loss, params, h0, xs)`` with ``params`` and ``h0`` in the layouts of the inputs.
"""

deep_bptt_auto = _with_deep_checks(_deep_auto_core)
deep_bptt_auto.__name__ = "deep_bptt_auto"
deep_bptt_auto.__doc__ = "Loss and gradients of a deep RNN by ``jax.value_and_grad``.\n" + _ARGS_DOC

deep_bptt_manual = _with_deep_checks(_deep_manual_core)
deep_bptt_manual.__name__ = "deep_bptt_manual"
deep_bptt_manual.__doc__ = (
    "Loss and gradients of a deep RNN by hand-written BPTT, layer by layer from the top.\n"
    + _ARGS_DOC
    + """
Example:
  >>> params = init_deep(jax.random.key(0), "lstm", 3, 8, 2, num_layers=2, bidirectional=True)
  >>> xs, ys = jnp.ones((6, 4, 3)), jnp.zeros((6, 4, 2))
  >>> manual = deep_bptt_manual(params, xs, ys, cell="lstm", dropout=0.2, key=jax.random.key(1))
  >>> auto = deep_bptt_auto(params, xs, ys, cell="lstm", dropout=0.2, key=jax.random.key(1))
  >>> compare_gradients(manual, auto).ok
  True
"""
)

deep_bptt_fast = _with_deep_checks(_deep_fast_core)
deep_bptt_fast.__name__ = "deep_bptt_fast"
deep_bptt_fast.__doc__ = (
    """Loss and gradients of a deep RNN by ``jax.value_and_grad`` through ``unroll_fast``.

Every layer and direction runs by ``unroll_fast``, so each recurrence's backward is the
hand-written reverse scan; autodiff handles concatenation, residual add, dropout and readout.
"""
    + _ARGS_DOC
)
