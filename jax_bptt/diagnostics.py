"""Seeing BPTT: where the gradient of a shared weight comes from, and how it fades through time.

Time indexing follows Pascanu, Mikolov & Bengio (2013): ``h_0`` is the initial state and ``h_t``
the state after ``t`` steps, so step ``t = 1..T`` reads ``x_t`` and ``h_{t-1}`` and emits ``y_t``
and the loss term ``L_t``. Arrays over states have ``T + 1`` rows (row ``t`` is ``h_t``); arrays
over steps or loss terms have ``T`` rows (row ``t - 1`` is step ``t``).

Everything gradient-shaped comes from the hand-written reverse scan (``bptt.backward_deltas``):

- ``gradient_flow``: ``dL/dh_t`` for every state and each step's contribution to every weight
  gradient, ``dW = sum_t contribution_t`` (e.g. ``dW_hh = sum_t h_{t-1}^T d hp_t``).
- ``term_flow``: the same split by loss term: ``dL_t/dh_k`` for every ``(t, k)`` and the
  gradient of each ``L_t`` alone, one reverse scan per term (vmapped).

and everything Jacobian-shaped from the forward step (``cells.step``, ``unroll.scan_states``):

- ``jacobian_norms``: ``||dh_T/dh_t||_2`` for every ``t``, exactly (dense per-step Jacobians,
  chained) or by power iteration (JVP/VJP through the unroll, no dense Jacobian).
- ``recurrent_spectrum``: singular values and spectral radius of each gate block of ``W_hh``.

The per-step ``d state`` is ``Deltas.d_states``, stacked by the reverse scan itself.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.bptt import (
    Deltas,
    backward_deltas,
    cell_grads,
    forward_pass,
    prepare,
    previous_states,
)
from jax_bptt.cells import Cell, elman_cell, get_cell, project_inputs, step
from jax_bptt.unroll import length_mask, scan_states
from jax_bptt.validation import check_choice, check_inputs

Array = jax.Array

# A linear Elman cell, h_t = x_t W_xh + b_h + h_{t-1} W_hh: the setting of Pascanu et al.'s
# analysis, where dh_T/dh_t = (W_hh^T)^(T-t) exactly.
LINEAR = elman_cell("linear", lambda z: z, jnp.ones_like)

GATE_NAMES = {"lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}
JACOBIAN_METHODS = ("exact", "power")
_LOSS_STATIC = ("cell", "loss", "placement", "reduction")


class Flow(NamedTuple):
    """The backward pass of one batch, step by step.

    ``d_states``: state pytree, leaves ``(T+1, B, H)``: ``dL/d state_t`` (row 0 is ``h_0``).
    ``d_hidden``: ``(T+1, B, H)``, the hidden part of ``d_states`` (``dL/dh_t``).
    ``steps``: the model params' structure with a leading ``(T,)`` axis on every leaf: step
    ``t``'s term of each weight gradient; summed over axis 0 it is the full gradient.
    Unbatched inputs drop the ``B`` axis.
    """

    loss: Array
    d_states: Any
    d_hidden: Array
    steps: dict


class TermFlow(NamedTuple):
    """The backward pass split by loss term ``L = sum_t L_t``.

    ``d_states``/``d_hidden``: leaves ``(T, T+1, B, H)``: ``dL_t/d state_k`` at ``[t-1, k]``
    (exactly zero for ``k > t``: ``L_t`` does not depend on later states).
    ``terms``: the model params' structure with a leading ``(T,)`` axis: the gradient of
    ``L_t`` alone; summed over axis 0 it is the full gradient.
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
# The backward pass, recorded


def _backward_with_states(cell: Cell, params, h0, mask, states, residuals, d_hs):
    """``(d_states, deltas)``: ``d_states`` leaves ``(T+1, b, h)``, row 0 ``dL/dh_0``."""
    d_final = jax.tree_util.tree_map(jnp.zeros_like, h0)
    deltas = backward_deltas(cell, params, h0, mask, states, residuals, d_hs, d_final)
    d_states = jax.tree_util.tree_map(
        lambda d0, d: jnp.concatenate([d0[None], d]), deltas.d_h0, deltas.d_states
    )
    return d_states, deltas


