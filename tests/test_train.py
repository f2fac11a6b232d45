"""Train step, optimizers and clipping, NaN guard, checkpoints, exact resume; deep (stacked,
bidirectional, dropout) models through the same step and fit loop; fit's time-based checkpoints,
resume records, stop records and plain progress lines."""

import functools
import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_bptt as jb
from jax_bptt import BPTT_MODES, bptt_auto, init_model, unroll
from jax_bptt import train as train_module
from jax_bptt.check import relative_error
from jax_bptt.checkpoints import (
    has_checkpoint,
    load_checkpoint,
    model_signature,
    read_metadata,
    save_checkpoint,
)
from jax_bptt.generate import init_state
from jax_bptt.model import dropout_masks
from jax_bptt.train import (
    DROPOUT_KEY_TAG,
    fit,
    make_optimizer,
    make_train_step,
)

TOL = 1e-10
T, B, D, H, OUT = 6, 3, 2, 4, 2


def _regression(dtype=jnp.float64, key=0):
    k_p, k_x = jax.random.split(jax.random.key(key))
    params = init_model(k_p, "lstm", D, H, OUT, dtype=dtype)
    xs = jax.random.normal(k_x, (T, B, D), dtype)
    targets = jnp.stack([jnp.cumsum(xs[..., 0], 0), xs[..., 1] * xs[..., 0]], -1)
    return params, xs, targets


def _leaves_equal(a, b) -> bool:
    flat_a, flat_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(flat_a) == len(flat_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(flat_a, flat_b, strict=True)
    )


def _assert_close(candidate, reference):
    flat_c, flat_r = jax.tree_util.tree_leaves(candidate), jax.tree_util.tree_leaves(reference)
    assert len(flat_c) == len(flat_r)
    for a, b in zip(flat_c, flat_r, strict=True):
        assert relative_error(a, b)[1] <= TOL


def _zero_model(cell, input_size, hidden_size, output_size, **kwargs):
    """Zeros in ``init_model``'s layout, shapes by ``jax.eval_shape`` (nothing compiled)."""
    shapes = jax.eval_shape(
        lambda k: init_model(k, cell, input_size, hidden_size, output_size, **kwargs),
        jax.random.key(0),
    )
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# --------------------------------------------------------------------------------------------
# Train step


@functools.lru_cache(maxsize=4)  # the auto curve is the reference of every mode: trained once
def _training_curve(mode):
    params, xs, targets = _regression()
    optimizer = make_optimizer("adam", 0.05, clip_norm=1.0)
    train_step = make_train_step(optimizer, cell="lstm", loss="mse", mode=mode)
    p, state, losses = params, optimizer.init(params), []
    for _ in range(5):
        p, state, info = train_step(p, state, xs, targets)
        losses.append(float(info.loss))
    return p, losses


@pytest.mark.parametrize("mode", [m for m in BPTT_MODES if m != "auto"])
def test_every_mode_gives_the_training_curve_of_auto(mode):
    (p_auto, loss_auto), (p_mode, loss_mode) = _training_curve("auto"), _training_curve(mode)
    assert loss_auto[-1] < loss_auto[0]  # it trains
    np.testing.assert_allclose(loss_mode, loss_auto, rtol=TOL, atol=0)
    _assert_close(p_mode, p_auto)


@pytest.mark.parametrize(
    ("clip", "expected"),
    [
        ({"clip_value": 0.01}, lambda g: jnp.clip(g, -0.01, 0.01)),
        ({"clip_norm": 0.05}, "global"),
    ],
)
def test_gradient_clipping(clip, expected):
    """One SGD step with lr 1: the update must be minus the clipped gradient."""
    params, xs, targets = _regression()
    grads = bptt_auto(params, xs, targets, cell="lstm").params
    if expected == "global":
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        assert norm > 0.05  # so the clipping is active
        clipped = jax.tree_util.tree_map(lambda g: g * 0.05 / norm, grads)
    else:
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads)) > 0.01
        clipped = jax.tree_util.tree_map(expected, grads)
    optimizer = make_optimizer("sgd", 1.0, **clip)
    train_step = make_train_step(optimizer, cell="lstm", mode="manual")
    new_params, _, _ = train_step(params, optimizer.init(params), xs, targets)
    want = jax.tree_util.tree_map(lambda p, g: p - g, params, clipped)
    _assert_close(new_params, want)


