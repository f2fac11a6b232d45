"""The experiment scripts' --quick smoke runs, their outputs, and their errors for bad flags."""

import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import adding_problem  # noqa: E402
import char_lm  # noqa: E402
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
        (adding_problem, ["--models", "tanh,rnn"], "unknown model 'rnn'"),
        (adding_problem, ["--lengths", "50,x"], "--lengths must be comma-separated integers"),
        (copy_memory, ["--models", "lstm", "--optimizer", "adamax"], "unknown optimizer"),
    ],
)
def test_bad_flags_give_clear_errors(module, flags, message):
    with pytest.raises(SystemExit, match=message):
        module.parse_args(flags)