def _per_step_cell_grads(cell: Cell, xs, deltas: Deltas) -> dict:
    """``cell_grads`` without the sum over t: ``x_t^T d xp_t``, ``h_{t-1}^T d hp_t``, biases."""
    per_step_biases = jax.vmap(cell.bias_grads)(deltas.d_xp.sum(1), deltas.d_hp.sum(1))
    return {
        "W_xh": jnp.einsum("tbd,tbg->tdg", xs, deltas.d_xp),
        "W_hh": jnp.einsum("tbh,tbg->thg", deltas.h_prev, deltas.d_hp),
        **per_step_biases,
    }


def _per_step_readout_grads(hs, d_ys) -> dict:
    """``h_t^T dL/dy_t`` and ``dL/dy_t`` (summed over the batch), one per step."""
    return {"W_hy": jnp.einsum("tbh,tbo->tho", hs, d_ys), "b_y": d_ys.sum(1)}


@functools.partial(jax.jit, static_argnames=_LOSS_STATIC)
def _flow_core(params, h0, xs, targets, lengths, **static) -> Flow:
    cell = static["cell"]
    fwd = forward_pass(params, h0, xs, targets, lengths, **static)
    d_states, deltas = _backward_with_states(
        cell, params["cell"], h0, fwd.mask, fwd.states, fwd.residuals, fwd.d_hs
    )
    steps = {
        "cell": _per_step_cell_grads(cell, xs, deltas),
        "readout": _per_step_readout_grads(fwd.hs, fwd.d_ys),
    }
    return Flow(fwd.loss, d_states, cell.hidden(d_states), steps)


@functools.partial(jax.jit, static_argnames=_LOSS_STATIC)
def _term_flow_core(params, h0, xs, targets, lengths, **static) -> TermFlow:
    cell = static["cell"]
    fwd = forward_pass(params, h0, xs, targets, lengths, **static)
    num_steps = xs.shape[0]

    def one_term(index):
        picked = (jnp.arange(num_steps) == index)[:, None, None]
        d_states, deltas = _backward_with_states(
            cell,
            params["cell"],
            h0,
            fwd.mask,
            fwd.states,
            fwd.residuals,
            jnp.where(picked, fwd.d_hs, 0),
        )
        return d_states, cell_grads(cell, params["cell"], xs, deltas)[0]

    d_states, d_cell = jax.vmap(one_term)(jnp.arange(num_steps))
    # The readout sees L_t only through y_t: its term-t gradient is its step-t term.
    terms = {"cell": d_cell, "readout": _per_step_readout_grads(fwd.hs, fwd.d_ys)}
    return TermFlow(d_states, cell.hidden(d_states), terms)


def _validated(core, unbatch_axis):
    """Wrap a core with the core API's validation (``bptt.prepare``); drop the batch axis of
    state-shaped outputs for unbatched inputs."""

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
    ):
        static = dict(loss=loss, placement=placement, reduction=reduction)
        cell, batch = prepare(params, xs, targets, cell=cell, lengths=lengths, h0=h0, **static)
        out = core(params, batch.h0, batch.xs, batch.targets, batch.lengths, cell=cell, **static)
        if batch.batched:
            return out
        unbatch = functools.partial(jax.tree_util.tree_map, lambda a: jnp.take(a, 0, unbatch_axis))
        return out._replace(d_states=unbatch(out.d_states), d_hidden=unbatch(out.d_hidden))

    return run


gradient_flow = _validated(_flow_core, unbatch_axis=1)
gradient_flow.__doc__ = """The backward pass step by step: ``Flow(loss, d_states, d_hidden, steps)``
for the model's loss.

Same arguments as ``bptt_manual`` (params, xs, targets, cell, loss, placement, reduction,
lengths, h0). ``||dL/dh_t||`` per sequence is ``jnp.linalg.norm(flow.d_hidden, axis=-1)``;
``flow.steps["cell"]["W_hh"][t - 1]`` is ``h_{t-1}^T d hp_t``, step t's term of ``dW_hh``.
"""

term_flow = _validated(_term_flow_core, unbatch_axis=2)
term_flow.__doc__ = """The backward pass per loss term: ``TermFlow(d_states, d_hidden, terms)``.

Same arguments as ``bptt_manual``. ``jnp.linalg.norm(tf.d_hidden, axis=-1)[t - 1, k]`` is
``||dL_t/dh_k||`` per sequence; ``tf.terms`` sums over axis 0 to the full gradient. Costs T
reverse scans (vmapped): for short sequences.
"""


