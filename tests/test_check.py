"""jax_bptt.check and ``python -m jax_bptt check``: reports name every leaf at any depth, the
finite differences (full and directional) agree with manual BPTT and catch a wrong gradient, and
the CLI fails on a 1% error in a backward, at one layer and at two bidirectional ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb
from jax_bptt import __main__ as cli
from jax_bptt.check import (
    FD_TOLERANCE,
    check_gradients,
    compare_directional,
    compare_gradients,
    finite_difference_gradients,
    random_problem,
    relative_error,
)
from jax_bptt.losses import Loss

F64 = jnp.float64
DEEP = dict(num_layers=2, bidirectional=True, residual="except_first", dropout=0.3)


def _assert_ok(report):
    assert report.ok, "\n" + report.table()


def test_reports_name_every_leaf_of_a_deep_bidirectional_model():
    params, xs, targets, kw = random_problem(
        jax.random.key(0), "lstm", Loss("cross_entropy", "last_step"), steps=6, batch=3,
        random_lengths=True, random_h0=True, dtype=F64, **DEEP,
    )  # fmt: skip
    assert {"dropout", "key", "residual"} <= set(kw) and kw["h0"][1]["bwd"][1].shape == (3, 6)
    reports = check_gradients(params, xs, targets, modes=("manual", "fast"), **kw)
    assert [(r.candidate, r.reference) for r in reports] == [("manual", "auto"), ("fast", "auto")]
    for report in reports:
        _assert_ok(report)
    names = [row.name for row in reports[0].rows]
    assert names[0] == "loss" and names[-1] == "xs"
    for name in ("params/layers/1/bwd/W_hh", "params/layers/0/fwd/b_h", "params/readout/W_hy"):
        assert name in names
    assert {"h0/0/fwd/0", "h0/0/fwd/1", "h0/1/bwd/0", "h0/1/bwd/1"} <= set(names)  # (h, c)
    assert "params/layers/1/bwd/W_hh" in reports[0].table()
    assert reports[0].criterion == "1e-10 relative per leaf"


def test_compare_gradients_detects_a_wrong_gradient():
    params, xs, targets, kw = random_problem(jax.random.key(0), "lstm", dtype=F64)
    auto = jb.bptt_auto(params, xs, targets, **kw)
    wrong = auto._replace(params=jax.tree_util.tree_map(lambda a: a * (1 + 1e-8), auto.params))
    report = compare_gradients(wrong, auto, tolerance=1e-10)
    assert not report.ok and report.worst.rel > 1e-9
    deeper = random_problem(jax.random.key(0), "lstm", num_layers=2, dtype=F64)
    other = jb.bptt_auto(*deeper[:3], **deeper[3])
    with pytest.raises(ValueError, match="different structures"):
        compare_gradients(auto, other)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_full_and_directional_finite_differences_agree_with_manual(cell):
    """The full difference quotient (every scalar) on a tiny deep model, and the directional
    check against it: ``<fd, v>`` is the directional difference up to O(eps^2)."""
    params, xs, targets, kw = random_problem(
        jax.random.key(5), cell, steps=4, batch=2, inputs=2, hidden=2, outputs=2,
        random_lengths=True, random_h0=True, dtype=F64, **DEEP,
    )  # fmt: skip
    manual = jb.bptt_manual(params, xs, targets, **kw)
    full = finite_difference_gradients(params, xs, targets, **kw)
    _assert_ok(compare_gradients(manual, full, tolerance=1e-7, global_scale=True))
    report = compare_directional(manual, params, xs, targets, num_directions=4, **kw)
    _assert_ok(report)
    assert report.tolerance == FD_TOLERANCE and "4 directions per leaf" in report.criterion
    assert [row.name for row in report.rows] == [
        row.name for row in compare_gradients(manual, full).rows
    ]


def test_directional_check_catches_a_one_percent_error_in_one_leaf():
    params, xs, targets, kw = random_problem(
        jax.random.key(1), "gru", steps=8, random_lengths=True, random_h0=True, dtype=F64, **DEEP
    )
    manual = jb.bptt_manual(params, xs, targets, **kw)
    _assert_ok(compare_directional(manual, params, xs, targets, **kw))
    layers = manual.params["layers"]
    wrong_layer = {
        **layers[1],
        "bwd": {**layers[1]["bwd"], "b_hn": 1.01 * layers[1]["bwd"]["b_hn"]},
    }
    wrong = manual._replace(params={**manual.params, "layers": [layers[0], wrong_layer]})
    report = compare_directional(wrong, params, xs, targets, **kw)
    assert [row.name for row in report.rows if not row.ok] == ["params/layers/1/bwd/b_hn"]
    with pytest.raises(ValueError, match="candidate must be the Gradients of this problem"):
        compare_directional(manual._replace(xs=manual.xs[:-1]), params, xs, targets, **kw)
    with pytest.raises(ValueError, match="num_directions must be an int >= 1"):
        compare_directional(manual, params, xs, targets, num_directions=0, **kw)


def test_float32_model_is_checked_against_float64_differences():
    params, xs, targets, kw = random_problem(
        jax.random.key(2), "elman_tanh", Loss("mse", "last_step"), random_h0=True
    )
    assert xs.dtype == jnp.float32
    vs_auto, vs_fd = check_gradients(params, xs, targets, finite_differences=True, **kw)
    _assert_ok(vs_auto)
    _assert_ok(vs_fd)
    assert vs_auto.tolerance == 1e-5 and vs_fd.reference == "finite diff"


def test_token_ids_are_checked_without_an_xs_row():
    params, xs, targets, kw = random_problem(
        jax.random.key(3), "gru", Loss("cross_entropy"), token_ids=True, random_lengths=True,
        dtype=F64,
    )  # fmt: skip
    assert xs.shape == (12, 3) and jnp.issubdtype(xs.dtype, jnp.integer)
    reports = check_gradients(params, xs, targets, finite_differences=True, **kw)
    for report in reports:
        _assert_ok(report)
        assert "xs" not in [row.name for row in report.rows]


def test_unbatched_problem_and_relative_error():
    params, xs, targets, kw = random_problem(jax.random.key(4), "lstm", batch=1, dtype=F64)
    kw.update(h0=None, lengths=None)
    reports = check_gradients(params, xs[:, 0], targets[:, 0], finite_differences=True, **kw)
    assert all(r.ok for r in reports)
    assert relative_error(np.zeros(3), np.zeros(3)) == (0.0, 0.0)
    assert relative_error([1.0, 2.0], [1.0, 4.0]) == (2.0, 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        relative_error(np.zeros(2), np.zeros(3))


def test_check_gradients_rejects_bad_modes():
    params, xs, targets, kw = random_problem(jax.random.key(0), "elman_relu", steps=2, dtype=F64)
    with pytest.raises(ValueError, match="mode must be one of"):
        check_gradients(params, xs, targets, modes=("manual", "magic"), **kw)
    with pytest.raises(ValueError, match="modes must be a non-empty tuple"):
        check_gradients(params, xs, targets, modes="manual", **kw)


# ---------------------------------------------------------------------------------------------
# The CLI


def _broken_tanh(monkeypatch):
    tanh = jb.CELLS["elman_tanh"]

    def broken_backward(params, res, state_prev, d_state):
        d_prev, d_xp, d_hp = tanh.backward(params, res, state_prev, d_state)
        return d_prev, d_xp, 1.01 * d_hp  # a 1% error in the recurrent path only

    monkeypatch.setitem(jb.CELLS, "elman_tanh", tanh._replace(backward=broken_backward))


ONE_CONFIG = ["check", "--cells", "elman_tanh", "--losses", "mse", "--placements", "per_step"]


def test_cli_check_passes_and_fails_on_a_broken_backward(monkeypatch, capsys):
    args = [*ONE_CONFIG, "-T", "4", "-B", "2", "-H", "3", "--no-deep"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "0 mismatches in 4 configurations (vs auto: 1e-10 relative per leaf)" in out

    _broken_tanh(monkeypatch)
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "4 mismatches in 4 configurations" in out
    assert "params/layers/0/fwd/W_hh" in out  # the failing report's table


def test_cli_checks_a_two_layer_bidirectional_model(monkeypatch, capsys):
    """The default sweep's extra case (2 layers, bidirectional, residual, dropout) with finite
    differences; the same 1% error in the recurrent path of a backward fails it."""
    args = [*ONE_CONFIG, "-T", "5", "-B", "2", "-H", "3", "--fd"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    deep = [line for line in out.splitlines() if "2 bi res1+ drop.25" in line]
    assert len(deep) == 1 and deep[0].endswith("yes") and "random  random" in deep[0]
    assert "0 mismatches in 5 configurations" in out
    assert "vs fin.diff: 1e-06 of the largest gradient norm (3 directions per leaf" in out

    _broken_tanh(monkeypatch)
    swept = [*ONE_CONFIG, "-T", "5", "-B", "2", "-H", "3", "--layers", "2", "--bidirectional"]
    assert cli.main([*swept, "--residual", "except_first", "--dropout", "0.3", "-j", "1"]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "2 bi res1+ drop.3" in line]
    assert len(rows) == 4 and all(line.endswith("NO") for line in rows)
    assert "params/layers/1/bwd/W_hh" in out


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--residual true .* needs -D equal to"):
        cli.main(["check", "--residual", "true", "-D", "4", "-H", "3"])
    with pytest.raises(SystemExit, match="--cells: 'transformer' is not one of"):
        cli.main(["check", "--cells", "transformer"])
    with pytest.raises(SystemExit, match="--layers must be >= 1"):
        cli.main(["check", "--layers", "0"])
    with pytest.raises(SystemExit, match=r"--dropout must be in \[0, 1\)"):
        cli.main(["check", "--dropout", "1.5"])
