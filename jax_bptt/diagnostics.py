"""Seeing BPTT: where the gradient of a shared weight comes from, and how it fades through time.

Time indexing follows Pascanu, Mikolov & Bengio (2013): ``h_0`` is the initial state and ``h_t``
the state after ``t`` steps, so step ``t = 1..T`` reads ``x_t`` and ``h_{t-1}`` and emits ``y_t``
and the loss term ``L_t``. Arrays over states have ``T + 1`` rows (row ``t`` is ``h_t``); arrays
over steps or loss terms have ``T`` rows (row ``t - 1`` is step ``t``).

Everything gradient-shaped comes from the hand-written reverse scan (``scan.backward_deltas``):

- ``gradient_flow``: ``dL/dh_t`` for every state and each step's contribution to every weight
  gradient, ``dW = sum_t contribution_t`` (e.g. ``dW_hh = sum_t h_{t-1}^T d hp_t``).
- ``term_flow``: the same split by loss term: ``dL_t/dh_k`` for every ``(t, k)`` and the
  gradient of each ``L_t`` alone, one reverse scan per term (vmapped).

and everything Jacobian-shaped from the forward step (``cells.step``, ``scan.scan_states``):

- ``jacobian_norms``: ``||dh_T/dh_t||_2`` for every ``t``, exactly (dense per-step Jacobians,
  chained) or by power iteration (JVP/VJP through the unroll, no dense Jacobian).
- ``recurrent_spectrum``: singular values and spectral radius of each gate block of ``W_hh``;
  ``scale_recurrent`` rescales those blocks.

Which models: all take ``init_model`` params. ``gradient_flow``, ``term_flow`` and
``jacobian_norms`` analyse ONE recurrence, so they take a model of one unidirectional layer
(``init_model(..., num_layers=1, bidirectional=False)``) and raise a ``ValueError`` for any
other: in a stack, ``dL/dh_t`` of a layer mixes the paths through the layers above and the other
direction, which is not the single chain of Jacobians these functions expose (``jax_bptt.bptt``
gives any model's gradients). ``recurrent_spectrum`` and ``scale_recurrent`` look at the weights
alone, so they apply to any layer and direction (``layer=``, ``direction=``).

The per-step ``d state`` is ``Deltas.d_states``, stacked by the reverse scan itself. States are
passed as everywhere in the package (``h0 = [{"fwd": state}]``); the per-state outputs
(``Flow.d_states``) are the one recurrence's state pytree with leading axes.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jax_bptt.cells import Cell, elman_cell, get_cell, is_token_ids, project_inputs, step
from jax_bptt.losses import Loss, check_loss, sequence_loss, sequence_loss_grad
from jax_bptt.model import Prepared, prepare, readout
from jax_bptt.scan import (
    Deltas,
    backward_deltas,
    cell_grads,
    length_mask,
    masked,
    masked_hidden,
    previous_states,
    scan_states,
)
from jax_bptt.validation import (
    DIRECTIONS,
    check_batch_targets,
    check_choice,
    check_params,
    check_positive_int,
)

Array = jax.Array

# A linear Elman cell, h_t = x_t W_xh + b_h + h_{t-1} W_hh: the setting of Pascanu et al.'s
# analysis, where dh_T/dh_t = (W_hh^T)^(T-t) exactly.
LINEAR = elman_cell("linear", lambda z: z, jnp.ones_like)

GATE_NAMES = {"lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}
JACOBIAN_METHODS = ("exact", "power")
SINGLE_RECURRENCE = ("gradient_flow", "term_flow", "jacobian_norms")


class Flow(NamedTuple):
    """The backward pass of one batch, step by step.

    Attributes:
      loss: the model's loss (``bptt(...).loss``).
      d_states: the recurrence's state pytree, leaves ``(T+1, B, H)``: ``dL/d state_t`` (row 0
        is ``bptt(...).h0[0]["fwd"]``).
      d_hidden: ``(T+1, B, H)``, the hidden part of ``d_states`` (``dL/dh_t``).
      steps: the model params' structure (``{"layers": [{"fwd": ...}], "readout": ...}``) with a
        leading ``(T,)`` axis on every leaf: step ``t``'s term of each weight gradient; summed
        over axis 0 it is ``bptt(...).params``.

    Unbatched inputs drop the ``B`` axis.
    """

    loss: Array
    d_states: Any
    d_hidden: Array
    steps: dict


class TermFlow(NamedTuple):
    """The backward pass split by loss term ``L = sum_t L_t``.

    Attributes:
      d_states, d_hidden: leaves ``(T, T+1, B, H)``: ``dL_t/d state_k`` at ``[t-1, k]``
        (exactly zero for ``k > t``: ``L_t`` does not depend on later states).
      terms: the model params' structure with a leading ``(T,)`` axis: the gradient of ``L_t``
        alone; summed over axis 0 it is the full gradient.

    Unbatched inputs drop the ``B`` axis.
    """

    d_states: Any
    d_hidden: Array
    terms: dict


class BlockSpectrum(NamedTuple):
    """One ``(H, H)`` gate block of ``W_hh``."""

    name: str
    singular_values: np.ndarray  # (H,) descending
    spectral_radius: float  # max |eigenvalue|


# --------------------------------------------------------------------------------------------
# Validation


def _one_recurrence(function: str, params, xs, *, cell, lengths, h0) -> Prepared:
    """``model.prepare`` for a single-recurrence diagnostic, which needs one forward layer."""
    run = prepare(
        params, xs, cell=cell, lengths=lengths, h0=h0, dropout=0.0, key=None, residual=False,
        options=None,
    )  # fmt: skip
    if run.shape.num_layers != 1 or run.shape.directions != ("fwd",):
        raise ValueError(
            f"{function} analyses one recurrence: it takes a model of one unidirectional layer "
            f"(init_model(..., num_layers=1, bidirectional=False)), got {run.shape.num_layers} "
            f"layer(s) with directions {list(run.shape.directions)}. "
            f"{', '.join(SINGLE_RECURRENCE)} apply to such models only; recurrent_spectrum and "
            "scale_recurrent take any model (layer=, direction=), and jax_bptt.bptt gives any "
            "model's gradients"
        )
    return run


# --------------------------------------------------------------------------------------------
# The backward pass, recorded


def _per_step_cell_grads(cell: Cell, params, h0, xs, mask, states, saved, deltas: Deltas) -> dict:
    """``cell_grads`` without the sum over t: ``x_t^T d xp_t``, ``h_{t-1}^T d hp_t``, biases
    (token ids: ``d xp_t`` scattered into the rows ``x_t``), and a cell's pointwise params (its
    backward once more per step, on the ``d state_t`` the reverse scan recorded)."""
    per_step = jax.vmap(cell.bias_grads)(deltas.d_xp.sum(1), deltas.d_hp.sum(1))
    if is_token_ids(xs):
        steps = jnp.broadcast_to(jnp.arange(xs.shape[0])[:, None], xs.shape)
        w_xh = jnp.zeros((xs.shape[0], *params["W_xh"].shape), deltas.d_xp.dtype)
        per_step["W_xh"] = w_xh.at[steps, xs].add(deltas.d_xp)
    else:
        per_step["W_xh"] = jnp.einsum("tbd,tbg->tdg", xs, deltas.d_xp)
    per_step["W_hh"] = jnp.einsum("tbh,tbg->thg", deltas.h_prev, deltas.d_hp)
    if cell.pointwise_params:
        d_steps = deltas.d_states
        if mask is not None:  # frozen rows give params no gradient (as in backward_deltas)
            d_steps = jax.tree_util.tree_map(lambda d: jnp.where(mask[..., None], d, 0), d_steps)

        def pointwise(saved_t, prev_t, d_t):
            return cell.backward(params, saved_t, prev_t, d_t)[3]

        per_step.update(jax.vmap(pointwise)(saved, previous_states(h0, states), d_steps))
    return per_step


@functools.partial(jax.jit, static_argnames=("cell", "loss", "options", "per_term"))
def _flow_core(params, h0, xs, targets, lengths, *, cell: Cell, loss: Loss, options, per_term):
    """``Flow``, or with ``per_term`` a ``TermFlow`` (one reverse scan per loss term, vmapped).

    The recurrence keeps its states and saved values; the readout runs at every step, and the loss
    and ``dL/dy`` are by hand. ``"last_step"`` counts only ``t = length - 1``
    (``losses.term_weights``), which for one unidirectional layer is the model's summary
    (``model.last_step_summary``)."""
    p, ro = params["layers"][0]["fwd"], params["readout"]
    num_steps = xs.shape[0]
    mask = length_mask(lengths, num_steps)
    xs = masked(mask, xs)  # padding reaches nothing (as the model)
    _, (states, saved) = scan_states(
        cell, p, project_inputs(p, xs), h0, mask, unroll=options.unroll
    )
    hs = masked_hidden(cell, states, mask)
    ys = readout(ro, hs)
    d_ys = sequence_loss_grad(ys, targets, loss, lengths)
    d_hs = d_ys @ ro["W_hy"].T

    def backward(d_hs):
        """``(d_states, deltas)``: ``d_states`` leaves ``(T+1, b, h)``, row 0 ``dL/dh_0``."""
        d_final = jax.tree_util.tree_map(jnp.zeros_like, h0)
        deltas = backward_deltas(
            cell, p, h0, mask, states, saved, d_hs, d_final, unroll=options.unroll
        )
        d_states = jax.tree_util.tree_map(
            lambda d0, d: jnp.concatenate([d0[None], d]), deltas.d_h0, deltas.d_states
        )
        return d_states, deltas

    if per_term:

        def one_term(index):
            picked = (jnp.arange(num_steps) == index)[:, None, None]
            d_states, deltas = backward(jnp.where(picked, d_hs, 0))
            return d_states, cell_grads(cell, p, xs, deltas)[0]

        d_states, d_cell = jax.vmap(one_term)(jnp.arange(num_steps))
    else:
        d_states, deltas = backward(d_hs)
        d_cell = _per_step_cell_grads(cell, p, h0, xs, mask, states, saved, deltas)
    # h_t^T dL/dy_t and dL/dy_t (summed over the batch) per step, which is also per term: the
    # readout sees L_t only through y_t.
    d_readout = {"W_hy": jnp.einsum("tbh,tbo->tho", hs, d_ys), "b_y": d_ys.sum(1)}
    out = (d_states, cell.hidden(d_states), {"layers": [{"fwd": d_cell}], "readout": d_readout})
    return TermFlow(*out) if per_term else Flow(sequence_loss(ys, targets, loss, lengths), *out)


def _flow(per_term: bool, params, xs, targets, cell, loss, lengths, h0):
    """Validate once, run ``_flow_core`` on the one recurrence, drop the batch axis if none was
    given."""
    loss = check_loss(loss)
    name = "term_flow" if per_term else "gradient_flow"
    run = _one_recurrence(name, params, xs, cell=cell, lengths=lengths, h0=h0)
    out = _flow_core(
        params, run.batch.h0[0]["fwd"], run.batch.xs,
        check_batch_targets(targets, loss, run.shape, run.batch), run.batch.lengths,
        cell=run.cell, loss=loss, options=run.options, per_term=per_term,
    )  # fmt: skip
    if run.batch.batched:
        return out
    axis = 2 if per_term else 1
    take = functools.partial(jax.tree_util.tree_map, lambda a: jnp.take(a, 0, axis))
    return out._replace(d_states=take(out.d_states), d_hidden=take(out.d_hidden))


def gradient_flow(
    params, xs, targets, *, cell, loss: Loss | str = "mse", lengths=None, h0=None
) -> Flow:
    """The backward pass step by step, for a model of one unidirectional layer.

    Args:
      params: ``init_model(..., num_layers=1, bidirectional=False)`` params.
      xs: ``(T, B, D)`` inputs (or ``(T, D)``), in the params' dtype.
      targets: as for ``bptt`` (``jax_bptt.losses``).
      cell: the model's cell (a name in ``jax_bptt.CELLS`` or a ``Cell``).
      loss: a ``Loss`` (kind, placement, reduction); a string is ``Loss(kind)``.
      lengths: ``(B,)`` valid lengths, default all ``T``.
      h0: ``[{"fwd": state}]``, default zeros.

    Returns:
      ``Flow(loss, d_states, d_hidden, steps)``: ``||dL/dh_t||`` per sequence is
      ``jnp.linalg.norm(flow.d_hidden, axis=-1)``; ``flow.steps["layers"][0]["fwd"]["W_hh"][t-1]``
      is ``h_{t-1}^T d hp_t``, step t's term of ``dW_hh``.

    Raises:
      ValueError: for a model of more than one layer or a bidirectional one (module docstring),
        and for inputs ``bptt`` would reject.
    """
    return _flow(False, params, xs, targets, cell, loss, lengths, h0)


def term_flow(
    params, xs, targets, *, cell, loss: Loss | str = "mse", lengths=None, h0=None
) -> TermFlow:
    """The backward pass per loss term, for a model of one unidirectional layer.

    Args:
      params, xs, targets, cell, loss, lengths, h0: as for ``gradient_flow``.

    Returns:
      ``TermFlow(d_states, d_hidden, terms)``: ``jnp.linalg.norm(tf.d_hidden, axis=-1)[t-1, k]``
      is ``||dL_t/dh_k||`` per sequence; ``tf.terms`` sums over axis 0 to the full gradient.
      Costs T reverse scans (vmapped): for short sequences.

    Raises:
      ValueError: as ``gradient_flow``.
    """
    return _flow(True, params, xs, targets, cell, loss, lengths, h0)


# --------------------------------------------------------------------------------------------
# Jacobians dh_T/dh_t


def _unit_rows(v):
    norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    return v / jnp.where(norm > 0, norm, 1)


@functools.partial(jax.jit, static_argnames=("cell", "options", "method", "num_iters"))
def _norms_core(params, h0, xs, lengths, key, *, cell: Cell, options, method, num_iters: int):
    """``jacobian_norms`` of the cell params on batched inputs: ``(T+1, b)``."""
    num_steps, batch_size = xs.shape[:2]
    mask = length_mask(lengths, num_steps)
    mask = jnp.ones((num_steps, batch_size), bool) if mask is None else mask
    xs = masked(mask, xs)
    xp = project_inputs(params, xs)
    dtype = params["W_hh"].dtype  # xs may be token ids
    _, (states, _) = scan_states(cell, params, xp, h0, mask, unroll=options.unroll)

    if method == "power":
        all_states = jax.tree_util.tree_map(
            lambda a0, a: jnp.concatenate([a0[None], a]), h0, states
        )
        start = _unit_rows(jax.random.normal(key, cell.hidden(h0).shape, dtype))

        def norm_from(t, state_t):
            # Steps before t+1 are frozen (masked), so the full-length scan runs h_t -> h_T with
            # one shape for every t; sequences are independent rows, so each row iterates alone.
            running = mask & (jnp.arange(num_steps) >= t)[:, None]

            def propagate(h):
                final, _ = scan_states(
                    cell, params, xp, cell.with_hidden(state_t, h), running, unroll=options.unroll
                )
                return cell.hidden(final)

            h_t = cell.hidden(state_t)
            _, jvp = jax.linearize(propagate, h_t)
            vjp = jax.linear_transpose(jvp, h_t)

            def iterate(_, v):
                return _unit_rows(vjp(jvp(v))[0])

            v = jax.lax.fori_loop(0, num_iters, iterate, start)
            return jnp.linalg.norm(jvp(v), axis=-1)

        return jax.vmap(norm_from)(jnp.arange(num_steps + 1), all_states)

    # method "exact": an unbatched state as one vector (S,), and back
    flat_state, unflatten = ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], h0))
    state_size = flat_state.shape[-1]

    def flatten(state):
        return ravel_pytree(state)[0]

    def step_jacobian(x, state_prev, live):
        """``d state_t / d state_{t-1}``, ``(S, S)``, of one sequence at one step."""

        def advance(vector):
            state = unflatten(vector)
            new = step(cell, params, state, x)
            # Past its length a sequence's state is frozen (as in ``scan_states``).
            return flatten(jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new, state))

        return jax.jacfwd(advance)(flatten(state_prev))

    states_prev = previous_states(h0, states)
    jacobians = jax.vmap(jax.vmap(step_jacobian))(xs, states_prev, mask)  # (t b S S)

    def chain(product, jacobian):  # d s_T/d s_t = d s_T/d s_{t+1} @ d s_{t+1}/d s_t
        product = product @ jacobian
        return product, product

    eye = jnp.eye(state_size, dtype=dtype)
    eye = jnp.broadcast_to(eye, (batch_size, state_size, state_size))
    _, products = jax.lax.scan(chain, eye, jacobians, reverse=True)
    products = jnp.concatenate([products, eye[None]])  # (T+1, b, S, S)
    # The h -> h block: embed h into a state (other parts fixed), read h out of the state.
    zero = jnp.zeros((state_size,), dtype)
    read_h = jax.jacfwd(lambda v: cell.hidden(unflatten(v)))(zero)  # (H, S)
    embed_h = jax.jacfwd(lambda h: flatten(cell.with_hidden(unflatten(zero), h)))(
        jnp.zeros((params["W_hh"].shape[0],), dtype)
    )  # (S, H)
    return jnp.linalg.norm(read_h @ products @ embed_h, ord=2, axis=(-2, -1))


def jacobian_norms(
    params, xs, *, cell, h0=None, lengths=None, method: str = "exact", num_iters: int = 100,
    key=None,
) -> Array:  # fmt: skip
    """``||dh_T/dh_t||_2`` (spectral norm) for ``t = 0..T``, for a model of one unidirectional
    layer.

    ``h_T`` is each sequence's last state (its length's); for the LSTM the Jacobian is the
    ``h -> h`` block of the full state Jacobian (``c_t`` held fixed). Row ``T`` is 1.

    Args:
      params: ``init_model(..., num_layers=1, bidirectional=False)`` params (the readout is not
        used).
      xs, cell, h0, lengths: as for ``jax_bptt.unroll`` (``h0 = [{"fwd": state}]``).
      method: ``"exact"``: dense per-step state Jacobians (``jax.jacfwd``) chained; memory
        ``T * B * S^2`` for state size ``S`` (H, 2H for the LSTM), so for small H.
        ``"power"``: ``num_iters`` power iterations on ``J^T J`` with ``jax.linearize`` and its
        transpose through the unroll from step t; no dense Jacobian.
      num_iters: power iterations (``method="power"``), an int >= 1.
      key: PRNG key of the power iteration's start vector (default ``jax.random.key(0)``).

    Returns:
      ``(T+1, B)`` norms, or ``(T+1,)`` for unbatched ``xs``.

    Raises:
      ValueError: for a model of more than one layer or a bidirectional one (module docstring),
        a bad ``method`` or ``num_iters``, and inputs ``jax_bptt.unroll`` would reject.
    """
    check_choice("method", method, JACOBIAN_METHODS)
    num_iters = check_positive_int("num_iters", num_iters)
    run = _one_recurrence("jacobian_norms", params, xs, cell=cell, lengths=lengths, h0=h0)
    norms = _norms_core(
        params["layers"][0]["fwd"], run.batch.h0[0]["fwd"], run.batch.xs, run.batch.lengths,
        jax.random.key(0) if key is None else key, cell=run.cell, options=run.options,
        method=method, num_iters=num_iters,
    )  # fmt: skip
    return norms if run.batch.batched else norms[:, 0]


# --------------------------------------------------------------------------------------------
# The recurrent weights


def _gate_blocks(cell: Cell, w_hh) -> list[tuple[str, Array]]:
    """``(name, (H, H) block)`` per gate of ``W_hh``: ``"W_hh"`` for one gate, else the gate's
    letter (``GATE_NAMES``) or ``"block<k>"``."""
    names = GATE_NAMES.get(cell.name, tuple(f"block{k}" for k in range(cell.num_gates)))
    h = w_hh.shape[0]
    return [
        (name, w_hh[:, k * h : (k + 1) * h])
        for k, name in enumerate(("W_hh",) if cell.num_gates == 1 else names)
    ]


def _selected(params, cell, layer, direction, *, allow_all: bool):
    """Validate the model once; return ``(cell, [(layer index, direction name), ...])``."""
    cell = get_cell(cell)
    shape = check_params(params, cell)
    if layer is None and allow_all:
        layers = range(shape.num_layers)
    else:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, numbers.Integral)
            or not -shape.num_layers <= layer < shape.num_layers
        ):
            raise ValueError(
                f"layer must be an int in [0, {shape.num_layers}) for this "
                f"{shape.num_layers}-layer model{' (or None: every layer)' if allow_all else ''}"
                f", got {layer!r}"
            )
        layers = [int(layer) % shape.num_layers]
    if direction is None and allow_all:
        directions = shape.directions
    else:
        check_choice("direction", direction, tuple(dict(DIRECTIONS)))
        if direction not in shape.directions:
            raise ValueError(
                f"direction {direction!r} is not in this model (directions "
                f"{list(shape.directions)}: init_model(..., bidirectional=True) has 'bwd')"
            )
        directions = (direction,)
    return cell, [(i, name) for i in layers for name in directions]


def recurrent_spectrum(
    params, *, cell, layer: int = 0, direction: str = "fwd"
) -> list[BlockSpectrum]:
    """Singular values and spectral radius of each ``(H, H)`` gate block of one ``W_hh``.

    Args:
      params: ``init_model`` params, any depth and direction.
      cell: the model's cell.
      layer: which layer (negative counts from the top).
      direction: ``"fwd"`` or ``"bwd"`` (bidirectional models).

    Returns:
      One ``BlockSpectrum(name, singular_values, spectral_radius)`` per gate block: ``"W_hh"``
      for Elman cells; ``i, f, g, o`` for the LSTM; ``r, z, n`` for the GRU.
    """
    cell, ((index, name),) = _selected(params, cell, layer, direction, allow_all=False)
    blocks = _gate_blocks(cell, np.asarray(params["layers"][index][name]["W_hh"], np.float64))
    return [
        BlockSpectrum(block_name, np.linalg.svd(m, compute_uv=False),
                      float(np.max(np.abs(np.linalg.eigvals(m)))))
        for block_name, m in blocks
    ]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("cell", "selected"))
def _scale_core(params, top_singular_value, *, cell: Cell, selected):
    layers = [dict(layer) for layer in params["layers"]]
    for index, name in selected:
        p = layers[index][name]
        scaled = []
        for _, block in _gate_blocks(cell, p["W_hh"]):
            norm = jnp.linalg.norm(block, ord=2)
            scaled.append(block * jnp.where(norm > 0, top_singular_value / norm, 0))
        layers[index][name] = {**p, "W_hh": jnp.concatenate(scaled, axis=1)}
    return {**params, "layers": layers}


def scale_recurrent(
    params, top_singular_value: float, *, cell, layer: int | None = None,
    direction: str | None = None,
) -> dict:  # fmt: skip
    """A copy of ``params`` with each gate block of ``W_hh`` rescaled so that its largest
    singular value is ``top_singular_value`` (a zero block stays zero).

    Args:
      params: ``init_model`` params, any depth and direction.
      top_singular_value: the new largest singular value of every selected block (>= 0).
      cell: the model's cell.
      layer: the layer to rescale (None: every layer).
      direction: ``"fwd"`` or ``"bwd"`` (None: every direction).

    Returns:
      The params with the selected ``W_hh`` rescaled; every other leaf is unchanged.
    """
    if isinstance(top_singular_value, bool) or not (
        isinstance(top_singular_value, numbers.Real)
        or (hasattr(top_singular_value, "dtype") and np.ndim(top_singular_value) == 0)
    ):
        raise TypeError(f"top_singular_value must be a scalar, got {top_singular_value!r}")
    if isinstance(top_singular_value, numbers.Real) and not top_singular_value >= 0:
        raise ValueError(f"top_singular_value must be >= 0, got {top_singular_value!r}")
    cell, selected = _selected(params, cell, layer, direction, allow_all=True)
    dtype = params["layers"][0]["fwd"]["W_hh"].dtype
    return _scale_core(
        params, jnp.asarray(top_singular_value, dtype), cell=cell, selected=tuple(selected)
    )
