"""The fused Pallas kernels (interpret mode on CPU) against the XLA scans and ``jax.grad``.

Each kernel must reproduce ``scan_states`` (states and saved values) and ``backward_deltas``
(every delta) of the same cell, with lengths and in both directions, and gradients formed from its
deltas by ``cell_grads`` must equal ``bptt_auto``'s. Sizes are tiny: interpret mode compiles each
kernel as an XLA loop over the grid, which is slow to build.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt.backends import (
    Backend,
    ScanOptions,
    backend_names,
    get_backend,
    resolve_options,
)
from jax_bptt.cells import CELLS, ELMAN_TANH, GRU, LSTM, Cell, make_cell, project_inputs
from jax_bptt.check import compare_gradients, relative_error
from jax_bptt.losses import Loss, sequence_loss_grad
from jax_bptt.model import init_model, readout
from jax_bptt.modes import bptt_auto, bptt_checkpointed, bptt_fast
from jax_bptt.pallas_rnn import (
    fits_on_chip,
    make_pallas_backend,
    on_chip_bytes,
    pallas_available,
    pallas_backward_deltas,
    pallas_scan_states,
    preferred_backend,
)
from jax_bptt.scan import (
    backward_deltas,
    cell_grads,
    length_mask,
    masked_hidden,
    scan_states,
)

T, B, D, H, O = 5, 3, 2, 4, 2  # noqa: E741 (O: outputs, the package's dimension legend)
LENGTHS = jnp.array([5, 2, 0])  # full, partial and empty sequences in one batch
REL_TOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}


def _problem(cell, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = init_model(keys[0], cell.name, D, H, O, dtype=dtype)
    xs = jax.random.normal(keys[1], (T, B, D), dtype)
    zeros, state_tree = jax.tree_util.tree_flatten(cell.zero_state((B,), H, dtype))
    h0_keys = jax.random.split(keys[2], len(zeros))
    h0 = jax.tree_util.tree_unflatten(
        state_tree,
        [0.5 * jax.random.normal(k, a.shape, dtype) for k, a in zip(h0_keys, zeros, strict=True)],
    )
    d_hs = jax.random.normal(keys[3], (T, B, H), dtype)
    d_final = jax.tree_util.tree_map(lambda a: 0.3 * jnp.ones_like(a), h0)
    return params, xs, h0, d_hs, d_final


def _assert_trees_close(candidate, reference, tol, what):
    flat_c = jax.tree_util.tree_flatten_with_path(candidate)[0]
    flat_r = jax.tree_util.tree_leaves(reference)
    assert len(flat_c) == len(flat_r), what
    for (path, a), b in zip(flat_c, flat_r, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, path, a.shape, b.shape)
        _, rel = relative_error(a, b)
        assert rel <= tol, f"{what}{jax.tree_util.keystr(path)}: relative error {rel:.2e}"


def _both_recurrences(scan_fn, deltas_fn, cell, reverse, unroll):
    """One jitted function running a forward and a backward implementation (one compile)."""

    def run(p, xp, h0, mask, d_hs, d_final):
        forward = scan_fn(cell, p, xp, h0, mask, reverse, unroll)
        _, (states, saved) = forward
        args = (cell, p, h0, mask, states, saved, d_hs, d_final)
        return forward, deltas_fn(*args, reverse=reverse, unroll=unroll)

    return jax.jit(run)


def _check_against_xla(cell, dtype, mask, reverse, unroll, backend, with_d_states):
    params, xs, h0, d_hs, d_final = _problem(cell, dtype)
    p = params["layers"][0]["fwd"]
    args = (p, project_inputs(p, xs), h0, mask, d_hs, d_final)
    tol = REL_TOL[dtype]
    expected = _both_recurrences(scan_states, backward_deltas, cell, reverse, unroll)(*args)
    got = _both_recurrences(backend.scan_states, backend.backward_deltas, cell, reverse, unroll)(
        *args
    )
    _assert_trees_close(got[0], expected[0], tol, "forward")
    got_d, expected_d = got[1]._asdict(), expected[1]._asdict()
    if not with_d_states:
        assert got_d.pop("d_states") is None
        expected_d.pop("d_states")
    _assert_trees_close(got_d, expected_d, tol, "deltas")
    # a test that cannot fail is no test: the deltas must carry signal
    assert float(jnp.max(jnp.abs(expected[1].d_hp))) > 1e-3


_SMALL_BLOCKS = make_pallas_backend(batch_block=2)  # 2 programs, the last one half padding


@pytest.mark.parametrize("cell", list(CELLS.values()), ids=list(CELLS))
def test_reverse_lengths_unroll_float64(cell):
    """Reverse, lengths (0, partial, full), unroll 2 over T=5 (a remainder step), 2 programs."""
    mask = length_mask(LENGTHS, T)
    _check_against_xla(cell, jnp.float64, mask, True, 2, _SMALL_BLOCKS, with_d_states=True)


@pytest.mark.parametrize("cell", list(CELLS.values()), ids=list(CELLS))
def test_forward_no_mask_float32(cell):
    """The registered ``"pallas"`` backend: batch_block 16 (the batch of 3 is padded to one
    block), d_states skipped as in a training step (``with_d_states=False``)."""
    backend = get_backend("pallas")
    assert isinstance(backend, Backend)
    _check_against_xla(cell, jnp.float32, None, False, 1, backend, with_d_states=False)


def _pallas_gradients(cell, params, xs, targets, h0, lengths):
    """The manual BPTT pipeline with both recurrences in Pallas (the public entry points)."""
    p, ro = params["layers"][0]["fwd"], params["readout"]
    mask = length_mask(lengths, xs.shape[0])
    _, (states, saved) = pallas_scan_states(cell, p, project_inputs(p, xs), h0, mask)
    ys = readout(ro, masked_hidden(cell, states, mask))
    d_ys = sequence_loss_grad(ys, targets, Loss("mse", "per_step", "mean"), lengths=lengths)
    d_final = jax.tree_util.tree_map(jnp.zeros_like, h0)
    deltas = pallas_backward_deltas(cell, p, h0, mask, states, saved, d_ys @ ro["W_hy"].T, d_final)
    d_cell, d_xs = cell_grads(cell, p, xs, deltas)
    return d_cell, deltas.d_h0, d_xs


@pytest.mark.parametrize("cell", list(CELLS.values()), ids=list(CELLS))
def test_gradients_equal_autodiff_float64(cell):
    params, xs, h0, _, _ = _problem(cell, jnp.float64, seed=1)
    targets = jax.random.normal(jax.random.key(7), (T, B, O), jnp.float64)
    d_cell, d_h0, d_xs = _pallas_gradients(cell, params, xs, targets, h0, LENGTHS)
    auto = bptt_auto(params, xs, targets, cell=cell, lengths=LENGTHS, h0=[{"fwd": h0}])
    _assert_trees_close(
        (d_cell, d_h0, d_xs),
        (auto.params["layers"][0]["fwd"], auto.h0[0]["fwd"], auto.xs),
        1e-10,
        "gradients",
    )


@pytest.mark.parametrize("cell", list(CELLS.values()), ids=list(CELLS))
def test_kernels_lower_to_triton(cell):
    """Both kernels pass Pallas' Triton lowering (what a GPU compile starts from), checked on CPU
    by lowering for the cuda platform: no split/concatenate across gates, power-of-2 tiles."""
    batch, hidden, dtype = 16, 16, jnp.float32
    params = cell.init(jax.random.key(0), D, hidden, dtype)
    xp = jnp.zeros((T, batch, cell.num_gates * hidden), dtype)
    h0 = cell.zero_state((batch,), hidden, dtype)
    mask = length_mask(jnp.full((batch,), 3), T)
    _, (states, saved) = jax.eval_shape(lambda: scan_states(cell, params, xp, h0, mask))
    d_hs = jnp.zeros((T, batch, hidden), dtype)
    native = make_pallas_backend(interpret=False)

    def forward(params, xp, h0, mask):
        return native.scan_states(cell, params, xp, h0, mask, True, 2)

    def backward(params, h0, mask, states, saved, d_hs):
        return native.backward_deltas(cell, params, h0, mask, states, saved, d_hs, h0)

    for fn, args in (
        (forward, (params, xp, h0, mask)),
        (backward, (params, h0, mask, states, saved, d_hs)),
    ):
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert hlo.count("__gpu$xla.gpu.triton") == 1  # one launch for all T steps


def test_unsupported_gate_op_is_named():
    """A cell whose pointwise code mixes gates (here a cumsum across them) is refused clearly."""

    def forward(params, xp, hp, h_prev):
        del params, h_prev
        h = jnp.cumsum(xp + hp, axis=-1)[..., :H]
        return h, h

    elman = ELMAN_TANH
    mixing = Cell(
        "mixing", 4, LSTM.init, elman.zero_state, elman.hidden, elman.with_hidden, forward,
        elman.backward, elman.bias_grads,
    )  # fmt: skip
    params = LSTM.init(jax.random.key(0), D, H, jnp.float32)
    xp = jnp.zeros((T, B, 4 * H), jnp.float32)
    with pytest.raises(NotImplementedError, match="cumsum"):
        pallas_scan_states(mixing, params, xp, jnp.zeros((B, H), jnp.float32))


def test_empty_sequence_and_bad_arguments():
    params, _, h0, _, _ = _problem(ELMAN_TANH, jnp.float64)
    p = params["layers"][0]["fwd"]
    xp = jnp.zeros((0, B, H), jnp.float64)
    final, (states, _) = pallas_scan_states(ELMAN_TANH, p, xp, h0)
    np.testing.assert_array_equal(final, h0)
    assert states.shape == (0, B, H)
    with pytest.raises(ValueError, match="xp must have shape"):
        pallas_scan_states(ELMAN_TANH, p, jnp.zeros((T, B, H + 1)), h0)
    with pytest.raises(ValueError, match="d_hs must have shape"):
        pallas_backward_deltas(ELMAN_TANH, p, h0, None, None, None, jnp.zeros((T, B, H + 1)), h0)
    with pytest.raises(ValueError, match="batch_block"):
        make_pallas_backend(batch_block=0).scan_states(ELMAN_TANH, p, jnp.zeros((T, B, H)), h0)


def test_cell_with_pointwise_params_is_refused():
    """The kernels write no ``Deltas.d_pointwise``: such a cell is refused by name, both by the
    backward entry point and by ``resolve_options`` before anything runs."""

    def scaled(params, xp, hp, h_prev):
        del h_prev
        return jnp.tanh(params["a"] * (xp + hp))

    cell = make_cell("scaled", num_gates=1, forward=scaled, pointwise_params=("a",))
    params = {**ELMAN_TANH.init(jax.random.key(0), D, H, jnp.float32), "a": jnp.ones(H)}
    h0 = jnp.zeros((B, H), jnp.float32)
    with pytest.raises(NotImplementedError, match=r"pointwise params \('a',\)"):
        pallas_backward_deltas(cell, params, h0, None, None, None, jnp.zeros((T, B, H)), h0)
    with pytest.raises(ValueError, match="backend 'pallas' cannot run cell 'scaled'"):
        resolve_options(ScanOptions(backend="pallas"), cell, (T, B, D), H, jnp.float32)


def test_hidden_size_plan():
    # the one H100 observation: Elman fp32 H=128 ran, H=256 exceeded shared memory
    assert fits_on_chip(128, 1, jnp.float32, 16)
    assert not fits_on_chip(256, 1, jnp.float32, 16)
    assert not fits_on_chip(128, 4, jnp.float32, 16)
    assert fits_on_chip(128, 4, jnp.float32, 16, weight_dtype=jnp.bfloat16)
    fp32 = on_chip_bytes(64, 3, jnp.float32, 16)
    bf16 = on_chip_bytes(64, 3, jnp.float32, 16, weight_dtype=jnp.bfloat16)
    assert fp32 - bf16 == 64 * 3 * 64 * 2  # only the resident weights shrink


def test_preferred_backend():
    if pallas_available():  # pragma: no cover - GPU only
        assert preferred_backend(256, 128, 256, ELMAN_TANH, jnp.float32) == "pallas"
        assert preferred_backend(256, 100, 256, ELMAN_TANH, jnp.float32) == "xla"
    else:
        assert jax.default_backend() != "gpu"
        assert preferred_backend(256, 128, 256, ELMAN_TANH, jnp.float32) == "xla"
    assert preferred_backend(256, 512, 256, LSTM, jnp.float32) == "xla"
    assert preferred_backend(256, 128, 256, ELMAN_TANH, jnp.float64) == "xla"
    # backend="auto" is resolved by this function, once per call, before anything is traced
    auto = ScanOptions(backend="auto")
    shape = (256, 256, 3)
    want = preferred_backend(256, 128, 256, ELMAN_TANH, jnp.float32)
    assert resolve_options(auto, ELMAN_TANH, shape, 128, jnp.float32).backend == want
    assert resolve_options(auto, ELMAN_TANH, shape, 128, jnp.float64).backend == "xla"


def _random_problem(key, cell, *, steps, batch, inputs=4, hidden=6, outputs=3):
    """A random model, mse targets at every step and random lengths in ``[0, T]`` (float64)."""
    k_p, k_x, k_y, k_l = jax.random.split(key, 4)
    params = init_model(k_p, cell, inputs, hidden, outputs, dtype=jnp.float64)
    xs = jax.random.normal(k_x, (steps, batch, inputs), jnp.float64)
    targets = jax.random.normal(k_y, (steps, batch, outputs), jnp.float64)
    lengths = jax.random.randint(k_l, (batch,), 0, steps + 1)
    return params, xs, targets, dict(cell=cell, lengths=lengths)


def test_registered_as_fast_path_backend():
    """``ScanOptions(backend="pallas")`` runs the kernels (interpret mode here) in the fast and
    the checkpointed modes and is exact; ``backend="auto"`` keeps the XLA scan where no GPU is
    present."""
    params, xs, targets, kw = _random_problem(jax.random.key(0), "gru", steps=5, batch=3)
    auto = bptt_auto(params, xs, targets, **kw)
    assert "pallas" in backend_names()
    pallas = ScanOptions(backend="pallas")
    # the kernels really are what runs: both directions of the recurrence are pallas_calls
    jaxpr = str(jax.make_jaxpr(lambda p: bptt_fast(p, xs, targets, options=pallas, **kw))(params))
    assert jaxpr.count("pallas_call") >= 2
    fast = bptt_fast(params, xs, targets, options=pallas, **kw)
    assert compare_gradients(fast, auto, tolerance=1e-10).ok
    chunked = bptt_fast(params, xs, targets, options=pallas._replace(chunk_length=2), **kw)
    assert compare_gradients(chunked, auto, tolerance=1e-10).ok  # kernels run per chunk
    ckpt = bptt_checkpointed(params, xs, targets, options=pallas._replace(segment_length=2), **kw)
    assert compare_gradients(ckpt, auto, tolerance=1e-10).ok
    if jax.default_backend() != "gpu":
        options = resolve_options(ScanOptions(backend="auto"), GRU, xs.shape, 6, jnp.float32)
        assert options.backend == "xla"
