"""Pictures of BPTT: the unrolled network, and plotting helpers for the diagnostics.

matplotlib is an optional dependency (``pip install jax_bptt[experiments]``); it is imported only
when a figure is drawn, with the non-interactive Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from jax_bptt.cells import get_cell
from jax_bptt.validation import check_positive_int

FORWARD_COLOR = "black"
BACKWARD_COLOR = "tab:red"
WEIGHT_COLORS = {"W_xh": "tab:blue", "W_hh": "tab:green", "W_hy": "tab:purple"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_path(path) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# The unrolled network


def _state_label(cell, t) -> str:
    """``h_t`` or ``h_t, c_t``: the state's leaves, read off the cell's ``zero_state``."""
    num_leaves = len(jax.tree_util.tree_leaves(cell.zero_state((), 1, np.float32)))
    names = ["h", "c", "m", "n"][:num_leaves]
    return "$" + ",\\,".join(f"{n}_{{{t}}}" for n in names) + "$"


def unrolled_network(
    cell, num_steps: int, path, *, input_size: int = 2, hidden_size: int = 16, output_size: int = 1
) -> str:
    """Draw ``cell`` unrolled for ``num_steps`` steps and save it as a PNG at ``path``.

    Nodes: inputs ``x_t``, states ``h_t`` (``h_t, c_t`` for the LSTM), outputs ``y_t`` and loss
    terms ``L_t``. Solid arrows are the forward pass, labelled with the shared weights (the same
    three matrices at every step); dashed red arrows the backward pass: ``dL_t/dy_t`` into the
    readout, the delta carried from ``h_t`` back to ``h_{t-1}`` through ``W_hh^T``, and
    ``dL/dx_t``. The parameter shapes come from the cell's own ``init``. Returns ``path``.
    """
    cell = get_cell(cell)
    num_steps = check_positive_int("num_steps", num_steps)
    if num_steps > 8:
        raise ValueError(f"num_steps must be <= 8 for a readable picture, got {num_steps}")
    input_size = check_positive_int("input_size", input_size)
    hidden_size = check_positive_int("hidden_size", hidden_size)
    output_size = check_positive_int("output_size", output_size)
    path = _check_path(path)
    # The cell's parameter shapes, from its own init (traced only, nothing computed).
    shapes = jax.eval_shape(lambda key: cell.init(key, input_size, hidden_size), jax.random.key(0))
    shapes = {name: tuple(leaf.shape) for name, leaf in shapes.items()}
    shapes.update(W_hy=(hidden_size, output_size), b_y=(output_size,))

    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch

    dx, rows = 2.6, {"x": 0.0, "h": 2.0, "y": 4.0, "L": 5.6}
    width = dx * (num_steps + 1) + 0.6
    fig, ax = plt.subplots(figsize=(1.55 * (num_steps + 1) + 1.2, 5.3), dpi=100)
    ax.set_xlim(-1.3, width - 0.7)
    ax.set_ylim(-1.35, 6.7)
    ax.axis("off")

    def node(x, y, text, face, w=1.1, h=0.62):
        style = "round,pad=0.04,rounding_size=0.15"
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=face,
                                    edgecolor="0.25", linewidth=1.0, zorder=3))  # fmt: skip
        ax.text(x, y, text, ha="center", va="center", fontsize=11, zorder=4)

    def arrow(start, end, color, dashed=False, label=None, offset=(0.0, 0.0)):
        """An arrow between box edges (the caller gives edge points), label at its middle."""
        line = (0, (4, 3)) if dashed else "-"
        props = dict(arrowstyle="-|>", color=color, lw=1.3, linestyle=line, shrinkA=1, shrinkB=1,
                     mutation_scale=12)  # fmt: skip
        ax.annotate("", xy=end, xytext=start, arrowprops=props, zorder=2)
        if label:
            lx = (start[0] + end[0]) / 2 + offset[0]
            ly = (start[1] + end[1]) / 2 + offset[1]
            ax.text(lx, ly, label, color=color, fontsize=9, ha="center", va="center", zorder=5)

    box_h, loss_h = 0.62, 0.55
    state_w = 1.5 if "c" in _state_label(cell, 0) else 1.1
    top = {name: y + box_h / 2 for name, y in rows.items()}
    bottom = {name: y - box_h / 2 for name, y in rows.items()}
    bottom["L"] = rows["L"] - loss_h / 2
    node(0.0, rows["h"], _state_label(cell, 0), "0.92", w=state_w)
    ax.text(0.0, rows["h"] - 0.65, "initial state", ha="center", va="top", fontsize=8, color="0.4")
    for t in range(1, num_steps + 1):
        x = dx * t
        left, right = x - 0.18, x + 0.18
        node(x, rows["x"], f"$x_{{{t}}}$", "#dbe9f6")
        node(x, rows["h"], _state_label(cell, t), "#e2f2e0", w=state_w)
        node(x, rows["y"], f"$y_{{{t}}}$", "#ece2f4")
        node(x, rows["L"], f"$L_{{{t}}}$", "#fbe3d6", w=0.9, h=loss_h)
        # Forward (solid), one column per step; the weights on the arrows are the same arrays.
        arrow((left, top["x"]), (left, bottom["h"]), WEIGHT_COLORS["W_xh"],
              label="$W_{xh}$", offset=(-0.42, 0))  # fmt: skip
        arrow((left, top["h"]), (left, bottom["y"]), WEIGHT_COLORS["W_hy"],
              label="$W_{hy}$", offset=(-0.42, 0))  # fmt: skip
        arrow((left, top["y"]), (left, bottom["L"]), FORWARD_COLOR)
        h_from, h_to = x - dx + state_w / 2, x - state_w / 2
        arrow((h_from, rows["h"] + 0.12), (h_to, rows["h"] + 0.12), WEIGHT_COLORS["W_hh"],
              label="$W_{hh}$", offset=(0, 0.28))  # fmt: skip
        # Backward (dashed): the adjoints, flowing against the forward arrows.
        arrow((right, bottom["L"]), (right, top["y"]), BACKWARD_COLOR, True,
              label=f"$\\partial L_{{{t}}}/\\partial y_{{{t}}}$", offset=(0.62, 0))  # fmt: skip
        arrow((right, bottom["y"]), (right, top["h"]), BACKWARD_COLOR, True,
              label="$W_{hy}^{\\top}$", offset=(0.4, 0))  # fmt: skip
        arrow((right, bottom["h"]), (right, top["x"]), BACKWARD_COLOR, True,
              label=f"$\\partial L/\\partial x_{{{t}}}$", offset=(0.55, -0.1))  # fmt: skip
        arrow((h_to, rows["h"] - 0.14), (h_from, rows["h"] - 0.14), BACKWARD_COLOR, True,
              label=f"$\\delta_{{{t}}} W_{{hh}}^{{\\top}}$", offset=(0, -0.3))  # fmt: skip

    gates = f", {cell.num_gates} gate blocks" if cell.num_gates > 1 else ""
    sizes = f"D={input_size}, H={hidden_size}, O={output_size}{gates}"
    ax.set_title(f"{cell.name} unrolled for {num_steps} steps ({sizes})", fontsize=12)
    shape_text = ",  ".join(
        f"{name} {'x'.join(map(str, shape))}" for name, shape in sorted(shapes.items())
    )
    legend = (
        f"shared at every step:  {shape_text}\n"
        "solid: forward $h_t = f(x_t W_{xh} + b_h,\\ h_{t-1} W_{hh})$;   dashed red: backward, "
        "$\\delta_t = \\partial L / \\partial (h_{t-1} W_{hh})$,   "
        "$dW_{hh} = \\sum_t h_{t-1}^{\\top} \\delta_t$"
    )
    ax.text(width / 2 - 1.0, -0.95, legend, ha="center", va="center", fontsize=8.5, color="0.2")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Plotting helpers


class Panel(NamedTuple):
    """One subplot of lines: ``curves`` maps a label to ``(x, y)``."""

    title: str
    xlabel: str
    ylabel: str
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]
    logy: bool = True
    reference: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None  # dotted


def line_panels(panels: Sequence[Panel], path, *, title: str | None = None) -> str:
    """Save side-by-side line plots (log y by default) as a PNG; returns ``path``."""
    if not panels:
        raise ValueError("panels must hold at least one Panel")
    path = _check_path(path)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels, strict=True):
        for label, (x, y) in panel.curves.items():
            y = np.asarray(y, np.float64)
            if panel.logy:  # exact zeros (e.g. a term with h_0 = 0) have no place on a log axis
                y = np.where(y > 0, y, np.nan)
            ax.plot(np.asarray(x), y, label=label, lw=1.6)
        for label, (x, y) in (panel.reference or {}).items():
            ax.plot(np.asarray(x), np.asarray(y), ":", color="0.4", lw=1.2, label=label)
        if panel.logy:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap_panels(
    matrices: Mapping[str, np.ndarray], path, *, xlabel: str, ylabel: str, title: str | None = None,
    floor: float = 1e-12, origin: tuple[float, float] = (0.0, 0.0),
) -> str:  # fmt: skip
    """Save side-by-side heatmaps on a shared log colour scale; returns ``path``.

    Entries at or below ``floor`` (e.g. the exact zeros of a causal structure) are left blank.
    ``origin``: the (x, y) axis values of entry ``[0, 0]`` (row index is y, column index x).
    """
    if not matrices:
        raise ValueError("matrices must hold at least one matrix")
    path = _check_path(path)
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    values = {name: np.asarray(m, np.float64) for name, m in matrices.items()}
    positive = np.concatenate([m[m > floor] for m in values.values()] or [np.ones(1)])
    norm = LogNorm(vmin=max(positive.min(), floor), vmax=positive.max())
    fig, axes = plt.subplots(1, len(values), figsize=(4.8 * len(values) + 0.8, 4.2), dpi=100)
    axes = np.atleast_1d(axes)
    image = None
    for ax, (name, m) in zip(axes, values.items(), strict=True):
        x0, y0 = origin[0] - 0.5, origin[1] - 0.5
        extent = (x0, x0 + m.shape[1], y0, y0 + m.shape[0])
        image = ax.imshow(
            np.ma.masked_less_equal(m, floor), origin="lower", norm=norm, cmap="viridis",
            aspect="auto", interpolation="nearest", extent=extent,
        )  # fmt: skip
        ax.set_title(name, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=list(axes), shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
