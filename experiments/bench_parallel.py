"""Parallel-in-time (quasi-DEER, DEER) against the sequential scan: iterations, time, memory.

Every measurement computes ``sum_t,b,h hs`` of a one-layer RNN and its gradients w.r.t. the
cell's params, the inputs and h0 (``jax.value_and_grad``), in float32, B = 16, D = 16:

  sequential  jax.grad through a plain ``lax.scan`` of ``cells.step`` (``x_t @ W_xh`` inside
              the step): the textbook baseline
  quasi       jax.grad through ``deer_unroll(method="quasi")``: diagonal-Jacobian Newton
              forward, exact adjoint (full Jacobians, reverse associative scan) backward
  full        the same with ``method="full"`` (dense-Jacobian Newton forward)

A second pass ("fwd") times the forward alone (``sum hs``, no gradient) for ``sequential`` and
``quasi`` at the points where the forward+backward cannot run: the exact adjoint stores T*B*S^2
Jacobians whatever the forward method (S = H for Elman and GRU).

Weights ("weights" column), per cell:
  untrained     ``cell.init``: PyTorch's default U(-1/sqrt(H), 1/sqrt(H))
  trained_like  a contracting long-memory proxy, *not* trained weights: ``W_hh`` = 0.9 x an
                orthogonal block per gate; for the GRU also the update-gate bias at +2
                (z ~ 0.88, so h leaks slowly); inputs as untrained

Newton runs with the library's float32 defaults (tol 1e-5 on the relative fixed-point defect)
and ``max_iters = min(T, 256)`` (the default T would let a non-converging point run for T
iterations); a point that does not converge falls back to the sequential scan, and says so.
Beside the iteration count: the largest Lyapunov exponent of the trajectory
(``lyapunov_exponent``, nats/step): the closer to 0 from below, the more iterations.

Skipped (printed with the reason), to fit a ~15-minute run on a shared 2-core machine: fwd+bwd
where the adjoint's Jacobians, T*B*S^2*4 bytes, exceed ``--jacobian-mib`` (default 64: that
leaves H=16 up to T=4096 and H=64 at T=256; the time, not the memory, is the limit on such a
machine: the T*B*S^3 Jacobian products of the adjoint scan); full DEER's forward likewise; the
fwd pass where T*H^2 > 2^24. Points with neither pass are listed as not measured.

Timing: compile (``jax.jit(f).lower(...).compile()``, whose ``memory_analysis()`` gives the
temp bytes), one warm-up call, then ``--repeats`` (3) rounds in which every candidate of the point
runs once, in the same order; median wall ms (``block_until_ready``) and median process CPU ms.

Usage:
  python experiments/bench_parallel.py --quick --json /tmp/b.json --txt /tmp/b.txt
  python experiments/bench_parallel.py --json experiments/results/bench_parallel_cpu.json \\
      --txt experiments/results/bench_parallel_cpu.txt
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench import compile_measured, interleaved_medians, jax_timer
from common import POSITIVE, cpu_model, device_name, set_cpu_threads, versions, write_outputs

from jax_bptt import cells
from jax_bptt.deer import deer_unroll, lyapunov_exponent

try:
    THREADS = len(os.sched_getaffinity(0))
except AttributeError:  # not Linux
    THREADS = os.cpu_count() or 1
if __name__ == "__main__" and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
    set_cpu_threads(THREADS)  # as many XLA threads as the machine gives this process

FULL = dict(steps=(256, 1024, 4096, 16384), hidden=(16, 64, 256), batch=16, inputs=16, repeats=3)
# Quick: one tiny point per cell, each cell in one weight regime (compile time is the cost).
QUICK = dict(steps=(64,), hidden=(8,), batch=4, inputs=4, repeats=2)
QUICK_WEIGHTS = {"elman_tanh": ("untrained",), "gru": ("trained_like",)}
CELL_NAMES = ("elman_tanh", "gru")
WEIGHTS = ("untrained", "trained_like")
MAX_ITERS = 256
FWD_WORK_LIMIT = 2**24  # T * H^2


# --------------------------------------------------------------------------------------------
# Environment


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------------
# Problems and candidates


def make_problem(cell_name, weights, steps, hidden, batch, inputs, seed=0):
    cell = cells.get_cell(cell_name)
    k_p, k_q, k_x = jax.random.split(jax.random.key(seed), 3)
    params = cell.init(k_p, inputs, hidden, jnp.float32)
    if weights == "trained_like":
        params["W_hh"] = 0.9 * cells.orthogonal_blocks(k_q, hidden, cell.num_gates, jnp.float32)
        if cell_name == "gru":
            params["b_h"] = params["b_h"].at[hidden : 2 * hidden].set(2.0)
    xs = jax.random.normal(k_x, (steps, batch, inputs), jnp.float32)
    h0 = cell.zero_state((batch,), hidden, jnp.float32)
    return params, xs, h0


def sequential_hs(cell, params, xs, h0):
    def body(state, x):
        state = cells.step(cell, params, state, x)
        return state, cell.hidden(state)

    return jax.lax.scan(body, h0, xs)[1]


def candidate(cell, mode, with_grad, max_iters):
    """A function ``(params, xs, h0) -> outputs`` to compile; DEER ones also return DeerInfo."""

    def loss(params, xs, h0):
        if mode == "sequential":
            return jnp.sum(sequential_hs(cell, params, xs, h0)), None
        hs, _, info = deer_unroll(cell, params, xs, h0, method=mode, max_iters=max_iters)
        return jnp.sum(hs), info

    if with_grad:
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return loss


def info_fields(info) -> dict:
    fields = dict(iterations=int, converged=bool, fell_back=bool, residual=float)
    return {k: None if info is None else kind(getattr(info, k)) for k, kind in fields.items()}


def skip_reason(mode, with_grad, steps, hidden, batch, jacobian_mib) -> str | None:
    jac_mib = steps * batch * hidden**2 * 4 / 2**20
    if with_grad and mode != "sequential" and jac_mib > jacobian_mib:
        return f"exact adjoint's T*B*S^2 Jacobians = {jac_mib:.0f} MiB > {jacobian_mib} MiB"
    if mode == "full" and jac_mib > jacobian_mib:
        return f"full DEER's T*B*S^2 Jacobians = {jac_mib:.0f} MiB > {jacobian_mib} MiB"
    if not with_grad and steps * hidden**2 > FWD_WORK_LIMIT:
        return f"T*H^2 = {steps * hidden**2:.2e} > {FWD_WORK_LIMIT:.2e} (time budget)"
    return None


def measure_point(cell_name, weights, steps, hidden, cfg, with_grad, jacobian_mib, log):
    batch, inputs = cfg["batch"], cfg["inputs"]
    modes = ("sequential", "quasi", "full") if with_grad else ("sequential", "quasi")
    base = dict(cell=cell_name, weights=weights, T=steps, H=hidden, B=batch, D=inputs)
    base["pass"] = "fwd+bwd" if with_grad else "fwd"
    reasons = {m: skip_reason(m, with_grad, steps, hidden, batch, jacobian_mib) for m in modes}
    if all(reasons[m] for m in modes if m != "sequential"):
        return []  # nothing parallel to compare against: not even the baseline is timed
    cell = cells.get_cell(cell_name)
    args = make_problem(cell_name, weights, steps, hidden, batch, inputs)
    lyap = float(lyapunov_exponent(cell, *args))
    max_iters = min(steps, MAX_ITERS)
    runs, meta = {}, {}
    for mode in modes:
        if reasons[mode]:
            continue
        compiled, temp = compile_measured(candidate(cell, mode, with_grad, max_iters), *args)
        out = compiled(*args)
        info = out[0][1] if with_grad else out[1]
        meta[mode] = dict(temp_bytes=temp, **info_fields(info))
        runs[mode] = jax_timer(compiled, args)
    medians = interleaved_medians(runs, cfg["repeats"])
    records = []
    for mode in modes:
        record = dict(base, mode=mode, lyapunov=lyap, max_iters=max_iters, repeats=cfg["repeats"])
        if reasons[mode]:
            record.update(skipped=reasons[mode], ms=None, cpu_ms=None, temp_bytes=None)
            record.update(info_fields(None))
        else:
            record.update(ms=medians[mode][0], cpu_ms=medians[mode][1], **meta[mode])
        records.append(record)
    log(row_lines(records))
    return records


# --------------------------------------------------------------------------------------------
# Report


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


HEADER = (
    f"  {'cell':<10} {'weights':<12} {'pass':<7} {'T':>6} {'H':>4} {'lyap':>7} {'mode':<10}"
    f" {'iters':>5} {'conv':>5} {'ms':>10} {'cpu ms':>10} {'seq/this':>8} {'temp MiB':>9}"
)


def row_lines(records) -> str:
    seq = next((r for r in records if r["mode"] == "sequential"), None)
    lines = []
    for r in records:
        start = (
            f"  {r['cell']:<10} {r['weights']:<12} {r['pass']:<7} {r['T']:>6} {r['H']:>4}"
            f" {r['lyapunov']:>7.3f} {r['mode']:<10}"
        )
        if r.get("skipped"):
            lines.append(f"{start} skipped: {r['skipped']}")
            continue
        iters = "-" if r["iterations"] is None else str(r["iterations"])
        conv = "-" if r["converged"] is None else ("yes" if r["converged"] else "FELL")
        ratio = f"{seq['ms'] / r['ms']:.2f}" if seq and seq.get("ms") else "-"
        lines.append(
            f"{start} {iters:>5} {conv:>5} {r['ms']:>10.2f} {r['cpu_ms']:>10.2f} {ratio:>8}"
            f" {_mib(r['temp_bytes']):>9}"
        )
    return "\n".join(lines)


def summary(records) -> str:
    """Per pass and mode: geometric mean of sequential/this time, and the iteration range."""
    lines = ["", "summary (sequential ms / this ms: > 1 means faster than the sequential scan)"]
    groups = {}
    for r in records:
        if r.get("skipped") or r["mode"] == "sequential":
            continue
        seq = next(
            q
            for q in records
            if q["mode"] == "sequential"
            and (q["cell"], q["weights"], q["T"], q["H"], q["pass"])
            == (r["cell"], r["weights"], r["T"], r["H"], r["pass"])
        )
        groups.setdefault((r["pass"], r["mode"], r["weights"]), []).append((seq["ms"] / r["ms"], r))
    for (pass_, mode, weights), rows in sorted(groups.items()):
        ratios = [x for x, _ in rows]
        iters = [r["iterations"] for _, r in rows]
        fell = sum(bool(r["fell_back"]) for _, r in rows)
        lines.append(
            f"  {pass_:<7} {mode:<6} {weights:<12} points {len(rows):>2}: speed ratio geo-mean "
            f"{float(np.exp(np.mean(np.log(ratios)))):.3f} (min {min(ratios):.3f}, max "
            f"{max(ratios):.3f}); iterations {min(iters)}-{max(iters)}; fell back {fell}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid (smoke test, < 30 s)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--txt", help="write the table here")
    parser.add_argument(
        "--repeats", type=POSITIVE, help="timed rounds per point (default 3; quick 2)"
    )
    parser.add_argument("--jacobian-mib", type=float, default=64.0)
    parser.add_argument("--cells", nargs="+", default=list(CELL_NAMES), choices=CELL_NAMES)
    parser.add_argument("--steps", nargs="+", type=int, help="override the grid's T values")
    parser.add_argument("--hidden", nargs="+", type=int, help="override the grid's H values")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for name in ("steps", "hidden"):
        if getattr(args, name):
            cfg[name] = tuple(getattr(args, name))
    if args.repeats is not None:
        cfg["repeats"] = args.repeats

    out_lines = []

    def log(text):
        print(text, flush=True)
        out_lines.append(text)

    started = time.perf_counter()
    device = device_name(f"{THREADS} threads available to this process")
    header = [
        f"device: {device}",
        f"jax {jax.__version__}, jaxlib {versions(('jaxlib',))['jaxlib']}, "
        f"python {platform.python_version()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        f"load average at start (1, 5, 15 min): {load_average()}",
        f"float32, B={cfg['batch']}, D={cfg['inputs']}; loss sum(hs); grads w.r.t. params, xs,"
        f" h0; median of {cfg['repeats']} interleaved rounds after warm-up; max_iters = min(T, "
        f"{MAX_ITERS}); tol = float32 default (1e-5). seq/this = sequential ms / this ms.",
        "The machine may be shared with other jobs: absolute times are noisy, ratios less so.",
        HEADER,
    ]
    log("\n".join(header))
    records = []
    grid = itertools.product((True, False), args.cells, cfg["hidden"], cfg["steps"])
    for with_grad, cell_name, hidden, steps in grid:
        for weights in QUICK_WEIGHTS[cell_name] if args.quick else WEIGHTS:
            done = any(
                (r["cell"], r["weights"], r["T"], r["H"], r["mode"])
                == (cell_name, weights, steps, hidden, "quasi")
                and not r.get("skipped")
                for r in records
            )
            if not done:  # the fwd pass only where fwd+bwd could not run
                records += measure_point(
                    cell_name, weights, steps, hidden, cfg, with_grad, args.jacobian_mib, log
                )
    skipped_points = [
        f"{c} T={t} H={h}"
        for c in args.cells
        for h in cfg["hidden"]
        for t in cfg["steps"]
        if not any(r["cell"] == c and r["T"] == t and r["H"] == h for r in records)
    ]
    if skipped_points:
        why = "no parallel candidate fits in either pass"
        log(f"\nnot measured at all ({why}): {', '.join(skipped_points)}")
    log(summary(records))
    elapsed = time.perf_counter() - started
    log(f"\ntotal wall time {elapsed:.0f} s; load average at the end: {load_average()}")
    result = dict(
        quick=args.quick, device=device, cpu_model=cpu_model(), threads=THREADS,
        xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, config=cfg,
        max_iters_cap=MAX_ITERS, jacobian_mib=args.jacobian_mib, elapsed_s=elapsed,
        load_average_end=load_average(), records=records,
    )  # fmt: skip
    write_outputs(args, result, "\n".join(out_lines) + "\n")
    return result


if __name__ == "__main__":
    main()
