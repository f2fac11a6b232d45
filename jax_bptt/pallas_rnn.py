"""Fused recurrent kernels in Pallas: all T steps in one launch, ``W_hh`` resident per program.

On a GPU with a small hidden size each time step is tiny and the cost is the loop itself: XLA runs
``lax.scan`` as a while loop that launches kernels every step. These kernels instead run the whole
forward recurrence (and the whole backward delta recurrence) in one launch: the grid is over batch
blocks, each program loads ``W_hh`` once and keeps it on chip while a ``fori_loop`` walks the T
steps. The input projection ``x @ W_xh`` and the weight-gradient GEMMs stay outside (one big GEMM
each, see ``jax_bptt.scan.cell_grads``).

The two entry points have the signatures of the XLA versions (plus a keyword ``options``,
``PallasOptions``), so they plug in as a backend:

    pallas_scan_states(cell, params, xp, h0, mask=None, reverse=False, unroll=1)
        == jax_bptt.scan.scan_states            -> (final_state, (states, saved))
    pallas_backward_deltas(cell, params, h0, mask, states, saved, d_hs, d_final, *,
                           reverse=False, unroll=1)
        == jax_bptt.scan.backward_deltas        -> Deltas

Only the loop, the loads/stores and the ``h @ W_hh`` / ``d_hp @ W_hh^T`` dots are kernel code; the
pointwise math is each cell's own ``cell.forward`` / ``cell.backward``. Pallas' Triton lowering
cannot split or concatenate along the gate axis (nor hold a ``(b, 3h)`` GRU tile: tile sizes must
be powers of 2), so the kernel keeps every ``(b, G*H)`` value as G separate ``(b, H)`` tiles and
evaluates the cell's functions on those tiles (``_gatewise``): the cell's jaxpr is replayed with
``split``/``concatenate`` on the gate axis turned into tile lists and elementwise ops applied per
tile. Loads and stores address each gate's columns directly, so nothing is copied to regroup.

Hidden-size plan. A program holds ``W_hh`` (``H * G*H`` elements) on chip for all T steps, which
must fit one SM's shared memory (227 KiB per block on an H100). ``on_chip_bytes`` estimates what
a program holds and ``fits_on_chip`` compares it with ``ON_CHIP_BUDGET_BYTES``; the only
calibration so far is one H100 observation (Elman fp32: H=128 compiled and ran, H=256 exceeded
shared memory). Beyond the budget ``preferred_backend`` answers ``"xla"`` (the XLA fast path); the
storage of ``W_hh`` in bfloat16 with float32 accumulation (``make_pallas_backend(weight_dtype=
jnp.bfloat16)``) halves the resident bytes at the cost of bf16 rounding of ``h`` and ``W_hh``.

Everything here runs on CPU in Pallas interpret mode (``interpret=True``, the default off GPU),
which is how the tests check it; they also lower both kernels for the cuda platform on CPU, which
runs Pallas' whole Triton lowering (not the PTX compile, so shared-memory and register limits are
only seen on a GPU). On a GPU the kernels go through Triton (``compiler_params`` selects it: the
default Mosaic GPU lowering has no rules for these dots). GPU timings are not measured yet (see
``preferred_backend`` and ``experiments/bench_pallas.py``).

As the ``"pallas"`` backend of the fast path: ``jax_bptt.backends`` imports this module the
first time ``get_backend("pallas")`` is called and builds the ``Backend`` from
``make_pallas_backend(with_d_states=False)`` (``d_states``, per-step ``dL/d state`` for
diagnostics, is not needed for gradients); ``ScanOptions(backend="auto")`` asks
``preferred_backend``. Any model call then runs the kernels::

    options = ScanOptions(backend="pallas")
    bptt(params, xs, targets, cell="lstm", mode="fast", options=options)
    unroll(params, xs, cell="lstm", mode="checkpointed", options=options)

Known costs outside the loop: a batch that is not a multiple of ``batch_block`` is padded (a
copy of every ``(t b ...)`` operand), and the backward materialises ``state_{t-1}`` with
``previous_states`` as the XLA version does.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.extend import core as jex_core

from jax_bptt.cells import Cell
from jax_bptt.scan import Deltas, backward_deltas, previous_states, scan_states, select

# H100: 227 KiB of shared memory per thread block (228 KiB per SM). Uncalibrated beyond the
# Elman fp32 H=128 (fits) / H=256 (does not) observation; re-measure on the target GPU.
ON_CHIP_BUDGET_BYTES = 227 * 1024

# Params that only feed the hoisted input projection; everything else reaches the kernel.
_PROJECTION_PARAMS = ("W_xh", "b_h")


class PallasOptions(NamedTuple):
    """Kernel settings.

    Attributes:
      batch_block: rows per program (the grid is ``ceil(B / batch_block)``); the batch is padded
        to a multiple. Triton needs a power of 2 and at least 16 (the smallest ``tl.dot`` tile).
      interpret: run in Pallas interpret mode; None means "when the default backend is not GPU".
      precision: of the in-kernel dots; ``HIGHEST`` is IEEE float32 (Triton's default for float32
        is TF32, which rounds the inputs to 10 mantissa bits).
      weight_dtype: store ``W_hh`` in this dtype (e.g. ``jnp.bfloat16``) and cast ``h`` to it
        before each dot, accumulating in float32; None keeps the params' dtype.
      num_warps, num_stages: Triton compiler parameters.
      with_d_states: also write ``Deltas.d_states`` (``dL/d state_t`` per step, which
        ``jax_bptt.diagnostics`` reads); False saves ``T x B x H`` stores per state leaf where
        only the gradients are wanted (``jax_bptt.fast`` reads d_h0, d_xp, d_hp, h_prev only) and
        leaves ``d_states`` None.
    """

    batch_block: int = 16
    interpret: bool | None = None
    precision: Any = lax.Precision.HIGHEST
    weight_dtype: Any = None
    num_warps: int = 4
    num_stages: int = 1
    with_d_states: bool = True


DEFAULT_OPTIONS = PallasOptions()


# --------------------------------------------------------------------------------------------
# Planning: does a kernel apply here?


def pallas_available() -> bool:
    """True when the kernels can be compiled natively (default backend GPU with Pallas Triton)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def on_chip_bytes(hidden_size: int, num_gates: int, dtype, batch_block: int, weight_dtype=None):
    """Estimated bytes one program keeps on chip: the resident ``W_hh`` (``H x G*H``) plus the
    step's working tiles (gate pre-activations and their adjoints ``2 x (bb, G*H)`` in the float32
    accumulator, state and hidden tiles ``4 x (bb, H)``)."""
    item = jnp.dtype(dtype).itemsize
    weight_item = jnp.dtype(weight_dtype or dtype).itemsize
    acc_item = max(4, item)
    gate_width = num_gates * hidden_size
    weights = hidden_size * gate_width * weight_item
    working = 2 * batch_block * gate_width * acc_item + 4 * batch_block * hidden_size * item
    return weights + working


