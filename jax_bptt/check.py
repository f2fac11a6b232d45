"""Cross-checks: manual BPTT against ``jax.grad`` and, on request, central finite differences.

A report has one row per gradient leaf (every parameter of every layer and direction, every
initial state, the inputs) named by its path in ``Gradients``: ``"loss"``,
``"params/layers/0/fwd/W_hh"``, ``"params/readout/W_hy"``, ``"h0/0/fwd"`` (``"h0/0/fwd/1"`` for the
LSTM's ``c``), ``"xs"``. Two measures:

- ``compare_gradients`` (two gradients, e.g. manual vs auto): ``max|a - b| / max|b|`` per leaf.
  Tolerances are keyed by dtype: float64 agreement of two exact methods is ~1e-15 in practice, so
  1e-10 leaves room only for summation order.
- ``compare_directional`` (a gradient vs the loss itself): for a few unit directions ``v`` per
  leaf (the first along the leaf's candidate gradient, the rest random), the central difference
  ``(L(p + eps v) - L(p - eps v)) / (2 eps)`` against ``<grad, v>``, in float64. The error is
  measured against the largest leaf gradient norm (a bound on every ``|<grad, v>|``): a central
  difference's error is absolute (``~eps^2 L'''`` and ``~ulp * L / eps``), so a leaf whose
  gradient has vanished (``d h0`` after many steps) is not judged by a relative error of noise.
  Two losses per direction instead of two per scalar: for the CLI's default LSTM (T=12, B=3,
  D=4, H=6, O=3) 3 directions for each of its 8 leaves cost 48 losses, where the full difference
  quotient (``finite_difference_gradients``) costs 930.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import get_cell, is_token_ids
from jax_bptt.losses import Loss, check_loss
from jax_bptt.model import init_model, prepare, run_scan, stack_loss, unbatch
from jax_bptt.modes import BPTT_MODES, Gradients, bptt
from jax_bptt.validation import check_batch_targets, check_choice, check_positive_int

TOLERANCE = {jnp.dtype("float64"): 1e-10, jnp.dtype("float32"): 1e-5}
FD_TOLERANCE = 1e-6  # of the largest leaf gradient norm, float64, eps = FD_EPS
FD_EPS = 1e-5
FD_DIRECTIONS = 3  # per leaf: along the candidate gradient, then random


class Row(NamedTuple):
    name: str  # e.g. "params/layers/0/fwd/W_hh", "h0/0/fwd", "xs"
    max_abs: float
    rel: float
    ok: bool


class GradientReport(NamedTuple):
    """Per-leaf comparison of a candidate gradient against a reference.

    Attributes:
      candidate, reference: names of the two sides (e.g. ``"manual"``, ``"auto"``).
      tolerance: the largest ``rel`` a row may have.
      rows: one ``Row(name, max_abs, rel, ok)`` per leaf.
      measure: what ``rel`` is relative to (``criterion`` is the tolerance and this, in words).
    """

    candidate: str
    reference: str
    tolerance: float
    rows: list[Row]
    measure: str = "relative per leaf"

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def worst(self) -> Row:
        return max(self.rows, key=lambda row: row.rel)

    @property
    def criterion(self) -> str:
        """The tolerance each row is held to, e.g. ``"1e-10 relative per leaf"``."""
        return f"{self.tolerance:.0e} {self.measure}"

    def table(self) -> str:
        head = f"{self.candidate} vs {self.reference} (tolerance {self.criterion})"
        width = max([24, *(len(row.name) for row in self.rows)])
        lines = [head, f"  {'gradient':<{width}} {'max abs err':>12} {'rel err':>10}  ok"]
        for row in self.rows:
            lines.append(
                f"  {row.name:<{width}} {row.max_abs:12.3e} {row.rel:10.3e}  "
                f"{'yes' if row.ok else 'NO'}"
            )
        return "\n".join(lines)


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


def _named_leaves(tree, fields: tuple[str, ...]) -> tuple[list[str], list, object]:
    """Leaves of a tuple of pytrees in order, named ``field/path`` (``"params/layers/0/fwd/W_hh"``),
    and the tuple's structure."""
    flat, structure = jax.tree_util.tree_flatten_with_path(tuple(tree))
    names = [
        "/".join(
            [fields[path[0].idx], jax.tree_util.keystr(path[1:], simple=True, separator="/")]
        ).rstrip("/")
        for path, _ in flat
    ]
    return names, [leaf for _, leaf in flat], structure


