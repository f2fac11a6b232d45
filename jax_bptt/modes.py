"""The BPTT implementations by name, so training code can pick one with a single argument."""

from __future__ import annotations

from jax_bptt.bptt import Gradients, bptt_auto, bptt_manual
from jax_bptt.fast import bptt_checkpointed, bptt_fast
from jax_bptt.validation import check_choice

BPTT_MODES = {
    "auto": bptt_auto,
    "manual": bptt_manual,
    "fast": bptt_fast,  # jax.grad through a custom_vjp whose backward is the manual scan
    "checkpointed": bptt_checkpointed,  # O(sqrt(T)) memory: segments recomputed in the backward
}


def bptt(params, xs, targets, *, mode: str = "manual", **kwargs) -> Gradients:
    """Loss and gradients by the implementation ``BPTT_MODES[mode]`` (same arguments as
    ``bptt_manual``)."""
    check_choice("mode", mode, tuple(BPTT_MODES))
    return BPTT_MODES[mode](params, xs, targets, **kwargs)
