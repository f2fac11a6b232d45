"""Train steps per second against the number of devices: data parallelism with ``jax.sharding``.

Each candidate runs the same jitted optax train step (``jax_bptt.train.make_train_step``, float32,
per-step MSE, Adam) on the same batch:

  unsharded     the bare step on one device, no mesh: the baseline
  dp{n}         ``jax_bptt.parallel.data_parallel_step`` on a 1-D mesh of n devices, batch split
  tp{n}         (``--tp``) W_xh, W_hh, b_h column-sharded over a ("batch": 1, "model": n) mesh,
                XLA partitions the hidden dimension: see ``jax_bptt.parallel``'s docstring

Strong scaling keeps the global batch ``-B`` fixed; weak scaling (``--per-device-batch``) gives
every device the same rows, so the global batch grows with n. For every candidate the script also
reports the relative difference from the bare step on one device after one step from the same
state (the larger of the loss's and the gradient norm's; params in the JSON), and the collectives
in the compiled train step: those inside the forward and backward ``while`` loops' bodies (run
once per time step) and all of them (XLA combines the gradient all-reduces of data parallelism
into one). Batches are placed on the devices once, so host-to-device transfers are not timed.

Timing: compile and two more calls first; then ``--repeats`` rounds, each timing every candidate
for ``--steps`` steps (``block_until_ready`` at the end) in the same order, so baseline and
candidates share the machine's noise; the figure is the median over rounds.

Fake devices: ``--fake-cpu-devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before JAX starts its backend, so one CPU shows up as N devices. They share the CPU's cores: on a
small machine the numbers measure the SPMD overhead (partitioning, collectives, per-device
dispatch), not a speed-up; real scaling needs real devices (GPUs/TPUs, or hosts).

Usage:
  python experiments/scaling.py --fake-cpu-devices 8 --tp \\
      --json experiments/results/scaling_cpu.json --txt experiments/results/scaling_cpu.txt
  python experiments/scaling.py --fake-cpu-devices 8 --quick       # smoke run, about a minute
  python experiments/scaling.py --devices 1,2,4,8 -B 256 -H 512     # a multi-GPU machine
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    NON_NEGATIVE,
    POSITIVE,
    Parser,
    device_info,
    int_list,
    markdown_table,
    max_relative_error,
    write_outputs,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_bptt import BPTT_MODES, CELLS, init_model, make_optimizer, make_train_step, parallel
from jax_bptt.check import relative_error

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# Columns sharded by tensor parallelism: everything with a gate axis G*H.
TP_PARAMS = {"W_xh": P(None, "model"), "W_hh": P(None, "model"), "b_h": P("model")}
QUICK = dict(T=8, B=16, H=16, tp_hidden=32, per_device_batch=2, repeats=2, steps=2)


# --------------------------------------------------------------------------------------------
# Compiled-HLO inspection


def _computations(hlo: str) -> dict[str, str]:
    """Computation name -> its body text, from a compiled module's ``as_text()``."""
    bodies, name, lines = {}, None, []
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name, lines = header.group(1), []
        elif line.startswith("}") and name is not None:
            bodies[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return bodies


def _count(text: str) -> int:
    return sum(len(re.findall(rf"\b{kind}(?:-start)?\(", text)) for kind in COLLECTIVES)


def collectives(compiled_text: str) -> dict:
    """Collectives inside while-loop bodies (run once per time step) and in total."""
    bodies = _computations(compiled_text)
    loops = set(re.findall(r"body=%?([\w.\-]+)", compiled_text))
    per_loop = [_count(bodies.get(name, "")) for name in sorted(loops)]
    return {"in_loops": sum(per_loop), "loops": len(loops), "total": _count(compiled_text)}


# --------------------------------------------------------------------------------------------
# Candidates


def make_problem(args, batch_size: int, key: int = 0):
    k_p, k_x, k_y = jax.random.split(jax.random.key(key), 3)
    params = init_model(k_p, args.cell, args.D, args.H, args.D, dtype=jnp.float32)
    xs = np.asarray(jax.random.normal(k_x, (args.T, batch_size, args.D), jnp.float32))
    targets = np.asarray(jax.random.normal(k_y, (args.T, batch_size, args.D), jnp.float32))
    return params, xs, targets


def tp_place(params, mesh):
    """Params with the gate axis of ``W_xh``, ``W_hh``, ``b_h`` split over ``"model"``."""

    def place(path, leaf):
        spec = TP_PARAMS.get(path[-1].key, P()) if path[0].key == "layers" else P()
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, params)


class Candidate:
    """A ready-to-time train step: ``run(k)`` does k steps from its current state."""

    def __init__(self, name, devices, step, params, opt_state, batch, unsharded, lower_args=None):
        self.name, self.devices, self.step = name, devices, step
        self.params, self.opt_state, self.batch = params, opt_state, batch
        self.unsharded = unsharded  # (params, opt_state, batch) on one device, for the check
        self.lower_args = lower_args

    def run(self, num_steps: int):
        params, opt_state = self.params, self.opt_state
        for _ in range(num_steps):
            params, opt_state, info = self.step(params, opt_state, **self.batch)
        jax.block_until_ready((params, opt_state, info.loss))
        self.params, self.opt_state = params, opt_state
        return info