def test_nonfinite_batch_skips_the_update():
    params, xs, targets = _regression()
    optimizer = make_optimizer("adam", 0.01)
    train_step = make_train_step(optimizer, cell="lstm", mode="manual")
    state = optimizer.init(params)
    params, state, _ = train_step(params, state, xs, targets)  # a non-trivial opt state
    bad = xs.at[2, 1, 0].set(jnp.nan)
    new_params, new_state, info = train_step(params, state, bad, targets)
    assert not bool(info.finite)
    assert _leaves_equal(new_params, params) and _leaves_equal(new_state, state)
    _, _, info = train_step(params, state, xs, targets.at[0, 0, 0].set(jnp.inf))
    assert not bool(info.finite)


def test_adamw_weight_decay_is_optax_adamw():
    """``weight_decay`` reaches optax's AdamW: two updates equal ``optax.adamw``'s."""
    params, xs, targets = _regression()
    grads = bptt_auto(params, xs, targets, cell="lstm").params
    ours, theirs = (
        make_optimizer("adamw", 0.1, weight_decay=0.5),
        optax.adamw(0.1, weight_decay=0.5),
    )
    results = []
    for optimizer in (ours, theirs):
        p, state = params, optimizer.init(params)
        for _ in range(2):
            updates, state = optimizer.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results.append(p)
    _assert_close(*results)
    default, _ = make_optimizer("adamw", 0.1).update(grads, ours.init(params), params)
    decayed, _ = ours.update(grads, ours.init(params), params)
    assert not _leaves_equal(default, decayed)


def test_make_optimizer_and_train_step_reject_bad_names():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("adamm")
    with pytest.raises(ValueError, match="clip_norm"):
        make_optimizer("adam", clip_norm=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_train_step(optax.sgd(0.1), cell="lstm", mode="magic")
    with pytest.raises(ValueError, match="cell must be one of"):
        make_train_step(optax.sgd(0.1), cell="transformer")
    with pytest.raises(ValueError, match="k2"):
        make_train_step(optax.sgd(0.1), cell="lstm", truncation=(4, 2))


# --------------------------------------------------------------------------------------------
# Deep models: the same step, depth and directions read from the params

DEEP = dict(cell="gru", dropout=0.25)


def _rbg_key(seed):
    # XLA's RngBitGenerator: the dropout masks compile in a fraction of threefry's time.
    return jax.random.key(seed, impl="rbg")


def test_deep_models_train_alike_in_every_mode():
    """A 2-layer bidirectional GRU with dropout: every mode gives auto's curve."""
    _, xs, targets = _regression()
    params = init_model(
        jax.random.key(0), "gru", D, H, OUT, num_layers=2, bidirectional=True, dtype=jnp.float64
    )
    optimizer = optax.sgd(0.2)
    keys = [_rbg_key(seed) for seed in range(3)]
    runs = {}
    for mode in BPTT_MODES:
        train_step = make_train_step(optimizer, loss="mse", mode=mode, **DEEP)
        assert train_step.needs_key
        p, state, losses = params, optimizer.init(params), []
        for key in keys:
            p, state, info = train_step(p, state, xs, targets, key=key)
            losses.append(float(info.loss))
        runs[mode] = (p, losses, train_step)
    p_auto, loss_auto, step_auto = runs["auto"]
    assert loss_auto[-1] < loss_auto[0]
    for mode in BPTT_MODES[1:]:
        np.testing.assert_allclose(runs[mode][1], loss_auto, rtol=TOL, atol=0)
        _assert_close(runs[mode][0], p_auto)
    # The key draws the dropout masks: another key, another update.
    state = optimizer.init(params)
    one, _, _ = step_auto(params, state, xs, targets, key=keys[0])
    other, _, _ = step_auto(params, state, xs, targets, key=keys[1])
    assert not _leaves_equal(one, other)
    with pytest.raises(ValueError, match="needs a PRNG key per step"):
        step_auto(params, state, xs, targets)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 1.0}, "dropout must be a float in"),
        ({"dropout": -0.1}, "dropout must be a float in"),
        ({"residual": "yes"}, "residual must be one of"),
    ],
)
def test_deep_train_step_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_train_step(optax.sgd(0.1), **{"cell": "gru", **kwargs})


