"""Gradient flow through time: vanishing and exploding gradients, measured and plotted.

1. A tanh RNN with ``W_hh = s * Q`` (Q orthogonal, so every singular value is s) for
   s in {0.5, 0.9, 1.0, 1.1, 1.5}: ``||dh_T/dh_t||`` and ``||dL/dh_t||`` (adding-problem loss on
   the last step) against the distance ``T - t``, with Pascanu et al.'s bound ``s^(T-t)``.
2. LSTM and GRU at initialisation and after a short Adam training on the adding problem: the
   same two curves, plus the size of each step's term of ``dW_hh``.
3. ``||dL_t/dh_k||`` over (t, k) for a per-step loss: how far back each loss term reaches.

Diagnostics run in float64 (the norms span many decades); training runs in float32.

    python experiments/gradient_flow.py            # a few minutes on 2 CPU cores
    python experiments/gradient_flow.py --quick    # seconds, for tests

Outputs under ``runs/gradient_flow/`` (or ``--out``): PNGs, ``summary.txt``, ``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common, also when run by path
from common import Parser, device_name, versions, write_text  # noqa: E402

import jax_bptt as jb  # noqa: E402
from jax_bptt.diagnostics import (  # noqa: E402
    gradient_flow,
    jacobian_norms,
    recurrent_spectrum,
    scale_recurrent,
    term_flow,
)
from jax_bptt.figures import Panel, heatmap_panels, line_panels, unrolled_network  # noqa: E402
from jax_bptt.tasks import ADDING_BASELINE_MSE, adding_problem  # noqa: E402

LAST_STEP_MSE = jb.Loss("mse", "last_step")  # the adding problem's loss
SCALES = (0.5, 0.9, 1.0, 1.1, 1.5)
DISTANCE = "distance T - t (steps)"
GRADIENT = "$\\|\\partial L/\\partial h_t\\|$, loss on the last step"
JACOBIAN = "$\\|\\partial h_T/\\partial h_t\\|_2$"
W_HH_TERMS = "step t's term of $dW_{hh}$: $\\|h_{t-1}^\\top\\, d\\,hp_t\\|_F$"

FULL = dict(
    hidden=32, sweep_steps=100, batch=16, train_steps_len=50, train_iters=1500, train_batch=64,
    heat_steps=30, power_iters=100, eval_batch=1000, gated=("lstm", "gru"),
)  # fmt: skip
QUICK = dict(
    hidden=6, sweep_steps=12, batch=2, train_steps_len=8, train_iters=20, train_batch=8,
    heat_steps=6, power_iters=0, eval_batch=2, gated=("lstm",),
)  # fmt: skip


def to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def tanh_rnn(hidden: int, top_singular_value: float) -> dict:
    """float64 tanh RNN with ``W_hh = s * Q``, Q orthogonal (every singular value is s)."""
    params = jb.init_model(
        jax.random.key(0), "elman_tanh", 2, hidden, 1, recurrent_init="orthogonal"
    )
    return to64(scale_recurrent(params, top_singular_value, cell="elman_tanh"))


def median_over_batch(norms) -> np.ndarray:
    """``(T+1, B) -> (T+1,)``: the typical sequence (robust to one saturated sequence)."""
    return np.median(np.asarray(norms), axis=-1)


def by_distance(values_over_states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row t of a ``(T+1,)`` array is h_t; return ``(T - t, value)`` with distance ascending."""
    num_steps = values_over_states.shape[0] - 1
    return np.arange(num_steps + 1), values_over_states[::-1]


def flow_curves(cell, params, xs, targets):
    """Medians over the batch of ``||dL/dh_t||`` and ``||dh_T/dh_t||``, and the per-step
    ``||h_{t-1}^T d hp_t||`` (step t's term of dW_hh), for a last-step MSE loss."""
    flow = gradient_flow(params, xs, targets, cell=cell, loss=LAST_STEP_MSE)
    d_h = median_over_batch(jnp.linalg.norm(flow.d_hidden, axis=-1))
    jac = median_over_batch(jacobian_norms(params, xs, cell=cell))
    step_terms = flow.steps["layers"][0]["fwd"]["W_hh"]  # (T, H, G*H): step t's term of dW_hh
    w_hh_terms = np.asarray(jnp.linalg.norm(step_terms, axis=(-2, -1)))
    return d_h, jac, w_hh_terms


# --------------------------------------------------------------------------------------------
# 1. tanh RNN, spectral sweep


