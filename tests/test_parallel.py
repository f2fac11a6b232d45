"""Data parallelism (``jax_bptt.parallel``): 1, 2, 4, 8 devices train exactly like one, in every
BPTT mode, for a single-layer model and a stacked bidirectional one (residual, dropout), and for
truncated BPTT at one and two layers.

JAX fixes its device count when it starts, and this pytest process already runs it with one CPU
device. So the multi-device checks run in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and ``JAX_ENABLE_X64=1``: it is this file
run as a script (``python tests/test_parallel.py <check>``), which prints one JSON line of
measurements (errors against the unsharded train step, shardings, collectives in the compiled
step) that the tests then assert on. Three children, one per test, so ``pytest -n 2`` overlaps
them.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import Loss, ScanOptions, init_model, modes, parallel
from jax_bptt.check import relative_error
from jax_bptt.train import make_optimizer, make_train_step

NUM_DEVICES = 8
DEVICE_COUNTS = (1, 2, 4, 8)
STEPS = 3  # optimizer steps per comparison
F64_TOL, F32_TOL = 1e-12, 1e-6
T, B, D, H, OUT = 6, 8, 3, 4, 2
DEEP = dict(num_layers=2, bidirectional=True)  # the stacked model: 2 layers, both directions
DEEP_STEP = dict(dropout=0.25, residual="except_first")


# --------------------------------------------------------------------------------------------
# Child process: runs with 8 CPU devices, prints measurements as JSON


def _max_error(candidate, reference) -> float:
    """Largest relative error over the leaves of two pytrees (0 for equal trees)."""
    flat_c, flat_r = jax.tree_util.tree_leaves(candidate), jax.tree_util.tree_leaves(reference)
    assert len(flat_c) == len(flat_r)
    return max(relative_error(a, b)[1] for a, b in zip(flat_c, flat_r, strict=True))


def _train(step, params, optimizer, batches, opt_state=None):
    """Run ``step`` over ``batches`` (dicts of step arguments); a truncated-BPTT batch whose
    ``h0`` is None takes the previous step's carry. Returns ``(losses, params, info, batch)``
    of the last step."""
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    losses, carry = [], None
    for batch in batches:
        if "h0" in batch and batch["h0"] is None:
            batch = {**batch, "h0": carry}
        params, opt_state, info = step(params, opt_state, **batch)
        carry = info.carry
        losses.append(np.asarray(info.loss))
    return np.stack(losses), params, info, batch


def _batch_only(batch: dict) -> dict:
    """A train-step batch without the dropout key (which is replicated, not split)."""
    return {name: value for name, value in batch.items() if name != "key"}


def _spec(array) -> list:
    """The partition spec as a JSON-able list, e.g. ``[None, "batch"]``; ``[]`` replicated."""
    return list(array.sharding.spec)


def _shard_shapes(array) -> list:
    return sorted({tuple(shard.data.shape) for shard in array.addressable_shards})


_DP_STEPS: dict = {}  # (train step, device count) -> data-parallel step: compile once


def _compare(name, step, params, optimizer, batches, reference, num_devices) -> dict:
    """One data-parallel run against the unsharded reference ``(losses, params)``."""
    key = (id(step), num_devices)
    if key not in _DP_STEPS:
        _DP_STEPS[key] = (step, parallel.data_parallel_step(step, parallel.make_mesh(num_devices)))
    dp_step = _DP_STEPS[key][1]
    mesh = dp_step.mesh
    losses, new_params, info, last = _train(dp_step, params, optimizer, batches)
    sharded = parallel.shard_batch(_batch_only(last), mesh)
    record = {
        "name": name,
        "devices": num_devices,
        "mesh_devices": mesh.devices.size,
        "loss_error": relative_error(losses, reference[0])[1],
        "params_error": _max_error(new_params, reference[1]),
        "params_spec": _spec(new_params["layers"][-1]["fwd"]["W_hh"]),
        "xs_spec": _spec(sharded["xs"]),
        "xs_shards": _shard_shapes(sharded["xs"]),
    }
    if info.carry is not None:
        leaf = jax.tree_util.tree_leaves(info.carry)[0]
        record.update(carry_spec=_spec(leaf), carry_shards=_shard_shapes(leaf))
    if num_devices > 1:  # the partitioner split the batch: the gradient sums are all-reduced
        replicated = parallel.replicate((params, optimizer.init(params)), mesh)
        key = () if "key" not in last else (parallel.replicate(last["key"], mesh),)
        hlo = dp_step.jitted.lower(*replicated, sharded, *key).compile().as_text()
        record["all_reduces"] = hlo.count("all-reduce(") + hlo.count("all-reduce-start(")
    return record


def _data(batch_size=B, num_steps=T, seed=0, dtype=np.float64):
    """Host (NumPy) inputs: placing them needs no extra XLA compiles."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((num_steps, batch_size, D)).astype(dtype)
    targets = rng.standard_normal((num_steps, batch_size, OUT)).astype(dtype)
    lengths = rng.integers(0, num_steps + 1, batch_size)
    lengths[0] = num_steps
    return xs, targets, lengths


