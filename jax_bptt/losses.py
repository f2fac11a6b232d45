"""Sequence losses and their hand-written gradients with respect to the outputs ``ys: (t b o)``.

A loss is a sum of terms ``L = sum_t sum_b w_tb l(y_tb, target_tb)`` where the weights ``w`` pick
the terms that count:

- ``placement="per_step"``: every valid step (``t < length``);
- ``placement="last_step"``: only ``t = length - 1`` (many-to-one); a length-0 sequence has none.

``reduction="sum"`` keeps the sum; ``"mean"`` divides by the number of counted terms (by 1 when no
term counts, so an empty loss is 0 rather than NaN). Per-term losses:

- ``"mse"``: ``mean_o (y - target)^2`` (so a constant predictor's loss is the target variance);
- ``"cross_entropy"``: ``logsumexp(y) - y[target]`` in nats, integer targets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSSES = ("mse", "cross_entropy")
PLACEMENTS = ("per_step", "last_step")
REDUCTIONS = ("sum", "mean")


class Loss(NamedTuple):
    """The static settings of a sequence loss, passed as one value.

    Attributes:
      kind: ``"mse"`` or ``"cross_entropy"``.
      placement: ``"per_step"`` (every valid step) or ``"last_step"`` (many-to-one).
      reduction: ``"mean"`` over the counted terms or ``"sum"``.

    Example:
      >>> Loss("cross_entropy", reduction="sum")
      Loss(kind='cross_entropy', placement='per_step', reduction='sum')
    """

    kind: str = "mse"
    placement: str = "per_step"
    reduction: str = "mean"


def check_loss(loss) -> Loss:
    """``loss`` as a validated ``Loss``; a string is ``Loss(kind=loss)``."""
    if isinstance(loss, str):
        loss = Loss(loss)
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a jax_bptt.Loss or one of {LOSSES}, got {loss!r}")
    for name, value, choices in zip(
        loss._fields, loss, (LOSSES, PLACEMENTS, REDUCTIONS), strict=True
    ):
        if value not in choices:
            raise ValueError(f"loss.{name} must be one of {choices}, got {value!r}")
    return loss


def term_weights(placement: str, num_steps: int, batch_size: int, lengths, dtype) -> jax.Array:
    """``(t b)`` weight of each term, 0/1, before the reduction."""
    lengths = jnp.full((batch_size,), num_steps) if lengths is None else lengths
    steps = jnp.arange(num_steps)[:, None]
    if placement == "per_step":
        picked = steps < lengths[None, :]
    else:
        picked = steps == lengths[None, :] - 1
    return picked.astype(dtype)


def _counted(ys, targets, loss: Loss, lengths):
    """``(targets, weights)`` over every step ``(t b ...)``: last-step targets broadcast over t so
    both placements share one code path, and the uncounted ones replaced by 0 (a NaN, or any
    value, in padding must reach neither the loss nor, through ``0 * NaN`` in a derivative, the
    gradients); ``weights`` are ``term_weights``."""
    num_steps, batch_size = ys.shape[:2]
    if loss.placement != "per_step":
        targets = jnp.broadcast_to(targets[None], (num_steps, *targets.shape))
    weights = term_weights(loss.placement, num_steps, batch_size, lengths, ys.dtype)
    picked = weights > 0
    picked = picked[..., None] if targets.ndim > weights.ndim else picked
    return jnp.where(picked, targets, 0), weights


def _terms(ys, targets, loss):
    if loss == "mse":
        return jnp.mean((ys - targets) ** 2, axis=-1)
    picked = jnp.take_along_axis(ys, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(ys, axis=-1) - picked


def _scale(weights, reduction):
    if reduction == "sum":
        return weights
    return weights / jnp.maximum(weights.sum(), 1.0)


def sequence_loss(ys, targets, loss: Loss, lengths=None) -> jax.Array:
    """Scalar loss of outputs ``ys: (t b o)`` (see the module docstring for the conventions)."""
    targets, weights = _counted(ys, targets, loss, lengths)
    terms = _terms(ys, targets, loss.kind)
    # where, not multiply: a masked term may be inf/NaN (padding) and must not poison the sum.
    return jnp.sum(jnp.where(weights > 0, terms, 0) * _scale(weights, loss.reduction))


def sequence_loss_grad(ys, targets, loss: Loss, lengths=None) -> jax.Array:
    """``dL/dys: (t b o)``, derived by hand.

        mse:            dl/dy = 2 (y - target) / O
        cross_entropy:  dl/dy = softmax(y) - onehot(target)

    each scaled by the term's weight (0 for excluded terms, 1/count for ``"mean"``).
    """
    output_size = ys.shape[-1]
    targets, weights = _counted(ys, targets, loss, lengths)
    weights = _scale(weights, loss.reduction)
    if loss.kind == "mse":
        d_terms = 2.0 * (ys - targets) / output_size
    else:
        d_terms = jax.nn.softmax(ys, axis=-1) - jax.nn.one_hot(targets, output_size, dtype=ys.dtype)
    return jnp.where(weights[..., None] > 0, d_terms, 0) * weights[..., None]