def tanh_sweep(cfg, out, summary):
    hidden, num_steps, batch = cfg["hidden"], cfg["sweep_steps"], cfg["batch"]
    xs, targets = to64(adding_problem(jax.random.key(1), batch, num_steps))
    grads, jacs, rows = {}, {}, []
    for s in SCALES:
        params = tanh_rnn(hidden, s)
        d_h, jac, _ = flow_curves("elman_tanh", params, xs, targets)
        grads[f"s = {s}"] = by_distance(d_h)
        jacs[f"s = {s}"] = by_distance(jac)
        ratio = float(d_h[0] / d_h[-1])
        rows.append(dict(s=s, jacobian_T_to_0=float(jac[0]), bound_s_pow_T=s**num_steps,
                         grad_ratio_h0_to_hT=ratio))  # fmt: skip
    distance = np.arange(num_steps + 1)
    bounds = {f"$s^{{T-t}}$, s = {s}": (distance, s**distance) for s in (0.5, 0.9)}
    exact = JACOBIAN + " (exact, chained Jacobians)"
    line_panels(
        [
            Panel(exact, DISTANCE, "spectral norm", jacs, reference=bounds),
            Panel(GRADIENT, DISTANCE, "gradient norm", grads),
        ],
        os.path.join(out, "tanh_spectral_sweep.png"),
        title=f"tanh RNN, $W_{{hh}} = s\\,Q$ (Q orthogonal), H={hidden}, T={num_steps}, "
        f"adding-problem inputs, median of {batch} sequences",
    )
    summary["tanh_sweep"] = dict(hidden=hidden, steps=num_steps, batch=batch, rows=rows)
    lines = [f"tanh RNN, W_hh = s Q, H={hidden}, T={num_steps} (median of {batch} sequences)"]
    lines.append(f"  {'s':>4} {'||dh_T/dh_0||':>14} {'s^T':>10} {'||dL/dh_0||/||dL/dh_T||':>24}")
    for row in rows:
        lines.append(
            f"  {row['s']:>4} {row['jacobian_T_to_0']:14.3e} {row['bound_s_pow_T']:10.3e} "
            f"{row['grad_ratio_h0_to_hT']:24.3e}"
        )
    return lines


# --------------------------------------------------------------------------------------------
# 2. LSTM and GRU on the adding problem


