"""Fused Pallas recurrences against the XLA fast path and cuDNN (written for a GPU run).

Three measurements per (cell, B, H, T, D), float32, all candidates interleaved in one process:

  forward     the recurrence on projected inputs: ``scan_states`` (XLA, lax.scan unroll k) vs
              ``pallas_scan_states`` variants, and torch cuDNN's forward (``nn.RNN``/``LSTM``/
              ``GRU`` under ``no_grad``, input projection included); also us per step
  backward    the delta recurrence: ``backward_deltas`` (XLA) vs ``pallas_backward_deltas``
  gradients   a full training step: ``bptt(mode="fast", options=ScanOptions(backend=...))``
              (readout, MSE, both recurrences and the weight GEMMs) vs torch cuDNN forward +
              backward

Pallas variants: ``pallas`` (IEEE float32 dots), ``pallas_tf32`` (TF32 dots), ``pallas_bf16w``
(W_hh stored in bfloat16, float32 accumulation). A variant that fails to compile (e.g. W_hh
beyond shared memory) is reported with its error instead of a time. Accuracy: each candidate's
hidden states and gradients against a float64 XLA reference on the same device (max relative
error ``max|a - b| / max|b|``), which is where the TF32 and bf16 errors show.

``--crossover`` adds an H sweep at fixed (B, T) for the gradient step: the H where the XLA fast
path overtakes the fused kernel. Timing: warm-up then ``--repeats`` interleaved rounds, median,
``block_until_ready``; device and versions are printed next to the numbers.

Usage:
  python experiments/bench_pallas.py --json runs/bench_pallas_gpu.json        # GPU
  python experiments/bench_pallas.py --crossover --json runs/bench_pallas_cross.json
  python experiments/bench_pallas.py --tiny          # CPU smoke run, Pallas interpret mode
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from bench import PACKAGES, interleaved_medians, jax_inputs, jax_timer, torch_peer
from common import POSITIVE, Parser, device_name, max_relative_error, versions, write_outputs
from jax import lax

from jax_bptt import ScanOptions, bptt, get_cell
from jax_bptt.backends import Backend, backend_names, register_backend
from jax_bptt.cells import project_inputs
from jax_bptt.pallas_rnn import fits_on_chip, make_pallas_backend, preferred_backend
from jax_bptt.scan import backward_deltas, scan_states

POINTS = [(256, 128, 256, 32), (16, 256, 4096, 64)]  # (B, H, T, D)
TINY_POINTS = [(4, 8, 6, 3)]
CROSSOVER_HS = (16, 32, 64, 128, 256)
CROSSOVER_BT = (256, 256)
CELLS = ("elman_tanh", "lstm", "gru")
XLA_UNROLLS = (1, 8, 16)
PALLAS_VARIANTS = {
    "pallas": {},
    "pallas_tf32": {"precision": lax.Precision.DEFAULT},
    "pallas_bf16w": {"weight_dtype": jnp.bfloat16},
}


def register_pallas_variants(interpret: bool | None) -> dict:
    """Register each variant as a ``ScanOptions`` backend (the built-in ``"pallas"`` is already
    one); returns name -> PallasBackend."""
    out = {}
    for name, options in PALLAS_VARIANTS.items():
        # d_states (per-step dL/d state, for diagnostics) is not needed for gradients
        backend = make_pallas_backend(interpret=interpret, with_d_states=False, **options)
        if name not in backend_names():
            register_backend(name, Backend(backend.scan_states, backend.backward_deltas))
        out[name] = backend
    return out


def fast_grads(params, h0, xs, ys, *, cell, options):
    """``bptt(mode="fast")`` of the benchmark's one-layer model from the state ``h0``."""
    return bptt(params, xs, ys, cell=cell, mode="fast", h0=[{"fwd": h0}], options=options)


# --------------------------------------------------------------------------------------------
# Candidates: each name -> a jitted function and its arguments


