"""jax_bptt.deer: parallel-in-time Newton equals the sequential masked scan, forward and gradients.

The reference is written here, independently of the package's unroll: a ``lax.scan`` of
``cells.step`` with the ``t < length`` mask. Everything is float64 (tests/conftest.py), so two
exact computations agree to ~1e-13; the bound is 1e-9 relative.
"""

import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import cells
from jax_bptt.deer import (
    _Layout,
    _linearise_diag,
    _linearise_full,
    deer_unroll,
    lyapunov_exponent,
)

F64 = jnp.float64
TOL = 1e-9
REPO = Path(__file__).resolve().parents[1]
CELL_NAMES = sorted(cells.CELLS)


def rel_err(a, b) -> float:
    """``max|a - b| / max|b|`` (absolute where b is all zero)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_trees_close(candidate, reference, tol=TOL, what=""):
    flat, _ = jax.tree_util.tree_flatten_with_path(candidate)
    refs = jax.tree_util.tree_leaves(reference)
    assert len(flat) == len(refs)
    errors = {jax.tree_util.keystr(p): rel_err(a, b) for (p, a), b in zip(flat, refs, strict=True)}
    assert all(e <= tol for e in errors.values()), (what, errors)


def spectral_scale(w_hh, radius):
    """Rescale every (H, H) gate block of ``W_hh`` to the given spectral radius."""
    hidden = w_hh.shape[0]
    blocks = []
    for g in range(w_hh.shape[1] // hidden):
        block = w_hh[:, g * hidden : (g + 1) * hidden]
        blocks.append(block * radius / np.max(np.abs(np.linalg.eigvals(np.asarray(block)))))
    return jnp.concatenate(blocks, axis=1)


def problem(cell, steps, batch, inputs, hidden, seed=0, radius=0.6):
    """Params (PyTorch's U(-1/sqrt(H), 1/sqrt(H)), W_hh rescaled to a spectral radius: < 1
    contracts), inputs and a random h0. NumPy's generator: no jax.random compile per shape."""
    cell = cells.get_cell(cell)
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(hidden)
    shapes = jax.eval_shape(lambda k: cell.init(k, inputs, hidden, F64), jax.random.key(0))
    params = {k: jnp.asarray(rng.uniform(-bound, bound, v.shape)) for k, v in shapes.items()}
    params["W_hh"] = spectral_scale(params["W_hh"], radius)
    xs = jnp.asarray(rng.standard_normal((steps, batch, inputs)))
    h0 = jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape)),
        cell.zero_state((batch,), hidden, F64),
    )
    return params, xs, h0


def chaotic_problem(steps, batch=2, hidden=32, seed=0):
    """A tanh RNN with ``W_hh = 3 Q`` (Q orthogonal: spectral radius 3), no bias, small inputs:
    its largest Lyapunov exponent is 0.21-0.31 per step over seeds 0-7 at T = 30, 60 and 200
    (at H = 16 one seed of 24 gave -0.04: small chaotic nets have stable windows)."""
    rng = np.random.default_rng(seed)
    params, xs, h0 = problem("elman_tanh", steps, batch, 2, hidden, seed=seed)
    q = np.linalg.qr(rng.standard_normal((hidden, hidden)))[0]
    params.update(W_hh=jnp.asarray(3.0 * q), b_h=jnp.zeros(hidden, F64))
    return params, 0.1 * xs, h0


@functools.partial(jax.jit, static_argnames=("cell", "reverse"))
def reference(cell, params, xs, h0, lengths, reverse):
    """The sequential definition: ``(hs, final)`` of a masked scan of ``cells.step``."""
    mask = jnp.arange(xs.shape[0])[:, None] < lengths[None, :]

    def body(state, inputs):
        x, m = inputs
        new = cells.step(cell, params, state, x)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(m[:, None], a, b), new, state)
        return new, jnp.where(m[:, None], cell.hidden(new), 0.0)

    final, hs = jax.lax.scan(body, h0, (xs, mask), reverse=reverse)
    return hs, final