def _params(cell, dtype=np.float64, seed=0, **model):
    params = init_model(jax.random.key(seed), cell, D, H, OUT, dtype=jnp.float64, **model)
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), params)


def child_modes() -> dict:
    """Every BPTT mode on 8 devices (auto and manual on 1, 2, 4, 8), and the batch that does not
    divide the device count (the error, and padding)."""
    optimizer = make_optimizer("adam", 0.05)
    params = _params("elman_tanh")
    xs, targets, lengths = _data()
    batches = [{"xs": xs, "targets": targets, "lengths": lengths}] * STEPS
    records, steps = [], {}
    for mode in modes.BPTT_MODES:
        steps[mode] = make_train_step(optimizer, cell="elman_tanh", mode=mode)
        reference = _train(steps[mode], params, optimizer, batches)[:2]
        counts = DEVICE_COUNTS if mode in ("auto", "manual") else (NUM_DEVICES,)
        for n in counts:
            records.append(_compare(mode, steps[mode], params, optimizer, batches, reference, n))

    # The fast path's backward in one-step chunks on 8 devices, against the one-chunk step (the
    # CPU default at this size) on one device.
    reference = _train(steps["fast"], params, optimizer, batches)[:2]
    options = ScanOptions(chunk_length=1)
    chunked = make_train_step(optimizer, cell="elman_tanh", mode="fast", options=options)
    record = _compare("fast", chunked, params, optimizer, batches, reference, NUM_DEVICES)
    records.append({**record, "chunked": True})

    # Five sequences on eight devices: an error naming both, or five real rows and three
    # length-0 rows whose loss and update equal the unpadded batch's.
    step, mesh = steps["manual"], parallel.make_mesh(NUM_DEVICES)
    five = {"xs": xs[:, :5], "targets": targets[:, :5], "lengths": lengths[:5]}
    errors = []
    for attempt in (
        lambda: parallel.shard_batch(five, mesh),
        lambda: parallel.data_parallel_step(step, mesh)(params, optimizer.init(params), **five),
    ):
        try:
            attempt()
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    reference = _train(step, params, optimizer, [five])[:2]
    padded = parallel.pad_batch(five, NUM_DEVICES)
    pad = _compare("padded", step, params, optimizer, [padded], reference, NUM_DEVICES)
    pad["padded_lengths"] = np.asarray(padded["lengths"]).tolist()
    return {
        "device_count": jax.device_count(),
        "modes": sorted(modes.BPTT_MODES),
        "records": records,
        "errors": errors,
        "pad": pad,
    }