def compare_gradients(
    candidate: Gradients, reference: Gradients, *, tolerance: float | None = None,
    names: tuple[str, str] = ("manual", "auto"), global_scale: bool = False,
) -> GradientReport:  # fmt: skip
    """Compare two ``Gradients`` leaf by leaf (loss value, params, h0, xs).

    Args:
      candidate, reference: ``Gradients`` of the same model and inputs (same pytree structure).
      tolerance: largest relative error a leaf may have; default by the candidate's dtype
        (``TOLERANCE``: 1e-10 for float64, 1e-5 for float32).
      names: the two sides' names in the report.
      global_scale: measure each leaf's error against the largest gradient entry of all leaves
        (at least): right for finite differences, whose error is absolute, so a leaf whose
        gradient has vanished is not judged by a relative error of pure noise.

    Returns:
      A ``GradientReport`` (``.ok``, ``.worst``, ``.table()``).
    """
    if tolerance is None:
        tolerance = TOLERANCE.get(jnp.dtype(candidate.loss.dtype), 1e-5)
    row_names, flat_c, tree_c = _named_leaves(candidate, Gradients._fields)
    _, flat_r, tree_r = _named_leaves(reference, Gradients._fields)
    if tree_c != tree_r:
        raise ValueError(
            f"candidate and reference gradients have different structures:\n{tree_c}\nvs\n{tree_r}"
        )
    floor = 0.0
    if global_scale:
        grads = (reference.params, reference.h0, reference.xs)
        floor = max(
            [float(np.max(np.abs(leaf), initial=0)) for leaf in jax.tree_util.tree_leaves(grads)]
        )
    rows = []
    for name, a, b in zip(row_names, flat_c, flat_r, strict=True):
        max_abs, rel = relative_error(a, b, floor)
        rows.append(Row(name, max_abs, rel, rel <= tolerance))
    measure = "of the largest gradient entry" if global_scale else "relative per leaf"
    return GradientReport(names[0], names[1], tolerance, rows, measure)


# --------------------------------------------------------------------------------------------
# Finite differences (float64)


def _to64(tree):
    """Floating leaves cast to float64; others (integer targets, lengths) unchanged."""

    def cast(a):
        a = jnp.asarray(a)
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(cast, tree)


def _require_x64() -> None:
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "finite differences need float64: jax.config.update('jax_enable_x64', True)"
        )


class _Point(NamedTuple):
    """Where the float64 loss is differentiated: ``(params, h0, xs)`` in the caller's layout
    (``h0`` zeros if not given; ``xs`` None for token ids, which are in ``ids``), and what the
    loss needs besides."""

    point: tuple
    ids: jax.Array | None  # batched token ids (not differentiated), or None
    targets: jax.Array
    lengths: jax.Array | None
    drops: list | None
    static: dict


def _float64_point(
    params, xs, targets, *, cell, loss="mse", lengths=None, h0=None, dropout=0.0, key=None,
    residual=False, options=None,
) -> _Point:  # fmt: skip
    """Validate as ``bptt`` does, in float64; the dropout masks are ``bptt``'s for this key."""
    _require_x64()
    loss = check_loss(loss)
    params, xs = _to64(params), _to64(xs)
    h0 = None if h0 is None else _to64(h0)
    if loss.kind == "mse" and hasattr(targets, "dtype"):  # cast only what validation accepts
        targets = _to64(targets)
    run = prepare(
        params, xs, cell=cell, lengths=lengths, h0=h0, dropout=dropout, key=key,
        residual=residual, options=options,
    )  # fmt: skip
    targets = check_batch_targets(targets, loss, run.shape, run.batch)
    ids = run.batch.xs if is_token_ids(xs) else None
    point = (params, unbatch(run.batch.h0, run.batch.batched), None if ids is not None else xs)
    static = dict(
        cell=run.cell, loss=loss, residual=residual, options=run.options, batched=run.batch.batched
    )
    return _Point(point, ids, targets, run.batch.lengths, run.drops, static)