def random_loss(outputs_fn, seed=7):
    """A random linear-plus-nonlinear scalar of ``(hs, final)``: every output gets a cotangent.

    Returns ``(loss, outputs)`` for ``jax.value_and_grad(..., has_aux=True)``: one trace gives
    the outputs and the gradients (one compile of the forward, one of the backward).
    """

    def loss(params, xs, h0):
        outputs = outputs_fn(params, xs, h0)
        hs, final = outputs[0], outputs[1]
        rng = np.random.default_rng(seed)
        total = jnp.sum(jnp.asarray(rng.standard_normal(hs.shape)) * hs) + 0.5 * jnp.sum(hs**2)
        for leaf in jax.tree_util.tree_leaves(final):
            weights = jnp.asarray(rng.standard_normal(leaf.shape))
            total = total + jnp.sum(weights * leaf) + jnp.sum(jnp.sin(leaf))
        return total, outputs

    return loss


def check_against_reference(cell, params, xs, h0, lengths, reverse, **deer_kw):
    """Outputs and gradients (params, xs, h0) of deer_unroll equal the sequential scan's."""
    cell = cells.get_cell(cell)
    ref_lengths = jnp.asarray(np.full(xs.shape[1], xs.shape[0])) if lengths is None else lengths

    def deer_outputs(p, x, h):
        return deer_unroll(cell, p, x, h, lengths, reverse=reverse, **deer_kw)

    def ref_outputs(p, x, h):
        return reference(cell, p, x, h, ref_lengths, reverse)

    what = f"{cell.name} {deer_kw} lengths={lengths} reverse={reverse}"
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (_, (hs, final, info)), grads = grad(random_loss(deer_outputs))(params, xs, h0)
    (_, (ref_hs, ref_final)), ref_grads = grad(random_loss(ref_outputs))(params, xs, h0)
    assert_trees_close((hs, final), (ref_hs, ref_final), what=what)
    assert_trees_close(grads, ref_grads, what="grad " + what)
    return info


# ---------------------------------------------------------------------------------------------
# Equality with the sequential scan


@pytest.mark.parametrize("method", ["quasi", "full"])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_equals_sequential_scan(cell, method):
    steps, batch = 17, 3
    params, xs, h0 = problem(cell, steps, batch, inputs=2, hidden=4, seed=len(cell))
    for lengths in (None, jnp.array([steps, 0, 6])):  # full, empty and partial rows
        for reverse in (False, True):
            info = check_against_reference(cell, params, xs, h0, lengths, reverse, method=method)
            assert bool(info.converged) and not bool(info.fell_back)
            assert 1 <= int(info.iterations) <= steps
            assert float(info.residual) <= 1e-10


def test_zero_steps():
    params, _, h0 = problem("lstm", 1, 2, inputs=2, hidden=3)
    xs = jnp.zeros((0, 2, 2), F64)
    hs, final, info = deer_unroll("lstm", params, xs, h0, jnp.array([0, 0]))
    assert hs.shape == (0, 2, 3)
    assert_trees_close(final, h0)
    assert bool(info.converged) and int(info.iterations) == 0
    d_h0 = jax.grad(lambda h: jnp.sum(deer_unroll("lstm", params, xs, h)[1][1]))(h0)
    np.testing.assert_array_equal(d_h0[0], 0.0)
    np.testing.assert_array_equal(d_h0[1], 1.0)


@pytest.mark.parametrize("method", ["quasi", "full"])
def test_chaotic_rnn_falls_back_exactly(method):
    """Lyapunov exponent ~0.2 > 0: 3 Newton iterations cannot reach tol over 30 steps."""
    steps = 30
    params, xs, h0 = chaotic_problem(steps)
    lengths = jnp.array([steps, 19])
    info = check_against_reference(
        "elman_tanh", params, xs, h0, lengths, False, method=method, max_iters=3
    )
    assert not bool(info.converged) and bool(info.fell_back)
    assert int(info.iterations) == 3 and not float(info.residual) <= 1e-10


