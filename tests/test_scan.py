"""The recurrence: ``jax_bptt.scan`` (masks, reverse, ``T = 0``, unroll, the hand-written backward
against ``jax.vjp``) and the model-level ``unroll`` of a one-layer model against a Python loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_state

import jax_bptt as jb
from jax_bptt import cells, scan

CELL_NAMES = sorted(jb.CELLS)
F64 = jnp.float64


def _problem(
    seed, cell, *, steps, batch, inputs=4, hidden=6, random_lengths=False, h0=False, bidi=False
):
    """A one-layer model (bidirectional if ``bidi``), inputs, lengths and an initial state."""
    k_p, k_x, k_l, k_h = jax.random.split(jax.random.key(seed), 4)
    params = jb.init_model(k_p, cell, inputs, hidden, 2, bidirectional=bidi, dtype=F64)
    xs = jax.random.normal(k_x, (steps, batch, inputs), F64)
    lengths = jax.random.randint(k_l, (batch,), 0, steps + 1) if random_lengths else None
    state = None
    if h0:
        state = random_state(k_h, cell, batch, hidden, F64)
    return params, xs, lengths, state


_step = jax.jit(cells.step, static_argnums=0)


def _python_loop(cell, params, xs, h0, lengths):
    """Reference: a plain Python loop over t and b, one sequence at a time, no masks."""
    cell = jb.get_cell(cell)
    hidden = params["W_hh"].shape[0]
    outputs = np.zeros((*xs.shape[:2], hidden))
    if h0 is None:
        h0 = cell.zero_state((xs.shape[1],), hidden, F64)
    finals = []
    for b in range(xs.shape[1]):
        state = jax.tree_util.tree_map(lambda a, b=b: a[b], h0)
        for t in range(int(lengths[b])):
            state = _step(cell, params, state, xs[t, b])
            outputs[t, b] = cell.hidden(state)
        finals.append(state)
    return outputs, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *finals)


def _assert_trees_close(got, want, rtol, atol=0.0):
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree
    for a, b in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# The model-level unroll of one layer


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_unroll_equals_python_loop(cell):
    params, xs, lengths, h0 = _problem(1, cell, steps=7, batch=4, random_lengths=True, h0=True)
    lengths = lengths.at[:2].set(jnp.array([0, 7]))
    hs, finals = jb.unroll(params, xs, cell=cell, h0=[{"fwd": h0}], lengths=lengths)
    assert hs.shape == (7, 4, 6) and len(finals) == 1 and set(finals[0]) == {"fwd"}
    ref_hs, ref_final = _python_loop(cell, params["layers"][0]["fwd"], xs, h0, lengths)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-13, atol=1e-14)
    _assert_trees_close(finals[0]["fwd"], ref_final, rtol=1e-13, atol=1e-14)
    # A length-0 sequence keeps h0 as its final state; its outputs are zero.
    _assert_trees_close(
        jax.tree_util.tree_map(lambda a: a[0], finals[0]["fwd"]),
        jax.tree_util.tree_map(lambda a: a[0], h0),
        rtol=0,
    )
    np.testing.assert_array_equal(hs[:, 0], 0.0)


@pytest.mark.parametrize("cell", ["elman_tanh", "lstm"])
def test_reverse_equals_flipped_valid_prefix(cell):
    """A bidirectional layer's backward half: sequence b's reverse pass starts at its last valid
    step (like PyTorch's packed sequences) and ends at step 0, its final state."""
    params, xs, lengths, _ = _problem(2, cell, steps=6, batch=3, random_lengths=True, bidi=True)
    hs, finals = jb.unroll(params, xs, cell=cell, lengths=lengths)
    assert hs.shape == (6, 3, 12) and set(finals[0]) == {"fwd", "bwd"}
    fwd, bwd = params["layers"][0]["fwd"], params["layers"][0]["bwd"]
    ref_fwd, ref_fwd_final = _python_loop(cell, fwd, xs, None, lengths)
    np.testing.assert_allclose(hs[..., :6], ref_fwd, rtol=1e-13, atol=1e-14)
    _assert_trees_close(finals[0]["fwd"], ref_fwd_final, rtol=1e-13, atol=1e-14)
    for b, length in enumerate(np.asarray(lengths)):
        flipped = xs[:length, b][::-1][:, None]
        ref_hs, ref_final = _python_loop(cell, bwd, flipped, None, [length])
        np.testing.assert_allclose(hs[:length, b, 6:], ref_hs[::-1, 0], rtol=1e-13)
        np.testing.assert_array_equal(hs[length:, b], 0.0)
        _assert_trees_close(
            jax.tree_util.tree_map(lambda a, b=b: a[b], finals[0]["bwd"]),
            jax.tree_util.tree_map(lambda a: a[0], ref_final),
            rtol=1e-13,
        )


def test_unroll_options_agree():
    params, xs, _, _ = _problem(4, "gru", steps=10, batch=2)
    hs1, final1 = jb.unroll(params, xs, cell="gru")
    hs4, final4 = jb.unroll(params, xs, cell="gru", options=jb.ScanOptions(unroll=4))
    np.testing.assert_allclose(hs4, hs1, rtol=1e-14)
    _assert_trees_close(final4, final1, rtol=1e-14)
    hs_all, _ = jb.unroll(params, xs, cell="gru", options=jb.ScanOptions(unroll=True))
    np.testing.assert_allclose(hs_all, hs1, rtol=1e-14)
    # Unbatched input == batch of one.
    hs_single, final_single = jb.unroll(params, xs[:, 0], cell="gru")
    assert hs_single.shape == (10, 6) and final_single[0]["fwd"].shape == (6,)
    hs_batch_of_one, _ = jb.unroll(params, xs[:, :1], cell="gru")
    np.testing.assert_allclose(hs_single, hs_batch_of_one[:, 0], rtol=1e-14)
    # lengths == T everywhere == no lengths.
    hs_l, _ = jb.unroll(params, xs, cell="gru", lengths=jnp.array([10, 10]))
    np.testing.assert_allclose(hs_l, hs1, rtol=1e-14)
    # Works under jit with traced lengths.
    jitted = jax.jit(lambda x, n: jb.unroll(params, x, cell="gru", lengths=n))
    hs_j, _ = jitted(xs, jnp.array([3, 10]))
    np.testing.assert_allclose(hs_j[:3, 0], hs1[:3, 0], rtol=1e-14)
    np.testing.assert_array_equal(hs_j[3:, 0], 0.0)
    np.testing.assert_allclose(hs_j[:, 1], hs1[:, 1], rtol=1e-14)


def test_zero_length_sequence_is_defined():
    """T = 0: empty outputs, final state h0 (documented)."""
    params, xs, _, h0 = _problem(0, "lstm", steps=0, batch=2, h0=True)
    hs, finals = jb.unroll(params, xs, cell="lstm", h0=[{"fwd": h0}])
    assert hs.shape == (0, 2, 6)
    np.testing.assert_array_equal(finals[0]["fwd"][0], h0[0])
    np.testing.assert_array_equal(finals[0]["fwd"][1], h0[1])
    # The same at the scan level.
    p = params["layers"][0]["fwd"]
    final, (states, saved) = scan.scan_states(jb.LSTM, p, cells.project_inputs(p, xs), h0)
    _assert_trees_close(final, h0, rtol=0)
    assert states[0].shape == (0, 2, 6) and states[1].shape == (0, 2, 6)


@pytest.mark.parametrize(
    "shapes", [((5, 3, 4), (5, 3, 7)), ((5, 3, 7), (5, 3, 4)), ((6, 2), (6, 5))]
)
def test_sum_outer_is_the_sum_over_leading_axes(shapes):
    """Both operand orders (the smaller goes first), 2-D and 3-D, against a NumPy loop."""
    rng = np.random.default_rng(0)
    a, c = (rng.normal(size=shape) for shape in shapes)
    rows = zip(a.reshape(-1, a.shape[-1]), c.reshape(-1, c.shape[-1]), strict=True)
    want = sum(np.outer(x, y) for x, y in rows)
    got = scan.sum_outer(jnp.asarray(a, F64), jnp.asarray(c, F64))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    empty = scan.sum_outer(jnp.zeros((0, 3, 4)), jnp.zeros((0, 3, 7)))
    np.testing.assert_array_equal(empty, np.zeros((4, 7)))


# ---------------------------------------------------------------------------------------------
# jax_bptt.scan: masks and the hand-written backward


def test_masks_and_previous_states():
    lengths = jnp.array([0, 2, 3])
    mask = scan.length_mask(lengths, 3)
    np.testing.assert_array_equal(mask, np.arange(3)[:, None] < np.array([0, 2, 3])[None])
    assert scan.length_mask(None, 3) is None
    values = jnp.arange(18.0).reshape(3, 3, 2)
    np.testing.assert_array_equal(scan.masked(mask, values), np.where(mask[..., None], values, 0))
    assert scan.masked(None, values) is values
    new, old = (jnp.ones((3, 2)), jnp.ones((3, 2))), (jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    picked = scan.select(jnp.array([True, False, True]), new, old)
    np.testing.assert_array_equal(picked[1][:, 0], [1, 0, 1])
    assert scan.select(None, new, old) is new
    h0 = jnp.full((3, 2), -1.0)
    states = values
    np.testing.assert_array_equal(
        scan.previous_states(h0, states), np.concatenate([h0[None], states[:2]])
    )
    np.testing.assert_array_equal(
        scan.previous_states(h0, states, reverse=True), np.concatenate([states[1:], h0[None]])
    )


def _outputs(cell, params, xs, h0, mask, reverse, unroll):
    xp = cells.project_inputs(params, xs)
    final, (states, _) = scan.scan_states(cell, params, xp, h0, mask, reverse, unroll)
    return scan.masked_hidden(cell, states, mask), final


VARIANTS = ((True, False, 1), (True, True, 3), (False, True, 1))  # (masked, reverse, unroll)


@functools.partial(jax.jit, static_argnums=0)
def _backward_both_ways(cell, params, xs, h0, mask, d_hs, d_final):
    """``{variant: (backward_scan, jax.vjp)}`` of the same recurrence, cotangents
    ``(d_hs, d_final)``, for every variant of ``VARIANTS`` (one compile per cell)."""
    out = {}
    for masked, reverse, unroll in VARIANTS:
        m = mask if masked else None
        _, vjp = jax.vjp(
            lambda p, x, s, m=m, r=reverse, u=unroll: _outputs(cell, p, x, s, m, r, u),
            params,
            xs,
            h0,
        )
        want = vjp((d_hs, d_final))
        xp = cells.project_inputs(params, xs)
        _, (states, saved) = scan.scan_states(cell, params, xp, h0, m, reverse, unroll)
        got = scan.backward_scan(
            cell, params, xs, h0, m, states, saved, d_hs, d_final, reverse=reverse, unroll=unroll
        )
        out[masked, reverse, unroll] = got, want
    return out


def _rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.max(np.abs(want), initial=0.0)
    return np.max(np.abs(got - want), initial=0.0) / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_backward_scan_equals_vjp_of_scan_states(cell):
    """The hand-written reverse scan is the VJP of ``scan_states`` (outputs masked past each
    length, the final state's cotangent included), with and without a mask, in both directions,
    at unroll 1 and 3."""
    cell = jb.get_cell(cell)
    params, xs, lengths, h0 = _problem(3, cell, steps=7, batch=4, random_lengths=True, h0=True)
    p = params["layers"][0]["fwd"]
    mask = scan.length_mask(lengths.at[:2].set(jnp.array([0, 7])), 7)
    k_h, k_f = jax.random.split(jax.random.key(9))
    d_hs = jax.random.normal(k_h, (7, 4, 6), F64)
    d_final = jax.tree_util.tree_map(lambda a: jax.random.normal(k_f, a.shape, F64), h0)
    results = _backward_both_ways(cell, p, xs, h0, mask, d_hs, d_final)
    for variant, ((d_params, d_h0, d_xs), (want_params, want_xs, want_h0)) in results.items():
        assert set(d_params) == set(p)
        for name in p:
            assert _rel(d_params[name], want_params[name]) <= 1e-12, (variant, name)
        assert _rel(d_xs, want_xs) <= 1e-12, variant
        for got, want in zip(jax.tree.leaves(d_h0), jax.tree.leaves(want_h0), strict=True):
            assert _rel(got, want) <= 1e-12, variant
        assert float(np.max(np.abs(d_params["W_hh"]))) > 1e-3  # not vacuous
