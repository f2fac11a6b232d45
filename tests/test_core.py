"""Core: manual BPTT equals jax.grad, the scan equals a Python loop, the unroll's conventions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jax_bptt as jb
from jax_bptt.bptt import sum_outer
from jax_bptt.check import compare_gradients, random_problem

CELL_NAMES = sorted(jb.CELLS)
F64 = jnp.float64


def _assert_close(report):
    assert report.ok, "\n" + report.table()


# ---------------------------------------------------------------------------------------------
# Manual BPTT == automatic BPTT


@pytest.mark.parametrize(
    "cell, loss, placement, random_lengths",
    list(itertools.product(CELL_NAMES, jb.validation.LOSSES, jb.validation.PLACEMENTS, [0, 1])),
)
def test_manual_equals_auto_float64(cell, loss, placement, random_lengths):
    for seed, random_h0 in enumerate((False, True)):
        params, xs, targets, kw = random_problem(
            jax.random.key(seed),
            cell,
            loss,
            placement,
            steps=9,
            batch=4,
            random_lengths=bool(random_lengths),
            random_h0=random_h0,
            dtype=F64,
        )
        if random_lengths:  # make sure the edge cases 0 and T are present
            kw["lengths"] = kw["lengths"].at[:2].set(jnp.array([0, 9]))
        manual = jb.bptt_manual(params, xs, targets, **kw)
        auto = jb.bptt_auto(params, xs, targets, **kw)
        report = compare_gradients(manual, auto, tolerance=1e-10)
        _assert_close(report)
        # The comparison is not vacuous: the gradients are far from zero.
        assert float(jnp.max(jnp.abs(auto.params["cell"]["W_hh"]))) > 1e-4


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_manual_equals_auto_float32(cell):
    params, xs, targets, kw = random_problem(
        jax.random.key(3),
        cell,
        "cross_entropy",
        steps=30,
        batch=8,
        hidden=16,
        random_lengths=True,
        random_h0=True,
        dtype=jnp.float32,
    )
    manual = jb.bptt_manual(params, xs, targets, **kw)
    auto = jb.bptt_auto(params, xs, targets, **kw)
    assert manual.params["cell"]["W_hh"].dtype == jnp.float32
    _assert_close(compare_gradients(manual, auto, tolerance=1e-5))


@settings(max_examples=10, deadline=None)
@given(
    cell=st.sampled_from(CELL_NAMES),
    loss=st.sampled_from(jb.validation.LOSSES),
    placement=st.sampled_from(jb.validation.PLACEMENTS),
    reduction=st.sampled_from(jb.validation.REDUCTIONS),
    steps=st.integers(1, 50),
    batch=st.integers(1, 5),
    hidden=st.integers(1, 9),
    use_lengths=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_manual_equals_auto_property(
    cell, loss, placement, reduction, steps, batch, hidden, use_lengths, seed
):
    params, xs, targets, kw = random_problem(
        jax.random.key(seed),
        cell,
        loss,
        placement,
        steps=steps,
        batch=batch,
        inputs=3,
        hidden=hidden,
        outputs=2,
        random_lengths=use_lengths,
        random_h0=seed % 2 == 1,
        dtype=F64,
    )
    manual = jb.bptt_manual(params, xs, targets, reduction=reduction, **kw)
    auto = jb.bptt_auto(params, xs, targets, reduction=reduction, **kw)
    _assert_close(compare_gradients(manual, auto, tolerance=1e-10))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_manual_equals_finite_differences(cell):
    params, xs, targets, kw = random_problem(
        jax.random.key(5),
        cell,
        "mse",
        steps=5,
        batch=2,
        inputs=2,
        hidden=3,
        outputs=2,
        random_lengths=True,
        random_h0=True,
        dtype=F64,
    )
    manual = jb.bptt_manual(params, xs, targets, **kw)
    fd = jb.check.finite_difference_gradients(params, xs, targets, **kw)
    _assert_close(compare_gradients(manual, fd, tolerance=1e-7, global_scale=True))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_check_grads_on_tiny_model(cell):
    """jax.test_util.check_grads: the scan's derivatives match numerical ones (orders 1, 2)."""
    params, xs, targets, kw = random_problem(
        jax.random.key(7),
        cell,
        "mse",
        steps=4,
        batch=2,
        inputs=2,
        hidden=3,
        outputs=2,
        random_h0=True,
        dtype=F64,
    )
    static = dict(cell=jb.get_cell(cell), loss="mse", placement="per_step", reduction="mean")

    def loss(p, h0, x):
        return jb.model_loss(p, h0, x, targets, None, **static)

    check_grads(loss, (params, kw["h0"], xs), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_check_gradients_reports_all_leaves():
    params, xs, targets, kw = random_problem(jax.random.key(0), "gru", dtype=F64)
    (report,) = jb.check_gradients(params, xs, targets, **kw)
    names = {row.name for row in report.rows}
    assert {"params/cell/W_hh", "params/cell/b_hn", "params/readout/W_hy", "h0", "xs"} <= names
    assert report.ok and "W_hh" in report.table()


def test_compare_gradients_detects_a_wrong_gradient():
    params, xs, targets, kw = random_problem(jax.random.key(0), "lstm", dtype=F64)
    auto = jb.bptt_auto(params, xs, targets, **kw)
    wrong = auto._replace(params=jax.tree_util.tree_map(lambda a: a * (1 + 1e-8), auto.params))
    report = compare_gradients(wrong, auto, tolerance=1e-10)
    assert not report.ok and report.worst.rel > 1e-9


def test_cli_check_passes_and_fails_on_a_broken_backward(monkeypatch, capsys):
    from jax_bptt import __main__ as cli

    args = ["check", "--cells", "elman_tanh", "--losses", "mse", "--placements", "per_step"]
    args += ["-T", "4", "-B", "2", "-H", "3"]
    assert cli.main(args) == 0
    assert "0 mismatches" in capsys.readouterr().out

    tanh = jb.CELLS["elman_tanh"]

    def broken_backward(params, res, state_prev, d_state):
        d_prev, d_xp, d_hp = tanh.backward(params, res, state_prev, d_state)
        return d_prev, d_xp, 1.01 * d_hp  # a 1% error in the recurrent path only

    monkeypatch.setitem(jb.CELLS, "elman_tanh", tanh._replace(backward=broken_backward))
    assert cli.main(args) == 1
    assert "NO" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The unroll


def _python_loop(cell, params, xs, h0, lengths):
    """Reference: a plain Python loop over t and b, one sequence at a time, no masks."""
    cell = jb.get_cell(cell)
    outputs = np.zeros((*xs.shape[:2], params["W_hh"].shape[0]))
    finals = []
    for b in range(xs.shape[1]):
        state = jax.tree_util.tree_map(lambda a, b=b: a[b], h0)
        for t in range(int(lengths[b])):
            state = jb.step(cell, params, state, xs[t, b])
            outputs[t, b] = cell.hidden(state)
        finals.append(state)
    return outputs, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *finals)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_unroll_equals_python_loop(cell):
    params, xs, _, kw = random_problem(
        jax.random.key(1), cell, steps=7, batch=4, random_lengths=True, random_h0=True, dtype=F64
    )
    lengths = kw["lengths"].at[:2].set(jnp.array([0, 7]))
    hs, final = jb.unroll(cell, params["cell"], xs, kw["h0"], lengths)
    ref_hs, ref_final = _python_loop(cell, params["cell"], xs, kw["h0"], lengths)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-13, atol=1e-14)
    for got, want in zip(
        jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(ref_final), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cell", ["elman_tanh", "lstm"])
def test_reverse_equals_flipped_valid_prefix(cell):
    params, xs, _, kw = random_problem(
        jax.random.key(2), cell, steps=6, batch=3, random_lengths=True, dtype=F64
    )
    lengths = kw["lengths"]
    hs, final = jb.unroll(cell, params["cell"], xs, lengths=lengths, reverse=True)
    for b, length in enumerate(np.asarray(lengths)):
        # The reverse pass of sequence b starts at its last valid step, like packed sequences.
        flipped = xs[:length, b][::-1]
        ref_hs, ref_final = jb.unroll(cell, params["cell"], flipped)
        np.testing.assert_allclose(hs[:length, b], ref_hs[::-1], rtol=1e-13)
        np.testing.assert_array_equal(hs[length:, b], 0.0)
        for got, want in zip(
            jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(ref_final), strict=True
        ):
            np.testing.assert_allclose(got[b], want, rtol=1e-13)


def test_unroll_options_agree():
    params, xs, _, kw = random_problem(jax.random.key(4), "gru", steps=10, batch=2, dtype=F64)
    hs1, final1 = jb.unroll("gru", params["cell"], xs)
    hs4, final4 = jb.unroll("gru", params["cell"], xs, unroll=4)
    np.testing.assert_allclose(hs4, hs1, rtol=1e-14)
    # Unbatched input == batch of one.
    hs_single, final_single = jb.unroll("gru", params["cell"], xs[:, 0])
    assert hs_single.shape == (10, 6) and final_single.shape == (6,)
    np.testing.assert_allclose(hs_single, hs1[:, 0], rtol=1e-14)
    # lengths == T everywhere == no lengths.
    hs_l, _ = jb.unroll("gru", params["cell"], xs, lengths=jnp.array([10, 10]))
    np.testing.assert_allclose(hs_l, hs1, rtol=1e-14)
    # Works under jit with traced lengths.
    jitted = jax.jit(lambda x, n: jb.unroll("gru", params["cell"], x, lengths=n))
    hs_j, _ = jitted(xs, jnp.array([3, 10]))
    np.testing.assert_allclose(hs_j[:3, 0], hs1[:3, 0], rtol=1e-14)
    np.testing.assert_array_equal(hs_j[3:, 0], 0.0)


def test_zero_length_sequence_is_defined():
    """T = 0: empty outputs, final state h0, loss 0 and zero gradients (documented)."""
    params, xs, targets, kw = random_problem(
        jax.random.key(0), "lstm", steps=0, batch=2, random_h0=True, dtype=F64
    )
    hs, final = jb.unroll("lstm", params["cell"], xs, kw["h0"])
    assert hs.shape == (0, 2, 6)
    np.testing.assert_array_equal(final[1], kw["h0"][1])
    for fn in (jb.bptt_auto, jb.bptt_manual):
        grads = fn(params, xs, targets, **kw)
        assert float(grads.loss) == 0.0
        assert all(float(jnp.abs(a).max(initial=0)) == 0 for a in jax.tree_util.tree_leaves(grads))


def test_unbatched_gradients_have_unbatched_shapes():
    params, xs, targets, kw = random_problem(jax.random.key(0), "elman_tanh", batch=1, dtype=F64)
    manual = jb.bptt_manual(params, xs[:, 0], targets[:, 0], cell="elman_tanh")
    auto = jb.bptt_auto(params, xs, targets, cell="elman_tanh")
    assert manual.xs.shape == xs[:, 0].shape and manual.h0.shape == (6,)
    np.testing.assert_allclose(manual.xs, auto.xs[:, 0], rtol=1e-12)
    np.testing.assert_allclose(
        manual.params["cell"]["W_hh"], auto.params["cell"]["W_hh"], rtol=1e-12
    )


def test_gradients_inside_user_jit():
    params, xs, targets, kw = random_problem(
        jax.random.key(0), "gru", random_lengths=True, dtype=F64
    )
    lengths = kw.pop("lengths")
    manual = jax.jit(lambda p, x, n: jb.bptt_manual(p, x, targets, lengths=n, **kw))
    got = manual(params, xs, lengths)
    want = jb.bptt_auto(params, xs, targets, lengths=lengths, **kw)
    _assert_close(compare_gradients(got, want, tolerance=1e-10))


@pytest.mark.parametrize(
    "shapes", [((5, 3, 4), (5, 3, 7)), ((5, 3, 7), (5, 3, 4)), ((6, 2), (6, 5))]
)
def test_sum_outer_is_the_sum_over_leading_axes(shapes):
    """Both operand orders (the smaller goes first), 2-D and 3-D, against a NumPy loop."""
    rng = np.random.default_rng(0)
    a, c = (rng.normal(size=shape) for shape in shapes)
    rows = zip(a.reshape(-1, a.shape[-1]), c.reshape(-1, c.shape[-1]), strict=True)
    want = sum(np.outer(x, y) for x, y in rows)
    got = sum_outer(jnp.asarray(a, F64), jnp.asarray(c, F64))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    empty = sum_outer(jnp.zeros((0, 3, 4)), jnp.zeros((0, 3, 7)))
    np.testing.assert_array_equal(empty, np.zeros((4, 7)))


# ---------------------------------------------------------------------------------------------
# Losses


def test_losses_match_direct_computation():
    rng = np.random.default_rng(0)
    ys = rng.normal(size=(5, 3, 4))
    lengths = np.array([5, 2, 0])
    mse_t = rng.normal(size=(5, 3, 4))
    ce_t = rng.integers(0, 4, size=(5, 3))
    valid = [(t, b) for b in range(3) for t in range(lengths[b])]
    mse_terms = [np.mean((ys[t, b] - mse_t[t, b]) ** 2) for t, b in valid]

    def ce(t, b, target):
        return np.log(np.sum(np.exp(ys[t, b]))) - ys[t, b, target]

    ce_terms = [ce(t, b, ce_t[t, b]) for t, b in valid]
    last = [(lengths[b] - 1, b) for b in range(3) if lengths[b] > 0]
    kw = dict(lengths=jnp.asarray(lengths))
    cases = [
        ("mse", "per_step", "sum", mse_t, sum(mse_terms)),
        ("mse", "per_step", "mean", mse_t, np.mean(mse_terms)),
        ("cross_entropy", "per_step", "mean", ce_t, np.mean(ce_terms)),
        (
            "cross_entropy",
            "last_step",
            "mean",
            ce_t[0],
            np.mean([ce(t, b, ce_t[0, b]) for t, b in last]),
        ),
        (
            "mse",
            "last_step",
            "sum",
            mse_t[0],
            sum(np.mean((ys[t, b] - mse_t[0, b]) ** 2) for t, b in last),
        ),
    ]
    for loss, placement, reduction, targets, want in cases:
        args = dict(loss=loss, placement=placement, reduction=reduction, **kw)
        got = jb.sequence_loss(jnp.asarray(ys), jnp.asarray(targets), **args)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        # The hand-written dL/dy equals jax.grad of the loss.
        auto = jax.grad(lambda y, a=args, tg=targets: jb.sequence_loss(y, jnp.asarray(tg), **a))
        np.testing.assert_allclose(
            jb.sequence_loss_grad(jnp.asarray(ys), jnp.asarray(targets), **args),
            auto(jnp.asarray(ys)),
            rtol=1e-12,
            atol=1e-15,
        )


# ---------------------------------------------------------------------------------------------
# Initialisers


def test_initialisers():
    key = jax.random.key(0)
    hidden = 32
    params = jb.init_model(key, "lstm", 5, hidden, 2, dtype=F64)
    bound = 1 / np.sqrt(hidden)
    for leaf in jax.tree_util.tree_leaves(params):
        assert float(jnp.abs(leaf).max()) <= bound
    assert params["cell"]["W_xh"].shape == (5, 4 * hidden)

    ortho = jb.init_model(key, "gru", 5, hidden, 2, recurrent_init="orthogonal", dtype=F64)
    for gate in jnp.split(ortho["cell"]["W_hh"], 3, axis=1):
        np.testing.assert_allclose(gate.T @ gate, np.eye(hidden), atol=1e-12)

    irnn = jb.init_model(key, "elman_relu", 5, hidden, 2, recurrent_init="identity")
    np.testing.assert_array_equal(irnn["cell"]["W_hh"], np.eye(hidden))
    np.testing.assert_array_equal(irnn["cell"]["b_h"], 0.0)

    lstm = jb.init_model(key, "lstm", 5, hidden, 2, forget_bias=1.0)
    np.testing.assert_array_equal(lstm["cell"]["b_h"][hidden : 2 * hidden], 1.0)
    assert float(jnp.abs(lstm["cell"]["b_h"][:hidden]).max()) <= bound