@functools.partial(jax.jit, static_argnames=("cell", "loss", "residual", "options", "batched"))
def _central_differences(
    point, directions, eps, ids, targets, lengths, drops, *, batched, **static
):
    """``(L(p + eps v) - L(p - eps v)) / (2 eps)`` for each direction ``v`` (pytrees like
    ``point`` with a leading axis), and ``L(p)``."""

    def loss_at(p):
        params, h0, xs = p
        if not batched:
            h0 = jax.tree_util.tree_map(lambda a: a[None], h0)
            xs = None if xs is None else xs[:, None]
        xs = ids if xs is None else xs
        return stack_loss(params, h0, xs, targets, lengths, drops, run=run_scan, **static)

    def quotient(v):
        plus = jax.tree_util.tree_map(lambda a, d: a + eps * d, point, v)
        minus = jax.tree_util.tree_map(lambda a, d: a - eps * d, point, v)
        return (loss_at(plus) - loss_at(minus)) / (2 * eps)

    return jax.vmap(quotient)(directions), loss_at(point)


def _differences(at: _Point, per_leaf: list[np.ndarray], eps: float):
    """``(central differences, L(p))``: for each leaf ``i``, the differences along its directions
    (rows of ``per_leaf[i]``, flattened leaf-sized; zero in every other leaf), all in one call."""
    leaves, tree = jax.tree_util.tree_flatten(at.point)
    ends = np.cumsum([len(dirs) for dirs in per_leaf])
    stacked = []
    for leaf, dirs, end in zip(leaves, per_leaf, ends, strict=True):
        block = np.zeros((ends[-1], *np.shape(leaf)), np.float64)
        block[end - len(dirs) : end] = dirs.reshape(len(dirs), *np.shape(leaf))
        stacked.append(block)
    directions = jax.tree_util.tree_unflatten(tree, stacked)
    diffs, value = _central_differences(
        at.point, directions, eps, at.ids, at.targets, at.lengths, at.drops, **at.static
    )
    return np.split(np.asarray(diffs), ends[:-1]), value


def finite_difference_gradients(params, xs, targets, *, cell, eps: float = FD_EPS, **bptt_kwargs):
    """Central differences ``(L(w + eps) - L(w - eps)) / 2 eps`` for every scalar of params, h0
    and xs, in float64 (x64 must be enabled), as ``Gradients``.

    ``bptt_kwargs`` are ``bptt``'s (``loss``, ``lengths``, ``h0``, ``dropout``, ``key``,
    ``residual``, ``options``); the loss is ``model_loss``'s, with ``bptt``'s dropout masks for
    ``key``. Two losses per scalar: for tiny models (``compare_directional`` checks any size).
    """
    at = _float64_point(params, xs, targets, cell=cell, **bptt_kwargs)
    leaves, tree = jax.tree_util.tree_flatten(at.point)
    diffs, value = _differences(at, [np.eye(np.size(leaf)) for leaf in leaves], eps)
    grads = [d.reshape(np.shape(leaf)) for d, leaf in zip(diffs, leaves, strict=True)]
    return Gradients(value, *jax.tree_util.tree_unflatten(tree, grads))


