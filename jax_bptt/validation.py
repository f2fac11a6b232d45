"""Input checks shared by the public API: clear errors before any work is done.

Shapes are static in JAX, so every shape/dtype check here runs at trace time, also inside a user's
``jax.jit``. Value checks (``lengths`` within ``[0, T]``) need concrete values: they run when the
caller passes concrete arrays and are skipped for tracers, where lengths are clamped to ``[0, T]``
by construction of the mask (``t < length``).

The params are checked against the cell once, up front: every layer and direction must have
exactly the leaves, shapes and dtype that ``cell.init`` would give it (``jax.eval_shape``, so
nothing is computed), and the error names the leaf and the expected shape.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import Cell, is_token_ids
from jax_bptt.losses import Loss

DIRECTIONS = (("fwd", False), ("bwd", True))  # (name, reverse)
RESIDUALS = (False, True, "except_first")


class Batch(NamedTuple):
    """Inputs brought to the batched, time-major layout; ``batched`` says whether to undo it."""

    xs: jax.Array  # (t b d)
    h0: list  # one {"fwd": state, "bwd"?: state} per layer, state leaves (b h); zeros if not given
    lengths: jax.Array | None  # (b,) int
    targets: jax.Array | None
    batched: bool
    resets: jax.Array | None = None  # (t b) bool: segment starts


class ModelShape(NamedTuple):
    """What the params say about the model."""

    input_size: int
    hidden_size: int
    output_size: int
    num_layers: int
    directions: tuple[str, ...]  # ("fwd",) or ("fwd", "bwd")
    dtype: Any


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


@functools.lru_cache(maxsize=256)
def _expected_cell_params(cell: Cell, input_size: int, hidden_size: int, dtype) -> dict:
    """``{leaf name: ShapeDtypeStruct}`` of ``cell.init`` for these sizes (traced, not run)."""
    return jax.eval_shape(
        lambda key: cell.init(key, input_size, hidden_size, dtype), jax.random.key(0)
    )


def _check_leaves(where: str, given, expected: dict, why: str) -> None:
    if not isinstance(given, dict):
        raise TypeError(f"{where} must be a dict of arrays {sorted(expected)}, got {type(given)}")
    if set(given) != set(expected):
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise ValueError(
            f"{where} must have the leaves {sorted(expected)} ({why}); missing {missing}, "
            f"unexpected {extra}"
        )
    for name, want in expected.items():
        leaf = given[name]
        if not hasattr(leaf, "dtype") or _shape(leaf) != want.shape:
            raise ValueError(
                f"{where}[{name!r}] must have shape {want.shape} ({why}), got "
                f"{_shape(leaf) if hasattr(leaf, 'shape') else type(leaf).__name__}"
            )
        if leaf.dtype != want.dtype:
            raise TypeError(
                f"{where}[{name!r}] has dtype {leaf.dtype}, but the model's params are "
                f"{want.dtype} (every leaf must share one float dtype)"
            )


def check_params(params, cell: Cell) -> ModelShape:
    """Validate ``init_model``'s layout against ``cell``; return the sizes it implies."""
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, list | tuple) or not layers or set(params) != {"layers", "readout"}:
        got = f"keys {sorted(params)}" if isinstance(params, dict) else type(params).__name__
        raise TypeError(
            "params must be a dict {'layers': [{'fwd': cell_params, 'bwd'?: ...}, ...], "
            f"'readout': {{'W_hy', 'b_y'}}}} as returned by jax_bptt.init_model, got {got}"
        )
    first = layers[0]
    if not isinstance(first, dict) or set(first) not in ({"fwd"}, {"fwd", "bwd"}):
        got = f"keys {sorted(first)}" if isinstance(first, dict) else type(first).__name__
        raise TypeError(
            f"params['layers'][0] must be a dict {{'fwd': ..., 'bwd'?: ...}}, got {got}"
        )
    directions = tuple(name for name, _ in DIRECTIONS if name in first)
    w_xh, w_hh = first["fwd"].get("W_xh"), first["fwd"].get("W_hh")
    if not hasattr(w_xh, "shape") or not hasattr(w_hh, "shape") or w_xh.ndim != 2 or w_hh.ndim != 2:
        raise ValueError(
            "params['layers'][0]['fwd'] must hold 2-D 'W_xh' (input_size, G*hidden_size) and "
            f"'W_hh' (hidden_size, G*hidden_size) for cell {cell.name!r}"
        )
    input_size, hidden_size, dtype = w_xh.shape[0], w_hh.shape[0], w_hh.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"params must be floating point, got W_hh dtype {dtype}")
    layer_input = input_size
    for i, layer in enumerate(layers):
        if (
            not isinstance(layer, dict)
            or tuple(n for n, _ in DIRECTIONS if n in layer) != (directions)
            or len(layer) != len(directions)
        ):
            got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise ValueError(
                f"params['layers'][{i}] must have the directions {list(directions)} like layer 0 "
                f"(every layer bidirectional or none), got {got}"
            )
        expected = _expected_cell_params(cell, layer_input, hidden_size, dtype)
        why = (
            f"cell {cell.name!r}, {layer_input} inputs"
            + (" (the layer below, all directions)" if i else "")
            + f", hidden_size {hidden_size}"
        )
        for name in directions:
            _check_leaves(f"params['layers'][{i}][{name!r}]", layer[name], expected, why)
        layer_input = len(directions) * hidden_size
    readout = params["readout"]
    w_hy = readout.get("W_hy") if isinstance(readout, dict) else None
    if not hasattr(w_hy, "shape") or w_hy.ndim != 2:
        raise ValueError("params['readout'] must hold 'W_hy' (features, output_size) and 'b_y'")
    output_size = w_hy.shape[1]
    expected = {
        "W_hy": jax.ShapeDtypeStruct((layer_input, output_size), dtype),
        "b_y": jax.ShapeDtypeStruct((output_size,), dtype),
    }
    _check_leaves("params['readout']", readout, expected, "the top layer's features, outputs")
    return ModelShape(input_size, hidden_size, output_size, len(layers), directions, dtype)


