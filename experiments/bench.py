"""Forward + backward time and compiled temporary memory of the BPTT modes, next to their peers.

Every measurement computes the same thing: the per-step MSE (mean over t, b, o) of a linear
readout ``y_t = h_t W_hy + b_y`` (O = D outputs) of a one-layer RNN, and its gradients w.r.t.
all params, the inputs and the initial state, in float32. Modes:

  auto          jax.grad through a plain lax.scan whose step also does x_t @ W_xh
                (``jax_bptt.cells.step``): the textbook baseline
  auto_hoisted  ``bptt(mode="auto")``: jax.grad through the scan with the input projection
                hoisted
  manual        ``bptt(mode="manual")``: the hand-written reverse scan called directly
  fast          ``bptt(mode="fast")`` (custom_vjp around the hand-written backward) with
                ``ScanOptions(unroll=1)``: the platform's default backward chunking
                (``jax_bptt.backends.default_chunk_length``)
  fast_one_chunk  the same with ``ScanOptions(unroll=1, chunk_bytes=0)``: the backward in one chunk
  fast_u{k}     the same with ``ScanOptions(unroll=k)``; "fast+unroll" is the best k of the point
  fast_default  the same with ``ScanOptions()``: the platform's default unroll too
  checkpointed  ``bptt(mode="checkpointed")``: segment-boundary states only, default segment
                ceil(sqrt T)
  gemm_floor    not BPTT: only the matrix products every exact BPTT of this model must run, in
                the same two sequential loops, with one tanh per step as the only gate math
                (``gemm_floor``), unroll 1. No implementation built from XLA's GEMMs can beat
                it at the same unroll: ``gemm_floor / auto`` bounds the speed-up over ``auto``

Each library candidate's record holds the ``ScanOptions`` it resolved to (``"options"``).

``--pairs``: instead of the grid, three pairs on the fast path, each baseline and candidate
interleaved: the hand-written LSTM/GRU backward against the one ``make_cell`` derives by
``jax.vjp`` (``derived``), time-major against batch-major inputs (``batch_major``), float32
against ``ScanOptions(compute_dtype="bfloat16")`` (``bf16``); the load average is recorded.

Peers, when installed: PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` + ``nn.Linear`` (cuDNN on a GPU;
``--device``) and Flax ``nn.RNN`` with ``SimpleCell``/``OptimizedLSTMCell``/``GRUCell`` + ``Dense``.

Timing: one warm-up call (compile) and two more, then ``--repeats`` rounds; every round times
each candidate once, in the same order, so baseline and candidates share the machine's noise.
The reported time is the median, with ``block_until_ready`` (``torch.cuda.synchronize``).
Temporary memory is XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled function
(arguments and outputs excluded); None where the backend does not report it (and for peers).

Usage:
  python experiments/bench.py --quick --json runs/bench_cpu.json --txt runs/bench_cpu.txt
  python experiments/bench.py --json runs/bench_gpu.json --txt runs/bench_gpu.txt   # GPU grid
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from common import (
    POSITIVE,
    Parser,
    device_name,
    int_list,
    set_cpu_threads,
    versions,
    write_outputs,
)

from jax_bptt import ScanOptions, bptt, get_cell, init_model
from jax_bptt.backends import PLATFORM_DEFAULTS, resolve_options
from jax_bptt.cells import make_cell, step
from jax_bptt.losses import Loss, sequence_loss
from jax_bptt.model import readout
from jax_bptt.scan import previous_states, sum_outer

FULL_GRID = [  # (B, H, T, D)
    (64, 512, 1024, 128),
    (1, 512, 1024, 128),
    (128, 1024, 512, 256),
    (16, 256, 4096, 64),
    (256, 128, 256, 32),
]
QUICK_GRID = [(16, 64, 128, 16), (64, 128, 256, 32), (4, 128, 512, 16)]
FULL_LONG = (16, 256, 16384, 64)
QUICK_LONG = (4, 32, 16384, 8)
CELLS = ("elman_tanh", "lstm", "gru")
UNROLLS = (1, 2, 4, 8, 16)
PACKAGES = ("jax", "jaxlib", "numpy", "torch", "flax")


def default_unroll() -> int:
    """The scan unroll ``ScanOptions(unroll=None)`` means on this platform."""
    return PLATFORM_DEFAULTS[jax.default_backend()].unroll


def compile_measured(fn, *args):
    """``(compiled, temp bytes)``: ``jax.jit(fn)`` compiled for ``args`` (call it with the same
    args), and the bytes of temporary buffers XLA allocates for it (not counting arguments and
    outputs), None when the backend does not report a memory analysis. One compilation serves
    both the timing and the memory figure.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        temp = None
    return compiled, None if temp is None else int(temp)


