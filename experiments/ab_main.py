"""Same-run A/B of this tree's BPTT against the package at an earlier commit.

The earlier package (default ``7e765ca``, the last main before the one-API redesign) is exported
with ``git archive`` into a temporary folder and imported as ``jax_bptt_old`` beside
``jax_bptt``, so both run in one process, on one thread, interleaved round by round: the ratio
new/old is what to read, not the absolute times. Each point is forward + backward (loss and every
gradient) of a one-layer model with a per-step MSE readout, in float32, by ``bptt_auto``,
``bptt_manual`` and ``bptt_fast`` at scan unroll 1 in both trees; the earlier tree's params are
the same arrays in its ``{"cell", "readout"}`` layout.

Usage:
  python experiments/ab_main.py --txt experiments/results/ab_redesign_cpu.txt
"""

from __future__ import annotations

import functools
import importlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from bench import CELLS, QUICK_GRID, interleaved_medians, jax_timer
from common import (
    POSITIVE,
    REPO_ROOT,
    Parser,
    device_name,
    max_relative_error,
    set_cpu_threads,
    versions,
    write_outputs,
)

import jax_bptt as jb

MODES = ("auto", "manual", "fast")


def import_old(ref: str, folder: Path):
    """The package at ``ref`` as the module ``jax_bptt_old`` (imports rewritten to match)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", ref, "jax_bptt"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    package = folder / "jax_bptt_old"
    (folder / "jax_bptt").rename(package)
    for path in package.glob("*.py"):
        path.write_text(path.read_text().replace("jax_bptt", "jax_bptt_old"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("jax_bptt_old")


def candidates(old, cell, size) -> dict:
    """``{"old"|"new" mode: run}``: each run computes the loss and gradients, blocking."""
    batch, hidden, steps, features = size
    k_params, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    params = jb.init_model(k_params, cell, features, hidden, features)
    old_params = {"cell": params["layers"][0]["fwd"], "readout": params["readout"]}
    xs = jax.random.normal(k_x, (steps, batch, features), jnp.float32)
    ys = jax.random.normal(k_y, (steps, batch, features), jnp.float32)
    one = jb.ScanOptions(unroll=1)
    runs = {}
    for mode in MODES:
        old_fn = functools.partial(getattr(old, f"bptt_{mode}"), cell=cell, unroll=1)
        new_fn = functools.partial(getattr(jb, f"bptt_{mode}"), cell=cell, options=one)
        runs[f"old {mode}"] = jax_timer(old_fn, (old_params, xs, ys))
        runs[f"new {mode}"] = jax_timer(new_fn, (params, xs, ys))
        # both compute the same thing: the loss and every gradient agree to float32 rounding
        was, now = runs[f"old {mode}"](), runs[f"new {mode}"]()
        was = (was.loss, was.params["cell"], was.params["readout"], was.h0, was.xs)
        now = (now.loss, now.params["layers"][0]["fwd"], now.params["readout"], now.h0, now.xs)
        error = max_relative_error(now, was)
        if error > 1e-4:
            raise AssertionError(f"{cell} {mode}: the two trees disagree (relative error {error})")
    return runs


def main(argv=None) -> list[str]:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="7e765ca", help="the earlier commit")
    parser.add_argument("--repeats", type=POSITIVE, default=11, help="timed rounds per point")
    parser.add_argument("--quick", action="store_true", help="one small point, 2 rounds")
    parser.add_argument("--txt", default=None, help="write the report here")
    parser.add_argument("--json", default=None, help="write one record per point here")
    args = parser.parse_args(argv)
    grid, repeats = ([(2, 8, 16, 4)], 2) if args.quick else (QUICK_GRID, args.repeats)
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    lines = [
        f"# Same-run A/B: this tree against {args.ref}, bptt_{{auto,manual,fast}} forward and",
        f"# backward, float32, unroll 1, median of {repeats} interleaved rounds.",
        f"device: {device_name('1 thread')}; {vers}",
    ]
    print("\n".join(lines), flush=True)
    ratios, records = [], []
    with tempfile.TemporaryDirectory() as folder:
        old = import_old(args.ref, Path(folder))
        for size in grid:
            for cell in CELLS:
                medians = interleaved_medians(candidates(old, cell, size), repeats)
                for mode in MODES:
                    (old_ms, _), (new_ms, _) = medians[f"old {mode}"], medians[f"new {mode}"]
                    ratios.append(new_ms / old_ms)
                    records.append(
                        dict(size=size, cell=cell, mode=mode, old_ms=old_ms, new_ms=new_ms)
                    )
                    lines.append(
                        f"{size} {cell:<10} {mode:<6} old {old_ms:8.2f} ms  new {new_ms:8.2f} ms"
                        f"  new/old {ratios[-1]:.3f}"
                    )
                    print(lines[-1], flush=True)
    lines.append(
        f"new/old over {len(ratios)} points: median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    )
    print(lines[-1])
    write_outputs(
        args, {"ref": args.ref, "versions": versions(), "points": records}, "\n".join(lines) + "\n"
    )
    return lines


if __name__ == "__main__":
    set_cpu_threads(1)  # before JAX starts its backend: one thread is the steadier comparison
    main()