def check_xs(xs, shape: ModelShape):
    """``xs (T, B, D)`` or ``(T, D)`` floats in the params' dtype, or token ids ``(T, B)`` or
    ``(T,)`` in ``[0, D)`` (checked when concrete)."""
    if not hasattr(xs, "dtype") or not hasattr(xs, "shape"):
        raise TypeError(f"xs must be an array of shape (T, B, D) or (T, D), got {type(xs)}")
    if is_token_ids(xs):
        if xs.ndim not in (1, 2):
            raise ValueError(f"token ids xs must have shape (T, B) or (T,), got {_shape(xs)}")
        if _is_concrete(xs) and xs.size:
            values = np.asarray(xs)
            if values.min() < 0 or values.max() >= shape.input_size:
                raise ValueError(
                    f"token ids xs must lie in [0, {shape.input_size}) (input_size), got min "
                    f"{values.min()} and max {values.max()}"
                )
        return
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(f"xs must be floating point or integer token ids, got {xs.dtype}")
    if xs.ndim not in (2, 3):
        raise ValueError(f"xs must have shape (T, B, D) or (T, D), got shape {_shape(xs)}")
    if xs.shape[-1] != shape.input_size:
        raise ValueError(
            f"xs has feature size {xs.shape[-1]} but the params expect input_size="
            f"{shape.input_size}; xs shape {_shape(xs)}"
        )
    if xs.dtype != shape.dtype:
        raise TypeError(f"xs has dtype {xs.dtype} but the params are {shape.dtype}: cast one")