def build(args, optimizer, train_step, kind: str, n: int, batch_size: int) -> Candidate:
    params, xs, targets = make_problem(args, batch_size)
    batch = {"xs": xs, "targets": targets}
    unsharded = (params, optimizer.init(params), batch)
    if kind == "unsharded":  # data placed once, as for the others: transfers are not timed
        placed = jax.device_put(unsharded)
        return Candidate("unsharded", 1, train_step, *placed, unsharded)
    if kind == "dp":
        mesh = parallel.make_mesh(n)
        step = parallel.data_parallel_step(train_step, mesh)
        placed = parallel.replicate((params, optimizer.init(params)), mesh)
        sharded = parallel.shard_batch(batch, mesh)
        lower = (step.jitted, (*placed, sharded))
        return Candidate(f"dp{n}", n, step, *placed, sharded, unsharded, lower)
    mesh = jax.make_mesh(
        (1, n), ("batch", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n]
    )
    placed = tp_place(params, mesh)
    opt_state = optimizer.init(placed)
    batch_on_mesh = parallel.replicate(batch, mesh)  # B stays whole: the mesh's batch axis is 1
    return Candidate(f"tp{n}", n, train_step, placed, opt_state, batch_on_mesh, unsharded)


def one_step_error(candidate: Candidate, train_step) -> dict:
    """Relative differences after one step from the same state, against the bare step on one
    device (called before the candidate has run): the loss, the raw gradient's global norm, and
    the params. In float32 the first two are round-off from the changed summation order; the
    params' can be larger, since Adam's first update ``g / (|g| + eps)`` amplifies the rounding of
    near-zero gradient entries."""
    out = candidate.step(candidate.params, candidate.opt_state, **candidate.batch)
    params, opt_state, batch = candidate.unsharded
    ref = train_step(params, opt_state, **batch)
    return {
        "loss": relative_error(out[2].loss, ref[2].loss)[1],
        "grad_norm": relative_error(out[2].grad_norm, ref[2].grad_norm)[1],
        "params": max_relative_error(out[0], ref[0]),
    }


def hlo_collectives(c: Candidate) -> dict:
    lowered = (
        c.lower_args[0].lower(*c.lower_args[1])
        if c.lower_args is not None
        else c.step.lower(c.params, c.opt_state, **c.batch)
    )
    return collectives(lowered.compile().as_text())


def measure(args, train_step, candidates: list[Candidate], batch_sizes: list[int]) -> list[dict]:
    reference = candidates[0]
    records = [{"error": one_step_error(candidate, train_step)} for candidate in candidates]
    for candidate in candidates:  # warm-up: compile (once more if output shardings differ)
        candidate.run(3)
    rates = {c.name: [] for c in candidates}
    for _ in range(args.repeats):
        for candidate in candidates:
            started = time.perf_counter()
            candidate.run(args.steps)
            rates[candidate.name].append(args.steps / (time.perf_counter() - started))
    base = statistics.median(rates[reference.name])
    for record, candidate, batch_size in zip(records, candidates, batch_sizes, strict=True):
        steps_per_s = statistics.median(rates[candidate.name])
        sequences = steps_per_s * batch_size
        record.update(
            candidate=candidate.name,
            devices=candidate.devices,
            global_batch=batch_size,
            steps_per_s=steps_per_s,
            sequences_per_s=sequences,
            sequences_per_s_per_device=sequences / candidate.devices,
            tokens_per_s=sequences * args.T,
            speedup_steps=steps_per_s / base,
            rounds=len(rates[candidate.name]),
            collectives=hlo_collectives(candidate),
        )
    return records


# (column, value of a record)
COLUMNS = {
    "candidate": lambda r: r["candidate"],
    "devices": lambda r: r["devices"],
    "global B": lambda r: r["global_batch"],
    "steps/s": lambda r: r["steps_per_s"],
    "seq/s": lambda r: r["sequences_per_s"],
    "seq/s/device": lambda r: r["sequences_per_s_per_device"],
    "vs unsharded": lambda r: f"{r['speedup_steps']:.2f}x",
    "rel diff (loss, grad norm)": lambda r: (
        f"{max(r['error']['loss'], r['error']['grad_norm']):.1e}"
    ),
    "coll. per time step": lambda r: r["collectives"]["in_loops"],
    "coll. per train step": lambda r: r["collectives"]["total"],
}


