"""Step-at-a-time inference with trained params: ``init_state``, ``step`` and ``generate``.

``step`` runs one time step through every layer of a unidirectional model (no dropout), so that
feeding a sequence step by step equals ``jax_bptt.unroll`` on it; ``generate`` samples token
sequences (e.g. text) from a next-token model with it: the prompt runs through ``unroll``, then
each step samples ``token ~ softmax(logits / temperature)`` (argmax when ``temperature == 0``)
and feeds it back as a token id (the same as one-hot, by a row gather).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.backends import ScanOptions
from jax_bptt.cells import Cell, get_cell, is_token_ids
from jax_bptt.model import readout, run_auto, stack_forward, unbatch
from jax_bptt.validation import (
    check_params,
    check_positive_int,
    check_stack_options,
    check_state,
    check_xs,
)

_ONE_STEP = ScanOptions(unroll=1)


def _check_streaming(params, cell: Cell, residual):
    shape = check_params(params, cell)
    check_stack_options(shape, 0.0, None, residual)
    if "bwd" in shape.directions:
        raise ValueError(
            "step-at-a-time inference needs a unidirectional model: a backward direction reads "
            "the whole sequence first (use jax_bptt.unroll)"
        )
    return shape


def init_state(params, batch_size: int | None = None, *, cell) -> list:
    """The zero states ``[{"fwd": state}, ...]`` (leaves ``(batch_size, H)``, or ``(H,)`` for
    ``batch_size=None``) that ``step`` starts from."""
    cell = get_cell(cell)
    shape = _check_streaming(params, cell, False)
    batch_shape = () if batch_size is None else (check_positive_int("batch_size", batch_size),)
    zero = cell.zero_state(batch_shape, shape.hidden_size, shape.dtype)
    return [{"fwd": zero} for _ in range(shape.num_layers)]


def _step(params, state, x, *, cell: Cell, residual):
    """One step through the stack, ``x (b d)`` or ids ``(b,)`` -> (new states, outputs ``(b o)``):
    the stack's own forward over a sequence of one step, so streaming cannot drift from it."""
    outputs, new_state, _ = stack_forward(
        cell, _ONE_STEP, params["layers"], state, x[None], None, None, residual, run_auto
    )
    return new_state, readout(params["readout"], outputs[0])


_jitted_step = jax.jit(_step, static_argnames=("cell", "residual"))


def step(params, state, x, *, cell, residual=False):
    """One time step of the model: ``(state, x (B, D)) -> (new state, outputs (B, O))``.

    ``state`` as from ``init_state`` or ``unroll``'s final states; ``x`` may be token ids
    ``(B,)``, and ``(D,)`` (or one id) with unbatched states. Equals ``unroll`` step by step.

    Example:
      >>> params = init_model(jax.random.key(0), "gru", 3, 8, 2, num_layers=2)
      >>> state = init_state(params, 4, cell="gru")
      >>> state, y = step(params, state, jnp.ones((4, 3)), cell="gru")
      >>> y.shape
      (4, 2)
    """
    cell = get_cell(cell)
    shape = _check_streaming(params, cell, residual)
    x = jnp.asarray(x)
    ids = is_token_ids(x)
    features = () if ids else (shape.input_size,)
    if x.shape[len(x.shape) - len(features) :] != features or x.ndim > len(features) + 1:
        want = (
            "(B,) or () token ids" if ids else f"(B, {shape.input_size}) or ({shape.input_size},)"
        )
        raise ValueError(f"x must have shape {want}, got {x.shape}")
    check_xs(x[None], shape)  # dtype and id range
    batched = x.ndim == len(features) + 1
    try:
        check_state(state, cell, shape, x.shape[0] if batched else 1, batched)
    except (TypeError, ValueError) as error:
        raise type(error)(f"state: {error}".replace("h0", "state")) from None
    if not batched:  # the stack runs on (t b ...): give the single sequence a batch of one
        state, x = jax.tree_util.tree_map(lambda a: a[None], (state, x))
    new_state, y = _jitted_step(params, state, x, cell=cell, residual=residual)
    return (new_state, y) if batched else (unbatch(new_state, False), y[0])


@functools.partial(jax.jit, static_argnames=("cell", "residual", "length", "temperature"))
def _generate(params, key, prompt, *, cell: Cell, residual, length: int, temperature: float):
    layers = params["layers"]
    dtype = layers[0]["fwd"]["W_xh"].dtype
    h0 = [{"fwd": cell.zero_state((1,), layer["fwd"]["W_hh"].shape[0], dtype)} for layer in layers]
    xs = prompt[:, None]  # (p 1) token ids: the input projection is a row gather
    outputs, state, _ = stack_forward(
        cell, _ONE_STEP, layers, h0, xs, None, None, residual, run_auto
    )
    logits = readout(params["readout"], outputs[-1])

    def sample_step(carry, step_key):
        state, logits = carry
        if temperature == 0:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(step_key, logits / temperature).astype(jnp.int32)
        return _step(params, state, token, cell=cell, residual=residual), token[0]

    _, tokens = jax.lax.scan(sample_step, (state, logits), jax.random.split(key, length))
    return tokens


def generate(params, key, prompt_ids, length: int, *, cell, residual=False, temperature=1.0):
    """Sample ``length`` token ids that continue ``prompt_ids``.

    Args:
      params: ``init_model(...)`` of a unidirectional next-token model, ``input_size ==
        output_size``, any depth.
      key: ``jax.random`` key.
      prompt_ids: ``(P,)`` integer ids, ``P >= 1``, each in ``[0, vocab_size)``.
      length: number of ids to sample, ``>= 1``.
      cell, residual: the model's.
      temperature: ``> 0`` scales the logits (below 1: more conservative); ``0`` is greedy.

    Returns:
      ``(length,)`` int32 ids.

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 5, 8, 5, num_layers=2)
      >>> generate(params, jax.random.key(1), jnp.array([0, 3]), 4, cell="lstm").shape
      (4,)
    """
    cell = get_cell(cell)
    shape = _check_streaming(params, cell, residual)
    if shape.output_size != shape.input_size:
        raise ValueError(
            "generate needs a next-token model with input_size == output_size, got input_size="
            f"{shape.input_size} and output_size={shape.output_size}"
        )
    length = check_positive_int("length", length)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D integer array, got {prompt.dtype}{prompt.shape}"
        )
    if prompt.min() < 0 or prompt.max() >= shape.input_size:
        raise ValueError(
            f"prompt_ids must lie in [0, {shape.input_size}), got range "
            f"[{prompt.min()}, {prompt.max()}]"
        )
    return _generate(
        params, key, jnp.asarray(prompt, jnp.int32),
        cell=cell, residual=residual, length=length, temperature=float(temperature),
    )  # fmt: skip
