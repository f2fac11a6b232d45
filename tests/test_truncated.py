"""Truncated BPTT(k1, k2): against full BPTT, a per-chunk jax.grad reference, and auto vs manual.

The reference recomputes each chunk with a plain Python loop over ``cells.step`` and
``jax.nn.log_softmax``: independent of the scan, the hand-written backward and ``losses.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import bptt_auto, init_model, modes
from jax_bptt.cells import get_cell, step
from jax_bptt.check import relative_error
from jax_bptt.truncated import (
    check_truncation,
    truncated_bptt,
    window_bounds,
    window_grads,
)

TOL = 1e-10  # float64 (conftest)
T, B, D, H, V = 8, 2, 3, 4, 3


def _problem(cell):
    keys = jax.random.split(jax.random.key(7), 4)
    params = init_model(keys[0], cell, D, H, V, dtype=jnp.float64)
    xs = jax.random.normal(keys[1], (T, B, D), jnp.float64)
    targets = jax.random.randint(keys[2], (T, B), 0, V)
    h0 = jax.tree_util.tree_map(
        lambda z: 0.5 * jax.random.normal(keys[3], z.shape, jnp.float64),
        get_cell(cell).zero_state((B,), H, jnp.float64),
    )
    return params, xs, targets, h0


def _states(cell, params, xs, h0):
    """Python-loop forward: the state after each step 0..T-1."""
    cell = get_cell(cell)
    states, state = [], h0
    for x in xs:
        state = step(cell, params["cell"], state, x)
        states.append(state)
    return states


def _chunk_reference_loss(params, cell, xs, targets, h_start, start, end, k1):
    """Mean cross-entropy of steps [end - k1, end), forward from stop_gradient(h_start) at start."""
    cell = get_cell(cell)
    state, total = jax.lax.stop_gradient(h_start), 0.0
    for t in range(start, end):
        state = step(cell, params["cell"], state, xs[t])
        if t >= end - k1:
            logits = cell.hidden(state) @ params["readout"]["W_hy"] + params["readout"]["b_y"]
            log_p = jax.nn.log_softmax(logits, axis=-1)
            total = total - jnp.take_along_axis(log_p, targets[t][:, None], axis=-1).sum()
    return total / (k1 * xs.shape[1])


def _state_before(states, h0, start):
    return h0 if start == 0 else states[start - 1]


def _assert_trees_close(candidate, reference, tol=TOL):
    flat_c = jax.tree_util.tree_leaves(candidate)
    flat_r = jax.tree_util.tree_leaves(reference)
    assert len(flat_c) == len(flat_r)
    for a, b in zip(flat_c, flat_r, strict=True):
        assert relative_error(a, b)[1] <= tol


@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_k1_equals_k2_equals_T_is_full_bptt(mode):
    params, xs, targets, h0 = _problem("lstm")
    full = bptt_auto(params, xs, targets, cell="lstm", loss="cross_entropy", h0=h0)
    truncated = truncated_bptt(
        params, xs, targets, cell="lstm", k1=T, k2=T, loss="cross_entropy", h0=h0, mode=mode
    )
    assert relative_error(truncated.loss, full.loss)[1] <= TOL
    _assert_trees_close(truncated.params, full.params)
    # The carry of the only window is the final state of the stream.
    _assert_trees_close(truncated.carry, _states("lstm", params, xs, h0)[-1])


@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_each_chunk_is_grad_of_its_loss_with_stopped_incoming_state(mode):
    """BPTT(2, 5) on T = 8: windows [0,2), [0,4), [1,6), [3,8); every chunk against jax.grad."""
    cell, k1, k2 = "gru", 2, 5
    params, xs, targets, h0 = _problem(cell)
    states = _states(cell, params, xs, h0)
    reference_total = None
    carry = h0
    for chunk in range(T // k1):
        start, end = window_bounds(chunk, k1, k2)
        h_start = _state_before(states, h0, start)
        _assert_trees_close(carry, h_start)  # the carried state is the stream's true state
        result = window_grads(
            params,
            xs[start:end],
            targets[start:end],
            cell=cell,
            k1=k1,
            k2=k2,
            loss="cross_entropy",
            h0=h_start,
            mode=mode,
        )
        value, grads = jax.value_and_grad(_chunk_reference_loss)(
            params, cell, xs, targets, h_start, start, end, k1
        )
        assert relative_error(result.loss, value)[1] <= TOL
        _assert_trees_close(result.params, grads)
        carry = result.carry
        reference_total = (
            grads
            if reference_total is None
            else jax.tree_util.tree_map(jnp.add, reference_total, grads)
        )

    stream = truncated_bptt(
        params, xs, targets, cell=cell, k1=k1, k2=k2, loss="cross_entropy", h0=h0, mode=mode
    )
    mean_reference = jax.tree_util.tree_map(lambda g: g / (T // k1), reference_total)
    _assert_trees_close(stream.params, mean_reference)
    # The carry is where a next window would start: after step T + k1 - k2 - 1.
    _assert_trees_close(stream.carry, states[T + k1 - k2 - 1])


def test_gradient_does_not_reach_past_the_window():
    """BPTT(2, 2), last chunk: the gradient of its loss stops at its window, so it differs from
    the untruncated gradient of the same loss terms."""
    cell, k1, k2 = "elman_tanh", 2, 2
    params, xs, targets, h0 = _problem(cell)
    h_start = _states(cell, params, xs, h0)[5]
    result = window_grads(
        params, xs[6:8], targets[6:8], cell=cell, k1=k1, k2=k2, loss="cross_entropy", h0=h_start
    )
    value, grads = jax.value_and_grad(_chunk_reference_loss)(
        params, cell, xs, targets, h_start, 6, 8, k1
    )
    _assert_trees_close(result.params, grads)
    # Full BPTT over [0, 8) differs: the truncation really cut the gradient.
    full = jax.grad(_chunk_reference_loss)(params, cell, xs, targets, h0, 0, 8, k1)
    assert relative_error(result.params["cell"]["W_hh"], full["cell"]["W_hh"])[1] > 1e-3


@pytest.mark.parametrize("cell", ["elman_tanh", "lstm", "gru"])
def test_manual_equals_auto(cell):
    params, xs, targets, h0 = _problem(cell)
    kwargs = dict(cell=cell, k1=4, k2=6, loss="cross_entropy", h0=h0)
    manual = truncated_bptt(params, xs, targets, mode="manual", **kwargs)
    auto = truncated_bptt(params, xs, targets, mode="auto", **kwargs)
    assert relative_error(manual.loss, auto.loss)[1] <= TOL
    _assert_trees_close(manual.params, auto.params)
    _assert_trees_close(manual.carry, auto.carry)


@pytest.mark.parametrize("mode", [m for m in modes.BPTT_MODES if m not in ("auto", "manual")])
def test_every_registered_mode_matches_auto(mode):
    """Modes added to the registry run through the same window code (``BPTT_MODES[mode]`` on the
    chunk, ``backward_scan`` over the rest of the window)."""
    params, xs, targets, h0 = _problem("lstm")
    kwargs = dict(cell="lstm", k1=4, k2=6, loss="cross_entropy", h0=h0)
    candidate = truncated_bptt(params, xs, targets, mode=mode, **kwargs)
    auto = truncated_bptt(params, xs, targets, mode="auto", **kwargs)
    _assert_trees_close(candidate, auto)


def test_mse_and_sum_reduction():
    params, xs, _, h0 = _problem("lstm")
    targets = jnp.cos(xs[..., :V])
    kwargs = dict(cell="lstm", k1=4, k2=6, loss="mse", reduction="sum", h0=h0)
    manual = truncated_bptt(params, xs, targets, mode="manual", **kwargs)
    auto = truncated_bptt(params, xs, targets, mode="auto", **kwargs)
    _assert_trees_close(manual.params, auto.params)
    # "sum": the stream loss is the sum of the per-step terms (every step counted once).
    hs = jnp.stack([get_cell("lstm").hidden(s) for s in _states("lstm", params, xs, h0)])
    ys = hs @ params["readout"]["W_hy"] + params["readout"]["b_y"]
    expected = np.sum(np.mean((np.asarray(ys) - np.asarray(targets)) ** 2, axis=-1))
    assert relative_error(manual.loss, expected)[1] <= TOL


@pytest.mark.parametrize(
    ("k1", "k2", "num_steps", "message"),
    [
        (0, 4, None, "k1"),
        (-2, 4, None, "k1"),
        (4, 3, None, "k2"),
        (3, 4, 8, "k1=3"),
        (4, 16, 8, "k2=16"),
    ],
)
def test_bad_truncation_is_rejected(k1, k2, num_steps, message):
    with pytest.raises(ValueError, match=message):
        check_truncation(k1, k2, num_steps)


def test_bad_truncation_arguments_name_k1_k2():
    params, xs, targets, _ = _problem("lstm")
    with pytest.raises(TypeError, match="k1"):
        check_truncation(2.0, 4)
    with pytest.raises(ValueError, match="multiple of k1=3"):
        truncated_bptt(params, xs, targets, cell="lstm", k1=3, k2=3)
    with pytest.raises(ValueError, match="k2"):
        truncated_bptt(params, xs, targets, cell="lstm", k1=4, k2=2)
    with pytest.raises(ValueError, match="W=8 with k1=2, k2=4"):
        window_grads(params, xs, targets, cell="lstm", k1=2, k2=4)
    with pytest.raises(ValueError, match="mode"):
        window_grads(params, xs, targets, cell="lstm", k1=8, k2=8, mode="nope")
