"""Cross-checks: manual BPTT against ``jax.grad`` and, on request, central finite differences.

A report has one row per gradient leaf (every parameter, the initial state and the inputs) with
the max absolute error and the relative error ``max|a - b| / max|b|``. Tolerances are keyed by
dtype: float64 agreement of two exact methods is ~1e-15 in practice, so 1e-10 leaves room only for
summation order; finite differences (always float64) carry O(eps^2) truncation error.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jax_bptt.bptt import Gradients, bptt_auto, bptt_manual, model_loss, prepare
from jax_bptt.cells import get_cell
from jax_bptt.model import init_model

TOLERANCE = {jnp.dtype("float64"): 1e-10, jnp.dtype("float32"): 1e-5}
FD_TOLERANCE = 1e-6  # relative, float64, eps = 1e-5


class Row(NamedTuple):
    name: str  # e.g. "params/cell/W_hh", "h0", "xs"
    max_abs: float
    rel: float
    ok: bool


class GradientReport(NamedTuple):
    """Per-leaf comparison of a candidate gradient against a reference."""

    candidate: str
    reference: str
    tolerance: float
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def worst(self) -> Row:
        return max(self.rows, key=lambda row: row.rel)

    def table(self) -> str:
        head = f"{self.candidate} vs {self.reference} (tolerance {self.tolerance:.0e}, relative)"
        lines = [head, f"  {'gradient':<24} {'max abs err':>12} {'rel err':>10}  ok"]
        for row in self.rows:
            lines.append(
                f"  {row.name:<24} {row.max_abs:12.3e} {row.rel:10.3e}  {'yes' if row.ok else 'NO'}"
            )
        return "\n".join(lines)


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def relative_error(candidate, reference, floor: float = 0.0) -> tuple[float, float]:
    """``(max |a - b|, max |a - b| / max(max |b|, floor))``; two zero arrays have error 0."""
    a, b = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: candidate {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(a - b)))
    scale = max(float(np.max(np.abs(b))), floor)
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def compare_gradients(
    candidate: Gradients,
    reference: Gradients,
    *,
    tolerance: float | None = None,
    names: tuple[str, str] = ("manual", "auto"),
    global_scale: bool = False,
) -> GradientReport:
    """Compare two ``Gradients`` leaf by leaf (loss value, params, h0, xs).

    ``global_scale=True`` measures each leaf's error against the largest gradient entry of all
    leaves (at least): right for finite differences, whose error is absolute (~eps^2 and
    ~ulp * L / eps), so a leaf whose gradient has vanished (d h0 after many steps) is not judged
    by a relative error of pure noise.
    """
    if tolerance is None:
        tolerance = TOLERANCE.get(jnp.dtype(candidate.loss.dtype), 1e-5)
    floor = 0.0
    if global_scale:
        grads = (reference.params, reference.h0, reference.xs)
        floor = max(float(np.max(np.abs(leaf))) for leaf in jax.tree_util.tree_leaves(grads))
    rows = []
    flat_c = jax.tree_util.tree_flatten_with_path(candidate._asdict())[0]
    flat_r = jax.tree_util.tree_leaves(reference._asdict())
    for (path, a), b in zip(flat_c, flat_r, strict=True):
        max_abs, rel = relative_error(a, b, floor)
        rows.append(Row(_leaf_name(path), max_abs, rel, rel <= tolerance))
    return GradientReport(names[0], names[1], tolerance, rows)


def finite_difference_gradients(
    params,
    xs,
    targets,
    *,
    cell,
    loss="mse",
    placement="per_step",
    reduction="mean",
    lengths=None,
    h0=None,
    unroll=1,
    eps: float = 1e-5,
) -> Gradients:
    """Central differences ``(f(w + eps) - f(w - eps)) / 2 eps`` for every scalar of params, h0
    and xs, in float64 (x64 must be enabled). For tiny models only: two losses per scalar."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "finite differences need float64: jax.config.update('jax_enable_x64', True)"
        )
    to64 = functools.partial(jax.tree_util.tree_map, lambda a: jnp.asarray(a, jnp.float64))
    static = dict(loss=loss, placement=placement, reduction=reduction)
    cell, batch = prepare(
        to64(params),
        jnp.asarray(xs, jnp.float64),
        targets,
        cell=cell,
        lengths=lengths,
        h0=h0,
        **static,
    )
    flat, unravel = ravel_pytree((to64(params), to64(batch.h0), batch.xs))

    def loss_at(vector):
        p, state0, inputs = unravel(vector)
        return model_loss(
            p, state0, inputs, batch.targets, batch.lengths, cell=cell, unroll=unroll, **static
        )

    basis = jnp.eye(flat.size, dtype=jnp.float64) * eps
    diffs = jax.jit(jax.vmap(lambda e: (loss_at(flat + e) - loss_at(flat - e)) / (2 * eps)))(basis)
    d_params, d_h0, d_xs = unravel(diffs)
    if not batch.batched:
        d_h0 = jax.tree_util.tree_map(lambda a: a[0], d_h0)
        d_xs = d_xs[:, 0]
    return Gradients(loss_at(flat), d_params, d_h0, d_xs)