def recurrence_candidates(cell_name, size, pallas: dict):
    """``{"forward": {name: (fn, args)}, "backward": {...}}`` on one problem."""
    cell = get_cell(cell_name)
    params, h0, xs, _ = jax_inputs(cell_name, *size)
    p = params["layers"][0]["fwd"]
    xp = project_inputs(p, xs)
    _, (states, saved) = jax.jit(lambda: scan_states(cell, p, xp, h0))()
    d_hs = jax.random.normal(jax.random.key(3), cell.hidden(states).shape)
    d_final = jax.tree_util.tree_map(jnp.zeros_like, h0)

    fwd_impls = {f"xla_u{k}": (scan_states, k) for k in XLA_UNROLLS}
    fwd_impls.update({name: (b.scan_states, 1) for name, b in pallas.items()})
    bwd_impls = {f"xla_u{k}": (backward_deltas, k) for k in XLA_UNROLLS}
    bwd_impls.update({name: (b.backward_deltas, 1) for name, b in pallas.items()})

    def forward(impl, unroll):
        return jax.jit(lambda p, xp, h0: impl(cell, p, xp, h0, None, False, unroll))

    def backward(impl, unroll):  # d_h0, d_xp, d_hp only: what the gradients need
        def deltas(p, h0, s, r, d_hs, d_f):
            return impl(cell, p, h0, None, s, r, d_hs, d_f, reverse=False, unroll=unroll)[:3]

        return jax.jit(deltas)

    return {
        "forward": {n: (forward(*i), (p, xp, h0)) for n, i in fwd_impls.items()},
        "backward": {
            n: (backward(*i), (p, h0, states, saved, d_hs, d_final)) for n, i in bwd_impls.items()
        },
    }


def gradient_candidates(cell_name, size, pallas: dict):
    args = jax_inputs(cell_name, *size)

    def step(backend, unroll):
        options = ScanOptions(unroll=unroll, backend=backend)
        return jax.jit(functools.partial(fast_grads, cell=cell_name, options=options))

    out = {f"xla_u{k}": (step("xla", k), args) for k in XLA_UNROLLS}
    out.update({name: (step(name, 1), args) for name in pallas})
    return out


# --------------------------------------------------------------------------------------------
# Measurement


def compile_or_error(candidates: dict) -> tuple[dict, dict]:
    """Warm every candidate once; ``(runs, errors)`` where a failed compile is an error string."""
    runs, errors = {}, {}
    for name, (fn, args) in candidates.items():
        try:
            jax.block_until_ready(fn(*args))
        except Exception as error:  # noqa: BLE001 - a kernel that does not fit is a result
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            continue
        runs[name] = jax_timer(fn, args)
    return runs, errors


def time_candidates(kind, cell_name, size, candidates, peer, repeats):
    runs, errors = compile_or_error(candidates)
    if peer is not None:  # bench.torch_peer's (name, run, ...)
        runs[peer[0]] = peer[1]
    base = dict(kind=kind, cell=cell_name, **dict(zip("BHTD", size, strict=True)))
    records = [
        dict(base, candidate=name, ms=wall, cpu_ms=cpu, us_per_step=1e3 * wall / size[2])
        for name, (wall, cpu) in interleaved_medians(runs, repeats).items()
    ]
    records += [dict(base, candidate=name, error=msg) for name, msg in errors.items()]
    return records


def accuracy(cell_name, size, pallas: dict) -> list[dict]:
    """Relative error of hidden states and gradients vs a float64 XLA reference."""
    cell = get_cell(cell_name)
    params, h0, xs, ys = jax_inputs(cell_name, *size)
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), tree)  # noqa: E731
        p64, h64, xs64, ys64 = to64(params), to64(h0), to64(xs), to64(ys)
        c64 = p64["layers"][0]["fwd"]
        ref_states = scan_states(cell, c64, project_inputs(c64, xs64), h64)[1][0]
        ref_grads = fast_grads(p64, h64, xs64, ys64, cell=cell_name, options=ScanOptions(unroll=1))
        ref_states, ref_grads = jax.device_get((ref_states, ref_grads))
    cell_params = params["layers"][0]["fwd"]
    xp = project_inputs(cell_params, xs)
    impls = {"xla": scan_states, **{name: b.scan_states for name, b in pallas.items()}}
    records = []
    for name, impl in impls.items():
        record = dict(kind="accuracy", cell=cell_name, **dict(zip("BHTD", size, strict=True)))
        record["candidate"] = name
        try:
            states = jax.jit(lambda p, xp, h0, impl=impl: impl(cell, p, xp, h0)[1][0])(
                cell_params, xp, h0
            )
            options = ScanOptions(unroll=1, backend=name)
            grads = fast_grads(params, h0, xs, ys, cell=cell_name, options=options)
        except Exception as error:  # noqa: BLE001
            records.append({**record, "error": f"{type(error).__name__}: {str(error)[:160]}"})
            continue
        record["states_rel_err"] = max_relative_error(states, ref_states)
        record["grads_rel_err"] = max_relative_error(grads, ref_grads)
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Report