def test_init_model_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        init_model(jax.random.key(0), "gru", D, H, OUT, num_layers=0)


def test_dropout_on_a_single_layer_is_rejected():
    params, xs, targets = _regression()
    train_step = make_train_step(optax.sgd(0.1), cell="lstm", dropout=0.5)
    with pytest.raises(ValueError, match="dropout=0.5 acts between stacked layers"):
        train_step(params, optax.sgd(0.1).init(params), xs, targets, key=_rbg_key(0))


def test_output_dropout_trains_a_single_layer_alike_in_every_mode():
    """Output dropout on a one-layer LSTM through BPTT(2, 4) windows (the k1 < k2 path slices the
    mask): every mode gives auto's losses and params; it needs a key, and the key decides."""
    params = init_model(jax.random.key(5), "lstm", 5, 6, 5, dtype=jnp.float64)
    ids = jax.random.randint(jax.random.key(6), (4, 3), 0, 5)
    targets = jax.random.randint(jax.random.key(7), (4, 3), 0, 5)
    optimizer = optax.sgd(0.5)
    h0 = init_state(params, 3, cell="lstm")
    runs = {}
    for mode in BPTT_MODES:
        train_step = make_train_step(
            optimizer, cell="lstm", loss="cross_entropy", mode=mode, truncation=(2, 4),
            output_dropout=0.5,
        )  # fmt: skip
        assert train_step.needs_key
        p, state, losses = params, optimizer.init(params), []
        for seed in range(2):
            p, state, info = train_step(p, state, ids, targets, h0=h0, key=_rbg_key(seed))
            losses.append(float(info.loss))
        runs[mode] = (p, losses, train_step)
    p_auto, loss_auto, step_auto = runs["auto"]
    for mode in BPTT_MODES[1:]:
        np.testing.assert_allclose(runs[mode][1], loss_auto, rtol=TOL, atol=0)
        _assert_close(runs[mode][0], p_auto)
    state = optimizer.init(params)
    one, _, _ = step_auto(params, state, ids, targets, h0=h0, key=_rbg_key(0))
    other, _, _ = step_auto(params, state, ids, targets, h0=h0, key=_rbg_key(1))
    assert not _leaves_equal(one, other)
    with pytest.raises(ValueError, match=r"output_dropout=0.5, weight_dropout=0.0\) needs a PRNG"):
        step_auto(params, state, ids, targets, h0=h0)
    with pytest.raises(ValueError, match="output_dropout must be a float in"):
        make_train_step(optimizer, cell="lstm", output_dropout=1.0)


