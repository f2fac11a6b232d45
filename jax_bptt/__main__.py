"""``python -m jax_bptt check``: manual vs automatic BPTT for every configuration, as a table.

Runs every cell x loss x placement x {no lengths, random lengths} x {zero, random h0}, prints the
worst relative error of each against ``jax.grad`` (and finite differences with ``--fd``), and exits
with status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import itertools
import sys


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m jax_bptt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="cross-check manual and automatic BPTT")
    check.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    check.add_argument("--steps", "-T", type=int, default=12, help="sequence length T")
    check.add_argument("--batch", "-B", type=int, default=3)
    check.add_argument("--inputs", "-D", type=int, default=4, help="input size D")
    check.add_argument("--hidden", "-H", type=int, default=6, help="hidden size H")
    check.add_argument("--outputs", "-O", type=int, default=3, help="output size O")
    check.add_argument("--cells", nargs="+", default=None, help="default: all cells")
    check.add_argument("--losses", nargs="+", default=None, help="default: all losses")
    check.add_argument("--placements", nargs="+", default=None, help="default: both")
    check.add_argument("--fd", action="store_true", help="also compare with finite differences")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--verbose", "-v", action="store_true", help="print every leaf's error")
    return parser.parse_args(argv)


def run_check(args) -> int:
    import jax

    if args.dtype == "float64" or args.fd:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jax_bptt.cells import CELLS
    from jax_bptt.check import check_gradients, random_problem
    from jax_bptt.validation import LOSSES, PLACEMENTS

    dtype = jnp.dtype(args.dtype)
    cells = args.cells or sorted(CELLS)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; dtype {args.dtype}; "
        f"T={args.steps} B={args.batch} D={args.inputs} H={args.hidden} O={args.outputs}"
    )
    header = f"{'cell':<11} {'loss':<13} {'placement':<9} {'lengths':<7} {'h0':<6}"
    refs = ["auto"] + (["fin.diff"] if args.fd else [])
    print(header + "".join(f" {'vs ' + r:>12}" for r in refs) + "  ok")
    key = jax.random.key(args.seed)
    failures = 0
    losses, placements = args.losses or LOSSES, args.placements or PLACEMENTS
    configs = itertools.product(cells, losses, placements, (False, True), (False, True))
    for index, (cell, loss, placement, use_lengths, random_h0) in enumerate(configs):
        params, xs, targets, kwargs = random_problem(
            jax.random.fold_in(key, index),
            cell,
            loss,
            placement,
            steps=args.steps,
            batch=args.batch,
            inputs=args.inputs,
            hidden=args.hidden,
            outputs=args.outputs,
            random_lengths=use_lengths,
            random_h0=random_h0,
            dtype=dtype,
        )
        reports = check_gradients(params, xs, targets, finite_differences=args.fd, **kwargs)
        ok = all(r.ok for r in reports)
        failures += not ok
        row = (
            f"{cell:<11} {loss:<13} {placement:<9} {'random' if use_lengths else 'none':<7} "
            f"{'random' if random_h0 else 'zero':<6}"
        )
        print(row + "".join(f" {r.worst.rel:12.2e}" for r in reports) + ("  yes" if ok else "  NO"))
        if args.verbose or not ok:
            for report in reports:
                print(report.table())
    tolerance = reports[0].tolerance
    print(f"{failures} mismatches (relative tolerance {tolerance:.0e} vs auto)")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    for name in ("steps", "batch", "inputs", "hidden", "outputs"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise SystemExit(f"--{name} must be >= {0 if name == 'steps' else 1}")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