def compare_directional(
    candidate: Gradients, params, xs, targets, *, cell, num_directions: int = FD_DIRECTIONS,
    eps: float = FD_EPS, seed: int = 0, tolerance: float = FD_TOLERANCE, name: str = "manual",
    **bptt_kwargs,
) -> GradientReport:  # fmt: skip
    """Check ``candidate`` (float64 ``Gradients`` of the model at these inputs) against central
    differences of the loss along ``num_directions`` unit directions per leaf.

    For each leaf, the first direction is the leaf's candidate gradient (normalised; a wrong
    scale shows at full strength), the others are random (``seed``). A row's error is
    ``max_v |<grad, v> - (L(p + eps v) - L(p - eps v)) / (2 eps)|`` divided by the largest leaf
    gradient norm ``max_leaf ||grad_leaf||_2``; the loss row is relative to ``|L|``. The loss is
    ``model_loss``'s in float64 (with ``bptt``'s dropout masks for ``key``).

    Args:
      candidate: ``bptt(...)`` of the float64 model (the layout of ``params``, ``h0``, ``xs``).
      params, xs, targets, cell, bptt_kwargs: the problem, as given to ``bptt``.
      num_directions: directions per leaf (>= 1).
      eps: the step.
      tolerance: the largest error a row may have.

    Returns:
      A ``GradientReport`` with one row per leaf, like ``compare_gradients``'s.
    """
    num_directions = check_positive_int("num_directions", num_directions)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    at = _float64_point(params, xs, targets, cell=cell, **bptt_kwargs)
    grad_point = (candidate.params, candidate.h0, candidate.xs)
    leaves, tree = jax.tree_util.tree_flatten(at.point)
    grad_leaves = jax.tree_util.tree_leaves(grad_point)
    if jax.tree_util.tree_structure(grad_point) != tree or any(
        np.shape(g) != np.shape(a) for g, a in zip(grad_leaves, leaves, strict=True)
    ):
        raise ValueError("candidate must be the Gradients of this problem (its params, h0, xs)")
    grad_leaves = [np.asarray(g, np.float64).ravel() for g in grad_leaves]
    rng = np.random.default_rng(seed)
    per_leaf = []
    for g in grad_leaves:
        dirs = rng.standard_normal((num_directions, g.size))
        if np.any(g):
            dirs[0] = g
        norms = np.linalg.norm(dirs, axis=1, keepdims=True)  # zero for an empty leaf
        per_leaf.append(dirs / np.where(norms > 0, norms, 1.0))
    diffs, value = _differences(at, per_leaf, eps)
    scale = max(float(np.linalg.norm(g)) for g in grad_leaves)
    names = _named_leaves(grad_point, Gradients._fields[1:])[0]
    max_abs, rel = relative_error(candidate.loss, value)
    rows = [Row("loss", max_abs, rel, rel <= tolerance)]
    for row_name, g, dirs, fd in zip(names, grad_leaves, per_leaf, diffs, strict=True):
        err = float(np.max(np.abs(dirs @ g - fd))) if g.size else 0.0
        rel = err / scale if scale > 0 else err
        rows.append(Row(row_name, err, rel, rel <= tolerance))
    measure = (
        f"of the largest gradient norm ({num_directions} directions per leaf, eps {eps:.0e}, "
        "float64)"
    )
    return GradientReport(name, "finite diff", tolerance, rows, measure)


def check_gradients(
    params, xs, targets, *, cell, finite_differences: bool = False,
    modes: tuple[str, ...] = ("manual",), num_directions: int = FD_DIRECTIONS, eps: float = FD_EPS,
    seed: int = 0, **bptt_kwargs,
) -> list[GradientReport]:  # fmt: skip
    """Each of ``modes`` against ``bptt(mode="auto")`` (``jax.grad``), and the first of them
    against finite differences if asked.

    Args:
      params, xs, targets, cell: the problem, any depth and direction (as for ``bptt``).
      finite_differences: also ``compare_directional`` (float64: x64 must be enabled; a
        float32 model is checked by its float64 copy, so the check measures the method, not
        float32 rounding).
      modes: the ``BPTT_MODES`` to check against ``"auto"``.
      num_directions, eps, seed: of the finite differences (``compare_directional``).
      bptt_kwargs: ``bptt``'s keywords (``loss``, ``lengths``, ``h0``, ``dropout``, ``key``,
        ``residual``, ``options``).

    Returns:
      A list of ``GradientReport`` (one per mode, then the finite differences); each has
      ``.ok``, ``.worst`` and ``.table()``.
    """
    if isinstance(modes, str) or not modes:
        raise ValueError(f"modes must be a non-empty tuple of {BPTT_MODES}, got {modes!r}")
    for mode in modes:
        check_choice("mode", mode, BPTT_MODES)
    if finite_differences:
        _require_x64()
    auto = bptt(params, xs, targets, cell=cell, mode="auto", **bptt_kwargs)
    grads = [bptt(params, xs, targets, cell=cell, mode=mode, **bptt_kwargs) for mode in modes]
    reports = [
        compare_gradients(g, auto, names=(mode, "auto"))
        for mode, g in zip(modes, grads, strict=True)
    ]
    if finite_differences:
        first = grads[0]
        kw64 = {**bptt_kwargs, "h0": _to64(bptt_kwargs.get("h0"))}  # None stays None
        if jnp.dtype(first.loss.dtype) != jnp.float64:
            first = bptt(_to64(params), _to64(xs), _to64(targets), cell=cell, mode=modes[0], **kw64)
        reports.append(compare_directional(
            first, params, xs, targets, cell=cell, num_directions=num_directions, eps=eps,
            seed=seed, name=modes[0], **kw64,
        ))  # fmt: skip
    return reports