def child_truncated() -> dict:
    """Truncated BPTT (k1=2, k2=4, LSTM, carried state) on 1, 2, 4, 8 devices; the bare jitted
    step on sharded arguments; float32; the single-process path of the multi-host helpers."""
    optimizer = make_optimizer("adam", 0.05)
    k1, k2, num_windows = 2, 4, 3
    params = _params("lstm", seed=1)
    xs, targets, _ = _data(num_steps=k2 + 2 * k1, seed=1)
    rng = np.random.default_rng(2)
    h0 = (rng.standard_normal((B, H)), rng.standard_normal((B, H)))
    # Overlapping windows [j k1, j k1 + k2): the first starts from h0, the next from the carry.
    batches = [
        {"xs": xs[j * k1 : j * k1 + k2], "targets": targets[j * k1 : j * k1 + k2], "h0": None}
        for j in range(num_windows)
    ]
    batches[0]["h0"] = [{"fwd": h0}]  # one {"fwd": state} per layer
    step = make_train_step(optimizer, cell="lstm", mode="manual", truncation=(k1, k2))
    reference = _train(step, params, optimizer, batches)[:2]
    records = [
        _compare("truncated", step, params, optimizer, batches, reference, n) for n in DEVICE_COUNTS
    ]
    # Two stacked layers (unidirectional: a carried state has no future), residual on layer 1.
    deep_params = _params("lstm", seed=4, num_layers=2)
    deep_h0 = [{"fwd": h0}, {"fwd": (0.5 * h0[1], 0.5 * h0[0])}]
    deep_batches = [{**batch, "h0": deep_h0 if j == 0 else None} for j, batch in enumerate(batches)]
    deep_step = make_train_step(
        optimizer, cell="lstm", mode="fast", truncation=(k1, k2), residual="except_first"
    )
    reference = _train(deep_step, deep_params, optimizer, deep_batches)[:2]
    record = _compare(
        "truncated-deep", deep_step, deep_params, optimizer, deep_batches, reference, NUM_DEVICES
    )
    records.append({**record, "deep": True})

    # The bare jitted step, given sharded arguments (optimizer state included: optax's step
    # count would otherwise sit on one device and cost a second compile), partitions itself.
    params = _params("elman_tanh")
    xs, targets, lengths = _data()
    batches = [{"xs": xs, "targets": targets, "lengths": lengths}] * STEPS
    step = make_train_step(optimizer, cell="elman_tanh", mode="manual")
    reference = _train(step, params, optimizer, batches)[:2]
    mesh = parallel.make_mesh(NUM_DEVICES)
    sharded = [parallel.shard_batch(batch, mesh) for batch in batches]
    placed, opt_state = parallel.replicate((params, optimizer.init(params)), mesh)
    losses, bare_params, _, _ = _train(step, placed, optimizer, sharded, opt_state)
    bare = {
        "loss_error": relative_error(losses, reference[0])[1],
        "params_error": _max_error(bare_params, reference[1]),
        "params_spec": _spec(bare_params["layers"][0]["fwd"]["W_hh"]),
    }

    params32 = _params("elman_tanh", np.float32)
    batches32 = [
        {"xs": xs.astype(np.float32), "targets": targets.astype(np.float32), "lengths": lengths}
    ] * STEPS
    reference = _train(step, params32, optimizer, batches32)[:2]
    f32 = _compare("float32", step, params32, optimizer, batches32, reference, NUM_DEVICES)
    f32["dtype"] = str(jax.tree_util.tree_leaves(reference[1])[0].dtype)

    # Multi-host helpers in one process: this process's slice is the whole batch, and the
    # assembled global arrays equal shard_batch's, values and shardings.
    batch = {"xs": xs, "targets": targets, "h0": [{"fwd": h0}]}
    local = parallel.process_batch_slice(batch, jax.process_index(), jax.process_count())
    assembled = parallel.make_global_batch(local, mesh)
    expected = parallel.shard_batch(batch, mesh)
    flat_a, flat_e = jax.tree_util.tree_leaves(assembled), jax.tree_util.tree_leaves(expected)
    same = [
        bool(np.array_equal(a, e)) and a.sharding == e.sharding
        for a, e in zip(flat_a, flat_e, strict=True)
    ]
    return {
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "records": records,
        "bare": bare,
        "float32": f32,
        "global_batch_same": same,
        "global_specs": [_spec(leaf) for leaf in flat_a],
    }


def child_deep() -> dict:
    """Every BPTT mode on 8 devices for a 2-layer bidirectional GRU with a residual connection on
    layer 1 and dropout between the layers (the same masks, from one key per step, on every
    device count), with lengths."""
    optimizer = make_optimizer("adam", 0.05)
    params = _params("gru", seed=3, **DEEP)
    xs, targets, lengths = _data(seed=3)
    keys = [jax.random.key(10 + i) for i in range(STEPS)]
    batches = [{"xs": xs, "targets": targets, "lengths": lengths, "key": k} for k in keys]
    records = []
    for mode in modes.BPTT_MODES:
        step = make_train_step(optimizer, cell="gru", mode=mode, **DEEP_STEP)
        reference = _train(step, params, optimizer, batches)[:2]
        records.append(_compare(mode, step, params, optimizer, batches, reference, NUM_DEVICES))
    return {"device_count": jax.device_count(), "records": records}


CHILDREN = {"modes": child_modes, "deep": child_deep, "truncated": child_truncated}


