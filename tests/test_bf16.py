"""Mixed precision (``ScanOptions(compute_dtype="bfloat16")``): float32 params, bf16 GEMM operands
accumulated in float32. Loss and gradients against the float32 run within bounds measured with
margin (worst of 6 seeds x 3 cells, 2 bidirectional layers with lengths: loss 6e-4, a gradient
leaf 1.0e-2, ``d xs`` 6.7e-3, relative in the 2-norm), gradients stay float32, and the jaxpr really
holds bf16 GEMMs."""

import jax
import jax.numpy as jnp
import pytest

import jax_bptt as jb
from jax_bptt.backends import resolve_options
from jax_bptt.cells import LSTM

T, B, D, H, O = 8, 4, 3, 8, 2  # noqa: E741
LENGTHS = jnp.array([8, 5, 1, 0])
BF16 = jb.ScanOptions(compute_dtype="bfloat16")
LOSS_BOUND, GRAD_BOUND = 5e-3, 5e-2


def _problem(cell, num_layers=2, bidirectional=True):
    params = jb.init_model(
        jax.random.key(0), cell, D, H, O, num_layers=num_layers, bidirectional=bidirectional
    )
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float32)
    ys = jax.random.normal(jax.random.key(2), (T, B, O), jnp.float32)
    return params, xs, ys


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


CASES = [("lstm", "fast"), ("gru", "fast"), ("elman_tanh", "fast")] + [
    ("lstm", mode) for mode in ("auto", "manual", "checkpointed")
]


@pytest.mark.parametrize(("cell", "mode"), CASES)
def test_bf16_within_bounds_of_float32(cell, mode):
    params, xs, ys = _problem(cell)
    kw = dict(cell=cell, mode=mode, lengths=LENGTHS)
    want = jb.bptt(params, xs, ys, **kw)
    got = jb.bptt(params, xs, ys, options=BF16, **kw)
    assert 0 < _rel(got.loss, want.loss) < LOSS_BOUND  # not 0: bf16 did change the numbers
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == jnp.float32 and a.shape == b.shape
        assert _rel(a, b) < GRAD_BOUND


def test_hand_written_modes_agree_in_bf16():
    """manual and fast run the same bf16 GEMMs: equal to float32 round-off, not bf16's."""
    params, xs, ys = _problem("lstm")
    kw = dict(cell="lstm", lengths=LENGTHS, options=BF16)
    fast = jb.bptt(params, xs, ys, mode="fast", **kw)
    manual = jb.bptt(params, xs, ys, mode="manual", **kw)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(manual), strict=True):
        assert _rel(a, b) < 1e-5


def _dots(jaxpr):
    """Every ``dot_general`` equation, inside scans, custom VJPs and jits too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _dots(sub)


@pytest.mark.parametrize("mode", ["fast", "checkpointed"])
def test_recurrence_gemms_are_bf16_with_float32_accumulation(mode):
    params, xs, ys = _problem("lstm", num_layers=1, bidirectional=False)

    def dots(options):
        grads = jax.make_jaxpr(
            lambda p: jb.bptt(p, xs, ys, cell="lstm", mode=mode, options=options).params
        )(params)
        return list(_dots(grads.jaxpr))

    gates = 4 * H  # every GEMM of the recurrence has the (4H) gate axis; the readout's do not
    recurrence = [e for e in dots(BF16) if gates in {*e.outvars[0].aval.shape} | {
        d for v in e.invars for d in v.aval.shape}]  # fmt: skip
    # the projection, h @ W_hh, d hp @ W_hh^T, dW_xh, dW_hh, d xs (checkpointed: + recomputation)
    assert len(recurrence) >= 6
    for eqn in recurrence:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
        assert eqn.params["preferred_element_type"] == jnp.float32
    assert all(v.aval.dtype != jnp.bfloat16 for e in dots(None) for v in e.invars)


def test_compute_dtype_checks():
    params, xs, ys = _problem("lstm", num_layers=1, bidirectional=False)
    for bad in ("int8", "nonsense", 3):
        with pytest.raises(ValueError, match="compute_dtype must be None or a float dtype"):
            jb.bptt(params, xs, ys, cell="lstm", options=jb.ScanOptions(compute_dtype=bad))
    with pytest.raises(ValueError, match="backend 'pallas' cannot run ScanOptions.compute_dtype"):
        jb.bptt(params, xs, ys, cell="lstm", mode="fast", options=BF16._replace(backend="pallas"))
    with pytest.raises(ValueError, match="mode 'parallel' computes in the params' dtype"):
        jb.unroll(params, xs, cell="lstm", mode="parallel", options=BF16)
    # the params' own dtype is no mixed precision at all: the same compiled core as None
    same = resolve_options(jb.ScanOptions(compute_dtype="float32"), LSTM, xs.shape, H, jnp.float32)
    assert same.compute_dtype is None
    assert resolve_options(BF16, LSTM, xs.shape, H, jnp.float32).compute_dtype == "bfloat16"