# --------------------------------------------------------------------------------------------
# Random problems


def random_problem(
    key, cell, loss: Loss | str = "mse", *, steps: int = 12, batch: int = 3, inputs: int = 4,
    hidden: int = 6, outputs: int = 3, num_layers: int = 1, bidirectional: bool = False,
    residual=False, dropout: float = 0.0, random_lengths: bool = False, random_h0: bool = False,
    token_ids: bool = False, dtype=jnp.float32,
):  # fmt: skip
    """A random model and batch for cross-checks: ``(params, xs, targets, kwargs)``.

    Args:
      key: PRNG key of everything: the params (``init_model``'s layout; every leaf uniform as
        PyTorch's default), the data, lengths and h0 (all NumPy, seeded by the key) and the
        dropout masks.
      cell: a name in ``CELLS`` or a ``Cell``.
      loss: a ``Loss`` or a kind (its placement decides the targets' shape).
      steps, batch, inputs, hidden, outputs: T, B, D, H, O.
      num_layers, bidirectional: the stack (``init_model``).
      residual: ``False``, ``True`` (needs ``inputs == hidden * directions``) or
        ``"except_first"``.
      dropout: between layers; ``kwargs`` then carries a dropout ``key``.
      random_lengths: lengths uniform in ``[0, T]`` (else None).
      random_h0: every initial state N(0, 0.25) (else None: zeros).
      token_ids: ``xs`` integer ids ``(T, B)`` in ``[0, inputs)`` (else N(0, 1) floats).

    Returns:
      ``kwargs`` (``cell``, ``loss``, ``lengths``, ``h0``, ``residual``, and ``dropout`` and
      ``key`` when ``dropout > 0``) go straight to ``bptt`` and ``check_gradients``.
    """
    loss = check_loss(loss)
    k_data, k_drop = jax.random.split(key)
    # Everything from NumPy, seeded by the key: no small JAX program to compile per shape (the
    # CLI builds 68 problems). The params have init_model's layout (traced, not run) and, for the
    # built-in cells, its distribution: U(-1/sqrt(fan), 1/sqrt(fan)) for every leaf, fan = H for
    # the cells and dirs * H for the readout.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_data)))
    shapes = jax.eval_shape(
        functools.partial(
            init_model, cell=cell, input_size=inputs, hidden_size=hidden, output_size=outputs,
            num_layers=num_layers, bidirectional=bidirectional, dtype=dtype,
        ),
        jax.random.key(0),
    )  # fmt: skip

    def uniform(leaf, fan):
        bound = 1.0 / np.sqrt(fan)
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

    fan_readout = shapes["readout"]["W_hy"].shape[0]
    params = {  # drawn in the leaves' order (eval_shape's dicts have sorted keys)
        "layers": jax.tree.map(lambda v: uniform(v, hidden), shapes["layers"]),
        "readout": jax.tree.map(lambda v: uniform(v, fan_readout), shapes["readout"]),
    }
    if token_ids:
        xs = jnp.asarray(rng.integers(0, inputs, (steps, batch)), jnp.int32)
    else:
        xs = jnp.asarray(rng.standard_normal((steps, batch, inputs)), dtype)
    target_shape = (steps, batch) if loss.placement == "per_step" else (batch,)
    if loss.kind == "mse":
        targets = jnp.asarray(rng.standard_normal((*target_shape, outputs)), dtype)
    else:
        targets = jnp.asarray(rng.integers(0, outputs, target_shape), jnp.int32)
    lengths = jnp.asarray(rng.integers(0, steps + 1, batch), jnp.int32) if random_lengths else None
    h0 = None
    if random_h0:
        zero = get_cell(cell).zero_state((batch,), hidden, dtype)
        directions = ("fwd", "bwd") if bidirectional else ("fwd",)

        def random_state(a):
            return jnp.asarray(0.5 * rng.standard_normal(a.shape), dtype)

        h0 = [
            {name: jax.tree_util.tree_map(random_state, zero) for name in directions}
            for _ in range(num_layers)
        ]
    kwargs = dict(cell=cell, loss=loss, lengths=lengths, h0=h0, residual=residual)
    if dropout:
        kwargs.update(dropout=dropout, key=k_drop)
    return params, xs, targets, kwargs