def check_gradients(params, xs, targets, *, finite_differences: bool = False, **kwargs):
    """Manual BPTT vs ``jax.grad`` (and vs finite differences if asked).

    ``kwargs`` are those of ``bptt_manual`` (``cell``, ``loss``, ``placement``, ``lengths``...).
    Returns a list of ``GradientReport``; each has ``.ok`` and ``.table()``.
    """
    manual = bptt_manual(params, xs, targets, **kwargs)
    reports = [compare_gradients(manual, bptt_auto(params, xs, targets, **kwargs))]
    if finite_differences:
        fd = finite_difference_gradients(params, xs, targets, **kwargs)
        reports.append(
            compare_gradients(
                manual,
                fd,
                tolerance=FD_TOLERANCE,
                names=("manual", "finite diff"),
                global_scale=True,
            )
        )
    return reports


def random_problem(
    key,
    cell,
    loss="mse",
    placement="per_step",
    *,
    steps=12,
    batch=3,
    inputs=4,
    hidden=6,
    outputs=3,
    random_lengths=False,
    random_h0=False,
    dtype=jnp.float32,
):
    """A random model and batch for cross-checks: ``(params, xs, targets, kwargs)``.

    ``kwargs`` (cell, loss, placement, lengths, h0) go straight to ``bptt_manual``/``bptt_auto``.
    Lengths are uniform in ``[0, T]``; a random ``h0`` has N(0, 0.25) entries.
    """
    k_p, k_x, k_y, k_l, k_h = jax.random.split(key, 5)
    params = init_model(k_p, cell, inputs, hidden, outputs, dtype=dtype)
    xs = jax.random.normal(k_x, (steps, batch, inputs), dtype)
    target_shape = (steps, batch) if placement == "per_step" else (batch,)
    if loss == "mse":
        targets = jax.random.normal(k_y, (*target_shape, outputs), dtype)
    else:
        targets = jax.random.randint(k_y, target_shape, 0, outputs)
    lengths = jax.random.randint(k_l, (batch,), 0, steps + 1) if random_lengths else None
    h0 = None
    if random_h0:
        leaves, tree = jax.tree_util.tree_flatten(
            get_cell(cell).zero_state((batch,), hidden, dtype)
        )
        keys = jax.random.split(k_h, len(leaves))
        h0 = jax.tree_util.tree_unflatten(
            tree,
            [0.5 * jax.random.normal(k, a.shape, dtype) for k, a in zip(keys, leaves, strict=True)],
        )
    kwargs = dict(cell=cell, loss=loss, placement=placement, lengths=lengths, h0=h0)
    return params, xs, targets, kwargs