def test_weight_dropout_is_the_gradient_of_the_masked_model_in_every_mode():
    """Weight dropout on a 2-layer bidirectional GRU: with SGD at rate 1 the step's gradient is
    ``params - new``; its zeros in ``W_hh`` are the dropped weights (about the rate), and every
    leaf equals ``jax.grad`` of the loss with ``W_hh * mask / keep``, times the mask / keep on
    ``W_hh`` (float64, 1e-10), in every mode; the key decides the mask."""
    rate, keep = 0.3, 0.7
    params = init_model(
        jax.random.key(8), "gru", D, 8, OUT, num_layers=2, bidirectional=True, dtype=jnp.float64
    )
    _, xs, targets = _regression()
    sgd = optax.sgd(1.0)
    steps = {
        mode: make_train_step(sgd, cell="gru", mode=mode, weight_dropout=rate)
        for mode in BPTT_MODES
    }
    assert all(step.needs_key for step in steps.values())
    new, _, info = steps["auto"](params, sgd.init(params), xs, targets, key=_rbg_key(3))
    grads = jax.tree.map(lambda p, q: p - q, params, new)
    masks = [{name: cell["W_hh"] != 0 for name, cell in layer.items()} for layer in grads["layers"]]
    dropped = np.mean([1 - np.mean(m) for layer in masks for m in layer.values()])
    assert 0.2 < dropped < 0.4

    def scaled(tree):
        layers = [
            {
                name: {**cell, "W_hh": cell["W_hh"] * mask[name] / keep}
                for name, cell in layer.items()
            }
            for layer, mask in zip(tree["layers"], masks, strict=True)
        ]
        return {**tree, "layers": layers}

    value, reference = jax.value_and_grad(
        lambda p: jb.model_loss(scaled(p), xs, targets, cell="gru")
    )(params)
    assert relative_error(info.loss, value)[1] <= TOL
    _assert_close(grads, reference)
    for mode in BPTT_MODES[1:]:
        other, _, _ = steps[mode](params, sgd.init(params), xs, targets, key=_rbg_key(3))
        _assert_close(jax.tree.map(lambda p, q: p - q, params, other), reference)
    moved, _, _ = steps["auto"](params, sgd.init(params), xs, targets, key=_rbg_key(4))
    assert not _leaves_equal(moved, new)
    with pytest.raises(ValueError, match="weight_dropout must be a float in"):
        make_train_step(sgd, cell="gru", weight_dropout=-0.1)


def test_truncated_train_step_rejects_a_bidirectional_model():
    """The model's directions come from the params, so the rejection comes at the call."""
    params = _zero_model("gru", D, H, OUT, bidirectional=True, dtype=jnp.float64)
    train_step = make_train_step(optax.sgd(0.1), cell="gru", truncation=(4, 4))
    _, xs, targets = _regression()
    with pytest.raises(ValueError, match="unidirectional"):
        train_step(params, optax.sgd(0.1).init(params), xs[:4], targets[:4])


