"""Train step, optimizers and clipping, NaN guard, checkpoints, exact resume, sampling."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_bptt import bptt_auto, init_model, modes
from jax_bptt.cells import get_cell, step
from jax_bptt.check import relative_error
from jax_bptt.checkpoints import (
    has_checkpoint,
    load_checkpoint,
    model_signature,
    read_metadata,
    save_checkpoint,
)
from jax_bptt.generate import generate
from jax_bptt.train import fit, make_optimizer, make_train_step

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


# --------------------------------------------------------------------------------------------
# Train step


@pytest.mark.parametrize("mode", [m for m in modes.BPTT_MODES if m != "auto"])
def test_every_mode_gives_the_training_curve_of_auto(mode):
    params, xs, targets = _regression()
    optimizer = make_optimizer("adam", 0.05, clip_norm=1.0)
    curves = {}
    for name in ("auto", mode):
        train_step = make_train_step(optimizer, cell="lstm", loss="mse", mode=name)
        p, state, losses = params, optimizer.init(params), []
        for _ in range(5):
            p, state, info = train_step(p, state, xs, targets)
            losses.append(float(info.loss))
        curves[name] = (p, losses)
    (p_auto, loss_auto), (p_mode, loss_mode) = curves["auto"], curves[mode]
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
# Fit loop: streams with truncated BPTT and a carried state (the hardest case to resume)

STREAM_T, K1 = 64, 4


@functools.lru_cache(maxsize=1)  # one train_step for every fit: compiled once
def _stream_setup():
    """A toy next-token stream: 2 streams of ids in [0, 5), one-hot inputs, BPTT(4, 4)."""
    ids = np.asarray(jax.random.randint(jax.random.key(3), (STREAM_T + 1, 2), 0, 5), np.int32)
    params = init_model(jax.random.key(4), "lstm", 5, 6, 5)  # float32, as in experiments
    optimizer = make_optimizer("adam", 0.02, clip_norm=1.0)
    train_step = make_train_step(
        optimizer, cell="lstm", loss="cross_entropy", mode="manual", truncation=(K1, K1)
    )
    zero = get_cell("lstm").zero_state((2,), 6, jnp.float32)

    def batch_fn(key, step_index, carry):
        del key  # the stream is read in order
        start = (step_index * K1) % STREAM_T
        window = ids[start : start + K1 + 1]
        return {
            "xs": np.eye(5, dtype=np.float32)[window[:-1]],
            "targets": window[1:],
            "h0": zero if start == 0 else carry,
        }

    return params, optimizer, train_step, batch_fn, zero


def _fit(run_dir, num_steps, batch_fn=None, resume=False, params=None, **kwargs):
    base_params, optimizer, train_step, base_batch_fn, zero = _stream_setup()
    params = base_params if params is None else params
    return fit(
        train_step,
        params,
        optimizer,
        batch_fn or base_batch_fn,
        num_steps=num_steps,
        key=jax.random.key(0),
        run_dir=run_dir,
        signature=model_signature(params, "lstm"),
        config={"test": True},
        init_carry=zero,
        checkpoint_every=4,
        log_every=2,
        resume=resume,
        progress=False,
        **kwargs,
    )


class Killed(Exception):
    pass


def test_interrupted_then_resumed_run_is_bitwise_identical(tmp_path):
    full = _fit(tmp_path / "full", 10, eval_fn=lambda p: {"w": p["cell"]["W_hh"][0, 0]})

    _, _, _, batch_fn, _ = _stream_setup()

    def dies_at_step_6(key, step_index, carry):
        if step_index == 6:  # after the checkpoint at step 4, mid-way to the next one
            raise Killed
        return batch_fn(key, step_index, carry)

    with pytest.raises(Killed):
        _fit(tmp_path / "resumed", 10, batch_fn=dies_at_step_6)
    assert read_metadata(tmp_path / "resumed")["step"] == 4
    resumed = _fit(tmp_path / "resumed", 10, resume=True)

    assert resumed.step == full.step == 10
    for name in ("params", "opt_state", "carry"):
        assert _leaves_equal(getattr(resumed, name), getattr(full, name)), name

    def train_losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]

    # The resumed log has each step once (steps 5-6 were redone) with the same losses.
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "full")

    # A time limit stops a run early (after its first step here); resuming finishes it exactly.
    stopped = _fit(tmp_path / "timed", 10, time_limit_s=0.0)
    assert stopped.stopped_early and stopped.step == 1
    finished = _fit(tmp_path / "timed", 10, resume=True)
    assert not finished.stopped_early and _leaves_equal(finished.params, full.params)


def test_nonfinite_steps_are_counted_and_logged(tmp_path):
    _, _, _, batch_fn, _ = _stream_setup()

    def poisoned(key, step_index, carry):
        batch = batch_fn(key, step_index, carry)
        if step_index == 2:
            batch["xs"] = np.full_like(batch["xs"], np.nan)
        return batch

    result = _fit(tmp_path / "run", 5, batch_fn=poisoned)
    assert result.skipped == 1
    trained = (result.params, result.opt_state, result.carry)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(trained))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [3]
    assert records[-1]["skipped"] == 1


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
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


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


# --------------------------------------------------------------------------------------------
# Sampling


def test_greedy_generation_matches_a_python_loop():
    vocab = 5
    params = init_model(jax.random.key(2), "gru", vocab, 8, vocab, dtype=jnp.float64)
    cell = get_cell("gru")
    prompt = np.array([1, 4, 0])
    tokens = generate(params, jax.random.key(0), prompt, 6, cell="gru", temperature=0.0)
    state = cell.zero_state((), 8, jnp.float64)
    expected = []
    for token in prompt:
        state = step(cell, params["cell"], state, jax.nn.one_hot(token, vocab, dtype=jnp.float64))
    for _ in range(6):
        logits = cell.hidden(state) @ params["readout"]["W_hy"] + params["readout"]["b_y"]
        expected.append(int(jnp.argmax(logits)))
        state = step(cell, params["cell"], state, jax.nn.one_hot(expected[-1], vocab))
    assert np.asarray(tokens).tolist() == expected

    sampled = generate(params, jax.random.key(0), prompt, 50, cell="gru", temperature=1.0)
    again = generate(params, jax.random.key(0), prompt, 50, cell="gru", temperature=1.0)
    assert sampled.shape == (50,) and np.array_equal(sampled, again)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < vocab
    # A very low temperature is (almost surely) greedy.
    cold = generate(params, jax.random.key(3), prompt, 6, cell="gru", temperature=1e-4)
    assert np.asarray(cold).tolist() == expected

    with pytest.raises(ValueError, match="temperature"):
        generate(params, jax.random.key(0), prompt, 5, cell="gru", temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(params, jax.random.key(0), np.array([7]), 5, cell="gru")
    with pytest.raises(ValueError, match="length"):
        generate(params, jax.random.key(0), prompt, 0, cell="gru")