def check_lengths(lengths, num_steps: int, batch_size: int, batched: bool):
    """``(B,)`` integers in ``[0, T]`` (a scalar when unbatched) -> ``(B,)`` array, or None."""
    if lengths is None:
        return None
    want = (batch_size,) if batched else ()
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    if _shape(lengths) != want:
        raise ValueError(
            f"lengths must have shape {want} (one length per sequence of xs), got {_shape(lengths)}"
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
    return jnp.reshape(jnp.asarray(lengths), (batch_size,))


def check_resets(resets, num_steps: int, batch_size: int, batched: bool):
    """``(T, B)`` bools (``(T,)`` unbatched; ``(B, T)`` batch-major is transposed before this)
    -> ``(T, B)`` array, or None. Bool only: 0/1 integers would hide a swapped argument."""
    if resets is None:
        return None
    want = (num_steps, batch_size) if batched else (num_steps,)
    if not hasattr(resets, "dtype"):
        resets = np.asarray(resets)
    if _shape(resets) != want:
        raise ValueError(
            f"resets must have shape {want} ((T, B), or (B, T) with time_major=False; (T,) for "
            f"one sequence), got {_shape(resets)}"
        )
    if resets.dtype != jnp.bool_:
        raise TypeError(
            f"resets must be bool (True where a new sequence starts), got {resets.dtype}"
        )
    return jnp.reshape(jnp.asarray(resets), (num_steps, batch_size))


def check_state(h0, cell: Cell, shape: ModelShape, batch_size: int, batched: bool) -> list:
    """``h0`` (one ``{"fwd": state, "bwd"?: state}`` per layer, leaves ``(B, H)``, or ``(H,)``
    unbatched) in the batched layout; None gives the zero state."""
    zero = cell.zero_state((batch_size,), shape.hidden_size, shape.dtype)
    if h0 is None:
        return [dict.fromkeys(shape.directions, zero) for _ in range(shape.num_layers)]
    if not isinstance(h0, list | tuple) or len(h0) != shape.num_layers:
        raise TypeError(
            f"h0 must be a list with one {{'fwd': state, 'bwd'?: state}} per layer "
            f"({shape.num_layers} layers), or None for zeros; got {type(h0).__name__}"
            f"{' of length ' + str(len(h0)) if isinstance(h0, list | tuple) else ''}"
        )
    want = (batch_size, shape.hidden_size) if batched else (shape.hidden_size,)
    template = jax.tree_util.tree_structure(zero)
    states = []
    for i, given in enumerate(h0):
        if not isinstance(given, dict) or set(given) != set(shape.directions):
            raise TypeError(
                f"h0[{i}] must be a dict with keys {list(shape.directions)} (the layer's "
                f"directions), got {sorted(given) if isinstance(given, dict) else type(given)}"
            )
        layer = {}
        for name in shape.directions:
            state = given[name]
            if jax.tree_util.tree_structure(state) != template:
                raise TypeError(
                    f"h0[{i}][{name!r}] must have the structure of {cell.name}'s state "
                    f"{template} with leaves of shape {want}, got "
                    f"{jax.tree_util.tree_structure(state)}"
                )
            for leaf in jax.tree_util.tree_leaves(state):
                if _shape(leaf) != want:
                    raise ValueError(
                        f"h0[{i}][{name!r}] leaves must have shape {want} (batch, hidden_size), "
                        f"got {_shape(leaf)}"
                    )
            layer[name] = (
                state if batched else jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], state)
            )
        states.append(layer)
    return states


def check_targets(
    targets, loss: Loss, num_steps: int, batch_size: int, output_size: int, batched, lengths=None
):
    """Validate targets against the loss; return them with a batch axis.

    mse: float targets ``(T, B, O)`` per step, ``(B, O)`` last step.
    cross_entropy: integer class ids ``(T, B)`` per step, ``(B,)`` last step, in ``[0, O)``
    wherever a term counts (steps past a length may hold anything, e.g. -1 as padding). The range
    is checked when the ids (and lengths) are concrete; traced ids out of range give a NaN or
    wrong loss, as ``jnp.take_along_axis`` does.
    (Unbatched: the same without ``B``.)
    """
    lead = (num_steps,) if loss.placement == "per_step" else ()
    batch = (batch_size,) if batched else ()
    trail = (output_size,) if loss.kind == "mse" else ()
    want = (*lead, *batch, *trail)
    if not hasattr(targets, "dtype"):
        targets = np.asarray(targets)
    if _shape(targets) != want:
        names = ("T " if lead else "") + ("B " if batched else "") + ("O" if trail else "")
        raise ValueError(
            f"targets for loss={loss.kind!r}, placement={loss.placement!r} must have shape "
            f"({names.strip().replace(' ', ', ')}) = {want}, got {_shape(targets)}"
        )
    if loss.kind == "mse" and not jnp.issubdtype(targets.dtype, jnp.floating):
        raise TypeError(f"targets for loss='mse' must be floating point, got {targets.dtype}")
    if loss.kind == "cross_entropy" and not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"targets for loss='cross_entropy' must be integer class ids, got {targets.dtype}"
        )
    if not batched:
        targets = jnp.expand_dims(jnp.asarray(targets), 1 if loss.placement == "per_step" else 0)
    if loss.kind == "cross_entropy" and _is_concrete(targets) and _is_concrete(lengths):
        _check_class_ids(np.asarray(targets), loss.placement, output_size, lengths)
    return jnp.asarray(targets)


