"""jax_bptt: recurrent networks trained by backpropagation through time, in pure JAX.

The recurrence is a ``lax.scan``; ``jax.grad`` through it is automatic BPTT; a hand-written reverse
scan gives the same gradients explicitly. See the README for a tour.
"""

from jax_bptt.bptt import Gradients, bptt_auto, bptt_manual, model_loss
from jax_bptt.cells import CELLS, ELMAN_RELU, ELMAN_TANH, GRU, LSTM, Cell, get_cell, step
from jax_bptt.check import GradientReport, check_gradients, compare_gradients
from jax_bptt.deep import deep_bptt_auto, deep_bptt_fast, deep_bptt_manual, deep_unroll, init_deep
from jax_bptt.fast import bptt_checkpointed, bptt_fast, unroll_checkpointed, unroll_fast
from jax_bptt.generate import generate
from jax_bptt.losses import sequence_loss, sequence_loss_grad
from jax_bptt.model import init_model, readout
from jax_bptt.modes import BPTT_MODES, bptt
from jax_bptt.train import fit, make_optimizer, make_train_step
from jax_bptt.truncated import truncated_bptt
from jax_bptt.unroll import unroll

__all__ = [
    "BPTT_MODES",
    "CELLS",
    "ELMAN_RELU",
    "ELMAN_TANH",
    "GRU",
    "LSTM",
    "Cell",
    "GradientReport",
    "Gradients",
    "bptt",
    "bptt_auto",
    "bptt_checkpointed",
    "bptt_fast",
    "bptt_manual",
    "check_gradients",
    "compare_gradients",
    "deep_bptt_auto",
    "deep_bptt_fast",
    "deep_bptt_manual",
    "deep_unroll",
    "fit",
    "generate",
    "get_cell",
    "init_deep",
    "init_model",
    "make_optimizer",
    "make_train_step",
    "model_loss",
    "readout",
    "sequence_loss",
    "sequence_loss_grad",
    "step",
    "truncated_bptt",
    "unroll",
    "unroll_checkpointed",
    "unroll_fast",
]