def train_adding(cell, cfg, key):
    """A short Adam run on the adding problem with manual BPTT; returns (params, mse)."""
    num_steps, batch = cfg["train_steps_len"], cfg["train_batch"]
    params = jb.init_model(key, cell, 2, cfg["hidden"], 1)
    optimizer = jb.make_optimizer("adam", 3e-3, clip_norm=1.0)
    opt_state = optimizer.init(params)
    train_step = jb.make_train_step(optimizer, cell=cell, loss=LAST_STEP_MSE, mode="manual")
    losses = []
    for k in jax.random.split(jax.random.fold_in(key, 1), cfg["train_iters"]):
        xs, targets = adding_problem(k, batch, num_steps)
        params, opt_state, info = train_step(params, opt_state, xs, targets)
        losses.append(info.loss)
    losses = np.asarray(jnp.stack(losses))
    return params, float(losses[-max(1, len(losses) // 20) :].mean())


def gated_runs(cfg, out, summary):
    num_steps, batch = cfg["train_steps_len"], cfg["batch"]
    xs, targets = to64(adding_problem(jax.random.key(7), batch, num_steps))
    xs_big, targets_big = to64(adding_problem(jax.random.key(8), cfg["eval_batch"], num_steps))
    grads, jacs, terms, rows, trained_params = {}, {}, {}, [], {}
    lines = [
        f"{'/'.join(c.upper() for c in cfg['gated'])} on the adding problem, T={num_steps}, "
        f"H={cfg['hidden']}, {cfg['train_iters']} Adam steps of batch {cfg['train_batch']} "
        f"(baseline MSE {ADDING_BASELINE_MSE:.4f})"
    ]
    for cell in cfg["gated"]:
        start = time.perf_counter()
        init = jb.init_model(jax.random.key(3), cell, 2, cfg["hidden"], 1)
        trained, train_mse = train_adding(cell, cfg, jax.random.key(3))
        seconds = time.perf_counter() - start
        trained_params[cell] = to64(trained)
        for stage, params in (("init", to64(init)), ("trained", to64(trained))):
            d_h, jac, w_hh_terms = flow_curves(cell, params, xs, targets)
            label = f"{cell} {stage}"
            grads[label], jacs[label] = by_distance(d_h), by_distance(jac)
            # Step t's term of dW_hh, against the distance T - t of step t from the loss.
            terms[label] = (num_steps - np.arange(1, num_steps + 1), w_hh_terms)
            power_vs_exact = float("nan")
            if cfg["power_iters"]:
                iters = cfg["power_iters"]
                power = jacobian_norms(params, xs, cell=cell, method="power", num_iters=iters)
                power = median_over_batch(power)
                power_vs_exact = float(np.max(np.abs(power - jac) / jac))
            spectrum = recurrent_spectrum(params, cell=cell)
            far = w_hh_terms[: num_steps // 2].sum() / max(w_hh_terms.sum(), 1e-300)
            # gradient_flow's loss: the diagnostics' compiled function when the shapes match
            mse = gradient_flow(params, xs_big, targets_big, cell=cell, loss=LAST_STEP_MSE).loss
            rows.append(dict(
                cell=cell, stage=stage, mse=float(mse),
                grad_ratio_h0_to_hT=float(d_h[0] / d_h[-1]), jacobian_T_to_0=float(jac[0]),
                power_vs_exact_max_rel=power_vs_exact, far_half_share_of_dW_hh_terms=float(far),
                top_singular_values={b.name: float(b.singular_values[0]) for b in spectrum},
                spectral_radii={b.name: b.spectral_radius for b in spectrum},
            ))  # fmt: skip
        lines.append(f"  {cell}: trained in {seconds:.1f} s, last-5% train MSE {train_mse:.4f}")
    lines.append(
        f"  {'model':<12} {'test MSE':>9} {'||dL/dh_0||/||dL/dh_T||':>24} "
        f"{'||dh_T/dh_0||':>14} {'dW_hh far half':>15} {'power vs exact':>15}  top sigma per gate"
    )
    for row in rows:
        sigmas = " ".join(f"{k}={v:.2f}" for k, v in row["top_singular_values"].items())
        lines.append(
            f"  {row['cell'] + ' ' + row['stage']:<12} {row['mse']:9.4f} "
            f"{row['grad_ratio_h0_to_hT']:24.3e} {row['jacobian_T_to_0']:14.3e} "
            f"{row['far_half_share_of_dW_hh_terms']:15.3f} {row['power_vs_exact_max_rel']:15.1e}  "
            f"{sigmas}"
        )
    line_panels(
        [
            Panel(GRADIENT, DISTANCE, "gradient norm", grads),
            Panel(JACOBIAN + " (h block; LSTM: $c_t$ fixed)", DISTANCE, "spectral norm", jacs),
            Panel(W_HH_TERMS, DISTANCE, "Frobenius norm", terms),
        ],
        os.path.join(out, "gated_adding.png"),
        title=f"{' and '.join(c.upper() for c in cfg['gated'])} on the adding problem "
        f"(T={num_steps}, H={cfg['hidden']}): at init and after {cfg['train_iters']} Adam steps, "
        f"median of {batch} sequences",
    )
    summary["gated"] = dict(
        steps=num_steps, hidden=cfg["hidden"], train_iters=cfg["train_iters"], rows=rows
    )
    return lines, trained_params


# --------------------------------------------------------------------------------------------
# 3. (t, k) heatmap


def term_heatmaps(cfg, out, summary, trained_lstm):
    hidden, num_steps, batch = cfg["hidden"], cfg["heat_steps"], cfg["batch"]
    key_x, key_y = jax.random.split(jax.random.key(11))
    xs = jax.random.normal(key_x, (num_steps, batch, 2), jnp.float64)
    targets = jax.random.normal(key_y, (num_steps, batch, 1), jnp.float64)
    models = {f"tanh, s = {s}": ("elman_tanh", tanh_rnn(hidden, s)) for s in (0.9, 1.5)}
    models["lstm, init"] = ("lstm", to64(jb.init_model(jax.random.key(3), "lstm", 2, hidden, 1)))
    models["lstm, trained (adding)"] = ("lstm", trained_lstm)
    matrices, rows = {}, []
    for name, (cell, params) in models.items():
        flow = term_flow(params, xs, targets, cell=cell, loss=jb.Loss("mse", reduction="sum"))
        matrix = median_over_batch(jnp.linalg.norm(flow.d_hidden, axis=-1))  # (T, T+1)
        matrices[name] = matrix
        last = matrix[-1]
        rows.append(dict(model=name, last_term_h0_over_hT=float(last[0] / last[-1])))
    heatmap_panels(
        matrices,
        os.path.join(out, "term_heatmap.png"),
        xlabel="state k (h_k)",
        ylabel="loss term t (L_t)",
        title=f"$\\|\\partial L_t/\\partial h_k\\|$, per-step MSE, T={num_steps}, H={hidden} "
        "(blank: k > t, exactly zero)",
        origin=(0.0, 1.0),
    )
    summary["heatmap"] = dict(steps=num_steps, rows=rows)
    return [f"||dL_T/dh_0|| / ||dL_T/dh_T|| (T={num_steps}, per-step loss):"] + [
        f"  {row['model']:<22} {row['last_term_h0_over_hT']:.3e}" for row in rows
    ]


def main(argv=None) -> dict:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    parser.add_argument("--out", default=os.path.join("runs", "gradient_flow"))
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a folder")
    jax.config.update("jax_enable_x64", True)
    cfg = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    vers = versions(("jax", "optax", "numpy", "matplotlib"))
    packages = ", ".join(f"{name} {version}" for name, version in vers.items())
    summary = dict(device=device_name(), versions=packages, quick=args.quick, config=cfg)
    lines = [f"device: {summary['device']}", f"versions: {summary['versions']}", ""]
    lines += tanh_sweep(cfg, args.out, summary) + [""]
    gated_lines, trained = gated_runs(cfg, args.out, summary)
    lines += gated_lines + [""]
    lines += term_heatmaps(cfg, args.out, summary, trained["lstm"])
    unrolled_network("lstm", 4, os.path.join(args.out, "unrolled.png"), hidden_size=cfg["hidden"])
    summary["seconds"] = time.perf_counter() - start
    lines.append(f"\ntotal {summary['seconds']:.1f} s; outputs in {args.out}")
    text = "\n".join(lines)
    print(text)
    write_text(os.path.join(args.out, "summary.txt"), text + "\n")
    write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