def table(records) -> str:
    lines = []
    groups = {}
    for r in records:
        key = (r["kind"], r["cell"], r["B"], r["H"], r["T"], r["D"])
        groups.setdefault(key, []).append(r)
    for (kind, cell, b, h, t, d), rows in groups.items():
        lines.append(f"\n{kind}: cell={cell} B={b} H={h} T={t} D={d}")
        xla = [r["ms"] for r in rows if "ms" in r and r["candidate"].startswith("xla")]
        if kind != "accuracy":
            lines.append(f"  {'candidate':<22} {'ms':>9} {'us/step':>9} {'vs best xla':>12}")
        for r in rows:
            if "error" in r:
                text = r["error"]
            elif kind == "accuracy":
                text = (
                    f"states rel err {r['states_rel_err']:9.2e}"
                    f"   grads rel err {r['grads_rel_err']:9.2e}"
                )
            else:
                ratio = f"{r['ms'] / min(xla):.2f}" if xla else "-"
                text = f"{r['ms']:9.3f} {r['us_per_step']:9.2f} {ratio:>12}"
            lines.append(f"  {r['candidate']:<22} {text}")
    return "\n".join(lines)


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke size (interpret mode)")
    parser.add_argument("--crossover", action="store_true", help="add the H sweep")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--repeats", type=POSITIVE, default=None, help="timed rounds (default 20)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default=None, help="write one record per measurement here")
    parser.add_argument("--txt", default=None, help="write the printed report here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.tiny else 20)
    points = TINY_POINTS if args.tiny else POINTS

    device, vers = device_name(), versions(PACKAGES)
    interpret = jax.default_backend() != "gpu"
    header = "\n".join(
        [
            f"device: {device}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
            f"float32; jax_default_matmul_precision={jax.config.jax_default_matmul_precision}; "
            f"Pallas {'INTERPRET mode (timings meaningless)' if interpret else 'Triton'}; "
            f"median of {repeats} interleaved rounds after warm-up.",
        ]
    )
    print(header, flush=True)
    pallas = register_pallas_variants(None)
    records = []
    for size in points:
        for cell in args.cells:
            g = get_cell(cell).num_gates
            note = (
                f"# {cell} {size}: preferred_backend -> "
                f"{preferred_backend(size[0], size[1], size[2], get_cell(cell), jnp.float32)}, "
                f"fits_on_chip fp32 {fits_on_chip(size[1], g, jnp.float32)}, "
                f"bf16 weights {fits_on_chip(size[1], g, jnp.float32, weight_dtype=jnp.bfloat16)}"
            )
            print(note, flush=True)
            rec = recurrence_candidates(cell, size, pallas)
            fwd_peer, peer = (
                torch_peer(cell, *size, args.device, backward=b) for b in (False, True)
            )
            got = time_candidates("forward", cell, size, rec["forward"], fwd_peer, repeats)
            got += time_candidates("backward", cell, size, rec["backward"], None, repeats)
            grads = gradient_candidates(cell, size, pallas)
            got += time_candidates("gradients", cell, size, grads, peer, repeats)
            got += accuracy(cell, size, pallas)
            print(table(got), flush=True)
            records += got
    if args.crossover:
        batch, steps = (4, 6) if args.tiny else CROSSOVER_BT
        hidden_sizes = (8, 16) if args.tiny else CROSSOVER_HS
        for cell in args.cells:
            for hidden in hidden_sizes:
                size = (batch, hidden, steps, 32 if not args.tiny else 3)
                grads = gradient_candidates(cell, size, {"pallas": pallas["pallas"]})
                got = time_candidates("gradients (H sweep)", cell, size, grads, None, repeats)
                print(table(got), flush=True)
                records += got
    for r in records:
        r.update(device=device, versions=vers, interpret=interpret)
    report = header + table(records)
    print("\n" + "=" * 80 + "\n" + report)
    write_outputs(args, records, report + "\n")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