def test_warm_start_and_damping():
    steps, batch = 40, 2
    params, xs, h0 = problem("gru", steps, batch, inputs=3, hidden=5, seed=1, radius=0.9)
    ref_hs, _ = reference(cells.GRU, params, xs, h0, jnp.asarray(np.full(batch, steps)), False)
    # The GRU's state is its hidden output, so the sequential hs are the exact states.
    _, _, exact = deer_unroll("gru", params, xs, h0, method="full", init_states=ref_hs)
    assert int(exact.iterations) == 0 and bool(exact.converged)
    near = ref_hs + 1e-6 * jnp.asarray(np.random.default_rng(5).standard_normal(ref_hs.shape))
    cold = {}
    for method in ("full", "quasi"):
        _, _, cold[method] = deer_unroll("gru", params, xs, h0, method=method)
        _, _, warm = deer_unroll("gru", params, xs, h0, method=method, init_states=near)
        assert bool(warm.converged) and 1 <= int(warm.iterations) < int(cold[method].iterations)
        if method == "full":  # Newton from 1e-6 away: 1e-12, then done
            assert int(warm.iterations) <= 2, warm

    # Damping is traced (no recompile) and never changes the answer; the backward does not
    # depend on it (test_chaotic_rnn_falls_back_exactly covers gradients after any forward).
    lengths = jnp.array([steps, 25])
    ref = reference(cells.GRU, params, xs, h0, lengths, True)
    for method in ("full", "quasi"):
        hs, final, info = deer_unroll(
            "gru", params, xs, h0, lengths, reverse=True, method=method, damping=0.5
        )
        assert_trees_close((hs, final), ref, what=f"damped {method}")
        assert bool(info.converged) and not bool(info.fell_back)
        if method == "full":  # damping gives up Newton's quadratic convergence
            assert int(info.iterations) > int(cold[method].iterations)


def test_inside_jit_with_traced_lengths_and_float32():
    params, xs, h0 = problem("lstm", 12, 2, inputs=2, hidden=3, seed=4)
    lengths = jnp.array([12, 5])
    ref_hs, ref_final = reference(cells.LSTM, params, xs, h0, lengths, False)
    f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, xs, h0))

    @jax.jit
    def run(params, xs, h0, lengths):
        return deer_unroll("lstm", params, xs, h0, lengths, method="quasi")

    hs, final, info = run(*f32, lengths)
    assert hs.dtype == jnp.float32 and bool(info.converged)
    assert float(info.residual) <= 1e-5  # float32's default tol
    # A state error is the defect amplified by at most sum_k ||J products|| (~1/(1 - 0.6) here),
    # on top of float32 rounding: an order of magnitude above the tol, not more.
    assert_trees_close((hs, final), (ref_hs, ref_final), tol=1e-4)


# ---------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_quasi_diagonal_is_the_jacobians_diagonal(cell):
    cell = cells.get_cell(cell)
    params, xs, h0 = problem(cell, 4, 3, inputs=2, hidden=5, seed=2, radius=1.5)
    leaves, treedef = jax.tree_util.tree_flatten(h0)
    layout = _Layout(treedef, tuple(a.shape[-1] for a in leaves))
    s_prev = jnp.asarray(np.random.default_rng(9).standard_normal((4, 3, sum(layout.sizes))))
    xp = cells.project_inputs(params, xs)
    linearise = jax.jit(
        lambda p, s, x: (
            _linearise_diag(cell, layout, p, s, x),
            _linearise_full(cell, layout, p, s, x),
        )
    )
    (f_diag, diag), (f_full, jac) = linearise(params, s_prev, xp)
    assert rel_err(f_diag, f_full) <= 1e-14
    assert rel_err(diag, jnp.diagonal(jac, axis1=-2, axis2=-1)) <= 1e-14
    assert float(jnp.max(jnp.abs(jac - jax.vmap(jax.vmap(jnp.diag))(diag)))) > 1e-3  # not diagonal


def test_lyapunov_exponent():
    linear = cells.elman_cell("linear", lambda z: z, jnp.ones_like)
    hidden, steps = 5, 25
    params, xs, h0 = problem(linear, steps, 3, inputs=2, hidden=hidden)
    q = np.linalg.qr(np.random.default_rng(1).standard_normal((hidden, hidden)))[0]
    for a in (0.8, 1.25):
        params["W_hh"] = jnp.asarray(a * q)
        value = lyapunov_exponent(linear, params, xs, h0, jnp.array([steps, 7, 1]))
        assert abs(float(value) - np.log(a)) <= 1e-6, (a, value)

    params, xs, h0 = problem("elman_tanh", 60, 2, inputs=2, hidden=6, radius=0.3)
    assert float(lyapunov_exponent("elman_tanh", params, xs, h0)) < -0.5
    assert float(lyapunov_exponent("elman_tanh", *chaotic_problem(60))) > 0.1


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work


def _no_work(*args):
    raise AssertionError("cell.forward ran before the inputs were checked")


NO_WORK = cells.ELMAN_TANH._replace(forward=_no_work)


