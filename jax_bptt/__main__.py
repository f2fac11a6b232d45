"""``python -m jax_bptt check``: manual vs automatic BPTT for every configuration, as a table.

Runs every cell x loss x placement x {no lengths, random lengths} x {zero, random h0} on the model
given by ``--layers``/``--bidirectional``/``--residual``/``--dropout`` (default: one
unidirectional layer), plus, unless ``--no-deep``, one 2-layer bidirectional model per cell with
residual connections (``"except_first"``), dropout 0.25, random lengths and random h0 (the four
cells take the four loss x placement pairs between them). Prints the worst error of each against
``jax.grad`` (and finite differences with ``--fd``), then a summary naming the tolerance each
column is held to, and exits with status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

RESIDUAL_CHOICES = {"none": False, "true": True, "except_first": "except_first"}
# (flags, default, smallest value, help) of the integer options
INT_OPTIONS = (
    (("--steps", "-T"), 12, 0, "sequence length T"),
    (("--batch", "-B"), 3, 1, None),
    (("--inputs", "-D"), 4, 1, "input size D"),
    (("--hidden", "-H"), 6, 1, "hidden size H"),
    (("--outputs", "-O"), 3, 1, "output size O"),
    (("--layers", "-L"), 1, 1, "layers of the swept model"),
    (("--directions",), 3, 1, "finite-difference directions per leaf"),
    (("--jobs", "-j"), 2, 1, "configurations checked at once (threads: XLA compiles in parallel)"),
    (("--seed",), 0, None, None),
)
DEEP = dict(num_layers=2, bidirectional=True, residual="except_first", dropout=0.25)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m jax_bptt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="cross-check manual and automatic BPTT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    for flags, default, _, help_text in INT_OPTIONS:
        check.add_argument(*flags, type=int, default=default, help=help_text)
    check.add_argument("--bidirectional", action="store_true", help="swept model bidirectional")
    check.add_argument(
        "--residual", choices=tuple(RESIDUAL_CHOICES), default="none",
        help="residual connections of the swept model ('true' needs D = H * directions)",
    )  # fmt: skip
    check.add_argument("--dropout", type=float, default=0.0, help="between the swept layers")
    check.add_argument(
        "--no-deep", action="store_true", help="skip the extra 2-layer bidirectional cases"
    )
    check.add_argument("--cells", nargs="+", default=None, help="default: all cells")
    check.add_argument("--losses", nargs="+", default=None, help="default: all losses")
    check.add_argument("--placements", nargs="+", default=None, help="default: both")
    check.add_argument("--fd", action="store_true", help="also compare with finite differences")
    check.add_argument(
        "--xla-opt", action="store_true",
        help="compile with XLA's default LLVM optimisation (default for python -m jax_bptt: "
        "level 0, which halves the compile time of the ~70 small programs)",
    )  # fmt: skip
    check.add_argument("--verbose", "-v", action="store_true", help="print every leaf's error")
    return parser.parse_args(argv)


def _model_label(num_layers, bidirectional, residual, dropout) -> str:
    """E.g. ``"1 uni"``, ``"2 bi res1+ drop.25"`` (``res1+``: residual on layers 1 and up)."""
    label = f"{num_layers} {'bi' if bidirectional else 'uni'}"
    if residual:
        label += " res" if residual is True else " res1+"
    if dropout and num_layers > 1:
        label += f" drop{dropout:g}".replace("0.", ".")
    return label


def _configs(args, cells, losses, placements):
    """``(cell, loss, placement, lengths, h0, model)`` rows: the sweep, then the deep cases."""
    model = dict(num_layers=args.layers, bidirectional=args.bidirectional,
                 residual=RESIDUAL_CHOICES[args.residual], dropout=args.dropout)  # fmt: skip
    for config in itertools.product(cells, losses, placements, (False, True), (False, True)):
        yield (*config, model)
    if args.no_deep or model == DEEP:
        return
    pairs = list(itertools.product(losses, placements))
    for i, cell in enumerate(cells):
        yield (cell, *pairs[i % len(pairs)], True, True, DEEP)


def run_check(args) -> int:
    import jax

    if args.dtype == "float64" or args.fd:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jax_bptt.cells import CELLS
    from jax_bptt.check import check_gradients, random_problem
    from jax_bptt.losses import LOSSES, PLACEMENTS, Loss

    start = time.perf_counter()
    dtype = jnp.dtype(args.dtype)
    cells = args.cells or sorted(CELLS)
    losses, placements = args.losses or LOSSES, args.placements or PLACEMENTS
    for flag, given, choices in (
        ("--cells", cells, tuple(sorted(CELLS))), ("--losses", losses, LOSSES),
        ("--placements", placements, PLACEMENTS),
    ):  # fmt: skip
        for value in given:
            if value not in choices:
                raise SystemExit(f"{flag}: {value!r} is not one of {choices}")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; dtype {args.dtype}; "
        f"T={args.steps} B={args.batch} D={args.inputs} H={args.hidden} O={args.outputs}"
    )
    header = f"{'cell':<11} {'loss':<13} {'placement':<9} {'lengths':<7} {'h0':<6} {'model':<18}"
    refs = ["auto"] + (["fin.diff"] if args.fd else [])
    print(header + "".join(f" {'vs ' + r:>12}" for r in refs) + "  ok")
    key = jax.random.key(args.seed)

    def check(indexed):
        index, (cell, loss, placement, use_lengths, random_h0, model) = indexed
        params, xs, targets, kwargs = random_problem(
            jax.random.fold_in(key, index), cell, Loss(loss, placement),
            steps=args.steps, batch=args.batch, inputs=args.inputs, hidden=args.hidden,
            outputs=args.outputs, random_lengths=use_lengths, random_h0=random_h0, dtype=dtype,
            **model,
        )  # fmt: skip
        reports = check_gradients(
            params, xs, targets, finite_differences=args.fd, num_directions=args.directions,
            **kwargs,
        )  # fmt: skip
        row = (
            f"{cell:<11} {loss:<13} {placement:<9} {'random' if use_lengths else 'none':<7} "
            f"{'random' if random_h0 else 'zero':<6} {_model_label(**model):<18}"
        )
        return row, reports

    failures = 0
    configs = list(enumerate(_configs(args, cells, losses, placements)))
    with ThreadPoolExecutor(args.jobs) as pool:  # results in order, printed as they come
        for row, reports in pool.map(check, configs):
            ok = all(r.ok for r in reports)
            failures += not ok
            worst = "".join(f" {r.worst.rel:12.2e}" for r in reports)
            print(row + worst + ("  yes" if ok else "  NO"), flush=True)
            if args.verbose or not ok:
                for report in reports:
                    print(report.table())
    # Every row holds a column to the same criterion (one dtype, one finite-difference setting).
    held = "; ".join(f"vs {ref}: {r.criterion}" for ref, r in zip(refs, reports, strict=True))
    print(
        f"{failures} mismatches in {len(configs)} configurations ({held}) "
        f"[{time.perf_counter() - start:.1f} s]"
    )
    return 1 if failures else 0


def main(argv=None, *, standalone: bool = False) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``standalone``: this process runs nothing but the check (``python -m jax_bptt``), so XLA's
    LLVM optimisation level is lowered to 0 before the backend starts (unless ``--xla-opt`` or
    ``XLA_FLAGS`` already sets it): compiling ~70 small programs is most of the run, and level 0
    halves it. In-process callers (tests) keep their process's settings.
    """
    args = _parse(sys.argv[1:] if argv is None else argv)
    for flags, _, minimum, _ in INT_OPTIONS:
        if minimum is not None and getattr(args, flags[0][2:]) < minimum:
            raise SystemExit(f"{flags[0]} must be >= {minimum}")
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {args.dropout}")
    directions = 2 if args.bidirectional else 1
    if args.residual == "true" and args.inputs != args.hidden * directions:
        raise SystemExit(
            f"--residual true adds layer 0's input to its output: it needs -D equal to "
            f"H * directions = {args.hidden * directions}, got -D {args.inputs} "
            "(or use --residual except_first)"
        )
    flags = os.environ.get("XLA_FLAGS", "")
    if standalone and not args.xla_opt and "xla_backend_optimization_level" not in flags:
        # Read when the backend starts: importing jax_bptt does not start it.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main(standalone=True))
