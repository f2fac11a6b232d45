"""Truncated BPTT(k1, k2): against full BPTT, a per-window jax.grad reference, and across modes.

The reference recomputes each window with a plain Python loop over ``cells.step`` through every
layer and ``jax.nn.log_softmax``: independent of the scan, the stack code, the hand-written
backward and ``losses.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import BPTT_MODES, Loss, bptt_auto, init_model
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


@functools.lru_cache(maxsize=8)
def _problem(cell, num_layers=1, input_size=D):
    keys = jax.random.split(jax.random.key(7), 4)
    params = init_model(keys[0], cell, input_size, H, V, num_layers=num_layers, dtype=jnp.float64)
    xs = jax.random.normal(keys[1], (T, B, input_size), jnp.float64)
    targets = jax.random.randint(keys[2], (T, B), 0, V)
    zero = get_cell(cell).zero_state((B,), H, jnp.float64)
    h0 = [
        {"fwd": jax.tree_util.tree_map(lambda z, k=k: 0.5 * jax.random.normal(k, z.shape), zero)}
        for k in jax.random.split(keys[3], num_layers)
    ]
    return params, xs, targets, h0


def _has_residual(residual, layer):
    return residual is True or (residual == "except_first" and layer > 0)


def _step_stack(cell, params, state, x, residual=False):
    """One step through every layer: (new states, top layer's output)."""
    new_state, inputs = [], x
    for i, (layer, s) in enumerate(zip(params["layers"], state, strict=True)):
        s = step(cell, layer["fwd"], s["fwd"], inputs)
        out = cell.hidden(s)
        inputs = out + inputs if _has_residual(residual, i) else out
        new_state.append({"fwd": s})
    return new_state, inputs


def _states(cell, params, xs, h0, residual=False):
    """Python-loop forward: every layer's states after each step 0..T-1, and the top outputs."""
    cell = get_cell(cell)
    states, outputs, state = [], [], h0
    for x in xs:
        state, out = _step_stack(cell, params, state, x, residual)
        states.append(state)
        outputs.append(out)
    return states, jnp.stack(outputs)


def _chunk_reference_loss(params, cell, xs, targets, h_start, start, end, k1, residual=False):
    """Mean cross-entropy of steps [end - k1, end), forward from stop_gradient(h_start) at start."""
    cell = get_cell(cell)
    state, total = jax.lax.stop_gradient(h_start), 0.0
    for t in range(start, end):
        state, out = _step_stack(cell, params, state, xs[t], residual)
        if t >= end - k1:
            logits = out @ params["readout"]["W_hy"] + params["readout"]["b_y"]
            log_p = jax.nn.log_softmax(logits, axis=-1)
            total = total - jnp.take_along_axis(log_p, targets[t][:, None], axis=-1).sum()
    return total / (k1 * xs.shape[1])


def _state_before(states, h0, start):
    return h0 if start == 0 else states[start - 1]


def _assert_trees_close(candidate, reference, tol=TOL):
    assert jax.tree_util.tree_structure(candidate) == jax.tree_util.tree_structure(reference)
    flat_c = jax.tree_util.tree_leaves(candidate)
    flat_r = jax.tree_util.tree_leaves(reference)
    assert len(flat_c) == len(flat_r)
    for a, b in zip(flat_c, flat_r, strict=True):
        assert relative_error(a, b)[1] <= tol


@functools.lru_cache(maxsize=8)  # shared by the modes checked against it
def _window_references(cell, k1, k2, num_layers, residual, input_size):
    """The problem, the stream's true states, and per window ``(start, end, h_start, loss,
    grads)`` by jax.grad of the Python-loop reference."""
    params, xs, targets, h0 = _problem(cell, num_layers, input_size)
    states, _ = _states(cell, params, xs, h0, residual)
    windows = []
    for chunk in range(T // k1):
        start, end = window_bounds(chunk, k1, k2)
        h_start = _state_before(states, h0, start)
        value, grads = jax.value_and_grad(_chunk_reference_loss)(
            params, cell, xs, targets, h_start, start, end, k1, residual
        )
        windows.append((start, end, h_start, value, grads))
    return (params, xs, targets, h0), states, windows


def _check_every_window(cell, mode, k1, k2, num_layers=1, residual=False, input_size=D):
    """Each window of BPTT(k1, k2) on T = 8 against jax.grad of the Python-loop reference, the
    carried states against the stream's true states, and the stream against the mean."""
    problem, states, windows = _window_references(cell, k1, k2, num_layers, residual, input_size)
    params, xs, targets, h0 = problem
    carry = h0
    for start, end, h_start, value, grads in windows:
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
            residual=residual,
        )
        assert relative_error(result.loss, value)[1] <= TOL
        _assert_trees_close(result.params, grads)
        carry = result.carry

    stream = truncated_bptt(
        params, xs, targets, cell=cell, k1=k1, k2=k2, loss="cross_entropy", h0=h0, mode=mode,
        residual=residual,
    )  # fmt: skip
    reference_total = jax.tree_util.tree_map(lambda *g: sum(g), *[w[-1] for w in windows])
    mean_reference = jax.tree_util.tree_map(lambda g: g / (T // k1), reference_total)
    _assert_trees_close(stream.params, mean_reference)
    # The carry is where a next window would start: after step T + k1 - k2 - 1.
    _assert_trees_close(stream.carry, states[T + k1 - k2 - 1])


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
    _assert_trees_close(truncated.carry, _states("lstm", params, xs, h0)[0][-1])


@pytest.mark.parametrize("mode", ["auto", "manual"])
def test_each_chunk_is_grad_of_its_loss_with_stopped_incoming_state(mode):
    """BPTT(2, 5) on T = 8: windows [0,2), [0,4), [1,6), [3,8); every chunk against jax.grad."""
    _check_every_window("gru", mode, k1=2, k2=5)


@pytest.mark.parametrize("mode", BPTT_MODES)
def test_deep_truncated_with_k1_below_k2_is_grad_of_each_window(mode):
    """A 2-layer LSTM, BPTT(4, 6) in every mode (windows [0,4), [2,8)): each window equals
    jax.grad of the Python loop through both layers (the stopped incoming state and the carry
    hold every layer's state; the second window backpropagates through 2 loss-free steps)."""
    _check_every_window("lstm", mode, k1=4, k2=6, num_layers=2)


@pytest.mark.parametrize(
    ("cell", "num_layers", "residual", "input_size"),
    [("gru", 3, "except_first", D), ("elman_tanh", 2, True, H)],
)
def test_deep_truncated_with_residual_connections(cell, num_layers, residual, input_size):
    """Residual paths run through the window's gradient-only prefix too (manual, BPTT(4, 6))."""
    _check_every_window(cell, "manual", 4, 6, num_layers, residual, input_size)


def test_gradient_does_not_reach_past_the_window():
    """BPTT(2, 2), last chunk: the gradient of its loss stops at its window, so it differs from
    the untruncated gradient of the same loss terms."""
    cell, k1, k2 = "elman_tanh", 2, 2
    params, xs, targets, h0 = _problem(cell)
    h_start = _states(cell, params, xs, h0)[0][5]
    result = window_grads(
        params, xs[6:8], targets[6:8], cell=cell, k1=k1, k2=k2, loss="cross_entropy", h0=h_start
    )
    value, grads = jax.value_and_grad(_chunk_reference_loss)(
        params, cell, xs, targets, h_start, 6, 8, k1
    )
    _assert_trees_close(result.params, grads)
    # Full BPTT over [0, 8) differs: the truncation really cut the gradient.
    full = jax.grad(_chunk_reference_loss)(params, cell, xs, targets, h0, 0, 8, k1)
    w_hh = result.params["layers"][0]["fwd"]["W_hh"]
    assert relative_error(w_hh, full["layers"][0]["fwd"]["W_hh"])[1] > 1e-3


@pytest.mark.parametrize("cell", ["elman_tanh", "lstm", "gru"])
def test_manual_equals_auto(cell):
    params, xs, targets, h0 = _problem(cell)
    kwargs = dict(cell=cell, k1=4, k2=6, loss="cross_entropy", h0=h0)
    manual = truncated_bptt(params, xs, targets, mode="manual", **kwargs)
    auto = truncated_bptt(params, xs, targets, mode="auto", **kwargs)
    assert relative_error(manual.loss, auto.loss)[1] <= TOL
    _assert_trees_close(manual.params, auto.params)
    _assert_trees_close(manual.carry, auto.carry)


@pytest.mark.parametrize("mode", [m for m in BPTT_MODES if m not in ("auto", "manual")])
def test_every_registered_mode_matches_auto(mode):
    """Every mode runs through the same window code (``CORES[mode]`` on the block,
    ``stack_backward`` over the rest of the window)."""
    params, xs, targets, h0 = _problem("lstm")
    kwargs = dict(cell="lstm", k1=4, k2=6, loss="cross_entropy", h0=h0)
    candidate = truncated_bptt(params, xs, targets, mode=mode, **kwargs)
    auto = truncated_bptt(params, xs, targets, mode="auto", **kwargs)
    _assert_trees_close(candidate, auto)


def test_mse_and_sum_reduction():
    params, xs, _, h0 = _problem("lstm")
    targets = jnp.cos(xs[..., :V])
    kwargs = dict(cell="lstm", k1=4, k2=6, loss=Loss("mse", "per_step", "sum"), h0=h0)
    manual = truncated_bptt(params, xs, targets, mode="manual", **kwargs)
    auto = truncated_bptt(params, xs, targets, mode="auto", **kwargs)
    _assert_trees_close(manual.params, auto.params)
    # "sum": the stream loss is the sum of the per-step terms (every step counted once).
    _, hs = _states("lstm", params, xs, h0)
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
    with pytest.raises(ValueError, match="placement='per_step'"):
        last_step = Loss("cross_entropy", "last_step")
        truncated_bptt(params, xs, targets[-1], cell="lstm", k1=4, k2=4, loss=last_step)


def _zero_model(cell, num_layers, bidirectional):
    """Zeros in ``init_model``'s layout, shapes by ``jax.eval_shape`` (nothing compiled)."""
    shapes = jax.eval_shape(
        lambda k: init_model(
            k, cell, D, H, V, num_layers=num_layers, bidirectional=bidirectional,
            dtype=jnp.float64,
        ),
        jax.random.key(0),
    )  # fmt: skip
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_bidirectional_models_are_rejected():
    """A backward direction would start from the future, which no carried state can give."""
    xs, targets = np.zeros((T, B, D)), np.zeros((T, B), np.int32)
    with pytest.raises(ValueError, match="unidirectional"):
        window_grads(_zero_model("gru", 1, True), xs[:4], targets[:4], cell="gru", k1=4, k2=4)
    with pytest.raises(ValueError, match="unidirectional"):
        truncated_bptt(_zero_model("gru", 2, True), xs, targets, cell="gru", k1=2, k2=4)
