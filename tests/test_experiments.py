"""The experiment scripts' --quick smoke runs, their outputs, and their errors for bad flags."""

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import adding_problem  # noqa: E402
import bench  # noqa: E402
import char_lm  # noqa: E402
import copy_memory  # noqa: E402


def _quick(module, out: Path, *extra: str) -> dict:
    return module.main(["--quick", "--no-progress", "--out", str(out), *extra])


def _sample_steps(out: Path) -> list[int]:
    text = (out / "samples.txt").read_text()
    return [int(step) for step in re.findall(r"^=== step (\d+): ", text, re.MULTILINE)]


def _eval_steps(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return [r["step"] for r in records if r["kind"] == "eval"]


# --------------------------------------------------------------------------------------------
# char_lm


def test_char_lm_quick(tmp_path, capsys):
    out = tmp_path / "char_lm"
    summary = _quick(char_lm, out)
    for name in ("config.json", "metrics.jsonl", "samples.txt", "summary.json", "loss_curve.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["bptt_mode"] == "fast"
    assert saved["truncation"]["k1"] == saved["truncation"]["k2"] == char_lm.QUICK["k1"]
    assert saved["steps"] == char_lm.QUICK["steps"] and not saved["stopped_early"]
    assert math.isfinite(summary["final_val_nats"])
    assert summary["final_val_bits"] == pytest.approx(summary["final_val_nats"] / math.log(2))
    assert 2.0 < summary["baselines_nats"]["bigram"] < summary["baselines_nats"]["unigram"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    *_, last, again = capsys.readouterr().out.strip().splitlines()
    assert last.startswith("done: 30 of 30 steps; final validation") and "time limit" not in last
    assert " steps/s; outputs in " in last
    assert again == f"sample again: python experiments/char_lm.py --sample --out {out}"

    with pytest.raises(SystemExit, match="not empty"):  # never overwrite a finished run
        _quick(char_lm, out)
    capsys.readouterr()
    line = _error_line(capsys, lambda: _quick(char_lm, out, "--resume", "--bptt", "manual"))
    assert "bptt: 'fast' -> 'manual'" in line
    line = _error_line(capsys, lambda: _quick(char_lm, out, "--resume", "--layers", "2"))
    assert "layers: 1 -> 2" in line  # a 1-layer run stays 1-layer
    samples = (out / "samples.txt").read_text()
    assert samples.count("[The ]") == 2  # the prompt once per sample (two evaluations)
    assert _sample_steps(out) == _eval_steps(out) == [15, 30]

    # --sample reads the run folder (config, vocabulary, params) and trains nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    sampled = char_lm.main(["--sample", "--out", str(out), "--temperature", "0"])
    assert sampled["step"] == 30 and sampled["sample"].startswith("[The ]")
    assert len(sampled["sample"]) == len("[The ]") + char_lm.QUICK["sample_length"]
    assert sampled["sample"] in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    greedy = char_lm.main(["--sample", "--out", str(out), "--temperature", "0", "--seed", "5"])
    assert greedy["sample"] == sampled["sample"]  # temperature 0 is argmax: no randomness


def test_char_lm_quick_deep_data_parallel(tmp_path):
    """A 2-layer LSTM with dropout and a residual connection, through the data-parallel step;
    the samples come from the stacked model."""
    out = tmp_path / "deep"
    flags = ["--layers", "2", "--dropout", "0.1", "--residual", "--devices", "1"]
    summary = _quick(char_lm, out, *flags, "--steps", "4", "--eval-every", "4")
    options = {"layers": 2, "bidirectional": False, "dropout": 0.1, "residual": "except_first"}
    assert summary["model_options"] == {**options, "devices": 1, "unroll": None, "dtype": "float32"}
    saved = json.loads((out / "config.json").read_text())["config"]
    assert {name: saved[name] for name in options} == options
    assert math.isfinite(summary["final_val_nats"]) and summary["steps"] == 4
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["signature"]["num_layers"] == 2 and meta["signature"]["residual"] == "except_first"
    (sample,) = (out / "samples.txt").read_text().split("===")[2:]
    assert sample.strip().startswith("[The ]") and len(sample.strip()) > len("[The ]")


class _Killed(Exception):
    pass


def test_char_lm_resume_keeps_one_sample_per_evaluation(tmp_path, monkeypatch, capsys):
    """A run killed after an evaluation that followed its last checkpoint, resumed and stopped
    by the time limit, then resumed to the end: samples.txt holds each evaluation once."""
    out = tmp_path / "resumed"
    flags = ["--eval-every", "5"]  # QUICK: checkpoint at step 20, 30 steps
    make_batch_fn = char_lm.make_batch_fn

    def killed_at_27(*args, **kwargs):
        batch_fn, carry = make_batch_fn(*args, **kwargs)

        def batch(key, step, carry):
            if step == 26:
                raise _Killed
            return batch_fn(key, step, carry)

        return batch, carry

    monkeypatch.setattr(char_lm, "make_batch_fn", killed_at_27)
    with pytest.raises(_Killed):
        _quick(char_lm, out, *flags)
    monkeypatch.undo()
    assert _sample_steps(out) == [5, 10, 15, 20, 25]  # 25 came after the checkpoint at 20

    capsys.readouterr()
    stopped = _quick(char_lm, out, *flags, "--resume", "--max-minutes", "1e-9")
    assert stopped["stopped_early"] and stopped["steps"] == 21
    last = capsys.readouterr().out.strip().splitlines()[-2]
    assert last.startswith("stopped by the time limit at step 21 of 30")
    assert "--resume --out" in last and "final validation" in last
    assert _sample_steps(out) == _eval_steps(out) == [5, 10, 15, 20, 21]

    done = _quick(char_lm, out, *flags, "--resume")
    assert not done["stopped_early"] and done["steps"] == 30
    assert _sample_steps(out) == _eval_steps(out) == [5, 10, 15, 20, 21, 25, 30]
    assert (out / "samples.txt").read_text().count("[The ]") == 7


def test_char_lm_checkpoint_minutes_reach_fit(tmp_path, monkeypatch):
    seen = {}

    def fake_fit(*args, **kwargs):
        seen.update(kwargs)
        raise _Killed

    monkeypatch.setattr(char_lm.jb, "fit", fake_fit)
    with pytest.raises(_Killed):
        _quick(char_lm, tmp_path / "a", "--checkpoint-minutes", "0.5", "--max-minutes", "2")
    assert seen["checkpoint_every_s"] == 30.0 and seen["time_limit_s"] == 120.0
    with pytest.raises(_Killed):
        _quick(char_lm, tmp_path / "b", "--checkpoint-minutes", "0", "--max-minutes", "0")
    assert seen["checkpoint_every_s"] is None and seen["time_limit_s"] is None
    assert char_lm.Config().checkpoint_minutes == 1.0


# --------------------------------------------------------------------------------------------
# The sweeps


def test_adding_problem_quick(tmp_path):
    summary = _quick(adding_problem, tmp_path / "adding", "--models", "tanh,irnn,lstm,gru")
    rows = summary["results"]
    assert [r["model"] for r in rows] == ["tanh", "irnn", "lstm", "gru"]
    assert all(math.isfinite(r["test_mse"]) for r in rows)
    assert summary["bptt_mode"] == "manual"
    for name in ("results.json", "results.md", "adding_problem.png"):
        assert (tmp_path / "adding" / name).stat().st_size > 0
    assert (tmp_path / "adding" / "irnn_T8" / "checkpoint.json").exists()
    saved = json.loads((tmp_path / "adding" / "results.json").read_text())
    assert saved["config"]["lengths"] == [8] and "sizes" not in saved["config"]
    assert saved["baseline_mse"] == pytest.approx(1 / 6, rel=1e-6)


def test_copy_memory_quick(tmp_path):
    flags = ["--models", "gru,lstm", "--bptt", "auto", "--unroll", "2", "--dtype", "bfloat16"]
    summary = _quick(copy_memory, tmp_path / "copy", *flags)
    rows = summary["results"]
    assert [r["model"] for r in rows] == ["gru", "lstm"]
    assert all(0.0 <= r["recall_accuracy"] <= 1.0 for r in rows)
    assert summary["bptt_mode"] == "auto"
    assert summary["model_options"]["unroll"] == 2
    assert summary["model_options"]["dtype"] == "bfloat16"
    assert summary["config"]["delays"] == (5,)
    assert (tmp_path / "copy" / "copy_memory.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# Bad flags: one line on stderr, exit code 2, before any work


def _error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error: " in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        (char_lm, ["--cell", "transformer"], "invalid choice: 'transformer'"),
        (char_lm, ["--optimizer", "adamm"], "invalid choice: 'adamm'"),
        (char_lm, ["--bptt", "magic"], "invalid choice: 'magic'"),
        (char_lm, ["--k1", "8", "--k2", "4"], "k2"),
        (char_lm, ["--resume"], "--resume needs the --out"),
        (char_lm, ["--bidirectional"], "--bidirectional does not apply"),
        (char_lm, ["--dropout", "0.2"], "--dropout acts between stacked layers"),
        (char_lm, ["--data", "windows", "--k2", "128"], "--data windows"),
        (char_lm, ["--sample"], "--sample needs --out"),
        (char_lm, ["--weight-decay", "0.1"], "--weight-decay needs --optimizer adamw"),
        (char_lm, ["--resume", "--out", "/nonexistent/run"], "--resume: no char_lm run in"),
        (char_lm, ["--sample", "--out", "/nonexistent/run"], "--sample: no checkpoint in"),
        (adding_problem, ["--layers", "0"], "--layers: must be an int >= 1"),
        (adding_problem, ["--devices", "3"], r"batch \(50\) must be a multiple of --devices 3"),
        (copy_memory, ["--devices", "64"], "--devices 64 but JAX sees"),
        (copy_memory, ["--residual"], "--residual adds"),
        (adding_problem, ["--models", "tanh,rnn"], "unknown model 'rnn'"),
        (adding_problem, ["--lengths", "50,x"], "--lengths: must be comma-separated integers"),
        (copy_memory, ["--models", "lstm", "--optimizer", "adamax"], "invalid choice: 'adamax'"),
    ],
)
def test_bad_flags_give_clear_errors(module, flags, message, capsys):
    assert re.search(message, _error_line(capsys, lambda: module.parse_args(flags)))


def test_combinations_the_library_now_supports():
    """Truncated BPTT of a stacked model with k1 != k2, and every mode bidirectional: errors of
    the old scripts, valid settings now."""
    config, _ = char_lm.parse_args(["--layers", "2", "--k2", "128"])
    assert (config.layers, config.k1, config.k2) == (2, char_lm.Config().k1, 128)
    assert config.output_dropout == char_lm.Config().output_dropout == 0.2  # the default's
    config, _ = copy_memory.parse_args(["--bidirectional", "--bptt", "checkpointed"])
    assert config.bidirectional and config.bptt == "checkpointed"


RANGE_ERRORS = {
    "char_lm": [
        ["--steps", "0"], ["--steps", "-1"], ["--steps", "abc"], ["--lr", "nan"], ["--lr", "-1"],
        ["--lr", "inf"], ["--hidden", "0"], ["--batch", "0"], ["--k1", "0"], ["--k2", "-3"],
        ["--temperature", "-0.5"], ["--max-minutes", "-1"], ["--checkpoint-minutes", "nan"],
        ["--clip-norm", "-1"], ["--clip-value", "-1"], ["--eval-every", "-1"], ["--seed", "-1"],
        ["--dropout", "1"], ["--dropout", "-0.1"], ["--output-dropout", "1"],
        ["--output-dropout", "-0.1"], ["--weight-dropout", "1"], ["--weight-dropout", "-0.1"],
        ["--weight-decay", "0"], ["--layers", "0"], ["--unroll", "0"], ["--devices", "0"],
        ["--batch", "100000"], ["--text", "{missing}"], ["--text", "{empty}"],
        ["--text", "{binary}"], ["--text", "{nul}"], ["--text", "{tmp}"], ["--text", "{short}"],
    ],
    "adding_problem": [
        ["--steps", "0"], ["--batch", "-1"], ["--hidden", "0"], ["--lr", "nan"],
        ["--lr-irnn", "0"], ["--lengths", "1"], ["--lengths", ""], ["--eval-every", "-1"],
        ["--clip-norm", "nan"], ["--seed", "-2"], ["--unroll", "-1"],
    ],
    "copy_memory": [["--delays", "0"], ["--steps", "-5"], ["--lr", "-1e-3"], ["--batch", "0"]],
    "scaling": [
        ["--fake-cpu-devices", "0"], ["--fake-cpu-devices", "x"], ["-T", "0"], ["-B", "-1"],
        ["--repeats", "0"], ["--steps", "0"], ["--per-device-batch", "-1"], ["--tp-hidden", "0"],
        ["--devices", "0,2"], ["--devices", "64"],
    ],
    "bench": [
        ["--repeats", "0"], ["--long-repeats", "-1"], ["--unrolls", "0"], ["--sizes", "1,2,3"],
        ["--sizes", "1,2,3,0"], ["--threads", "0"], ["--render", "{missing}"],
    ],
    "bench_pallas": [["--repeats", "0"], ["--repeats", "x"]],
}  # fmt: skip


@pytest.fixture
def bad_files(tmp_path):
    files = {"missing": tmp_path / "missing.txt", "tmp": tmp_path}
    for name, data in {
        "empty": b"",
        "binary": bytes(range(256)) * 4,
        "nul": b"abc\x00def" * 100,
        "short": b"ab",
    }.items():
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_bytes(data)
    return {name: str(path) for name, path in files.items()}


@pytest.mark.parametrize(
    ("script", "flags"),
    [(script, flags) for script, cases in RANGE_ERRORS.items() for flags in cases],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_numeric_flags_are_range_checked(script, flags, bad_files, capsys):
    module = importlib.import_module(script)
    argv = [flag.format(**bad_files) for flag in flags]
    line = _error_line(capsys, lambda: (getattr(module, "parse_args", None) or module.main)(argv))
    name = argv[0].lstrip("-")
    assert name in line or "text" in line, line


def test_gradient_flow_flag_errors(tmp_path, capsys):
    gradient_flow = importlib.import_module("gradient_flow")
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error_line(
        capsys, lambda: gradient_flow.main(["--out", str(tmp_path / "file")])
    )
    assert "unrecognized" in _error_line(capsys, lambda: gradient_flow.main(["--steps", "3"]))


@pytest.mark.parametrize(
    "argv",
    [
        ["char_lm.py", "--steps", "0"],
        ["scaling.py", "--fake-cpu-devices", "x"],
        ["bench.py", "--threads", "0"],
    ],
)
def test_command_line_errors_are_one_line(argv):
    """The real command line: exit code 2, one line on stderr, no traceback, nothing on stdout."""
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"{argv[0]}: error: argument {argv[1]}")
    assert done.stdout == ""


# --------------------------------------------------------------------------------------------
# Sampling and benchmarks


def test_deep_greedy_sampling_matches_rerunning_the_prefix():
    """jax_bptt.generate carries every layer's state; the reference reruns the whole prefix."""
    vocab = 5
    params = jb.init_model(
        jax.random.key(2), "gru", vocab, 8, vocab, num_layers=2, dtype=jnp.float64
    )
    prompt = [1, 4, 0]
    tokens = jb.generate(
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
        logits = jb.predict(params, xs, cell="gru", residual="except_first")
        ids.append(int(jnp.argmax(logits[-1])))
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
        "fast_one_chunk",
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
    by_mode = {r["mode"]: r for r in records}
    # the fast variants are ScanOptions: unroll 2, and the backward in one chunk of T = 3 steps
    assert by_mode["fast_u2"]["options"]["unroll"] == by_mode["fast_u2"]["unroll"] == 2
    assert by_mode["fast_one_chunk"]["options"]["chunk_length"] == 3
    assert by_mode["checkpointed"]["segment_length"] == 2  # ceil(sqrt(3))
    assert "options" not in by_mode["auto"] and "options" not in by_mode["gemm_floor"]
    text = Path(str(out) + ".txt").read_text()
    assert "targets, wall time" in text and "gemm_floor" in text


def test_bench_pairs_smoke_run(tmp_path):
    """--pairs: the three pairs per cell with a hand-written backward, each with both sides."""
    out = tmp_path / "pairs.json"
    flags = ["--pairs", "--sizes", "2,4,3,2", "--cells", "elman_tanh", "lstm", "--repeats", "1"]
    records = bench.main([*flags, "--json", str(out), "--txt", str(out) + ".txt"])
    assert [(r["pair"], r["cell"]) for r in records] == [
        (pair, "lstm") for pair in ("derived", "batch_major", "bf16")
    ]
    for r in json.loads(out.read_text()):
        assert r["baseline_ms"] > 0 and r["candidate_ms"] > 0 and "load average" in r["load"]
    assert "candidate / baseline" in Path(str(out) + ".txt").read_text()


def test_ab_main_quick_run(tmp_path):
    """The same-run A/B against the pre-redesign tree: both trees give the same loss and
    gradients (``ab_main`` raises otherwise) and every point has both times."""
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "7e765ca^{commit}"]).returncode:
        pytest.skip("this checkout has no history back to 7e765ca (a shallow clone)")
    import ab_main

    out = tmp_path / "ab.json"
    ab_main.main(["--quick", "--json", str(out)])
    points = json.loads(out.read_text())["points"]
    assert [(p["cell"], p["mode"]) for p in points] == [
        (cell, mode) for cell in bench.CELLS for mode in ab_main.MODES
    ]
    assert all(p["old_ms"] > 0 and p["new_ms"] > 0 for p in points)


def test_gemm_floor_has_the_gradients_shapes():
    params, h0, xs, ys = bench.jax_inputs("lstm", 3, 4, 5, 2)
    d_params, d_h0, d_xs = jax.jit(bench.gemm_floor)(params, h0, xs, ys)
    cell_params = params["layers"][0]["fwd"]
    assert d_params["W_hh"].shape == cell_params["W_hh"].shape
    assert d_params["W_xh"].shape == cell_params["W_xh"].shape
    assert d_params["W_hy"].shape == params["readout"]["W_hy"].shape
    assert d_h0.shape == h0[0].shape and d_xs.shape == xs.shape