def _bad_cases():
    params, xs, h0 = problem("elman_tanh", 5, 2, inputs=3, hidden=4)
    ok = dict(cell=NO_WORK, params=params, xs=xs, h0=h0)
    no_bias = {k: v for k, v in params.items() if k != "b_h"}
    return [
        (dict(method="newton"), ValueError, "method"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(tol="1e-6"), TypeError, "tol"),
        (dict(max_iters=0), ValueError, "max_iters"),
        (dict(max_iters=2.5), TypeError, "max_iters"),
        (dict(damping=1.0), ValueError, "damping"),
        (dict(damping=-0.1), ValueError, "damping"),
        (dict(reverse="yes"), TypeError, "reverse"),
        (dict(cell="transformer"), ValueError, "cell"),
        (dict(params=no_bias), ValueError, "b_h"),
        (dict(xs=xs[:, :, :2]), ValueError, "xs"),
        (dict(xs=xs[:, 0]), ValueError, "xs"),
        (dict(xs=xs.astype(jnp.float32)), TypeError, "xs"),
        (dict(h0=h0[:, :3]), ValueError, "h0"),
        (dict(h0=(h0, h0)), ValueError, "h0"),
        (dict(lengths=jnp.array([5])), ValueError, "lengths"),
        (dict(lengths=jnp.array([5, 6])), ValueError, "lengths"),
        (dict(lengths=jnp.array([5.0, 1.0])), TypeError, "lengths"),
        (dict(init_states=h0), ValueError, "init_states"),
    ], ok


BAD_CASES, OK_ARGS = _bad_cases()


@pytest.mark.parametrize("change, error, name", BAD_CASES, ids=[c[2] for c in BAD_CASES])
def test_bad_input_is_named(change, error, name):
    args = {**OK_ARGS, **change}
    positional = [args.pop(k) for k in ("cell", "params", "xs", "h0")]
    with pytest.raises(error, match=name):
        deer_unroll(*positional, **args)


def test_lyapunov_bad_input():
    params, xs, h0 = problem("elman_tanh", 3, 2, inputs=2, hidden=3)
    with pytest.raises(ValueError, match="T >= 1"):
        lyapunov_exponent(NO_WORK, params, xs[:0], h0)
    with pytest.raises(ValueError, match="lengths"):
        lyapunov_exponent(NO_WORK, params, xs, h0, jnp.array([0, 0]))
    with pytest.raises(ValueError, match="xs"):
        lyapunov_exponent(NO_WORK, params, xs[..., :1], h0)


# ---------------------------------------------------------------------------------------------
# The benchmark's --quick mode


def test_bench_parallel_quick(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_parallel", REPO / "experiments" / "bench_parallel.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_json, out_txt = tmp_path / "b.json", tmp_path / "b.txt"
    module.main(["--quick", "--json", str(out_json), "--txt", str(out_txt)])
    saved = json.loads(out_json.read_text())
    assert saved["quick"] is True and "cpu" in saved["device"].lower()
    assert saved["jax"] == jax.__version__
    records = saved["records"]
    assert {r["cell"] for r in records} >= {"elman_tanh", "gru"}
    assert {r["weights"] for r in records} == {"untrained", "trained_like"}
    assert {r["mode"] for r in records} == {"sequential", "quasi", "full"}
    for r in records:
        for key in ("T", "H", "B", "ms", "temp_bytes", "lyapunov", "iterations", "converged"):
            assert key in r, (key, r)
        if r["mode"] != "sequential" and not r.get("skipped"):
            assert r["converged"] is True and r["iterations"] >= 1 and r["ms"] > 0
    assert "quasi" in out_txt.read_text()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_parallel_mode_of_the_model_equals_auto(cell):
    """``bptt(mode="parallel")``: every layer and direction by deer_unroll, at any depth."""
    import jax_bptt as jb

    params = jb.init_model(
        jax.random.key(0), cell, 3, 4, 2, num_layers=2, bidirectional=True, dtype=jnp.float64
    )
    xs = jax.random.normal(jax.random.key(1), (8, 3, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (8, 3, 2), jnp.float64)
    kw = dict(
        cell=cell, lengths=jnp.array([8, 3, 0]), dropout=0.2, key=jax.random.key(3),
        residual="except_first",
    )  # fmt: skip
    parallel, auto = (
        jb.bptt(params, xs, ys, mode="parallel", **kw),
        jb.bptt_auto(params, xs, ys, **kw),
    )
    for a, b in zip(jax.tree.leaves(parallel), jax.tree.leaves(auto), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-9 * max(float(jnp.max(jnp.abs(b))), 1e-30)