def test_train_step_rejects_params_of_another_layout():
    params, xs, targets = _regression()
    train_step = make_train_step(optax.sgd(0.1), cell="lstm")
    old_layout = {"cell": params["layers"][0]["fwd"], "readout": params["readout"]}
    with pytest.raises(TypeError, match="init_model"):
        train_step(old_layout, (), xs, targets)
    gru = _zero_model("gru", D, H, OUT, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['fwd'\].*lstm"):
        train_step(gru, (), xs, targets)
    # Depth comes from the params: an h0 must have one state per layer.
    three = _zero_model("lstm", D, H, OUT, num_layers=3, dtype=jnp.float64)
    two_states = init_state(_zero_model("lstm", D, H, OUT, num_layers=2, dtype=jnp.float64), B,
                            cell="lstm")  # fmt: skip
    with pytest.raises(TypeError, match="3 layers"):
        train_step(three, (), xs, targets, h0=two_states)


# --------------------------------------------------------------------------------------------
# Fit loop: streams with truncated BPTT and a carried state (the hardest case to resume)

STREAM_T, K1 = 64, 4


def _stream_batch_fn(zero):
    """Windows of a toy next-token stream: 2 streams of ids in [0, 5), one-hot inputs."""
    ids = np.asarray(jax.random.randint(jax.random.key(3), (STREAM_T + 1, 2), 0, 5), np.int32)

    def batch_fn(key, step_index, carry):
        del key  # the stream is read in order
        start = (step_index * K1) % STREAM_T
        window = ids[start : start + K1 + 1]
        return {
            "xs": np.eye(5, dtype=np.float32)[window[:-1]],
            "targets": window[1:],
            "h0": zero if start == 0 else carry,
        }

    return batch_fn


@functools.lru_cache(maxsize=1)  # one train_step for every fit: compiled once
def _stream_setup():
    """An LSTM on the toy stream with BPTT(4, 4)."""
    params = init_model(jax.random.key(4), "lstm", 5, 6, 5)  # float32, as in experiments
    optimizer = make_optimizer("adam", 0.02, clip_norm=1.0)
    train_step = make_train_step(
        optimizer, cell="lstm", loss="cross_entropy", mode="manual", truncation=(K1, K1)
    )
    zero = init_state(params, 2, cell="lstm")
    return params, optimizer, train_step, _stream_batch_fn(zero), zero


DEEP_STREAM = dict(dropout=0.2, residual="except_first")


@functools.lru_cache(maxsize=1)
def _deep_stream_setup():
    """A 2-layer LSTM with dropout and a residual connection on the same stream, BPTT(4, 4)."""
    params = init_model(jax.random.key(4), "lstm", 5, 6, 5, num_layers=2)
    optimizer = make_optimizer("adam", 0.02, clip_norm=1.0)
    train_step = make_train_step(
        optimizer,
        cell="lstm",
        loss="cross_entropy",
        mode="manual",
        truncation=(K1, K1),
        **DEEP_STREAM,
    )
    zero = init_state(params, 2, cell="lstm")
    return params, optimizer, train_step, _stream_batch_fn(zero), zero


def _fit(
    run_dir, num_steps, batch_fn=None, resume=False, params=None, setup=_stream_setup, **kwargs
):
    base_params, optimizer, train_step, base_batch_fn, zero = setup()
    params = base_params if params is None else params
    kwargs.setdefault("key", jax.random.key(0))
    kwargs.setdefault("checkpoint_every", 4)
    kwargs.setdefault("log_every", 2)
    kwargs.setdefault("progress", False)
    residual = DEEP_STREAM["residual"] if len(params["layers"]) > 1 else False
    return fit(
        train_step,
        params,
        optimizer,
        batch_fn or base_batch_fn,
        num_steps=num_steps,
        run_dir=run_dir,
        signature=model_signature(params, "lstm", residual=residual),
        config={"test": True},
        init_carry=zero,
        resume=resume,
        **kwargs,
    )


class Killed(Exception):
    pass


def _dies_at(step_to_die, batch_fn=None):
    batch_fn = batch_fn or _stream_setup()[3]

    def dying(key, step_index, carry):
        if step_index == step_to_die:
            raise Killed
        return batch_fn(key, step_index, carry)

    return dying


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in _records(run_dir) if r["kind"] == "train"]


def _assert_no_duplicate_steps(run_dir):
    """Every kind of record but the resume markers has each step at most once, in order."""
    records = _records(run_dir)
    for kind in {r["kind"] for r in records} - {"resumed"}:
        steps = [r["step"] for r in records if r["kind"] == kind]
        assert steps == sorted(set(steps)), (kind, steps)


def _w(params):
    return {"w": params["layers"][0]["fwd"]["W_hh"][0, 0]}


def test_interrupted_then_resumed_run_is_bitwise_identical(tmp_path):
    full = _fit(tmp_path / "full", 10, eval_fn=_w)

    # Killed after the checkpoint at step 4, mid-way to the next one.
    with pytest.raises(Killed):
        _fit(tmp_path / "resumed", 10, batch_fn=_dies_at(6))
    assert read_metadata(tmp_path / "resumed")["step"] == 4
    resumed = _fit(tmp_path / "resumed", 10, resume=True)

    assert resumed.step == full.step == 10
    for name in ("params", "opt_state", "carry"):
        assert _leaves_equal(getattr(resumed, name), getattr(full, name)), name

    # The resumed log has each step once (steps 5-6 were redone) with the same losses.
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "full")

    # A time limit stops a run early (after its first step here); resuming finishes it exactly.
    stopped = _fit(tmp_path / "timed", 10, time_limit_s=0.0)
    assert stopped.stopped_early and stopped.step == 1
    finished = _fit(tmp_path / "timed", 10, resume=True)
    assert not finished.stopped_early and _leaves_equal(finished.params, full.params)