def fits_on_chip(
    hidden_size: int,
    num_gates: int,
    dtype,
    batch_block: int = 16,
    *,
    weight_dtype=None,
    budget_bytes: int = ON_CHIP_BUDGET_BYTES,
) -> bool:
    """Whether ``on_chip_bytes`` is within one block's shared memory (the documented fallback
    beyond it is the XLA path: ``preferred_backend`` returns ``"xla"``).

    Example: Elman fp32 at H=128 fits (112 KiB), at H=256 it does not (~384 KiB); LSTM fp32
    fits up to H=64, and H=128 with bfloat16 weights (224 KiB) just does.
    """
    return on_chip_bytes(hidden_size, num_gates, dtype, batch_block, weight_dtype) <= budget_bytes


def preferred_backend(
    batch_size: int, hidden_size: int, num_steps: int, cell: Cell, dtype, *, batch_block: int = 16
) -> str:
    """``"pallas"`` or ``"xla"`` for one recurrence: what ``ScanOptions(backend="auto")``
    resolves to (``jax_bptt.backends.resolve_options``).

    ``"xla"`` on CPU/TPU (no native kernel), for float64 (no fast fp64 tensor-core path), for
    hidden sizes Triton cannot tile (not a power of 2, or below 16), for ``num_steps == 0`` and
    where ``fits_on_chip`` fails. Otherwise ``"pallas"``. The GPU crossover (the (B, H, T) below
    which the fused kernel beats the XLA fast path) is UNMEASURED: the only data point is one
    H100 fp32 forward at (B, H, T) = (256, 128, 256), where a naive fused kernel took ~0.68 ms
    against ~1.2 ms for ``lax.scan`` with unroll 16 (cuDNN ~0.4 ms). ``batch_size`` is accepted
    for the calibrated rule to come.
    """
    del batch_size
    if not pallas_available() or num_steps == 0:
        return "xla"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return "xla"
    if hidden_size < 16 or hidden_size & (hidden_size - 1):
        return "xla"
    if not fits_on_chip(hidden_size, cell.num_gates, dtype, batch_block):
        return "xla"
    return "pallas"