def check_batch_targets(targets, loss: Loss, shape: ModelShape, batch: Batch):
    """``check_targets`` for the model and inputs ``check_inputs`` returned."""
    num_steps, batch_size = batch.xs.shape[:2]
    return check_targets(
        targets, loss, num_steps, batch_size, shape.output_size, batch.batched, batch.lengths
    )


def _check_class_ids(ids: np.ndarray, placement: str, output_size: int, lengths) -> None:
    """Every counted class id in ``[0, O)``; ``ids`` batched ``(T, B)`` or ``(B,)``."""
    counted = np.ones(ids.shape, bool)
    if lengths is not None:
        lengths = np.asarray(lengths)
        if placement == "per_step":
            counted = np.arange(ids.shape[0])[:, None] < lengths[None, :]
        else:
            counted = lengths > 0
    bad = counted & ((ids < 0) | (ids >= output_size))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"targets must be class ids in [0, {output_size}) (output_size) wherever a loss term "
            f"counts, got {ids[where]} at index {where}"
        )


def check_dropout(name: str, value) -> None:
    """A dropout probability: a real number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the probability of zeroing), got {value}")


def check_residual(residual) -> None:
    """``residual`` one of ``RESIDUALS`` (``True``/``False`` by identity: 1 and 0 are not)."""
    if not any(residual is choice for choice in RESIDUALS[:2]) and residual != RESIDUALS[2]:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")


def check_stack_options(
    shape: ModelShape, dropout, key, residual, token_ids=False, output_dropout=0.0
) -> None:
    """Dropout (between layers, and on the top layer's outputs; needs a key) and residual
    connections (sizes must match)."""
    check_dropout("dropout", dropout)
    check_dropout("output_dropout", output_dropout)
    if output_dropout > 0 and key is None:
        raise ValueError(
            f"output_dropout={output_dropout} needs a PRNG key for its mask: pass "
            "key=jax.random.key(...) (or output_dropout=0.0 to evaluate)"
        )
    if dropout > 0 and shape.num_layers == 1:
        raise ValueError(
            f"dropout={dropout} acts between stacked layers, so it needs num_layers >= 2, got a "
            "model of 1 layer"
        )
    if dropout > 0 and key is None:
        raise ValueError(
            f"dropout={dropout} needs a PRNG key for its masks: pass key=jax.random.key(...) "
            "(or dropout=0.0 to evaluate)"
        )
    check_residual(residual)
    features = len(shape.directions) * shape.hidden_size
    if residual is True and token_ids:
        raise ValueError("residual=True adds layer 0's input to its output: not for token ids")
    if residual is True and shape.input_size != features:
        raise ValueError(
            f"residual=True adds layer 0's input to its output, but layer 0 maps "
            f"{shape.input_size} features to {features} (hidden_size * num_directions); use "
            "residual='except_first' or make input_size equal hidden_size * num_directions"
        )


def check_inputs(
    params, xs, *, cell: Cell, lengths=None, h0=None, resets=None
) -> tuple[ModelShape, Batch]:
    """Params, ``xs``, ``lengths``, ``h0`` and ``resets`` checked and brought to the batched
    layout."""
    shape = check_params(params, cell)
    check_xs(xs, shape)
    batched = xs.ndim == (2 if is_token_ids(xs) else 3)
    xs = xs if batched else xs[:, None]
    num_steps, batch_size = xs.shape[:2]
    lengths = check_lengths(lengths, num_steps, batch_size, batched)
    h0 = check_state(h0, cell, shape, batch_size, batched)
    resets = check_resets(resets, num_steps, batch_size, batched)
    return shape, Batch(xs, h0, lengths, None, batched, resets)