def test_nonfinite_steps_are_counted_and_logged(tmp_path):
    batch_fn = _stream_setup()[3]

    def poisoned(key, step_index, carry):
        batch = batch_fn(key, step_index, carry)
        if step_index in (2, 3):
            batch["xs"] = np.full_like(batch["xs"], np.nan)
        return batch

    result = _fit(tmp_path / "run", 5, batch_fn=poisoned)
    assert result.skipped == 2
    trained = (result.params, result.opt_state, result.carry)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(trained))
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [3, 4]
    assert records[-1]["skipped"] == 2
    # a log window whose every step was skipped has no mean loss (not 0.0); the others do
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert train[4]["loss"] is None and train[4]["grad_norm"] is None
    assert all(train[step]["loss"] > 0 and train[step]["grad_norm"] > 0 for step in (2, 5))


def test_existing_run_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    _fit(run, 4)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(FileExistsError, match="resume"):
        _fit(run, 4)
    # A checkpoint of another model: a clear error, and nothing is touched.
    other = init_model(jax.random.key(1), "lstm", 5, 7, 5)
    with pytest.raises(ValueError, match="hidden_size: checkpoint has 6, this run has 7"):
        _fit(run, 8, resume=True, params=other)
    # A 1-layer checkpoint never resumes into a 2-layer run.
    deep = init_model(jax.random.key(1), "lstm", 5, 6, 5, num_layers=2)
    with pytest.raises(ValueError, match="num_layers: checkpoint has 1, this run has 2"):
        _fit(run, 8, resume=True, params=deep)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_deep_truncated_fit_carries_every_layer_and_resumes_bitwise(tmp_path):
    params, optimizer, train_step, batch_fn, zero = _deep_stream_setup()
    run_key = _rbg_key(0)
    deep_fit = functools.partial(_fit, setup=_deep_stream_setup, key=run_key)

    # fit's first step is the step with the documented dropout key.
    first = deep_fit(tmp_path / "first", 1)
    data_key = jax.random.fold_in(run_key, 0)
    batch = batch_fn(data_key, 0, zero)
    dropout_key = jax.random.fold_in(data_key, DROPOUT_KEY_TAG)
    direct, _, info = train_step(params, optimizer.init(params), **batch, key=dropout_key)
    assert _leaves_equal(first.params, direct) and _leaves_equal(first.carry, info.carry)

    # The carry is every layer's final state, composed here from single-layer unrolls with the
    # same dropout mask between the layers (the residual path does not touch the states).
    (mask,) = dropout_masks(dropout_key, DEEP_STREAM["dropout"], params["layers"], batch["xs"])

    def one_layer(i):
        return {"layers": [params["layers"][i]], "readout": params["readout"]}

    hs, (final_0,) = unroll(one_layer(0), batch["xs"], cell="lstm")
    _, (final_1,) = unroll(one_layer(1), hs * mask, cell="lstm")
    expected = [final_0, final_1]
    assert jax.tree_util.tree_structure(info.carry) == jax.tree_util.tree_structure(expected)
    leaves = zip(
        jax.tree_util.tree_leaves(info.carry), jax.tree_util.tree_leaves(expected), strict=True
    )
    for got, want in leaves:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # float32 forward

    full = deep_fit(tmp_path / "full", 8)
    with pytest.raises(Killed):
        deep_fit(tmp_path / "resumed", 8, batch_fn=_dies_at(6, batch_fn))
    resumed = deep_fit(tmp_path / "resumed", 8, resume=True)
    for name in ("params", "opt_state", "carry"):
        assert _leaves_equal(getattr(resumed, name), getattr(full, name)), name