# --------------------------------------------------------------------------------------------
# Gate-wise evaluation of a cell's pointwise functions


class _Gates:
    """A ``(..., G*H)`` value held as G ``(..., H)`` tiles (a pytree leaf on purpose)."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    @property
    def shape(self):
        first = self.parts[0]
        return (*first.shape[:-1], first.shape[-1] * len(self.parts))

    @property
    def dtype(self):
        return self.parts[0].dtype


# Primitives that act elementwise (rank-0 operands broadcast), so they apply tile by tile.
_ELEMENTWISE = frozenset(
    "abs add and convert_element_type copy copy_p cos div eq erf exp exp2 expm1 ge gt integer_pow "
    "le log log1p logistic lt max min mul ne neg not or pow reduce_precision rsqrt select_n sign "
    "sin sqrt square sub tan tanh".split()
)


def _bind(eqn, invals):
    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return outs if eqn.primitive.multiple_results else [outs]


# Call-like primitives whose body is inlined (jit-wrapped jnp functions, relu's custom_jvp), so
# that a gate-axis split/concatenate inside them is seen.
_INLINED_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call"})


def _eval_eqn(eqn, invals, num_gates):
    name = eqn.primitive.name
    has_gates = any(isinstance(x, _Gates) for x in invals)
    last_axis = len(eqn.invars[0].aval.shape) - 1
    if name == "split" and eqn.params["axis"] == last_axis and has_gates:
        if len(eqn.params["sizes"]) == num_gates:
            return list(invals[0].parts)
    if name == "concatenate" and eqn.params["dimension"] == last_axis and not has_gates:
        if len(invals) == num_gates and len({v.aval.shape for v in eqn.invars}) == 1:
            return [_Gates(invals)]
    if name in _INLINED_CALLS:
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        return _eval_gatewise(sub.jaxpr, sub.consts, invals, num_gates)
    if not has_gates:
        return _bind(eqn, invals)
    if name in _ELEMENTWISE and all(
        isinstance(x, _Gates) or var.aval.shape == ()
        for var, x in zip(eqn.invars, invals, strict=True)
    ):
        per_gate = [
            _bind(eqn, [x.parts[g] if isinstance(x, _Gates) else x for x in invals])
            for g in range(num_gates)
        ]
        return [_Gates(outs) for outs in zip(*per_gate, strict=True)]
    raise NotImplementedError(
        f"the kernel cannot evaluate {name!r} on a (b, G*H) value gate by gate; "
        "use the XLA path (ScanOptions(backend='xla')) for this cell"
    )


def _eval_gatewise(jaxpr, consts, args, num_gates):
    """Evaluate ``jaxpr`` where ``(b, G*H)`` values are ``_Gates`` (a small ``eval_jaxpr``)."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(v) for v in eqn.invars], num_gates)
        for var, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex_core.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _gatewise(fn, num_gates: int):
    """``fn`` on pytrees whose ``(b, G*H)`` leaves are ``_Gates``; outputs likewise."""
    if num_gates == 1:
        return fn

    def run(*args):
        flat, tree = jax.tree_util.tree_flatten(args)
        avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
        closed, out_shape = jax.make_jaxpr(
            lambda *leaves: fn(*jax.tree_util.tree_unflatten(tree, leaves)), return_shape=True
        )(*avals)
        outs = _eval_gatewise(closed.jaxpr, closed.consts, flat, num_gates)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return run


# --------------------------------------------------------------------------------------------
# Kernel pieces shared by the forward and the backward


class _Layout(NamedTuple):
    hidden_size: int
    num_gates: int
    batch_block: int
    padded_batch: int


