"""Recurrent cells: each one's forward step and its hand-derived backward step, side by side.

Dimension legend used throughout the package:
    t  time steps (T)          b  batch (B)
    d  input features (D)      h  hidden units (H)
    g  gate units (G * H: 1 for Elman, 4 for LSTM, 3 for GRU)
    o  readout outputs (O)

Every cell splits one time step into two GEMMs and a pointwise part:

    xp_t = x_t @ W_xh + b_h        (t b g)  -- hoisted: one GEMM for all t before the scan
    hp_t = h_{t-1} @ W_hh          (b g)    -- the only GEMM inside the recurrence
    state_t, res_t = cell.forward(params, xp_t, hp_t, state_{t-1})   -- pointwise

so the backward step is pointwise too: ``cell.backward`` maps ``d state_t`` to the gradients of
``xp_t``, ``hp_t`` and the direct part of ``d state_{t-1}``; the caller adds ``d hp_t @ W_hh^T``.
Weight gradients are then single GEMMs over all steps (see ``jax_bptt.scan.cell_grads``):

    dW_xh = sum_t x_t^T d xp_t,   dW_hh = sum_t h_{t-1}^T d hp_t,   db_h = sum_t d xp_t

Params are plain dicts (pytrees). Matrices act on row vectors (``x @ W``), so ``W_xh`` is
``(D, G*H)``; PyTorch stores the transpose (see ``jax_bptt.torch_convert``).

    Elman:  W_xh (d h),  W_hh (h h),  b_h (h)
    LSTM:   W_xh (d 4h), W_hh (h 4h), b_h (4h)       gate order i, f, g, o (PyTorch)
    GRU:    W_xh (d 3h), W_hh (h 3h), b_h (3h), b_hn (h)   gate order r, z, n (PyTorch)

The LSTM's single ``b_h`` is PyTorch's ``b_ih + b_hh``. The GRU's ``b_h`` is ``b_ih`` plus the
r and z parts of ``b_hh``; only the n part of ``b_hh`` must stay separate (``b_hn``) because it sits
inside the reset gate: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Array]
State = Any  # h (b h) for Elman/GRU, (h, c) for LSTM


class Cell(NamedTuple):
    """A recurrent cell as a bundle of pure functions (in the spirit of optax/stax).

    Attributes:
      name: registry name, e.g. ``"lstm"``.
      num_gates: G, the number of H-sized blocks in the projections.
      init: ``(key, input_size, hidden_size, dtype, recurrent_init) -> params``.
      zero_state: ``(batch_shape, hidden_size, dtype) -> state``.
      hidden: ``state -> h``, the part of the state the readout and next layer see.
      with_hidden: ``(state, h) -> state`` with its hidden part replaced by ``h``.
      forward: ``(params, xp, hp, state_prev) -> (state, residuals)``, pointwise.
      backward: ``(params, residuals, state_prev, d_state) -> (d_state_prev, d_xp, d_hp)``,
        pointwise; ``d_state_prev`` excludes the ``d_hp @ W_hh^T`` term, which the caller adds.
      bias_grads: ``(d_xp_sum, d_hp_sum) -> {bias name: gradient}``.
      pointwise_params: names of params that ``forward`` reads itself (not through ``xp``/``hp``);
        their gradients come from ``backward``'s optional fourth result (``make_cell`` derives
        it), summed over steps.

    Build one with ``make_cell`` (keywords, defaults for an ``h``-only state, and a backward
    derived by ``jax.vjp`` when none is written).
    """

    name: str
    num_gates: int
    init: Callable[..., Params]
    zero_state: Callable[..., State]
    hidden: Callable[[State], Array]
    with_hidden: Callable[[State, Array], State]
    forward: Callable[..., tuple[State, Any]]
    backward: Callable[..., tuple]
    bias_grads: Callable[[Array, Array], Params]
    pointwise_params: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Initialisers


def uniform_init(key: Array, shapes: dict[str, tuple[int, ...]], hidden_size: int, dtype) -> Params:
    """PyTorch's default for RNN weights and biases, U(-1/sqrt(H), 1/sqrt(H)), for every named
    shape, cut from one draw: one random call compiles several times faster than one per array."""
    bound = 1.0 / math.sqrt(hidden_size)
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = jax.random.uniform(key, (sum(sizes),), dtype, -bound, bound)
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    return {
        name: piece.reshape(shape)
        for (name, shape), piece in zip(shapes.items(), pieces, strict=True)
    }


def orthogonal_blocks(key: Array, hidden_size: int, num_gates: int, dtype) -> Array:
    """``(H, G*H)``: an independent random orthogonal ``(H, H)`` block per gate."""
    keys = jax.random.split(key, num_gates)
    blocks = [jax.nn.initializers.orthogonal()(k, (hidden_size, hidden_size), dtype) for k in keys]
    return jnp.concatenate(blocks, axis=1)


def identity_blocks(hidden_size: int, num_gates: int, dtype) -> Array:
    """``(H, G*H)``: identity per gate (IRNN, Le, Jaitly & Hinton 2015)."""
    return jnp.tile(jnp.eye(hidden_size, dtype=dtype), (1, num_gates))


RECURRENT_INITS = ("uniform", "orthogonal", "identity")


def _init_weights(key, input_size, hidden_size, num_gates, dtype, recurrent_init, **extra):
    """``W_xh``, ``W_hh``, ``b_h`` and the ``extra`` shapes; ``W_hh`` by ``recurrent_init``."""
    if recurrent_init not in RECURRENT_INITS:
        raise ValueError(f"recurrent_init must be one of {RECURRENT_INITS}, got {recurrent_init!r}")
    gh = num_gates * hidden_size
    shapes = {"W_xh": (input_size, gh), "W_hh": (hidden_size, gh), "b_h": (gh,), **extra}
    if recurrent_init == "uniform":
        return uniform_init(key, shapes, hidden_size, dtype)
    k_uniform, k_h = jax.random.split(key)
    del shapes["W_hh"]
    params = uniform_init(k_uniform, shapes, hidden_size, dtype)
    if recurrent_init == "orthogonal":
        params["W_hh"] = orthogonal_blocks(k_h, hidden_size, num_gates, dtype)
    else:
        params["W_hh"] = identity_blocks(hidden_size, num_gates, dtype)
    return params


def _zero_h(batch_shape, hidden_size, dtype):
    return jnp.zeros((*batch_shape, hidden_size), dtype)


# --------------------------------------------------------------------------------------------
# Building a cell: keywords, and a backward derived from the forward when none is written


def _derived_backward(forward: Callable, pointwise_params: tuple[str, ...]) -> Callable:
    """The pointwise backward of ``forward(params, xp, hp, state_prev) -> state`` by ``jax.vjp``.

    The forward saves its inputs ``(xp, hp)`` and the backward re-runs it under ``jax.vjp``: one
    more pointwise forward per step than a hand-written backward, no derivation by hand.
    """

    def backward(params, saved, state_prev, d_state):
        xp, hp = saved
        pointwise = {name: params[name] for name in pointwise_params}

        def step(pointwise, xp, hp, state_prev):
            return forward({**params, **pointwise}, xp, hp, state_prev)

        _, vjp = jax.vjp(step, pointwise, xp, hp, state_prev)
        d_pointwise, d_xp, d_hp, d_prev = vjp(d_state)
        if pointwise_params:
            return d_prev, d_xp, d_hp, d_pointwise
        return d_prev, d_xp, d_hp

    return backward


def make_cell(
    name: str,
    *,
    num_gates: int,
    forward: Callable,
    backward: Callable | None = None,
    init: Callable | None = None,
    zero_state: Callable = _zero_h,
    hidden: Callable = lambda state: state,
    with_hidden: Callable = lambda state, h: h,
    bias_grads: Callable = lambda d_xp_sum, d_hp_sum: {"b_h": d_xp_sum},
    pointwise_params: tuple[str, ...] = (),
) -> Cell:
    """A ``Cell`` from keywords (the built-in cells below are made so too); every BPTT mode
    (manual, fast, checkpointed, truncated, any depth) then runs it with the hoisted GEMMs.

    Args:
      name: a label (errors and reports use it).
      num_gates: G: the projections ``xp = x W_xh + b_h`` and ``hp = h W_hh`` are ``(b, G*H)``.
      forward: with ``backward=None``, ``(params, xp, hp, state_prev) -> state``, pointwise; its
        backward is derived by ``jax.vjp``. With a hand-written ``backward``,
        ``(params, xp, hp, state_prev) -> (state, saved)`` (see ``Cell``).
      init: ``(key, input_size, hidden_size, dtype, recurrent_init) -> params``; default the
        shared ``W_xh (d gh)``, ``W_hh (h gh)``, ``b_h (gh,)`` with PyTorch's uniform init.
      zero_state, hidden, with_hidden: for a state other than ``h (b h)``, e.g. ``(h, c)``.
      bias_grads: ``(d_xp_sum, d_hp_sum) -> {bias: gradient}``.
      pointwise_params: params the forward reads itself, besides ``xp`` and ``hp`` (e.g. the GRU's
        ``b_hn``); with a derived backward their gradients come from ``jax.vjp`` too.

    Example (a minimal gated unit, Zhou et al. 2016, with its backward derived):
      >>> def mgu(params, xp, hp, h_prev):
      ...     x_f, x_n = jnp.split(xp, 2, axis=-1)
      ...     h_f, h_n = jnp.split(hp, 2, axis=-1)
      ...     f = jax.nn.sigmoid(x_f + h_f)
      ...     return (1 - f) * h_prev + f * jnp.tanh(x_n + f * h_n)
      >>> MGU = make_cell("mgu", num_gates=2, forward=mgu)
      >>> params = init_model(jax.random.key(0), MGU, 3, 8, 2)
      >>> bptt_manual(params, jnp.ones((5, 4, 3)), jnp.zeros((5, 4, 2)), cell=MGU).loss.shape
      ()
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if isinstance(num_gates, bool) or not isinstance(num_gates, int) or num_gates < 1:
        raise ValueError(f"num_gates must be an int >= 1, got {num_gates!r}")
    for arg, fn in (("forward", forward), ("zero_state", zero_state), ("hidden", hidden)):
        if not callable(fn):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    pointwise_params = tuple(pointwise_params)
    if backward is None:
        user_forward = forward

        def forward(params, xp, hp, state_prev):
            return user_forward(params, xp, hp, state_prev), (xp, hp)

        backward = _derived_backward(user_forward, pointwise_params)
    if init is None:

        def init(key, input_size, hidden_size, dtype=jnp.float32, recurrent_init="uniform"):
            return _init_weights(key, input_size, hidden_size, num_gates, dtype, recurrent_init)

    return Cell(
        name, num_gates, init, zero_state, hidden, with_hidden, forward, backward, bias_grads,
        pointwise_params,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Elman RNN: h_t = act(x_t W_xh + b_h + h_{t-1} W_hh)


def elman_cell(name: str, act: Callable, act_grad_from_output: Callable) -> Cell:
    """An Elman cell for any activation whose derivative is a function of its output."""

    def init(key, input_size, hidden_size, dtype=jnp.float32, recurrent_init="uniform"):
        """Elman params; ``recurrent_init="identity"`` with ReLU and zero bias is the IRNN."""
        params = _init_weights(key, input_size, hidden_size, 1, dtype, recurrent_init)
        if recurrent_init == "identity":
            params["b_h"] = jnp.zeros_like(params["b_h"])
        return params

    def forward(params, xp, hp, h_prev):
        del params, h_prev
        h = act(xp + hp)
        return h, h

    def backward(params, h, h_prev, dh):
        """Adjoint: ``delta_t = dh_t * act'(z_t)``; ``d xp_t = d hp_t = delta_t``.

        The caller completes ``dh_{t-1} = delta_t @ W_hh^T`` (plus the readout's
        ``dL_{t-1}/dh_{t-1}``): the seed's ``delta_t = (W_hy^T dL_t/dy_t + W_hh^T delta_{t+1})
        * (1 - h_t^2)`` for tanh. Nothing flows to ``h_{t-1}`` except through ``W_hh``.
        """
        del params
        delta = dh * act_grad_from_output(h)
        return jnp.zeros_like(h_prev), delta, delta

    return make_cell(name, num_gates=1, init=init, forward=forward, backward=backward)


ELMAN_TANH = elman_cell("elman_tanh", jnp.tanh, lambda h: 1.0 - h * h)
# ReLU'(z) from its output: 1 where h > 0 (the subgradient at 0 is 0, as in jax.nn.relu).
ELMAN_RELU = elman_cell("elman_relu", jax.nn.relu, lambda h: (h > 0).astype(h.dtype))


# --------------------------------------------------------------------------------------------
# LSTM (PyTorch's equations, gate order i, f, g, o)
#   i, f, o = sigmoid(.), g = tanh(.)  on  a = xp + hp
#   c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)


def _lstm_init(
    key, input_size, hidden_size, dtype=jnp.float32, recurrent_init="uniform", forget_bias=None
):
    """LSTM params; ``forget_bias`` (e.g. 1.0) sets the f-gate bias (Jozefowicz et al. 2015)."""
    params = _init_weights(key, input_size, hidden_size, 4, dtype, recurrent_init)
    if forget_bias is not None:
        params["b_h"] = params["b_h"].at[hidden_size : 2 * hidden_size].set(forget_bias)
    return params


def _lstm_zero_state(batch_shape, hidden_size, dtype):
    zeros = _zero_h(batch_shape, hidden_size, dtype)
    return (zeros, zeros)


def _lstm_forward(params, xp, hp, state_prev):
    del params
    _, c_prev = state_prev
    a_i, a_f, a_g, a_o = jnp.split(xp + hp, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(a_i), jax.nn.sigmoid(a_f), jnp.tanh(a_g), jax.nn.sigmoid(a_o)
    c = f * c_prev + i * g
    tanh_c = jnp.tanh(c)
    h = o * tanh_c
    return (h, c), (i, f, g, o, tanh_c)


def _lstm_backward(params, res, state_prev, d_state):
    """Adjoint of one LSTM step, given ``(dh_t, dc_t)`` from the future and the readout.

    dc      = dc_t + dh_t * o * (1 - tanh(c_t)^2)
    do      = dh_t * tanh(c_t)          da_o = do * o (1 - o)
    di      = dc * g                    da_i = di * i (1 - i)
    df      = dc * c_{t-1}              da_f = df * f (1 - f)
    dg      = dc * i                    da_g = dg * (1 - g^2)
    dc_{t-1} = dc * f                   d xp = d hp = [da_i, da_f, da_g, da_o]
    dh_{t-1} = d hp @ W_hh^T            (added by the caller)
    """
    del params
    i, f, g, o, tanh_c = res
    _, c_prev = state_prev
    dh, dc_next = d_state
    dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
    da = jnp.concatenate(
        [
            dc * g * i * (1.0 - i),
            dc * c_prev * f * (1.0 - f),
            dc * i * (1.0 - g * g),
            dh * tanh_c * o * (1.0 - o),
        ],
        axis=-1,
    )
    return (jnp.zeros_like(dh), dc * f), da, da


LSTM = make_cell(
    "lstm",
    num_gates=4,
    init=_lstm_init,
    zero_state=_lstm_zero_state,
    hidden=lambda state: state[0],
    with_hidden=lambda state, h: (h, state[1]),
    forward=_lstm_forward,
    backward=_lstm_backward,
)


# --------------------------------------------------------------------------------------------
# GRU (PyTorch's equations, gate order r, z, n)
#   r = sigmoid(xp_r + hp_r),  z = sigmoid(xp_z + hp_z)
#   n = tanh(xp_n + r * (hp_n + b_hn)),  h_t = (1 - z) * n + z * h_{t-1}


def _gru_init(key, input_size, hidden_size, dtype=jnp.float32, recurrent_init="uniform"):
    """GRU params: the shared layout plus ``b_hn``, the n-gate's recurrent bias."""
    return _init_weights(
        key, input_size, hidden_size, 3, dtype, recurrent_init, b_hn=(hidden_size,)
    )


def _gru_forward(params, xp, hp, h_prev):
    x_r, x_z, x_n = jnp.split(xp, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hp, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    hn = h_n + params["b_hn"]
    n = jnp.tanh(x_n + r * hn)
    h = (1.0 - z) * n + z * h_prev
    return h, (r, z, n, hn)


def _gru_backward(params, res, h_prev, dh):
    """Adjoint of one GRU step, given ``dh_t``.

    dn  = dh * (1 - z)                  da_n = dn * (1 - n^2)       (a_n = xp_n + r * hn)
    dz  = dh * (h_{t-1} - n)            da_z = dz * z (1 - z)
    dr  = da_n * hn                     da_r = dr * r (1 - r)
    d xp = [da_r, da_z, da_n],          d hp = [da_r, da_z, da_n * r],   d b_hn = da_n * r
    dh_{t-1} = dh * z + d hp @ W_hh^T   (the second term added by the caller)
    """
    del params
    r, z, n, hn = res
    da_n = dh * (1.0 - z) * (1.0 - n * n)
    da_z = dh * (h_prev - n) * z * (1.0 - z)
    da_r = da_n * hn * r * (1.0 - r)
    d_xp = jnp.concatenate([da_r, da_z, da_n], axis=-1)
    d_hp = jnp.concatenate([da_r, da_z, da_n * r], axis=-1)
    return dh * z, d_xp, d_hp


def _gru_bias_grads(d_xp_sum, d_hp_sum):
    hidden_size = d_hp_sum.shape[-1] // 3
    return {"b_h": d_xp_sum, "b_hn": d_hp_sum[..., 2 * hidden_size :]}


GRU = make_cell(
    "gru",
    num_gates=3,
    init=_gru_init,
    forward=_gru_forward,
    backward=_gru_backward,
    bias_grads=_gru_bias_grads,
)


# --------------------------------------------------------------------------------------------

CELLS: dict[str, Cell] = {c.name: c for c in (ELMAN_TANH, ELMAN_RELU, LSTM, GRU)}


def get_cell(cell: str | Cell) -> Cell:
    """Return the ``Cell`` for a name in ``CELLS`` (or pass a ``Cell`` through)."""
    if isinstance(cell, Cell):
        return cell
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    return CELLS[cell]


def is_token_ids(xs) -> bool:
    """Integer inputs are token ids: row ``i`` of ``W_xh`` stands for the one-hot vector ``e_i``."""
    return jnp.issubdtype(xs.dtype, jnp.integer)


def matmul(a: Array, b: Array, compute_dtype=None) -> Array:
    """``a @ b``; with ``compute_dtype`` (e.g. ``"bfloat16"``) the operands are cast to it and the
    products accumulated in their own dtype (``preferred_element_type``): mixed precision."""
    if compute_dtype is None:
        return a @ b
    out = jnp.result_type(a, b)
    return jnp.matmul(a.astype(compute_dtype), b.astype(compute_dtype), preferred_element_type=out)


def project_inputs(params: Params, xs: Array, compute_dtype=None) -> Array:
    """``(..., d) -> (..., g)``: ``xs @ W_xh + b_h``, one GEMM for every step at once (operands in
    ``compute_dtype`` if given); for token ids ``(...)`` a row gather ``W_xh[xs] + b_h`` (the same
    as the GEMM with one-hot inputs)."""
    if is_token_ids(xs):
        return jnp.take(params["W_xh"], xs, axis=0) + params["b_h"]
    return matmul(xs, params["W_xh"], compute_dtype) + params["b_h"]


def step(cell: str | Cell, params: Params, state: State, x: Array) -> State:
    """One full time step ``state_{t-1}, x_t -> state_t`` (unhoisted; for reading and tests)."""
    cell = get_cell(cell)
    xp = project_inputs(params, x)
    hp = cell.hidden(state) @ params["W_hh"]
    return cell.forward(params, xp, hp, state)[0]