# --------------------------------------------------------------------------------------------
# Jacobians dh_T/dh_t


def _flat_state_maps(template):
    """``(flatten, unflatten)`` between an unbatched state and one vector ``(S,)``."""
    leaves, structure = jax.tree_util.tree_flatten(template)

    def flatten(state):
        return jnp.concatenate(jax.tree_util.tree_leaves(state), -1)

    def unflatten(vector):
        return jax.tree_util.tree_unflatten(structure, jnp.split(vector, len(leaves), -1))

    return flatten, unflatten


def _drop_batch(state):
    return jax.tree_util.tree_map(lambda a: a[0], state)


@functools.partial(jax.jit, static_argnames=("cell",))
def _exact_norms(params, h0, xs, lengths, *, cell: Cell):
    num_steps, batch_size = xs.shape[:2]
    hidden_size = params["W_hh"].shape[0]
    mask = length_mask(lengths, num_steps)
    if mask is None:
        mask = jnp.ones((num_steps, batch_size), bool)
    _, (states, _) = scan_states(cell, params, project_inputs(params, xs), h0, mask)
    states_prev = previous_states(h0, states)
    flatten, unflatten = _flat_state_maps(_drop_batch(h0))
    state_size = flatten(_drop_batch(h0)).shape[-1]

    def step_jacobian(x, state_prev, live):
        """``d state_t / d state_{t-1}``, ``(S, S)``, of one sequence at one step."""

        def advance(vector):
            state = unflatten(vector)
            new = step(cell, params, state, x)
            # Past its length a sequence's state is frozen (as in ``scan_states``).
            return flatten(jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new, state))

        return jax.jacfwd(advance)(flatten(state_prev))

    jacobians = jax.vmap(jax.vmap(step_jacobian))(xs, states_prev, mask)  # (t b S S)

    def chain(product, jacobian):  # d s_T/d s_t = d s_T/d s_{t+1} @ d s_{t+1}/d s_t
        product = product @ jacobian
        return product, product

    eye = jnp.broadcast_to(
        jnp.eye(state_size, dtype=xs.dtype), (batch_size, state_size, state_size)
    )
    _, products = jax.lax.scan(chain, eye, jacobians, reverse=True)
    products = jnp.concatenate([products, eye[None]])  # (T+1, b, S, S)
    # The h -> h block: embed h into a state (other parts fixed), read h out of the state.
    zero = jnp.zeros((state_size,), xs.dtype)
    read_h = jax.jacfwd(lambda v: cell.hidden(unflatten(v)))(zero)  # (H, S)
    embed_h = jax.jacfwd(lambda h: flatten(cell.with_hidden(unflatten(zero), h)))(
        jnp.zeros((hidden_size,), xs.dtype)
    )  # (S, H)
    return jnp.linalg.norm(read_h @ products @ embed_h, ord=2, axis=(-2, -1))


def _unit_rows(v):
    norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    return v / jnp.where(norm > 0, norm, 1)


@functools.partial(jax.jit, static_argnames=("cell", "num_iters"))
def _power_norms(params, h0, xs, lengths, key, *, cell: Cell, num_iters: int):
    num_steps, batch_size = xs.shape[:2]
    mask = length_mask(lengths, num_steps)
    if mask is None:
        mask = jnp.ones((num_steps, batch_size), bool)
    xp = project_inputs(params, xs)
    _, (states, _) = scan_states(cell, params, xp, h0, mask)
    all_states = jax.tree_util.tree_map(lambda a0, a: jnp.concatenate([a0[None], a]), h0, states)
    start = _unit_rows(jax.random.normal(key, cell.hidden(h0).shape, xs.dtype))

    def norm_from(t, state_t):
        # Steps before t+1 are frozen (masked), so the full-length scan runs h_t -> h_T with
        # one shape for every t; sequences are independent rows, so each row iterates alone.
        running = mask & (jnp.arange(num_steps) >= t)[:, None]

        def propagate(h):
            final, _ = scan_states(cell, params, xp, cell.with_hidden(state_t, h), running)
            return cell.hidden(final)

        h_t = cell.hidden(state_t)
        _, jvp = jax.linearize(propagate, h_t)
        vjp = jax.linear_transpose(jvp, h_t)

        def iterate(_, v):
            return _unit_rows(vjp(jvp(v))[0])

        v = jax.lax.fori_loop(0, num_iters, iterate, start)
        return jnp.linalg.norm(jvp(v), axis=-1)

    return jax.vmap(norm_from)(jnp.arange(num_steps + 1), all_states)