# --------------------------------------------------------------------------------------------
# Fit: checkpoints by time, resume and stop records, progress off a terminal (issue 17)


def test_checkpoint_every_s_writes_a_checkpoint_within_the_time(tmp_path, monkeypatch):
    """fit's clock is replaced by one that only moves when step 3 runs (for 10 s): with
    checkpoint_every_s=5 the run checkpoints right after it, and a kill at step 5 leaves that
    checkpoint; without checkpoint_every_s the killed run has none."""
    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    batch_fn = _stream_setup()[3]

    def slow_step_3(key, step_index, carry):
        if step_index == 2:
            clock[0] += 10.0
        return batch_fn(key, step_index, carry)

    for run, every_s in (("timed", 5.0), ("untimed", None)):
        with pytest.raises(Killed):
            _fit(tmp_path / run, 10, batch_fn=_dies_at(4, slow_step_3), checkpoint_every=0,
                 checkpoint_every_s=every_s)  # fmt: skip
    assert read_metadata(tmp_path / "timed")["step"] == 3
    assert not has_checkpoint(tmp_path / "untimed")
    resumed = _fit(tmp_path / "timed", 10, resume=True, checkpoint_every=0)
    assert resumed.history[0] == {"kind": "resumed", "step": 3}


def test_resume_logs_and_prints_where_it_starts(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        _fit(run, 10, batch_fn=_dies_at(6))
    capsys.readouterr()
    resumed = _fit(run, 10, resume=True, progress=True)
    assert resumed.history[0] == {"kind": "resumed", "step": 4}
    assert {"kind": "resumed", "step": 4} in _records(run)
    assert re.search(r"resuming .*run at step 4 of 10", capsys.readouterr().err)

    # resume=True on an empty directory starts at step 0, and says so.
    fresh = _fit(tmp_path / "fresh", 2, resume=True, progress=True)
    assert fresh.history[0] == {"kind": "resumed", "step": 0} and fresh.step == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_metrics_have_no_duplicate_steps_after_a_resume(tmp_path):
    run = tmp_path / "run"
    fit_kwargs = dict(eval_fn=_w, eval_every=4)
    with pytest.raises(Killed):
        _fit(run, 10, batch_fn=_dies_at(6), **fit_kwargs)
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == [2, 4, 6]
    done = _fit(run, 10, resume=True, **fit_kwargs)
    _assert_no_duplicate_steps(run)
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in _records(run) if r["kind"] == "eval"] == [4, 8, 10]

    # Resuming a finished run does no step and logs none again.
    again = _fit(run, 10, resume=True, **fit_kwargs)
    assert again.step == 10 and _leaves_equal(again.params, done.params)
    _assert_no_duplicate_steps(run)
    assert [r["step"] for r in _records(run) if r["kind"] == "resumed"] == [4, 10]


def test_time_limited_run_reports_and_logs_its_stop(tmp_path):
    run = tmp_path / "run"
    stopped = _fit(run, 10, time_limit_s=0.0)
    assert stopped.stopped_early and stopped.step == 1
    assert read_metadata(run)["step"] == 1  # checkpointed where it stopped
    (record,) = [r for r in _records(run) if r["kind"] == "stopped"]
    assert record["step"] == 1 and "time limit" in record["reason"]
    assert stopped.history[-1] == record
    # Resumed without a limit: it finishes, with each step logged once.
    finished = _fit(run, 10, resume=True)
    assert not finished.stopped_early and finished.step == 10
    _assert_no_duplicate_steps(run)


def test_progress_off_a_terminal_prints_plain_lines(tmp_path, capsys):
    """stderr captured by pytest is not a tty: one plain line per logged window, no '\\r'."""
    _fit(tmp_path / "run", 4, progress=True, eval_fn=_w, eval_every=4, desc="stream")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3  # train at steps 2 and 4, eval at 4
    assert re.fullmatch(r"stream 2/4 loss=\d+\.\d{4}", lines[0])
    assert re.fullmatch(r"stream 4/4 loss=\d+\.\d{4}", lines[1])
    assert re.fullmatch(r"stream 4/4 w=-?\d+\.\d{4}", lines[2])