def _run_child(name: str) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={NUM_DEVICES}",
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"child {name!r} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_sharded(record: dict) -> None:
    """The inputs really were split, outputs placed as promised, and (n > 1) XLA all-reduced."""
    n = record["devices"]
    assert record["mesh_devices"] == n
    assert record["xs_spec"] == [None, "batch"]
    assert len(record["xs_shards"]) == 1 and record["xs_shards"][0][1] == B // n
    assert record["params_spec"] == []
    if "carry_spec" in record:  # on one device XLA reports the carry as replicated: the same
        assert record["carry_spec"] == (["batch"] if n > 1 else [])
        assert record["carry_shards"] == [[B // n, H]]
    if n > 1:
        assert record["all_reduces"] >= 1


# --------------------------------------------------------------------------------------------
# Tests: multi-device (child processes)


def test_every_mode_on_1_2_4_8_devices_trains_like_one_device():
    result = _run_child("modes")
    assert result["device_count"] == NUM_DEVICES
    assert result["modes"] == sorted(modes.BPTT_MODES)
    seen = {(r["name"], r["devices"]) for r in result["records"]}
    for mode in modes.BPTT_MODES:
        assert (mode, NUM_DEVICES) in seen
    for mode in ("auto", "manual"):
        assert {(mode, n) for n in DEVICE_COUNTS} <= seen
    assert any(r.get("chunked") for r in result["records"])
    for record in result["records"]:
        assert record["loss_error"] <= F64_TOL, record
        assert record["params_error"] <= F64_TOL, record
        _assert_sharded(record)

    for message in result["errors"]:
        assert message is not None and "B=5" in message and "8 devices" in message
    pad = result["pad"]
    assert pad["padded_lengths"][5:] == [0, 0, 0]
    assert pad["loss_error"] <= F64_TOL and pad["params_error"] <= F64_TOL
    _assert_sharded(pad)


def test_every_mode_of_a_stacked_bidirectional_model_on_8_devices():
    result = _run_child("deep")
    assert result["device_count"] == NUM_DEVICES
    assert [(r["name"], r["devices"]) for r in result["records"]] == [
        (mode, NUM_DEVICES) for mode in modes.BPTT_MODES
    ]
    for record in result["records"]:
        assert record["loss_error"] <= F64_TOL, record
        assert record["params_error"] <= F64_TOL, record
        _assert_sharded(record)


def test_truncated_bptt_bare_step_float32_and_global_batch_on_8_devices():
    result = _run_child("truncated")
    assert result["device_count"] == NUM_DEVICES and result["process_count"] == 1
    assert [r["devices"] for r in result["records"]] == [*DEVICE_COUNTS, NUM_DEVICES]
    assert [r["name"] for r in result["records"]][-1] == "truncated-deep"
    for record in result["records"]:
        assert record["loss_error"] <= F64_TOL, record
        assert record["params_error"] <= F64_TOL, record
        assert "carry_spec" in record
        _assert_sharded(record)
    bare = result["bare"]
    assert bare["loss_error"] <= F64_TOL and bare["params_error"] <= F64_TOL
    assert bare["params_spec"] == []
    f32 = result["float32"]
    assert f32["dtype"] == "float32"
    assert f32["loss_error"] <= F32_TOL and f32["params_error"] <= F32_TOL
    _assert_sharded(f32)

    # Leaves in key order: h0 [{"fwd": (h, c)}], targets, xs.
    assert result["global_batch_same"] == [True] * 4
    assert result["global_specs"] == [["batch"], ["batch"], [None, "batch"], [None, "batch"]]


# --------------------------------------------------------------------------------------------
# Tests: single process (layout rule, padding, slicing, distributed start-up)


def test_layout_rule_puts_the_batch_axis_where_each_argument_has_it():
    assert parallel.batch_dims("per_step") == {
        "xs": 1, "targets": 1, "lengths": 0, "h0": 0, "resets": 1
    }  # fmt: skip
    assert parallel.batch_dims("last_step")["targets"] == 0
    assert parallel.batch_dims(Loss("cross_entropy", "last_step")) == parallel.batch_dims(
        "last_step"
    )
    mesh = parallel.make_mesh(1)
    assert mesh.axis_names == ("batch",)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert parallel.batch_sharding(mesh, 1).spec == jax.sharding.PartitionSpec(None, "batch")
    assert parallel.batch_sharding(mesh, 0).spec == jax.sharding.PartitionSpec("batch")
    with pytest.raises(ValueError, match="placement"):
        parallel.batch_dims("middle")
    with pytest.raises(ValueError, match=r"num_devices must be in \[1, 1\]"):
        parallel.make_mesh(2)
    with pytest.raises(ValueError, match="not an axis"):
        parallel.batch_sharding(mesh, 0, "model")


def test_batch_checks_name_the_argument_and_the_sizes():
    xs, targets = np.zeros((T, 5, D)), np.zeros((T, 5), np.int32)
    with pytest.raises(ValueError, match=r"B=5 is not divisible by the 4 devices"):
        parallel.check_divisible({"xs": xs, "targets": targets}, 4)
    with pytest.raises(ValueError, match="disagree"):
        parallel.check_divisible({"xs": xs, "lengths": np.zeros(4, np.int32)}, 1)
    with pytest.raises(ValueError, match=r"targets must have its batch axis at position 1"):
        parallel.check_divisible({"xs": xs, "targets": np.zeros(5, np.int32)}, 1)
    with pytest.raises(ValueError, match="unknown keys"):
        parallel.check_divisible({"xs": xs, "ys": targets}, 1)
    assert parallel.check_divisible({"xs": xs, "targets": np.zeros(5)}, 5, placement="last_step")


def test_pad_batch_adds_zero_rows_of_length_zero():
    xs = np.arange(T * 3 * D, dtype=np.float64).reshape(T, 3, D) + 1
    targets = np.ones((3, OUT))  # last-step targets: batch axis 0
    h0 = [{"fwd": (np.ones((3, H)), np.ones((3, H)))}, {"fwd": (np.ones((3, H)), np.ones((3, H)))}]
    padded = parallel.pad_batch({"xs": xs, "targets": targets, "h0": h0}, 4, placement="last_step")
    assert padded["xs"].shape == (T, 4, D) and padded["targets"].shape == (4, OUT)
    assert [leaf.shape for leaf in jax.tree_util.tree_leaves(padded["h0"])] == [(4, H)] * 4
    assert not np.any(padded["h0"][1]["fwd"][0][3]) and np.all(padded["h0"][1]["fwd"][0][:3])
    np.testing.assert_array_equal(padded["xs"][:, :3], xs)
    assert not np.any(padded["xs"][:, 3]) and not np.any(padded["targets"][3])
    np.testing.assert_array_equal(padded["lengths"], [T, T, T, 0])
    already = parallel.pad_batch({"xs": xs, "lengths": np.array([1, 2, 3])}, 3)
    np.testing.assert_array_equal(already["lengths"], [1, 2, 3])


def test_padded_batch_has_the_loss_and_gradients_of_the_unpadded_one():
    # Last-step cross-entropy: a padded row's class id 0 is valid, and its length 0 picks no step.
    params, (xs, _, lengths) = _params("elman_tanh"), _data(batch_size=3)
    targets = np.array([1, 0, 1])
    kw = dict(cell="elman_tanh", loss=Loss("cross_entropy", "last_step", "mean"))
    original = modes.bptt(params, xs, targets, lengths=lengths, mode="manual", **kw)
    padded = parallel.pad_batch(
        {"xs": xs, "targets": targets, "lengths": lengths}, 4, placement="last_step"
    )
    assert padded["targets"].shape == (4,) and padded["lengths"][3] == 0
    grads = modes.bptt(params, **padded, mode="manual", **kw)
    assert relative_error(grads.loss, original.loss)[1] <= F64_TOL
    assert _max_error(grads.params, original.params) <= F64_TOL


def test_process_slices_partition_the_global_batch():
    xs = np.arange(T * 4 * D).reshape(T, 4, D)
    lengths = np.arange(4)
    slices = [parallel.process_batch_slice({"xs": xs, "lengths": lengths}, i, 2) for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([s["xs"] for s in slices], axis=1), xs)
    np.testing.assert_array_equal(slices[1]["lengths"], [2, 3])
    with pytest.raises(ValueError, match="B=4 is not divisible by the 3 processes"):
        parallel.process_batch_slice({"xs": xs}, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        parallel.process_batch_slice({"xs": xs}, 2, 2)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


def test_distributed_start_up_follows_the_environment():
    recorder = _Recorder()
    start = functools.partial(parallel.maybe_initialize_distributed, initialize=recorder)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}
    assert not start({})
    assert not start({"SLURM_NTASKS": "1"})
    assert recorder.calls == []  # one process: nothing happens
    with pytest.raises(ValueError, match=r"\['JAX_PROCESS_ID'\] are not"):
        start(env)
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be in"):
        start({**env, "JAX_PROCESS_ID": "4"})
    assert start({**env, "JAX_PROCESS_ID": "3"})
    assert recorder.calls == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    ]
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}
    assert start({**slurm, "SLURM_PROCID": "0"})
    assert recorder.calls[-1] == {}  # jax's own Slurm auto-detection


if __name__ == "__main__":
    print(json.dumps(CHILDREN[sys.argv[1]]()))