def table(records: list[dict]) -> str:
    return markdown_table(list(COLUMNS), [[f(r) for f in COLUMNS.values()] for r in records])


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fake-cpu-devices", type=POSITIVE, default=None,
        help="show the CPU as N devices (XLA_FLAGS, set before JAX starts: from the command line "
        "only)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke run)")
    parser.add_argument(
        "--devices", type=int_list(1), default=None, help="device counts, e.g. 1,2,4,8 (default)"
    )
    parser.add_argument("--cell", default="lstm", choices=tuple(CELLS))
    parser.add_argument("--bptt", default="manual", choices=BPTT_MODES)
    parser.add_argument("-T", type=POSITIVE, default=32, help="sequence length")
    parser.add_argument("-B", type=POSITIVE, default=64, help="global batch (strong scaling)")
    parser.add_argument("-D", type=POSITIVE, default=16, help="inputs (= outputs)")
    parser.add_argument("-H", type=POSITIVE, default=128, help="hidden units")
    parser.add_argument(
        "--per-device-batch", type=NON_NEGATIVE, default=8, help="weak scaling; 0: skip"
    )
    parser.add_argument("--tp", action="store_true", help="also time hidden-dim sharding")
    parser.add_argument("--tp-hidden", type=POSITIVE, default=512, help="H for the --tp rows")
    parser.add_argument("--repeats", type=POSITIVE, default=7)
    parser.add_argument("--steps", type=POSITIVE, default=10, help="train steps per timed round")
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--txt", default=None, help="write the printed report here")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.fake_cpu_devices is not None:  # before anything asks JAX for its devices
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.fake_cpu_devices}"
        ).strip()
        if "JAX_PLATFORMS" not in os.environ:
            jax.config.update("jax_platforms", "cpu")
    available = jax.device_count()
    if args.devices is None:
        args.devices = [n for n in (1, 2, 4, 8, 16, 32) if n <= available]
    if max(args.devices) > available:
        parser.error(
            f"--devices asks for {max(args.devices)} devices but JAX sees {available}; on CPU "
            "pass --fake-cpu-devices N"
        )
    for n in args.devices:
        if args.B % n:
            parser.error(f"-B {args.B} must be divisible by every device count ({n})")
    return args


def report(lines: list[str], title: str, records: list[dict]) -> None:
    text = f"## {title}\n\n{table(records)}\n"
    lines.append(text)
    print(text, flush=True)


def main(argv=None):
    args = parse_args(argv)
    counts, available = args.devices, jax.device_count()
    info = device_info()
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["load_average_1min"] = os.getloadavg()[0]
    fake = args.fake_cpu_devices is not None and jax.default_backend() == "cpu"
    note = (
        f"{available} fake CPU devices on {os.cpu_count()} cores share those cores: these numbers "
        "measure the SPMD overhead (partitioning, collectives, per-device dispatch), not a "
        "speed-up. Real scaling needs real devices."
        if fake
        else "real devices"
    )
    lines = [
        f"device: {info['backend']}: {info['cpu']} ({info['cpu_count']} logical cores); "
        f"JAX devices: {available}; XLA_FLAGS={info['xla_flags']!r}",
        f"versions: python {info['python']}, jax {info['jax']}, optax {info['optax']}",
        f"load average (1 min) at start: {info['load_average_1min']:.1f}",
        f"note: {note}",
        f"train step: {args.cell}, bptt={args.bptt}, T={args.T}, D=O={args.D}, H={args.H}, "
        f"float32, per-step MSE, Adam; median of {args.repeats} interleaved rounds of "
        f"{args.steps} steps after warm-up",
        "",
    ]
    print("\n".join(lines), flush=True)
    optimizer = make_optimizer("adam", 1e-3)
    train_step = make_train_step(optimizer, cell=args.cell, mode=args.bptt)
    result = {"device": info, "note": note, "config": vars(args), "counts": counts}

    sections = [("strong", f"Strong scaling: global batch B={args.B}", lambda n: args.B)]
    if args.per_device_batch:
        per_device = args.per_device_batch
        sections.append(
            ("weak", f"Weak scaling: {per_device} sequences per device", lambda n: per_device * n)
        )
    for key, title, batch_of in sections:
        sizes = [batch_of(1)] + [batch_of(n) for n in counts]
        candidates = [build(args, optimizer, train_step, "unsharded", 1, sizes[0])]
        candidates += [
            build(args, optimizer, train_step, "dp", n, size)
            for n, size in zip(counts, sizes[1:], strict=True)
        ]
        result[key] = measure(args, train_step, candidates, sizes)
        report(lines, title, result[key])

    if args.tp:
        tp_args = argparse.Namespace(**{**vars(args), "H": args.tp_hidden})
        candidates = [build(tp_args, optimizer, train_step, "unsharded", 1, args.B)]
        candidates += [build(tp_args, optimizer, train_step, "dp", max(counts), args.B)]
        tp_counts = [n for n in counts if n > 1]
        candidates += [build(tp_args, optimizer, train_step, "tp", n, args.B) for n in tp_counts]
        result["tp"] = measure(tp_args, train_step, candidates, [args.B] * len(candidates))
        title = (
            f"Tensor parallelism over H={args.tp_hidden} (W_xh, W_hh, b_h column-sharded), "
            f"global batch B={args.B}, against data parallelism"
        )
        report(lines, title, result["tp"])

    write_outputs(args, result, "\n".join(lines), default=str)
    return result


if __name__ == "__main__":
    main()
