"""The README's examples run as written, each block on its own (imports included)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 5, "the README lost its python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_on_its_own(index, capsys):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    if index == 0:  # the tour prints the per-leaf report of manual against jax.grad
        out = capsys.readouterr().out
        assert "W_hh" in out and "yes" in out
