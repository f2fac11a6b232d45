"""Token ids as inputs: the projection is a row gather of ``W_xh`` and its gradient a scatter-add,
equal to one-hot inputs in every mode, at every depth, truncated and streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb
from jax_bptt.check import relative_error
from jax_bptt.model import run_auto

T, B, V, H = 9, 3, 7, 5
TOL = 1e-12  # float64: the gather is the GEMM with a one-hot operand, the same sums
LENGTHS = jnp.array([9, 4, 0])


def _problem(num_layers=1, bidirectional=False, cell="lstm"):
    params = jb.init_model(
        jax.random.key(0), cell, V, H, V, num_layers=num_layers, bidirectional=bidirectional,
        dtype=jnp.float64,
    )  # fmt: skip
    ids = jax.random.randint(jax.random.key(1), (T, B), 0, V)
    targets = jax.random.randint(jax.random.key(2), (T, B), 0, V)
    return params, ids, jax.nn.one_hot(ids, V, dtype=jnp.float64), targets


def _assert_close(candidate, reference, tol=TOL):
    leaves_c, leaves_r = jax.tree.leaves(candidate), jax.tree.leaves(reference)
    assert len(leaves_c) == len(leaves_r)
    for a, b in zip(leaves_c, leaves_r, strict=True):
        assert relative_error(a, b)[1] <= tol


@pytest.mark.parametrize("mode", jb.BPTT_MODES)
@pytest.mark.parametrize("depth", [(1, False), (2, True)], ids=["L1", "L2-bi"])
def test_token_ids_equal_one_hot_inputs(mode, depth):
    params, ids, one_hot, targets = _problem(*depth, cell="gru" if depth[0] == 1 else "lstm")
    kw = dict(
        cell="gru" if depth[0] == 1 else "lstm", mode=mode, loss="cross_entropy",
        lengths=LENGTHS, dropout=0.2 if depth[0] > 1 else 0.0, key=jax.random.key(3),
        options=jb.ScanOptions(chunk_length=2, segment_length=4),
    )  # fmt: skip
    from_ids, from_one_hot = (
        jb.bptt(params, ids, targets, **kw),
        jb.bptt(params, one_hot, targets, **kw),
    )
    assert from_ids.xs is None  # ids have no gradient
    _assert_close((from_ids.loss, from_ids.params, from_ids.h0), from_one_hot[:3])


def test_token_ids_through_truncated_bptt_unroll_and_streaming():
    params, ids, one_hot, targets = _problem(num_layers=2)
    _assert_close(
        jb.truncated_bptt(params, ids, targets, cell="lstm", k1=3, k2=5),
        jb.truncated_bptt(params, one_hot, targets, cell="lstm", k1=3, k2=5),
    )
    outputs, _ = jb.unroll(params, ids, cell="lstm")
    _assert_close(outputs, jb.unroll(params, one_hot, cell="lstm")[0])
    state = jb.init_state(params, B, cell="lstm")
    for t in range(T):
        state, ys = jb.step(params, state, ids[t], cell="lstm")
    _assert_close(ys, jb.predict(params, one_hot, cell="lstm")[-1])
    single, _ = jb.unroll(params, ids[:, 1], cell="lstm")  # one (T,) sequence of ids
    _assert_close(single, outputs[:, 1])


@pytest.mark.parametrize("bad", [-1, V, 10**4])
def test_token_ids_out_of_range_are_refused(bad):
    params, ids, _, targets = _problem()
    with pytest.raises(ValueError, match=r"token ids xs must lie in \[0, 7\)"):
        jb.bptt_manual(params, ids.at[2, 1].set(bad), targets, cell="lstm", loss="cross_entropy")


def test_token_ids_need_the_right_rank_and_no_residual_on_layer_0():
    params, ids, _, targets = _problem()
    with pytest.raises(ValueError, match=r"token ids xs must have shape \(T, B\) or \(T,\)"):
        jb.unroll(params, ids[..., None], cell="lstm")
    wide = jb.init_model(jax.random.key(0), "gru", 4, 4, 4, dtype=jnp.float64)
    with pytest.raises(ValueError, match="residual=True"):
        jb.unroll(wide, np.zeros((3, 2), np.int32), cell="gru", residual=True)


def test_auto_mode_gathers_the_rows_inside_the_scan():
    """``run_auto`` hands the ids to the scan, whose every step gathers its rows of ``W_xh``: no
    ``(T, B, G)`` projection is gathered before it (and scattered back after it), which made the
    automatic mode's char-LM train step about 30% slower on a CPU. The gradients stay those of the
    one-hot GEMM (``test_token_ids_equal_one_hot_inputs``)."""
    params, ids, _, _ = _problem(cell="lstm")
    layer, h0 = params["layers"][0]["fwd"], jb.init_state(params, B, cell="lstm")[0]["fwd"]
    options = jb.ScanOptions(unroll=1)
    jaxpr = jax.make_jaxpr(
        lambda p, x: run_auto(jb.get_cell("lstm"), options, p, x, h0, None, False)
    )(layer, ids).jaxpr
    (scan,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    outside = " ".join(str(eqn) for eqn in jaxpr.eqns if eqn is not scan)  # nested jaxprs too
    assert "gather" not in outside, outside
    assert "gather" in str(scan.params["jaxpr"])