def _check_stack(name: str, x, width: int, what: str, mask):
    """``(T, B)`` of the ``(T, B, width)`` operand ``x``, after checking it and ``mask``."""
    if x.ndim != 3 or x.shape[2] != width:
        raise ValueError(
            f"{name} must have shape (T, B, {what}) with {what} = {width} from W_hh, got {x.shape}"
        )
    num_steps, batch, _ = x.shape
    if mask is not None and tuple(mask.shape) != (num_steps, batch):
        raise ValueError(f"mask must have shape (T, B) = {(num_steps, batch)}, got {mask.shape}")
    return num_steps, batch


def _layout(batch: int, params, cell: Cell, options) -> _Layout:
    block = options.batch_block
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"batch_block must be a positive int, got {block!r}")
    padded = -(-batch // block) * block
    return _Layout(params["W_hh"].shape[0], cell.num_gates, block, padded)


def _with_batch(shape, axis: int, size: int) -> tuple:
    return (*shape[:axis], size, *shape[axis + 1 :])


def _batch_spec(shape, axis: int):
    """Block over rows ``[i*bb, (i+1)*bb)`` of the batch axis, whole along every other axis."""
    return pl.BlockSpec(shape, lambda i: (0,) * axis + (i,) + (0,) * (len(shape) - axis - 1))


def _batch_input(a, lay: _Layout, time_major: bool):
    """``(input, BlockSpec)`` of an operand with its batch at axis 1 (``time_major``) or 0; the
    input is ``a`` with zero rows appended up to ``lay.padded_batch``."""
    axis = int(time_major)
    spec = _batch_spec(_with_batch(a.shape, axis, lay.batch_block), axis)
    if a.shape[axis] == lay.padded_batch:
        return a, spec
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, lay.padded_batch - a.shape[axis])
    return jnp.pad(a, widths), spec


def _batch_output(shape, dtype, lay: _Layout, time_major: bool):
    """``(ShapeDtypeStruct, BlockSpec)`` of an output with its batch at axis 1 or 0."""
    axis = int(time_major)
    full, block = (_with_batch(shape, axis, n) for n in (lay.padded_batch, lay.batch_block))
    return jax.ShapeDtypeStruct(full, dtype), _batch_spec(block, axis)


def _resident(params, options: PallasOptions):
    """``([W_hh, *other kernel params], their names)``: what each program loads once; ``W_hh``
    in ``options.weight_dtype`` if set. The projection params stay outside."""
    names = sorted(k for k in params if k not in (*_PROJECTION_PARAMS, "W_hh"))
    w_hh = params["W_hh"]
    if options.weight_dtype is not None:
        w_hh = w_hh.astype(options.weight_dtype)
    arrays = [w_hh, *(params[k] for k in names)]
    return [(a, pl.BlockSpec(a.shape, _whole_index(a.ndim))) for a in arrays], names


def _whole_index(ndim: int):
    return lambda i: (0,) * ndim


def _load_resident(refs, names, lay: _Layout):
    """``W_hh`` as G ``(H, H)`` tiles (loaded once per program and kept for all steps) and the
    cell's other params as a dict."""
    h = lay.hidden_size
    w_tiles = [refs[0][:, pl.ds(g * h, h)] for g in range(lay.num_gates)]
    return w_tiles, dict(zip(names, _read_all(refs[1:]), strict=True))


def _load_step(ref, t, lay: _Layout):
    """Row block of step ``t``; a ``G*H``-wide row comes back as G per-gate tiles."""
    width = ref.shape[-1]
    if lay.num_gates > 1 and width == lay.num_gates * lay.hidden_size:
        h = lay.hidden_size
        return _Gates(ref[t, :, pl.ds(g * h, h)] for g in range(lay.num_gates))
    return ref[t]


def _store_steps(refs, t, tree, lay: _Layout):
    """Step ``t`` (``...``: the whole block) of each leaf of ``tree`` into its ref, a ``_Gates``
    leaf gate by gate."""
    h = lay.hidden_size
    for ref, leaf in zip(refs, jax.tree_util.tree_leaves(tree), strict=True):
        if isinstance(leaf, _Gates):
            for g, tile in enumerate(leaf.parts):
                ref[t, :, pl.ds(g * h, h)] = tile.astype(ref.dtype)
        else:
            ref[t] = leaf.astype(ref.dtype)