def _check_cell_params(cell_params) -> None:
    if not isinstance(cell_params, dict) or "W_hh" not in cell_params:
        raise TypeError(
            "cell_params must be a cell's params dict with 'W_xh', 'W_hh', 'b_h' "
            f"(init_model(...)['cell']), got {type(cell_params).__name__}"
            + (f" with keys {sorted(cell_params)}" if isinstance(cell_params, dict) else "")
        )


def jacobian_norms(
    cell, cell_params, xs, h0=None, lengths=None, *, method="exact", num_iters=100, key=None
) -> Array:
    """``||dh_T/dh_t||_2`` (spectral norm) for ``t = 0..T``: ``(T+1, B)``, or ``(T+1,)`` unbatched.

    ``h_T`` is each sequence's last state (its length's); for the LSTM the Jacobian is the
    ``h -> h`` block of the full state Jacobian (``c_t`` held fixed). Row ``T`` is 1.

    Args:
      cell, cell_params, xs, h0, lengths: as for ``unroll``.
      method: ``"exact"``: dense per-step state Jacobians (``jax.jacfwd``) chained; memory
        ``T * B * S^2`` for state size ``S`` (H, 2H for the LSTM), so for small H.
        ``"power"``: ``num_iters`` power iterations on ``J^T J`` with ``jax.linearize`` and its
        transpose through the unroll from step t; no dense Jacobian.
      key: PRNG key of the power iteration's start vector (default ``jax.random.key(0)``).
    """
    cell = get_cell(cell)
    _check_cell_params(cell_params)
    check_choice("method", method, JACOBIAN_METHODS)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    batch = check_inputs(cell, cell_params, xs, h0, lengths)
    state0 = batch.h0
    if method == "exact":
        norms = _exact_norms(cell_params, state0, batch.xs, batch.lengths, cell=cell)
    else:
        key = jax.random.key(0) if key is None else key
        norms = _power_norms(
            cell_params, state0, batch.xs, batch.lengths, key, cell=cell, num_iters=num_iters
        )
    return norms if batch.batched else norms[:, 0]


# --------------------------------------------------------------------------------------------
# The recurrent weights


def _gate_blocks(cell: Cell, cell_params) -> list[tuple[str, Array]]:
    _check_cell_params(cell_params)
    w_hh = cell_params["W_hh"]
    hidden_size = w_hh.shape[0]
    names = GATE_NAMES.get(cell.name, tuple(f"block{k}" for k in range(cell.num_gates)))
    if cell.num_gates == 1:
        names = ("W_hh",)
    return [
        (name, w_hh[:, k * hidden_size : (k + 1) * hidden_size]) for k, name in enumerate(names)
    ]


def recurrent_spectrum(cell, cell_params) -> list[BlockSpectrum]:
    """Singular values and spectral radius of each ``(H, H)`` gate block of ``W_hh``.

    One block (``"W_hh"``) for Elman cells; ``i, f, g, o`` for the LSTM; ``r, z, n`` for the GRU.
    """
    cell = get_cell(cell)
    blocks = []
    for name, block in _gate_blocks(cell, cell_params):
        matrix = np.asarray(block, np.float64)
        blocks.append(
            BlockSpectrum(
                name,
                np.linalg.svd(matrix, compute_uv=False),
                float(np.max(np.abs(np.linalg.eigvals(matrix)))),
            )
        )
    return blocks


def scale_recurrent(cell, cell_params, top_singular_value: float) -> dict:
    """A copy of ``cell_params`` with each gate block of ``W_hh`` rescaled so that its largest
    singular value is ``top_singular_value``."""
    cell = get_cell(cell)
    scaled = [
        block * (top_singular_value / jnp.linalg.norm(block, ord=2))
        for _, block in _gate_blocks(cell, cell_params)
    ]
    return {**cell_params, "W_hh": jnp.concatenate(scaled, axis=1)}
