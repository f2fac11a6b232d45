"""The experiment scripts' --quick smoke runs, their outputs, and their errors for bad flags."""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import deep_unroll, init_deep, readout

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import adding_problem  # noqa: E402
import bench  # noqa: E402
import char_lm  # noqa: E402
import common  # noqa: E402
import copy_memory  # noqa: E402


def _quick(module, out: Path, *extra: str) -> dict:
    return module.main(["--quick", "--no-progress", "--out", str(out), *extra])


def test_char_lm_quick(tmp_path):
    out = tmp_path / "char_lm"
    summary = _quick(char_lm, out)
    for name in ("config.json", "metrics.jsonl", "samples.txt", "summary.json", "loss_curve.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["bptt_mode"] == "auto"
    assert saved["truncation"]["k1"] == saved["truncation"]["k2"] == char_lm.QUICK["k1"]
    assert saved["steps"] == char_lm.QUICK["steps"] and not saved["stopped_early"]
    assert math.isfinite(summary["final_val_nats"])
    assert summary["final_val_bits"] == pytest.approx(summary["final_val_nats"] / math.log(2))
    assert 2.0 < summary["baselines_nats"]["bigram"] < summary["baselines_nats"]["unigram"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert {r["kind"] for r in records} == {"train", "eval"}

    with pytest.raises(SystemExit, match="not empty"):  # never overwrite a finished run
        _quick(char_lm, out)
    with pytest.raises(SystemExit, match="bptt: 'auto' -> 'manual'"):
        _quick(char_lm, out, "--resume", "--bptt", "manual")
    with pytest.raises(SystemExit, match="layers: 1 -> 2"):  # a 1-layer run stays 1-layer
        _quick(char_lm, out, "--resume", "--layers", "2")
    samples = (out / "samples.txt").read_text()
    assert samples.count("[The ]") == 2  # the prompt once per sample (two evaluations)


def test_char_lm_quick_deep_data_parallel(tmp_path):
    """A 2-layer LSTM with dropout and a residual connection, through the data-parallel step;
    the samples come from the stacked model."""
    out = tmp_path / "deep"
    flags = ["--layers", "2", "--dropout", "0.1", "--residual", "--devices", "1"]
    summary = _quick(char_lm, out, *flags, "--steps", "4", "--eval-every", "4")
    options = {"layers": 2, "bidirectional": False, "dropout": 0.1, "residual": "except_first"}
    assert summary["model_options"] == {**options, "devices": 1}
    saved = json.loads((out / "config.json").read_text())["config"]
    assert {name: saved[name] for name in options} == options
    assert math.isfinite(summary["final_val_nats"]) and summary["steps"] == 4
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["signature"]["num_layers"] == 2 and meta["signature"]["residual"] == "except_first"
    (sample,) = (out / "samples.txt").read_text().split("===")[2:]
    assert sample.strip().startswith("[The ]") and len(sample.strip()) > len("[The ]")


def test_adding_problem_quick(tmp_path):
    summary = _quick(adding_problem, tmp_path / "adding", "--models", "tanh,irnn,lstm,gru")
    rows = summary["results"]
    assert [r["model"] for r in rows] == ["tanh", "irnn", "lstm", "gru"]
    assert all(math.isfinite(r["test_mse"]) for r in rows)
    assert summary["bptt_mode"] == "manual"
    for name in ("results.json", "results.md", "adding_problem.png"):
        assert (tmp_path / "adding" / name).stat().st_size > 0
    assert (tmp_path / "adding" / "irnn_T8" / "checkpoint.json").exists()


def test_copy_memory_quick(tmp_path):
    summary = _quick(copy_memory, tmp_path / "copy", "--models", "gru,lstm", "--bptt", "auto")
    rows = summary["results"]
    assert [r["model"] for r in rows] == ["gru", "lstm"]
    assert all(0.0 <= r["recall_accuracy"] <= 1.0 for r in rows)
    assert summary["bptt_mode"] == "auto"
    assert (tmp_path / "copy" / "copy_memory.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        (char_lm, ["--cell", "transformer"], "unknown cell 'transformer'"),
        (char_lm, ["--optimizer", "adamm"], "unknown optimizer 'adamm'"),
        (char_lm, ["--bptt", "magic"], "unknown --bptt mode 'magic'"),
        (char_lm, ["--k1", "8", "--k2", "4"], "k2"),
        (char_lm, ["--resume"], "--resume needs the --out"),
        (char_lm, ["--bidirectional"], "--bidirectional does not apply"),
        (char_lm, ["--dropout", "0.2"], "--dropout acts between stacked layers"),
        (char_lm, ["--layers", "2", "--k2", "128"], "k1 == k2"),
        (adding_problem, ["--layers", "0"], "--layers must be >= 1"),
        (adding_problem, ["--devices", "3"], r"batch \(50\) must be a multiple of --devices 3"),
        (copy_memory, ["--devices", "64"], "--devices 64 but JAX sees"),
        (copy_memory, ["--residual"], "--residual adds"),
        (copy_memory, ["--bidirectional", "--bptt", "checkpointed"], "no stacked/bidirectional"),
        (adding_problem, ["--models", "tanh,rnn"], "unknown model 'rnn'"),
        (adding_problem, ["--lengths", "50,x"], "--lengths must be comma-separated integers"),
        (copy_memory, ["--models", "lstm", "--optimizer", "adamax"], "unknown optimizer"),
    ],
)
def test_bad_flags_give_clear_errors(module, flags, message):
    with pytest.raises(SystemExit, match=message):
        module.parse_args(flags)


def test_deep_greedy_sampling_matches_rerunning_the_prefix():
    """sample_deep carries every layer's state; the reference reruns the whole prefix."""
    vocab = 5
    params = init_deep(jax.random.key(2), "gru", vocab, 8, vocab, num_layers=2, dtype=jnp.float64)
    prompt = [1, 4, 0]
    tokens = common.sample(
        params,
        jax.random.key(0),
        np.array(prompt),
        4,
        cell="gru",
        temperature=0.0,
        residual="except_first",
    )
    ids = list(prompt)
    for _ in range(4):
        xs = jax.nn.one_hot(jnp.array(ids), vocab, dtype=jnp.float64)
        outputs, _ = deep_unroll("gru", params, xs, residual="except_first")
        ids.append(int(jnp.argmax(readout(params["readout"], outputs[-1]))))
    assert np.asarray(tokens).tolist() == ids[len(prompt) :]


def test_bench_smoke_run_writes_records(tmp_path):
    """A one-point benchmark run: every mode measured, the documented JSON fields, the reports."""
    out = tmp_path / "bench.json"
    flags = ["--sizes", "2,4,3,2", "--cells", "gru", "--no-long", "--no-peers", "--repeats", "1"]
    records = bench.main(
        [*flags, "--unrolls", "1", "2", "--json", str(out), "--txt", str(out) + ".txt"]
    )
    modes = {r["mode"] for r in records}
    assert {
        "auto",
        "auto_hoisted",
        "manual",
        "fast",
        "fast_u2",
        "checkpointed",
        "gemm_floor",
    } <= modes
    for r in json.loads(out.read_text()):
        assert {
            "impl",
            "cell",
            "mode",
            "B",
            "H",
            "T",
            "D",
            "ms",
            "temp_bytes",
            "device",
            "versions",
        } <= set(r)
        assert r["ms"] > 0
    text = Path(str(out) + ".txt").read_text()
    assert "targets, wall time" in text and "gemm_floor" in text


def test_gemm_floor_has_the_gradients_shapes():
    params, h0, xs, ys = bench.jax_inputs("lstm", 3, 4, 5, 2)
    d_params, d_h0, d_xs = bench.gemm_floor(params, h0, xs, ys)
    assert d_params["W_hh"].shape == params["cell"]["W_hh"].shape
    assert d_params["W_xh"].shape == params["cell"]["W_xh"].shape
    assert d_params["W_hy"].shape == params["readout"]["W_hy"].shape
    assert d_h0.shape == h0[0].shape and d_xs.shape == xs.shape
