"""A model = a recurrent cell plus a linear readout ``y_t = h_t @ W_hy + b_y``.

Params are a plain dict pytree::

    {"cell": {"W_xh": (d g), "W_hh": (h g), "b_h": (g,), ...},
     "readout": {"W_hy": (h o), "b_y": (o,)}}
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_bptt.cells import get_cell


def init_model(
    key: jax.Array,
    cell: str,
    input_size: int,
    hidden_size: int,
    output_size: int,
    *,
    dtype=jnp.float32,
    recurrent_init: str = "uniform",
    forget_bias: float | None = None,
) -> dict:
    """Initialise a cell and its readout (PyTorch's default U(-1/sqrt(H), 1/sqrt(H)) for both).

    Args:
      cell: ``"elman_tanh"``, ``"elman_relu"``, ``"lstm"`` or ``"gru"``.
      recurrent_init: ``"uniform"`` (PyTorch), ``"orthogonal"`` or ``"identity"`` (IRNN: use with
        ``"elman_relu"``; the recurrent bias is then zero).
      forget_bias: LSTM only, a constant for the forget-gate bias (1.0 is the usual choice).
    """
    for name, value in (
        ("input_size", input_size),
        ("hidden_size", hidden_size),
        ("output_size", output_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    spec = get_cell(cell)
    k_cell, k_w, k_b = jax.random.split(key, 3)
    extra = {} if forget_bias is None else {"forget_bias": forget_bias}
    if forget_bias is not None and spec.name != "lstm":
        raise ValueError(f"forget_bias applies to the lstm cell only, got cell={spec.name!r}")
    bound = 1.0 / math.sqrt(hidden_size)
    return {
        "cell": spec.init(k_cell, input_size, hidden_size, dtype, recurrent_init, **extra),
        "readout": {
            "W_hy": jax.random.uniform(k_w, (hidden_size, output_size), dtype, -bound, bound),
            "b_y": jax.random.uniform(k_b, (output_size,), dtype, -bound, bound),
        },
    }


def readout(params: dict, hs: jax.Array) -> jax.Array:
    """``(..., h) -> (..., o)``: ``hs @ W_hy + b_y``."""
    return hs @ params["W_hy"] + params["b_y"]