# --------------------------------------------------------------------------------------------
# JAX candidates: each a jitted (params, h0, xs, targets) -> gradients


def plain_scan_loss(cell, params, h0, xs, targets):
    """The textbook unroll: ``x_t @ W_xh`` inside the scan step, then readout and loss."""
    cell_params = params["layers"][0]["fwd"]

    def body(state, x):
        state = step(cell, cell_params, state, x)
        return state, cell.hidden(state)

    _, hs = jax.lax.scan(body, h0, xs)
    return sequence_loss(readout(params["readout"], hs), targets, Loss("mse"))


def gemm_floor(params, h0, xs, targets):
    """The GEMMs of exact BPTT and (almost) nothing else; returns arrays of the gradients' shapes.

    Input projection ``(T B D)(D G)``; T sequential ``(B H)(H G)`` forward products; the readout's
    three; T sequential ``(B G)(G H)`` backward products; ``dW_hh``, ``dW_xh``, ``d xs`` as single
    GEMMs (``sum_outer``, the library's fastest form). Stored per step: ``h (T B H)`` forward,
    ``d (T B G)`` backward, as the fast path must. Gate math is replaced by one tanh (forward)
    and one multiply (backward) per step, so the values stay bounded and nothing is folded away.
    """
    cell, ro = params["layers"][0]["fwd"], params["readout"]
    hidden, gates = cell["W_hh"].shape
    h0 = jax.tree_util.tree_leaves(h0)[0]
    xp = xs @ cell["W_xh"]

    def forward(h, xp_t):
        h = jnp.tanh((h @ cell["W_hh"] + xp_t)[:, :hidden])
        return h, h

    _, hs = jax.lax.scan(forward, h0, xp)
    d_ys = readout(ro, hs) - targets
    d_hs = d_ys @ ro["W_hy"].T

    def backward(d_h, inputs):
        d_hs_t, h_t = inputs
        d = jnp.tile((d_h + d_hs_t) * h_t, gates // hidden)
        return d @ cell["W_hh"].T, d

    d_h0, ds = jax.lax.scan(backward, jnp.zeros_like(h0), (d_hs, hs), reverse=True)
    h_prev = previous_states(h0, hs)
    d_params = {
        "W_hh": sum_outer(h_prev, ds),
        "W_xh": sum_outer(xs, ds),
        "W_hy": sum_outer(hs, d_ys),
    }
    return d_params, d_h0, ds @ cell["W_xh"].T


def jax_candidates(cell_name: str, modes, unrolls) -> dict:
    """Name -> ``(jitted (params, h0, xs, targets) -> gradients, ScanOptions or None)``. The
    library's candidates differ only in the ``jax_bptt.bptt`` mode and the scan options; the
    mode "fast" stands for one candidate per unroll k (``fast_u{k}``; ``fast`` for k = 1)."""
    plain = functools.partial(plain_scan_loss, get_cell(cell_name))
    own = {"auto": jax.value_and_grad(plain, argnums=(0, 1, 2)), "gemm_floor": gemm_floor}
    fast = {"fast" if k == 1 else f"fast_u{k}": ("fast", ScanOptions(unroll=k)) for k in unrolls}
    library = {
        "auto_hoisted": ("auto", ScanOptions()),
        "manual": ("manual", ScanOptions()),
        **fast,
        "fast_one_chunk": ("fast", ScanOptions(unroll=1, chunk_bytes=0)),  # backward in one chunk
        "fast_default": ("fast", ScanOptions()),  # the platform's defaults
        "checkpointed": ("checkpointed", ScanOptions()),
    }
    out = {}
    for mode in modes:
        if mode in own:
            out[mode] = (jax.jit(own[mode]), None)
            continue
        for name in fast if mode == "fast" else [mode]:
            if name not in library:
                raise ValueError(f"unknown mode {mode!r}")
            bptt_mode, options = library[name]
            fn = functools.partial(_library_grads, cell=cell_name, mode=bptt_mode, options=options)
            out[name] = (jax.jit(fn), options)
    return out


def _library_grads(params, h0, xs, targets, *, cell, mode, options, time_major=True):
    return bptt(
        params, xs, targets, cell=cell, mode=mode, h0=[{"fwd": h0}], options=options,
        time_major=time_major,
    )  # fmt: skip


def jax_inputs(cell_name, batch, hidden, steps, features):
    """``(params, h0, xs, targets)``, float32; ``h0`` is the one layer's state."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = init_model(keys[0], cell_name, features, hidden, features)
    h0 = get_cell(cell_name).zero_state((batch,), hidden, jnp.float32)
    xs = jax.random.normal(keys[1], (steps, batch, features), jnp.float32)
    ys = jax.random.normal(keys[2], (steps, batch, features), jnp.float32)
    return params, h0, xs, ys


def jax_timer(fn, args):
    """A ``run()`` for ``interleaved_medians``: ``fn(*args)``, waiting for its results."""
    return lambda: jax.block_until_ready(fn(*args))


# --------------------------------------------------------------------------------------------
# Peers (optional, imported lazily)


def torch_peer(cell_name, batch, hidden, steps, features, device, *, backward: bool = True):
    """``(name, run, temp bytes)`` of PyTorch's RNN (cuDNN on a GPU): forward, readout, MSE and
    the gradients, or (``backward=False``) the RNN's forward alone under ``no_grad``, the input
    projection included; None without torch or without the asked-for device."""
    try:
        import torch
    except ImportError:
        return None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return None
    torch.manual_seed(0)
    rnn_cls = {"elman_tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell_name]
    rnn = rnn_cls(features, hidden).to(device)  # time-major (batch_first=False), like jax_bptt
    head = torch.nn.Linear(hidden, features).to(device)
    xs = torch.randn(steps, batch, features, device=device, requires_grad=True)
    ys = torch.randn(steps, batch, features, device=device)
    h0 = torch.zeros(1, batch, hidden, device=device, requires_grad=True)
    c0 = torch.zeros(1, batch, hidden, device=device, requires_grad=True)
    state = (h0, c0) if cell_name == "lstm" else h0
    wrt = [*rnn.parameters(), *head.parameters(), xs, h0] + ([c0] if cell_name == "lstm" else [])

    def run():
        if backward:
            hs, _ = rnn(xs, state)
            torch.autograd.grad(torch.mean((head(hs) - ys) ** 2), wrt)
        else:
            with torch.no_grad():
                rnn(xs, state)
        if device == "cuda":
            torch.cuda.synchronize()

    temp = None
    if device == "cuda":  # peak allocation of one step beyond what is already held
        run()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        run()
        temp = torch.cuda.max_memory_allocated() - held
    cudnn = ", cuDNN" if device == "cuda" else ""
    return f"torch nn.{rnn_cls.__name__} ({device}{cudnn})", run, temp


def flax_peer(cell_name, batch, hidden, steps, features):
    try:
        from flax import linen as nn
    except ImportError:
        return None
    cell_cls = {"elman_tanh": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}
    cell_cls = cell_cls[cell_name]

    class Model(nn.Module):
        @nn.compact
        def __call__(self, xs, carry):
            hs = nn.RNN(cell_cls(features=hidden), time_major=True)(xs, initial_carry=carry)
            return nn.Dense(features)(hs)

    model = Model()
    keys = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(keys[0], (steps, batch, features), jnp.float32)
    ys = jax.random.normal(keys[1], (steps, batch, features), jnp.float32)
    carry = cell_cls(features=hidden).initialize_carry(keys[2], (batch, features))
    params = model.init(keys[2], xs, carry)

    def loss(params, xs, carry, ys):
        return jnp.mean((model.apply(params, xs, carry) - ys) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    args = (params, xs, carry, ys)
    compiled, temp = compile_measured(fn, *args)
    return f"flax nn.RNN({cell_cls.__name__})", jax_timer(compiled, args), temp


# --------------------------------------------------------------------------------------------
# Measurement


def interleaved_medians(runs: dict, repeats: int) -> dict:
    """``{name: (wall ms, process-CPU ms)}`` medians; each round times every candidate once, in
    the same order. CPU time counts only this process's work, so with ``--threads 1`` it is the
    steadier number on a machine shared with other jobs."""
    for run in runs.values():  # compile / warm caches
        for _ in range(3):
            run()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start) * 1e3)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in runs}


def measure_point(cell_name, size, modes, unrolls, repeats, peers, torch_device):
    """Records for one (cell, B, H, T, D): every JAX mode, then the peers."""
    batch, hidden, steps, features = size
    args = jax_inputs(cell_name, *size)
    candidates = jax_candidates(cell_name, modes, unrolls)
    runs, meta = {}, {}
    for mode, (fn, options) in candidates.items():
        compiled, temp = compile_measured(fn, *args)
        runs[mode] = jax_timer(compiled, args)
        meta[mode] = ("jax_bptt", temp, options)
    peer_fns = {"torch": functools.partial(torch_peer, device=torch_device), "flax": flax_peer}
    for impl, peer in peer_fns.items() if peers else ():
        found = peer(cell_name, *size)  # (name, run, temp bytes) or None
        if found is not None:
            runs[found[0]] = found[1]
            meta[found[0]] = (impl, found[2], None)
    medians = interleaved_medians(runs, repeats)
    records = []
    for mode, (ms, cpu_ms) in medians.items():
        impl, temp, options = meta[mode]
        record = dict(impl=impl, cell=cell_name, mode=mode, B=batch, H=hidden, T=steps)
        record.update(D=features, ms=ms, cpu_ms=cpu_ms, temp_bytes=temp, repeats=repeats)
        if options is not None:  # what the options resolved to on this problem
            resolved = resolve_options(
                options, get_cell(cell_name), (steps, batch, features), hidden, jnp.float32
            )
            record["options"] = resolved._asdict()
            if mode.startswith("fast"):
                record["unroll"] = resolved.unroll
            if mode == "checkpointed":
                record.update(unroll=resolved.unroll, segment_length=resolved.segment_length)
        records.append(record)
    return with_best_unroll(records)


def _point(r) -> tuple:
    """A record's grid point ``(cell, B, H, T, D)``."""
    return r["cell"], r["B"], r["H"], r["T"], r["D"]


def with_best_unroll(records):
    """Add a "fast+unroll" record per point: the fast_u{k} with the least CPU time (see
    ``unroll_summary`` for why CPU time), replacing any earlier one."""
    records = [r for r in records if r["mode"] != "fast+unroll"]
    points = {}
    for r in records:
        if r["impl"] == "jax_bptt" and (r["mode"] == "fast" or r["mode"].startswith("fast_u")):
            points.setdefault(_point(r), []).append(r)
    out = []
    for r in records:
        out.append(r)
        fast = points.get(_point(r), [])
        if len(fast) > 1 and r is fast[-1]:
            best = min(fast, key=lambda q: q["cpu_ms"])
            out.append({**best, "mode": "fast+unroll", "derived_from": best["mode"]})
    return out


def derived(cell_name: str):
    """The cell rebuilt from its forward alone: ``make_cell`` derives its backward by jax.vjp."""
    cell = get_cell(cell_name)
    return make_cell(
        f"{cell_name}_derived", num_gates=cell.num_gates, init=cell.init,
        forward=lambda params, xp, hp, state: cell.forward(params, xp, hp, state)[0],
        zero_state=cell.zero_state, hidden=cell.hidden, with_hidden=cell.with_hidden,
        pointwise_params=("b_hn",) if cell_name == "gru" else (),  # read inside the reset gate
    )  # fmt: skip


PAIRS = {  # name: (baseline, candidate) as (cell variant, ScanOptions, time-major), fast mode
    "derived": (("hand", ScanOptions(), True), ("derived", ScanOptions(), True)),
    "batch_major": (("hand", ScanOptions(), True), ("hand", ScanOptions(), False)),
    "bf16": (("hand", ScanOptions(), True), ("hand", ScanOptions(compute_dtype="bfloat16"), True)),
}


def measure_pairs(cell_name, size, repeats) -> list:
    """One record per pair at one (cell, B, H, T, D): both sides' medians, interleaved."""
    args = jax_inputs(cell_name, *size)
    batch_major = (*args[:2], args[2].swapaxes(0, 1), args[3].swapaxes(0, 1))
    records = []
    for pair, sides in PAIRS.items():
        runs = {}
        for side, (variant, options, major) in zip(("baseline", "candidate"), sides, strict=True):
            cell = derived(cell_name) if variant == "derived" else cell_name
            fn = functools.partial(
                _library_grads, cell=cell, mode="fast", options=options, time_major=major
            )
            inputs = args if major else batch_major
            runs[side] = jax_timer(jax.jit(fn).lower(*inputs).compile(), inputs)
        (b_ms, b_cpu), (c_ms, c_cpu) = interleaved_medians(runs, repeats).values()
        records.append(dict(
            impl="pair", pair=pair, cell=cell_name, size=list(size), repeats=repeats,
            baseline_ms=b_ms, candidate_ms=c_ms, baseline_cpu_ms=b_cpu, candidate_cpu_ms=c_cpu,
        ))  # fmt: skip
    return records


def pairs_report(records, header: str) -> str:
    lines = [header, "", "candidate / baseline (fast mode; median of interleaved rounds)"]
    lines.append(f"  {'pair':<12} {'cell':<6} {'B,H,T,D':<16} {'wall':>6} {'cpu':>6}")
    for r in records:
        size = ",".join(map(str, r["size"]))
        wall = _ratio(r["candidate_ms"], r["baseline_ms"])
        cpu = _ratio(r["candidate_cpu_ms"], r["baseline_cpu_ms"])
        lines.append(f"  {r['pair']:<12} {r['cell']:<6} {size:<16} {wall:>6} {cpu:>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Report


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.2f}"


def _ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _vs(r, ref, key="ms") -> str:
    """``r[key] / ref[key]`` as ``_ratio`` writes it ("-" without ``ref``)."""
    return _ratio(r[key], None if ref is None else ref[key])


def _groups(records) -> dict:
    """Records by grid point ``(cell, B, H, T, D)``, in order of first appearance."""
    groups = {}
    for r in records:
        groups.setdefault(_point(r), []).append(r)
    return groups


def _by_name(rows) -> dict:
    """A point's records by mode; the peers' as "torch" and "flax"."""
    return {r["impl"] if r["impl"] in ("torch", "flax") else r["mode"]: r for r in rows}


def table(records, header: str) -> str:
    lines = [header]
    for (cell, b, h, t, d), rows in _groups(records).items():
        by = _by_name(rows)
        auto = by.get("auto")
        lines.append("")
        lines.append(f"B={b} H={h} T={t} D={d}  cell={cell}")
        lines.append(
            f"  {'mode':<34} {'ms':>9} {'vs auto':>8} {'vs torch':>9} {'vs flax':>8}"
            f" {'cpu ms':>9} {'cpu/auto':>8} {'temp MiB':>9} {'temp/auto':>9}"
        )
        for r in rows:
            name = r["mode"] + (f" (k={r['unroll']})" if r["mode"] == "fast+unroll" else "")
            lines.append(
                f"  {name:<34} {r['ms']:9.2f} {_vs(r, auto):>8} {_vs(r, by.get('torch')):>9}"
                f" {_vs(r, by.get('flax')):>8} {r['cpu_ms']:9.2f} {_vs(r, auto, 'cpu_ms'):>8}"
                f" {_mib(r['temp_bytes']):>9} {_vs(r, auto, 'temp_bytes'):>9}"
            )
    return "\n".join(lines)


def unroll_summary(records) -> str:
    """Per point: fast's time for each unroll k, and each k's geometric-mean time vs k = 1.

    The best k is picked on process-CPU time: with one thread per process it counts only this
    process's work, so it is steadier than wall time on a shared machine.
    """
    fast_modes = ("fast",) + tuple(f"fast_u{k}" for k in UNROLLS)
    rows = {}
    for r in records:
        if r["impl"] == "jax_bptt" and r["mode"] in fast_modes:
            rows.setdefault(_point(r), {})[r["unroll"]] = (r["ms"], r["cpu_ms"])
    if not rows:
        return ""
    ks = sorted({k for v in rows.values() for k in v})
    lines = ["", "fast path: wall ms / cpu ms per scan unroll k (forward and backward scans)"]
    lines.append(f"  {'cell':<11} {'B,H,T,D':<16}" + "".join(f"{'k=' + str(k):>16}" for k in ks))
    for (cell, *size), by_k in rows.items():
        cells = "".join(
            f"{by_k[k][0]:8.2f}/{by_k[k][1]:<7.2f}" if k in by_k else f"{'-':>16}" for k in ks
        )
        lines.append(f"  {cell:<11} {','.join(map(str, size)):<16}{cells}")
    ratios = {
        (k, i): [by_k[k][i] / by_k[1][i] for by_k in rows.values() if k in by_k and 1 in by_k]
        for k in ks
        for i in (0, 1)
    }
    geo = {key: statistics.geometric_mean(v) for key, v in ratios.items() if v}
    for i, name in ((0, "wall"), (1, "cpu")):
        lines.append(
            f"  geometric mean {name} time vs k=1: "
            + ", ".join(f"k={k}: {geo[k, i]:.3f}" for k in ks if (k, i) in geo)
        )
    best = min((k for k in ks if (k, 1) in geo), key=lambda k: geo[k, 1])
    lines.append(f"  best k on this device (cpu time): {best}")
    return "\n".join(lines)


def targets_summary(records) -> str:
    """Per grid point, the fast path against the targets: <= 0.5 x auto, faster than Flax (and
    than cuDNN for H >= 512 on a GPU). Beside it ``gemm_floor / auto``: at the same unroll (1),
    the best ratio any implementation made of XLA's GEMMs could reach on this device."""
    lines = [
        "",
        "targets, wall time (fast: best unroll k of the point; k=1 and the floor: unroll 1)",
        f"  {'cell':<11} {'B,H,T,D':<16} {'fast/auto':>9} {'<=0.5':>6} {'k=1/auto':>9}"
        f" {'floor/auto':>10} {'fast/flax':>9} {'<1':>4} {'fast/torch':>10}",
    ]
    for (cell, *size), rows in _groups(records).items():
        by = _by_name(rows)
        fast, auto = by.get("fast+unroll") or by.get("fast"), by.get("auto")
        if fast is None or auto is None:
            continue
        ms = {name: r["ms"] for name, r in by.items()}
        to_flax = fast["ms"] / ms["flax"] if ms.get("flax") else None
        lines.append(
            f"  {cell:<11} {','.join(map(str, size)):<16} {_ratio(fast['ms'], auto['ms']):>9}"
            f" {'yes' if fast['ms'] <= 0.5 * auto['ms'] else 'no':>6}"
            f" {_ratio(ms.get('fast'), auto['ms']):>9}"
            f" {_ratio(ms.get('gemm_floor'), auto['ms']):>10}"
            f" {_ratio(fast['ms'], ms.get('flax')):>9}"
            f" {'-' if to_flax is None else ('yes' if to_flax < 1 else 'no'):>4}"
            f" {_ratio(fast['ms'], ms.get('torch')):>10}"
        )
    return "\n".join(lines) if len(lines) > 3 else ""


def long_summary(records) -> str:
    """The checkpointing targets: temp memory vs auto, time vs the fast path, per cell."""
    lines, groups = [], _groups(records)
    for r in records:
        if r["mode"] != "checkpointed" or r["T"] < 16384:
            continue
        same = _by_name(groups[_point(r)])
        auto, fast = same.get("auto"), same.get("fast_default")
        if auto is None or fast is None:
            continue
        lines.append(
            f"  {r['cell']:<11} T={r['T']}: temp {_mib(r['temp_bytes'])} MiB = "
            f"1/{auto['temp_bytes'] / r['temp_bytes']:.0f} of auto's "
            f"({_mib(auto['temp_bytes'])} MiB), 1/{fast['temp_bytes'] / r['temp_bytes']:.0f} of"
            f" fast's; time {r['ms']:.1f} ms = "
            f"{_ratio(r['ms'], fast['ms'])} x fast (wall), "
            f"{_ratio(r['cpu_ms'], fast['cpu_ms'])} x fast (cpu)"
        )
    if not lines:
        return ""
    return "\n".join(
        ["", "checkpointed at long T (targets: temp <= 1/8 auto, time <= 1.5 x fast)"] + lines
    )


def make_header(device: str, vers: dict, threads: str, repeats, long_repeats) -> str:
    return "\n".join(
        [
            f"device: {device}; {threads}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
            "float32, per-step MSE on a linear readout (O = D), grads w.r.t. params, xs, h0; "
            f"median of {repeats} interleaved rounds ({long_repeats} for T=16384) "
            "after warm-up. ms = wall time, cpu ms = this process's CPU time.",
            "Baseline and candidates run interleaved in the same process; the machine may be "
            "shared with other jobs, so absolute times are noisy, ratios less so.",
            f"default unroll on this platform: {default_unroll()}; checkpointed segment "
            "length ceil(sqrt(T)).",
        ]
    )


def full_report(records, args) -> str:
    first = records[0]
    threads = first.get("threads", f"XLA threads {args.threads or 'default'}")
    repeats = {r["T"] >= 16384: r["repeats"] for r in records}
    header = make_header(
        first["device"], first["versions"], threads, repeats.get(False), repeats.get(True)
    )
    text = "\n".join(
        [
            table(records, header),
            unroll_summary(records),
            targets_summary(records),
            long_summary(records),
            "",
        ]
    )
    return "\n".join(line.rstrip() for line in text.split("\n"))


def parse_args(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU grid")
    parser.add_argument("--repeats", type=POSITIVE, default=20, help="timed rounds")
    parser.add_argument(
        "--long-repeats", type=POSITIVE, default=None, help="rounds for the long row"
    )
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--unrolls", nargs="+", type=POSITIVE, default=list(UNROLLS))
    parser.add_argument(
        "--sizes", nargs="+", type=int_list(1, length=4), default=None,
        help="override the grid: B,H,T,D points, e.g. 8,32,64,4",
    )  # fmt: skip
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch and Flax")
    parser.add_argument("--no-long", action="store_true", help="skip the T=16384 row")
    parser.add_argument("--no-grid", action="store_true", help="only the T=16384 row")
    parser.add_argument("--pairs", action="store_true", help="only the pairs (module docstring)")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch device"
    )
    parser.add_argument(
        "--threads", type=POSITIVE, default=None,
        help="CPU threads for XLA (set before JAX starts: from the command line only) and torch",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write one record per measurement here")
    parser.add_argument("--txt", default=None, help="write the printed report here")
    parser.add_argument(
        "--render", default=None, help="only print (and --txt) the report of a saved --json"
    )
    args = parser.parse_args(argv)
    if args.long_repeats is None:
        args.long_repeats = 7 if args.quick else 20
    if args.render:
        try:
            with open(args.render, encoding="utf-8") as f:
                args.records = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"--render: cannot read {args.render}: {err}")
    return args


def finish(args, records, report: str):
    """Print the report, write ``--txt`` and ``--json``; the records are main's result."""
    print(report)
    write_outputs(args, records, report)
    return records


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        records = with_best_unroll(args.records)
        return finish(args, records, full_report(records, args))

    if args.threads is not None:
        set_cpu_threads(args.threads)
    device, vers = device_name(), versions(PACKAGES)
    threads = f"XLA threads {args.threads or 'default'}"
    try:
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        threads += f", torch threads {torch.get_num_threads()}"
    except ImportError:
        pass
    header = make_header(device, vers, threads, args.repeats, args.long_repeats)
    print(header, flush=True)
    grid = args.sizes or (QUICK_GRID if args.quick else FULL_GRID)
    if args.pairs:  # the cells with a hand-written backward to derive
        load = "load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
        cells = [c for c in args.cells if c != "elman_tanh"]
        records = [r for size in grid for c in cells for r in measure_pairs(c, size, args.repeats)]
        load += ", after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
        for r in records:
            r.update(device=device, versions=vers, threads=threads, load=load)
        return finish(args, records, pairs_report(records, header + "\n" + load) + "\n")
    records = []
    modes = ("auto", "auto_hoisted", "manual", "fast", "fast_one_chunk", "checkpointed")
    modes += ("gemm_floor",)
    if not args.no_grid:
        for size in grid:
            for cell in args.cells:
                got = measure_point(
                    cell, size, modes, args.unrolls, args.repeats, not args.no_peers, args.device
                )
                records += got
                print(table(got, "").lstrip("\n"), flush=True)
    if not args.no_long:
        long_size = QUICK_LONG if args.quick else FULL_LONG
        long_modes = ("auto", "auto_hoisted", "fast_default", "fast_one_chunk", "checkpointed")
        for cell in args.cells:
            got = measure_point(cell, long_size, long_modes, (1,), args.long_repeats, False, "")
            records += got
            print(table(got, "").lstrip("\n"), flush=True)
    for r in records:
        r.update(device=device, versions=vers, threads=threads)
    print("\n" + "=" * 100)
    return finish(args, records, full_report(records, args))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