# --------------------------------------------------------------------------------------------
# Checkpoint files


def _save(directory, step_count, params, opt_state):
    return save_checkpoint(
        directory,
        step=step_count,
        params=params,
        opt_state=opt_state,
        key=jax.random.key(5),
        signature=model_signature(params, "lstm"),
        skipped=1,
    )


def test_checkpoint_roundtrip_and_checks(tmp_path):
    params, _, _ = _regression(jnp.float32)
    optimizer = optax.adam(0.1)
    opt_state = optimizer.init(params)
    opt_state = optimizer.update(params, opt_state, params)[1]  # non-zero moments
    _save(tmp_path, 7, params, opt_state)
    signature = model_signature(params, "lstm")
    loaded = load_checkpoint(
        tmp_path, params_template=params, opt_state_template=opt_state, signature=signature
    )
    assert loaded.step == 7 and loaded.skipped == 1
    assert _leaves_equal(loaded.params, params) and _leaves_equal(loaded.opt_state, opt_state)
    assert np.array_equal(jax.random.key_data(loaded.key), jax.random.key_data(jax.random.key(5)))

    with pytest.raises(ValueError, match="opt_state"):  # a different optimizer's state
        load_checkpoint(
            tmp_path,
            params_template=params,
            opt_state_template=optax.sgd(0.1, momentum=0.9).init(params),
            signature=signature,
        )
    gru = init_model(jax.random.key(0), "gru", D, H, OUT)
    with pytest.raises(ValueError, match="cell: checkpoint has 'lstm', this run has 'gru'"):
        load_checkpoint(
            tmp_path, params_template=gru, opt_state_template=None, signature=model_signature(
                gru, "gru"
            )
        )  # fmt: skip


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    params, _, _ = _regression(jnp.float32)
    opt_state = optax.sgd(0.1).init(params)
    _save(tmp_path, 1, params, opt_state)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_replace = os.replace

    def killed_replace(src, dst):
        if str(dst).endswith(".json"):  # die after the arrays landed, before the metadata
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_replace)
    moved = jax.tree_util.tree_map(lambda a: a + 1, params)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, moved, opt_state)
    monkeypatch.setattr(os, "replace", real_replace)

    # The metadata still names the old arrays, which load intact; no temporary file is left.
    assert has_checkpoint(tmp_path)
    loaded = load_checkpoint(
        tmp_path,
        params_template=params,
        opt_state_template=opt_state,
        signature=model_signature(params, "lstm"),
    )
    assert loaded.step == 1 and _leaves_equal(loaded.params, params)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / "checkpoint.json").read_bytes() == before["checkpoint.json"]

    # A torn or tampered array file is detected by its checksum.
    array_file = tmp_path / read_metadata(tmp_path)["arrays"]
    array_file.write_bytes(array_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match="SHA-256"):
        load_checkpoint(
            tmp_path,
            params_template=params,
            opt_state_template=opt_state,
            signature=model_signature(params, "lstm"),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-1.0), "learning_rate must be a finite number > 0"),
        (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),
        (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number > 0"),
        (dict(learning_rate="0.1"), "learning_rate must be a finite number > 0"),
        (dict(clip_norm=0.0), "clip_norm must be a finite number > 0"),
        (dict(clip_norm=float("nan")), "clip_norm must be a finite number > 0"),
        (dict(clip_value=-2.0), "clip_value must be a finite number > 0"),
        (dict(weight_decay=0.0), "weight_decay must be a finite number > 0"),
        (dict(weight_decay=0.1), "weight_decay applies to optimizer 'adamw' only"),
    ],
)
def test_make_optimizer_refuses_values_that_make_no_sense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer("adam", **kwargs)
    # a schedule is a learning rate too
    make_optimizer("adam", optax.constant_schedule(1e-3))
