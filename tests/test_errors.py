"""Bad input: a clear error naming the argument, raised before any work (also under jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb
from jax_bptt.check import random_problem


@pytest.fixture(scope="module")
def problem():
    return random_problem(
        jax.random.key(0),
        "lstm",
        steps=5,
        batch=3,
        inputs=4,
        hidden=6,
        outputs=2,
        dtype=jnp.float64,
    )


def _call(problem, **changes):
    params, xs, targets, kw = problem
    kw = {**kw, **changes}
    xs = kw.pop("xs", xs)
    targets = kw.pop("targets", targets)
    params = kw.pop("params", params)
    return jb.bptt_manual(params, xs, targets, **kw)


@pytest.mark.parametrize("fn", [jb.bptt_manual, jb.bptt_auto])
def test_wrong_rank_of_inputs(problem, fn):
    params, xs, targets, kw = problem
    with pytest.raises(ValueError, match=r"xs must have shape \(T, B, D\)"):
        fn(params, xs[None], targets, **kw)
    with pytest.raises(ValueError, match="xs must have shape"):
        jb.unroll("lstm", params["cell"], xs[0, 0])


def test_feature_size_mismatch(problem):
    with pytest.raises(ValueError, match="xs has feature size 3 .* input_size=4"):
        _call(problem, xs=jnp.ones((5, 3, 3)))


def test_batch_mismatch_initial_state(problem):
    h0 = (jnp.zeros((2, 6)), jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match=r"h0 leaves must have shape \(3, 6\)"):
        _call(problem, h0=h0)


def test_initial_state_structure(problem):
    with pytest.raises(TypeError, match="h0 must have the structure of lstm"):
        _call(problem, h0=jnp.zeros((3, 6)))


def test_batch_mismatch_targets(problem):
    with pytest.raises(ValueError, match=r"targets .* must have shape \(T, B, O\) = \(5, 3, 2\)"):
        _call(problem, targets=jnp.zeros((5, 2, 2)))
    with pytest.raises(ValueError, match=r"targets .* placement='last_step' .* \(B, O\)"):
        _call(problem, placement="last_step")


def test_target_dtypes(problem):
    with pytest.raises(TypeError, match="targets for loss='cross_entropy' must be integer"):
        _call(problem, loss="cross_entropy", targets=jnp.zeros((5, 3)))
    with pytest.raises(TypeError, match="targets for loss='mse' must be floating"):
        _call(problem, targets=jnp.zeros((5, 3, 2), jnp.int32))


def test_batch_mismatch_lengths(problem):
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        _call(problem, lengths=jnp.array([1, 2]))


def test_lengths_outside_range(problem):
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        _call(problem, lengths=jnp.array([1, 6, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        _call(problem, lengths=np.array([-1, 2, 2]))


def test_lengths_dtype(problem):
    with pytest.raises(TypeError, match="lengths must be integers"):
        _call(problem, lengths=jnp.array([1.0, 2.0, 3.0]))


def test_non_float_inputs(problem):
    with pytest.raises(TypeError, match="xs must be floating point"):
        _call(problem, xs=jnp.ones((5, 3, 4), jnp.int32))


@pytest.mark.parametrize(
    "argument, value",
    [("cell", "transformer"), ("loss", "hinge"), ("placement", "middle"), ("reduction", "max")],
)
def test_unknown_names(problem, argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be one of"):
        _call(problem, **{argument: value})


def test_unknown_mode_and_init(problem):
    params, xs, targets, kw = problem
    with pytest.raises(ValueError, match="mode must be one of"):
        jb.bptt(params, xs, targets, mode="magic", **kw)
    with pytest.raises(ValueError, match="recurrent_init must be one of"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, recurrent_init="zeros")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        jb.init_model(jax.random.key(0), "gru", 2, 0, 1)
    with pytest.raises(ValueError, match="forget_bias applies to the lstm cell only"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, forget_bias=1.0)


def test_bad_params(problem):
    _, xs, targets, kw = problem
    with pytest.raises(TypeError, match="params must be a dict"):
        jb.bptt_manual({"W_xh": 1}, xs, targets, **kw)


def test_errors_raised_at_trace_time_under_jit(problem):
    params, xs, targets, kw = problem
    bad = jax.jit(lambda p, x: jb.bptt_manual(p, x, targets, **kw))
    with pytest.raises(ValueError, match="xs has feature size"):
        bad(params, jnp.ones((5, 3, 7)))
