"""jax_bptt: recurrent networks trained by backpropagation through time, in pure JAX.

The recurrence is a ``lax.scan``; ``jax.grad`` through it is automatic BPTT; a hand-written reverse
scan gives the same gradients explicitly. One params layout and one set of functions serve a model
of any depth and direction. See the README for a tour.
"""

from jax_bptt.backends import Backend, ScanOptions, register_backend
from jax_bptt.cells import CELLS, ELMAN_RELU, ELMAN_TANH, GRU, LSTM, Cell, get_cell, make_cell
from jax_bptt.check import GradientReport, check_gradients, compare_gradients
from jax_bptt.generate import generate, init_state, step
from jax_bptt.losses import Loss
from jax_bptt.model import init_model, predict, unroll
from jax_bptt.modes import (
    BPTT_MODES,
    Gradients,
    bptt,
    bptt_auto,
    bptt_checkpointed,
    bptt_fast,
    bptt_manual,
    model_loss,
)
from jax_bptt.train import fit, make_optimizer, make_train_step
from jax_bptt.truncated import truncated_bptt

__all__ = [
    "BPTT_MODES",
    "CELLS",
    "ELMAN_RELU",
    "ELMAN_TANH",
    "GRU",
    "LSTM",
    "Backend",
    "Cell",
    "GradientReport",
    "Gradients",
    "Loss",
    "ScanOptions",
    "bptt",
    "bptt_auto",
    "bptt_checkpointed",
    "bptt_fast",
    "bptt_manual",
    "check_gradients",
    "compare_gradients",
    "fit",
    "generate",
    "get_cell",
    "init_state",
    "init_model",
    "make_cell",
    "make_optimizer",
    "make_train_step",
    "model_loss",
    "predict",
    "register_backend",
    "step",
    "truncated_bptt",
    "unroll",
]