def _dot(a, w, *, transpose_w: bool, options: PallasOptions, out_dtype):
    """``a @ w`` (or ``a @ w.T``) with float32 (or float64) accumulation."""
    if options.weight_dtype is not None:
        a = a.astype(options.weight_dtype)
    acc = jnp.float64 if jnp.dtype(out_dtype) == jnp.float64 else jnp.float32
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    out = lax.dot_general(a, w, dims, precision=options.precision, preferred_element_type=acc)
    return out.astype(out_dtype)


def _run_steps(num_steps: int, unroll, step, carry):
    """``step(k, carry)`` for k = 0..num_steps-1, ``unroll`` steps per loop iteration (unrolled
    by hand: Triton lowers only ``fori_loop``s with unroll 1)."""
    unroll = num_steps if unroll is True else max(1, min(int(unroll), num_steps))

    def block(i, c):
        for j in range(unroll):
            c = step(i * unroll + j, c)
        return c

    carry = lax.fori_loop(0, num_steps // unroll, block, carry)
    for k in range(num_steps - num_steps % unroll, num_steps):
        carry = step(k, carry)
    return carry


def _read_all(refs):
    return [r[...] for r in refs]


def _launch(kernel, inputs, outputs, lay: _Layout, options: PallasOptions, name: str):
    """Run ``kernel`` over the batch blocks; ``inputs``/``outputs`` are ``(value, BlockSpec)``
    pairs. Returns the outputs (still padded)."""
    interpret = options.interpret
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    compiler_params = None
    if not interpret:  # Triton: the Mosaic GPU lowering has no dot_general/split rules
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(
            num_warps=options.num_warps, num_stages=options.num_stages
        )
    (values, in_specs), (out_shape, out_specs) = (zip(*x, strict=True) for x in (inputs, outputs))
    call = pl.pallas_call(
        kernel, out_shape=list(out_shape), grid=(lay.padded_batch // lay.batch_block,),
        in_specs=list(in_specs), out_specs=list(out_specs), interpret=interpret,
        compiler_params=compiler_params, name=name,
    )  # fmt: skip
    return call(*values)


def _split_refs(refs, counts):
    it = iter(refs)
    return [list(itertools.islice(it, n)) for n in counts]


# --------------------------------------------------------------------------------------------
# Forward recurrence


def pallas_scan_states(
    cell: Cell, params, xp, h0, mask=None, reverse=False, unroll=1, *,
    options: PallasOptions = DEFAULT_OPTIONS,
):  # fmt: skip
    """``jax_bptt.scan.scan_states`` as one fused kernel launch.

    ``xp: (t b g)``, ``h0`` state leaves ``(b h)``, ``mask: (t b)`` bool or None. Returns
    ``(final_state, (states, saved))`` stacked over t, ``saved`` being what
    ``cell.forward`` returns, so ``cell.backward`` applies unchanged. ``unroll`` steps run per
    loop iteration inside the kernel; ``options``: the kernel settings (``make_pallas_backend``
    fixes them).
    """
    num_steps, batch = _check_stack("xp", xp, params["W_hh"].shape[1], "G*H", mask)
    if num_steps == 0:  # nothing to fuse; the XLA scan returns the empty stacks
        return scan_states(cell, params, xp, h0, mask, reverse, unroll)
    lay = _layout(batch, params, cell, options)
    resident, names = _resident(params, options)
    h0_leaves, state_tree = jax.tree_util.tree_flatten(h0)
    xp_t = jax.ShapeDtypeStruct(xp.shape[1:], xp.dtype)
    step_shape = jax.eval_shape(cell.forward, params, xp_t, xp_t, h0)  # leaves (b ...)
    out_state_leaves = jax.tree_util.tree_leaves(step_shape[0])
    res_leaves, res_tree = jax.tree_util.tree_flatten(step_shape[1])
    has_mask = mask is not None

    inputs = [_batch_input(xp, lay, True), *(_batch_input(a, lay, False) for a in h0_leaves)]
    if has_mask:
        inputs.append(_batch_input(mask.astype(jnp.int32), lay, True))
    inputs += resident
    outputs = [_batch_output(a.shape, a.dtype, lay, False) for a in out_state_leaves]
    outputs += [
        _batch_output((num_steps, *a.shape), a.dtype, lay, True)
        for a in out_state_leaves + res_leaves
    ]
    n_state, n_res = len(h0_leaves), len(res_leaves)
    forward = _gatewise(cell.forward, lay.num_gates)

    def kernel(*refs):
        counts = [1, n_state, int(has_mask), len(resident), n_state, n_state, n_res]
        (xp_ref,), h0_refs, mask_refs, resident_refs, final_refs, state_refs, res_refs = (
            _split_refs(refs, counts)
        )
        w_tiles, cell_params = _load_resident(resident_refs, names, lay)
        state0 = jax.tree_util.tree_unflatten(state_tree, _read_all(h0_refs))

        def step(k, state):
            t = num_steps - 1 - k if reverse else k
            h = cell.hidden(state)
            hp_tiles = [_dot(h, w, transpose_w=False, options=options, out_dtype=xp.dtype)
                        for w in w_tiles]  # fmt: skip
            hp = hp_tiles[0] if lay.num_gates == 1 else _Gates(hp_tiles)
            new_state, residuals = forward(cell_params, _load_step(xp_ref, t, lay), hp, state)
            if has_mask:
                new_state = select(mask_refs[0][t] != 0, new_state, state)
            _store_steps(state_refs, t, new_state, lay)
            _store_steps(res_refs, t, residuals, lay)
            return new_state

        _store_steps(final_refs, ..., _run_steps(num_steps, unroll, step, state0), lay)

    outs = _launch(kernel, inputs, outputs, lay, options, f"{cell.name}_forward")
    # drop the padding rows: final states (b ...), stacks (t b ...)
    outs = [o[:batch] for o in outs[:n_state]] + [o[:, :batch] for o in outs[n_state:]]
    final_leaves, state_stack, res_stack = _split_refs(outs, [n_state, n_state, n_res])
    return jax.tree_util.tree_unflatten(state_tree, final_leaves), (
        jax.tree_util.tree_unflatten(state_tree, state_stack),
        jax.tree_util.tree_unflatten(res_tree, res_stack),
    )


# --------------------------------------------------------------------------------------------
# Backward delta recurrence


def pallas_backward_deltas(
    cell: Cell, params, h0, mask, states, saved, d_hs, d_final, *, reverse=False, unroll=1,
    options: PallasOptions = DEFAULT_OPTIONS,
) -> Deltas:  # fmt: skip
    """``jax_bptt.scan.backward_deltas`` as one fused kernel launch (``options`` as for
    ``pallas_scan_states``).

    Carries only ``d state`` through the reverse loop and writes ``d xp_t`` and ``d hp_t``
    ``(t b g)``; the weight gradients are then ``jax_bptt.scan.cell_grads``.
    """
    hidden = params["W_hh"].shape[0]
    num_steps, batch = _check_stack("d_hs", d_hs, hidden, "H", mask)
    if getattr(cell, "pointwise_params", ()):  # Deltas.d_pointwise is not written by the kernel
        raise NotImplementedError(
            f"the Pallas backward forms no gradients of cell {cell.name!r}'s pointwise params "
            f"{cell.pointwise_params}; use the XLA path (ScanOptions(backend='xla'))"
        )
    if num_steps == 0:  # nothing to fuse; the XLA version handles the empty sequence
        return backward_deltas(
            cell, params, h0, mask, states, saved, d_hs, d_final, reverse=reverse
        )
    lay = _layout(batch, params, cell, options)
    resident, names = _resident(params, options)
    has_mask = mask is not None
    states_prev = previous_states(h0, states, reverse=reverse)
    d_final_leaves, state_tree = jax.tree_util.tree_flatten(d_final)
    prev_leaves = jax.tree_util.tree_leaves(states_prev)
    res_leaves, res_tree = jax.tree_util.tree_flatten(saved)
    n_state, n_res = len(d_final_leaves), len(res_leaves)

    inputs = [_batch_input(d_hs, lay, True), *(_batch_input(a, lay, False) for a in d_final_leaves)]
    inputs += [_batch_input(a, lay, True) for a in prev_leaves + res_leaves]
    if has_mask:
        inputs.append(_batch_input(mask.astype(jnp.int32), lay, True))
    inputs += resident
    dtype = d_hs.dtype
    outputs = [_batch_output(a.shape, a.dtype, lay, False) for a in d_final_leaves]
    outputs += [_batch_output((num_steps, batch, lay.num_gates * hidden), dtype, lay, True)] * 2
    n_d_states = n_state if options.with_d_states else 0
    if options.with_d_states:
        outputs += [
            _batch_output((num_steps, *a.shape), a.dtype, lay, True) for a in d_final_leaves
        ]
    backward = _gatewise(cell.backward, lay.num_gates)

    def kernel(*refs):
        counts = [1, n_state, n_state, n_res, int(has_mask), len(resident), n_state, 2]
        (
            (d_hs_ref,),
            d_final_refs,
            prev_refs,
            res_refs,
            mask_refs,
            resident_refs,
            d_h0_refs,
            (d_xp_ref, d_hp_ref),
            d_states_refs,
        ) = _split_refs(refs, [*counts, n_d_states])
        w_tiles, cell_params = _load_resident(resident_refs, names, lay)
        d_state0 = jax.tree_util.tree_unflatten(state_tree, _read_all(d_final_refs))

        def step(k, d_state):
            t = k if reverse else num_steps - 1 - k  # against the forward's direction
            d_out = d_hs_ref[t]
            if has_mask:  # outputs past a length are constant zeros: no gradient from them
                in_sequence = mask_refs[0][t] != 0
                d_out = _rows_only(in_sequence, d_out)
            d_state = cell.with_hidden(d_state, cell.hidden(d_state) + d_out)
            if options.with_d_states:
                _store_steps(d_states_refs, t, d_state, lay)
            state_prev = jax.tree_util.tree_unflatten(state_tree, [r[t] for r in prev_refs])
            res_t = jax.tree_util.tree_unflatten(
                res_tree, [_load_step(r, t, lay) for r in res_refs]
            )
            d_prev, d_xp, d_hp = backward(cell_params, res_t, state_prev, d_state)
            d_hp_tiles = d_hp.parts if isinstance(d_hp, _Gates) else (d_hp,)
            dots = [_dot(tile, w, transpose_w=True, options=options, out_dtype=dtype)
                    for tile, w in zip(d_hp_tiles, w_tiles, strict=True)]  # fmt: skip
            recurrent = sum(dots[1:], dots[0])
            d_prev = cell.with_hidden(d_prev, cell.hidden(d_prev) + recurrent)
            if has_mask:  # past the length the state was frozen: pass d_state through
                d_prev = select(in_sequence, d_prev, d_state)
                d_xp, d_hp = _rows_only(in_sequence, d_xp), _rows_only(in_sequence, d_hp)
            _store_steps((d_xp_ref, d_hp_ref), t, (d_xp, d_hp), lay)
            return d_prev

        _store_steps(d_h0_refs, ..., _run_steps(num_steps, unroll, step, d_state0), lay)

    outs = _launch(kernel, inputs, outputs, lay, options, f"{cell.name}_backward")
    d_h0 = jax.tree_util.tree_unflatten(state_tree, [o[:batch] for o in outs[:n_state]])
    d_xp, d_hp, *d_states = (o[:, :batch] for o in outs[n_state:])
    d_states = jax.tree_util.tree_unflatten(state_tree, d_states) if d_states else None
    return Deltas(d_h0, d_xp, d_hp, cell.hidden(states_prev), d_states)


def _rows_only(rows, value):
    """``value`` (``(b, ...)``, or ``_Gates`` of such tiles) with the rows not in ``rows`` zero."""
    if isinstance(value, _Gates):
        return _Gates(_rows_only(rows, tile) for tile in value.parts)
    return jnp.where(rows[:, None], value, 0)


# --------------------------------------------------------------------------------------------
# Backends with fixed options


class PallasBackend(NamedTuple):
    """The two recurrences with fixed ``PallasOptions``; drop-in for ``scan_states`` and
    ``backward_deltas``."""

    scan_states: Any
    backward_deltas: Any
    options: PallasOptions


def make_pallas_backend(**options) -> PallasBackend:
    """A backend with non-default ``PallasOptions`` (e.g. ``batch_block=32``,
    ``weight_dtype=jnp.bfloat16``, ``precision=lax.Precision.DEFAULT`` for TF32)."""
    opts = PallasOptions(**options)
    return PallasBackend(
        functools.partial(pallas_scan_states, options=opts),
        functools.partial(pallas_backward_deltas, options=opts),
        opts,
    )
