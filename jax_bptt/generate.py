"""Sampling token sequences (e.g. text) from a trained next-token model, with a temperature.

The model reads one-hot tokens (``input_size == output_size == vocabulary size``). The prompt is
run through ``unroll``; then each step samples ``token ~ softmax(logits / temperature)`` (argmax
when ``temperature == 0``), feeds it back one-hot and takes one ``cells.step``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import Cell, get_cell, step
from jax_bptt.model import readout
from jax_bptt.unroll import unroll
from jax_bptt.validation import check_model_params


@functools.partial(jax.jit, static_argnames=("cell", "length", "temperature"))
def _generate(params, key, prompt, *, cell: Cell, length: int, temperature: float):
    vocab_size = params["cell"]["W_xh"].shape[0]
    dtype = params["cell"]["W_xh"].dtype
    hs, state = unroll(cell, params["cell"], jax.nn.one_hot(prompt, vocab_size, dtype=dtype))
    logits = readout(params["readout"], hs[-1])

    def sample_step(carry, step_key):
        state, logits = carry
        if temperature == 0:
            token = jnp.argmax(logits).astype(jnp.int32)
        else:
            token = jax.random.categorical(step_key, logits / temperature).astype(jnp.int32)
        state = step(cell, params["cell"], state, jax.nn.one_hot(token, vocab_size, dtype=dtype))
        return (state, readout(params["readout"], cell.hidden(state))), token

    _, tokens = jax.lax.scan(sample_step, (state, logits), jax.random.split(key, length))
    return tokens


def generate(params, key, prompt_ids, length: int, *, cell, temperature: float = 1.0):
    """Sample ``length`` token ids that continue ``prompt_ids``.

    Args:
      params: ``init_model(...)`` pytree of a model with ``input_size == output_size``.
      key: ``jax.random`` key.
      prompt_ids: ``(P,)`` integer ids, ``P >= 1``, each in ``[0, vocab_size)``.
      length: number of ids to sample, ``>= 1``.
      cell: the model's cell name or ``Cell``.
      temperature: ``> 0`` scales the logits (below 1: more conservative); ``0`` is greedy.

    Returns:
      ``(length,)`` int32 ids.

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 5, 8, 5)
      >>> generate(params, jax.random.key(1), jnp.array([0, 3]), 4, cell="lstm").shape
      (4,)
    """
    check_model_params(params)
    cell = get_cell(cell)
    vocab_size = params["cell"]["W_xh"].shape[0]
    if params["readout"]["W_hy"].shape[-1] != vocab_size:
        raise ValueError(
            "generate needs a next-token model with input_size == output_size, got input_size="
            f"{vocab_size} and output_size={params['readout']['W_hy'].shape[-1]}"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D integer array, got {prompt.dtype}{prompt.shape}"
        )
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise ValueError(
            f"prompt_ids must lie in [0, {vocab_size}), got range [{prompt.min()}, {prompt.max()}]"
        )
    return _generate(
        params,
        key,
        jnp.asarray(prompt, jnp.int32),
        cell=cell,
        length=length,
        temperature=float(temperature),
    )
