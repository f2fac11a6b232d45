"""Input checks shared by the public API: clear errors before any work is done.

Shapes are static in JAX, so every shape/dtype check here runs at trace time, also inside a user's
``jax.jit``. Value checks (``lengths`` within ``[0, T]``) need concrete values: they run when the
caller passes concrete arrays and are skipped for tracers, where lengths are clamped to ``[0, T]``
by construction of the mask (``t < length``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import Cell

LOSSES = ("mse", "cross_entropy")
PLACEMENTS = ("per_step", "last_step")
REDUCTIONS = ("sum", "mean")


class Batch(NamedTuple):
    """Inputs brought to the batched, time-major layout; ``batched`` says whether to undo it."""

    xs: jax.Array  # (t b d)
    h0: Any  # state pytree of (b h) arrays (zeros when none was given)
    lengths: jax.Array | None  # (b,) int
    targets: jax.Array | None
    batched: bool


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_model_params(params: Any) -> None:
    if not isinstance(params, dict) or "cell" not in params or "readout" not in params:
        raise TypeError(
            "params must be a dict {'cell': ..., 'readout': {'W_hy', 'b_y'}} as returned by "
            f"jax_bptt.init_model, got {type(params).__name__}"
        )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_inputs(cell: Cell, cell_params: dict, xs, h0=None, lengths=None) -> Batch:
    """Validate an unroll's arguments and add a batch axis to unbatched ones.

    Args:
      xs: ``(T, B, D)`` or ``(T, D)`` for one unbatched sequence; floating point.
      h0: initial state with leaves ``(B, H)`` (``(H,)`` unbatched), or None for zeros (the
        returned ``Batch.h0`` is then the cell's zero state).
      lengths: ``(B,)`` integers in ``[0, T]`` (a scalar when unbatched), or None.
    """
    if not hasattr(xs, "dtype") or not hasattr(xs, "shape"):
        raise TypeError(f"xs must be an array of shape (T, B, D) or (T, D), got {type(xs)}")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(
            f"xs must be floating point (one-hot encode integer tokens first), got {xs.dtype}"
        )
    if xs.ndim not in (2, 3):
        raise ValueError(f"xs must have shape (T, B, D) or (T, D), got shape {_shape(xs)}")
    w_xh = cell_params["W_xh"]
    input_size, hidden_size = w_xh.shape[0], cell_params["W_hh"].shape[0]
    if xs.shape[-1] != input_size:
        raise ValueError(
            f"xs has feature size {xs.shape[-1]} but the params expect input_size={input_size} "
            f"(W_xh has shape {_shape(w_xh)}); xs shape {_shape(xs)}"
        )
    batched = xs.ndim == 3
    if not batched:
        xs = xs[:, None, :]
    num_steps, batch_size = xs.shape[0], xs.shape[1]
    want = (batch_size, hidden_size) if batched else (hidden_size,)

    if h0 is not None:
        leaves = jax.tree_util.tree_leaves(h0)
        template = jax.tree_util.tree_structure(cell.zero_state((), hidden_size, xs.dtype))
        if jax.tree_util.tree_structure(h0) != template:
            raise TypeError(
                f"h0 must have the structure of {cell.name}'s state {template} with leaves of "
                f"shape {want}, got {jax.tree_util.tree_structure(h0)}"
            )
        for leaf in leaves:
            if _shape(leaf) != want:
                raise ValueError(
                    f"h0 leaves must have shape {want} (batch, hidden_size) to match xs "
                    f"{_shape(xs) if batched else _shape(xs[:, 0])}, got {_shape(leaf)}"
                )
        if not batched:
            h0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], h0)

    if lengths is not None:
        want_l = (batch_size,) if batched else ()
        if not hasattr(lengths, "dtype"):
            lengths = np.asarray(lengths)
        if _shape(lengths) != want_l:
            raise ValueError(
                f"lengths must have shape {want_l} (one length per sequence of xs), got "
                f"{_shape(lengths)}"
            )
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
        if _is_concrete(lengths):
            values = np.asarray(lengths)
            if values.size and (values.min() < 0 or values.max() > num_steps):
                raise ValueError(
                    f"lengths must lie in [0, T={num_steps}], got min {values.min()} "
                    f"and max {values.max()}"
                )
        lengths = jnp.reshape(jnp.asarray(lengths), (batch_size,))
    if h0 is None:
        h0 = cell.zero_state((batch_size,), hidden_size, xs.dtype)
    return Batch(xs, h0, lengths, None, batched)


def check_targets(
    targets,
    loss: str,
    placement: str,
    num_steps: int,
    batch_size: int,
    output_size: int,
    batched: bool,
):
    """Validate targets against the loss and placement; return them with a batch axis.

    mse: float targets ``(T, B, O)`` per step, ``(B, O)`` last step.
    cross_entropy: integer class ids ``(T, B)`` per step, ``(B,)`` last step.
    (Unbatched: the same without ``B``.)
    """
    check_choice("loss", loss, LOSSES)
    check_choice("placement", placement, PLACEMENTS)
    lead = (num_steps,) if placement == "per_step" else ()
    batch = (batch_size,) if batched else ()
    trail = (output_size,) if loss == "mse" else ()
    want = (*lead, *batch, *trail)
    if not hasattr(targets, "dtype"):
        targets = np.asarray(targets)
    if _shape(targets) != want:
        names = ("T " if lead else "") + ("B " if batched else "") + ("O" if trail else "")
        raise ValueError(
            f"targets for loss={loss!r}, placement={placement!r} must have shape "
            f"({names.strip().replace(' ', ', ')}) = {want}, got {_shape(targets)}"
        )
    if loss == "mse" and not jnp.issubdtype(targets.dtype, jnp.floating):
        raise TypeError(f"targets for loss='mse' must be floating point, got {targets.dtype}")
    if loss == "cross_entropy" and not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"targets for loss='cross_entropy' must be integer class ids, got {targets.dtype}"
        )
    if not batched:
        targets = jnp.expand_dims(jnp.asarray(targets), 1 if placement == "per_step" else 0)
    return jnp.asarray(targets)
