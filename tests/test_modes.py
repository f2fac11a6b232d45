"""BPTT modes: every mode of ``bptt`` equals ``jax.grad`` (``bptt_auto``), finite differences and
``check_grads``; the loss conventions; unbatched inputs, ``T = 0``, user ``jit``; the public
signatures."""

import functools
import inspect
import itertools
import pydoc
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_state
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jax_bptt as jb
from jax_bptt import losses
from jax_bptt.losses import Loss

CELL_NAMES = sorted(jb.CELLS)
F64 = jnp.float64
TINY = dict(batch=2, inputs=2, hidden=3, outputs=2)  # numerical derivatives: few parameters
OTHER_MODES = tuple(m for m in jb.BPTT_MODES if m != "auto")  # each checked against bptt_auto


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
    dtype=F64,
):
    """A random one-layer model and batch: ``(params, xs, targets, kwargs)`` where ``kwargs``
    (cell, loss, lengths, h0) go straight to ``bptt``. Lengths are uniform in ``[0, T]``; a random
    ``h0`` has N(0, 0.25) entries."""
    k_p, k_x, k_y, k_l, k_h = jax.random.split(key, 5)
    params = jb.init_model(k_p, cell, inputs, hidden, outputs, dtype=dtype)
    xs = jax.random.normal(k_x, (steps, batch, inputs), dtype)
    targets = random_targets(k_y, loss, placement, steps, batch, outputs, dtype)
    lengths = jax.random.randint(k_l, (batch,), 0, steps + 1) if random_lengths else None
    h0 = None
    if random_h0:
        h0 = [{"fwd": random_state(k_h, cell, batch, hidden, dtype)}]
    kwargs = dict(cell=cell, loss=Loss(loss, placement), lengths=lengths, h0=h0)
    return params, xs, targets, kwargs


def random_targets(key, loss, placement, steps, batch, outputs, dtype=F64):
    shape = (steps, batch) if placement == "per_step" else (batch,)
    if loss == "mse":
        return jax.random.normal(key, (*shape, outputs), dtype)
    return jax.random.randint(key, shape, 0, outputs)


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def compare(candidate, reference, tolerance, global_scale=False):
    """Leaf by leaf ``max|a - b| / max|b|`` (loss, params, h0, xs); returns the failing rows.

    ``global_scale``: every leaf's error is measured against at least the largest gradient entry
    of all leaves (finite differences have an absolute error)."""
    flat_c, tree_c = jax.tree_util.tree_flatten_with_path(candidate._asdict())
    flat_r, tree_r = jax.tree_util.tree_flatten(reference._asdict())
    assert tree_c == jax.tree_util.tree_structure(reference._asdict()), (tree_c, tree_r)
    floor = 0.0
    if global_scale:
        grads = (reference.params, reference.h0, reference.xs)
        floor = max(float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(grads))
    bad = []
    for (path, a), b in zip(flat_c, flat_r, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (_leaf_name(path), a.shape, b.shape)
        if a.size == 0:
            continue
        err = float(np.max(np.abs(a - b)))
        scale = max(float(np.max(np.abs(b))), floor)
        rel = err / scale if scale > 0 else err
        if not rel <= tolerance:
            bad.append(f"{_leaf_name(path)}: max abs err {err:.3e}, rel err {rel:.3e}")
    return bad


@functools.partial(jax.jit, static_argnames=("cell", "losses_", "modes"))
def every_mode(params, xs, targets, lengths, h0, *, cell, losses_, modes=OTHER_MODES):
    """``{(loss, mode): Gradients}`` for ``bptt_auto`` and ``bptt(mode=...)``, every loss, in ONE
    compiled program (compile time dominates these tests; one program compiles faster than many).
    ``bptt`` inside a user's ``jit`` is supported and validates at trace time."""
    out = {}
    for loss, ys in zip(losses_, targets, strict=True):
        kw = dict(cell=cell, loss=loss, lengths=lengths, h0=h0)
        out[loss, "auto"] = jb.bptt_auto(params, xs, ys, **kw)
        for mode in modes:
            out[loss, mode] = jb.bptt(params, xs, ys, mode=mode, **kw)
    return out


def mode_failures(results, tolerance, skip=()):
    """``{(loss, mode): failing rows}`` of every mode against ``bptt_auto``."""
    failures = {}
    for (loss, mode), got in results.items():
        if mode == "auto" or (loss, mode) in skip:
            continue
        bad = compare(got, results[loss, "auto"], tolerance)
        if bad:
            failures[loss, mode] = bad
    return failures


def _w_hh(grads):
    return grads.params["layers"][0]["fwd"]["W_hh"]


def _zero_h0(cell, batch, hidden, dtype=F64):
    return [{"fwd": jb.get_cell(cell).zero_state((batch,), hidden, dtype)}]


# ---------------------------------------------------------------------------------------------
# Every mode == automatic BPTT

LOSS_CASES = tuple(Loss(k, p) for k, p in itertools.product(losses.LOSSES, losses.PLACEMENTS))


@pytest.mark.parametrize("random_lengths", [0, 1])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_modes_equal_auto_float64(cell, random_lengths):
    """Every cell x loss x placement x lengths (with 0 and T) x h0 (zeros, random): manual, fast
    and checkpointed against jax.grad (auto). The losses of one (cell, lengths) share a compile."""
    for seed, random_h0 in enumerate((False, True)):
        key = jax.random.key(seed)
        params, xs, _, kw = random_problem(
            key, cell, steps=9, batch=4, random_lengths=bool(random_lengths), random_h0=random_h0
        )
        lengths = kw["lengths"]
        if random_lengths:  # make sure the edge cases 0 and T are present
            lengths = lengths.at[:2].set(jnp.array([0, 9]))
        k_y = jax.random.split(key, 5)[2]
        targets = [random_targets(k_y, *loss[:2], 9, 4, 3) for loss in LOSS_CASES]
        h0 = kw["h0"] or _zero_h0(cell, 4, 6)  # zeros: the h0=None default, sharing the compile
        results = every_mode(params, xs, targets, lengths, h0, cell=cell, losses_=LOSS_CASES)
        failures = mode_failures(results, 1e-10)
        assert not failures, (seed, failures)
        for loss in LOSS_CASES:  # the comparison is not vacuous: the gradients are far from zero
            assert float(jnp.max(jnp.abs(_w_hh(results[loss, "auto"])))) > 1e-4, (seed, loss)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_checkpointed_last_step_without_lengths(kind):
    """Regression: with T a multiple of the segment length and no lengths, each segment must
    still find the one last step (it once counted the last step of every segment)."""
    params, xs, targets, kw = random_problem(
        jax.random.key(0), "elman_tanh", kind, "last_step", steps=9, batch=4
    )
    auto = jb.bptt_auto(params, xs, targets, **kw)
    got = jb.bptt_checkpointed(params, xs, targets, **kw)
    assert not compare(got, auto, 1e-10)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_modes_equal_auto_float32(cell):
    params, xs, targets, kw = random_problem(
        jax.random.key(3),
        cell,
        "cross_entropy",
        steps=30,
        batch=8,
        hidden=16,
        random_lengths=True,
        random_h0=True,
        dtype=jnp.float32,
    )
    results = every_mode(
        params, xs, [targets], kw["lengths"], kw["h0"], cell=cell, losses_=(kw["loss"],)
    )
    manual = results[kw["loss"], "manual"]
    assert _w_hh(manual).dtype == jnp.float32
    for grads in results.values():
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(grads[1:]))
    assert not mode_failures(results, 1e-5)


@pytest.mark.parametrize("loss", losses.LOSSES)  # 2 x 5 examples: balanced over xdist workers
@settings(max_examples=5, deadline=None)
@given(
    cell=st.sampled_from(CELL_NAMES),
    placement=st.sampled_from(losses.PLACEMENTS),
    reduction=st.sampled_from(losses.REDUCTIONS),
    steps=st.integers(1, 50),
    batch=st.integers(1, 5),
    hidden=st.integers(1, 9),
    use_lengths=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_modes_equal_auto_property(
    loss, cell, placement, reduction, steps, batch, hidden, use_lengths, seed
):
    params, xs, targets, kw = random_problem(
        jax.random.key(seed),
        cell,
        loss,
        placement,
        steps=steps,
        batch=batch,
        inputs=3,
        hidden=hidden,
        outputs=2,
        random_lengths=use_lengths,
        random_h0=seed % 2 == 1,
    )
    loss = Loss(loss, placement, reduction)
    h0 = kw["h0"] or _zero_h0(cell, batch, hidden)
    results = every_mode(params, xs, [targets], kw["lengths"], h0, cell=cell, losses_=(loss,))
    assert not mode_failures(results, 1e-10)


def finite_difference_gradients(params, xs, targets, *, cell, loss, lengths, h0, eps=1e-5):
    """Central differences of ``model_loss`` for every scalar of params, h0 and xs (float64)."""
    flat, unravel = ravel_pytree((params, h0, xs))

    def loss_at(vector):
        p, state0, inputs = unravel(vector)
        return jb.model_loss(p, inputs, targets, cell=cell, loss=loss, lengths=lengths, h0=state0)

    @jax.jit  # one compile for the value and every difference
    def value_and_differences(flat):
        basis = jnp.eye(flat.size, dtype=F64) * eps
        diffs = jax.vmap(lambda e: (loss_at(flat + e) - loss_at(flat - e)) / (2 * eps))(basis)
        return loss_at(flat), diffs

    value, diffs = value_and_differences(flat)
    d_params, d_h0, d_xs = unravel(diffs)
    return jb.Gradients(value, d_params, d_h0, d_xs)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_manual_equals_finite_differences(cell):
    params, xs, targets, kw = random_problem(
        jax.random.key(5), cell, steps=5, random_lengths=True, random_h0=True, **TINY
    )
    manual = jb.bptt_manual(params, xs, targets, **kw)
    fd = finite_difference_gradients(params, xs, targets, **kw)
    assert not compare(manual, fd, 1e-7, global_scale=True)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_check_grads_on_tiny_model(cell):
    """jax.test_util.check_grads: the scan's derivatives match numerical ones (orders 1, 2)."""
    params, xs, targets, kw = random_problem(
        jax.random.key(7), cell, steps=4, random_h0=True, **TINY
    )

    def loss(p, h0, x):
        return jb.model_loss(p, x, targets, cell=jb.get_cell(cell), loss=Loss("mse"), h0=h0)

    check_grads(loss, (params, kw["h0"], xs), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The comparison itself


def test_compare_detects_a_wrong_gradient():
    """This file's own comparison is not vacuous: a relative error of 1e-8 in one leaf fails."""
    rng = np.random.default_rng(0)
    auto = jb.Gradients(
        np.float64(1.5),
        {"layers": [{"fwd": {"W_hh": rng.normal(size=(3, 3))}}]},
        [{"fwd": rng.normal(size=(2, 3))}],
        rng.normal(size=(4, 2, 3)),
    )
    wrong = auto._replace(params=jax.tree_util.tree_map(lambda a: a * (1 + 1e-8), auto.params))
    assert compare(wrong, auto, 1e-10) and not compare(wrong, auto, 1e-7)
    assert not compare(auto, auto, 0.0)
    with pytest.raises(AssertionError):  # another structure is never "equal"
        compare(auto._replace(h0=[]), auto, 1.0)


# ---------------------------------------------------------------------------------------------
# Edge cases and calling conventions


def test_zero_length_sequence_is_defined():
    """T = 0: loss 0 and zero gradients in every mode (documented)."""
    params, xs, targets, kw = random_problem(
        jax.random.key(0), "lstm", steps=0, batch=2, random_h0=True
    )
    assert xs.shape == (0, 2, 4)
    for mode in jb.BPTT_MODES:
        grads = jb.bptt(params, xs, targets, mode=mode, **kw)
        assert float(grads.loss) == 0.0, mode
        assert grads.xs.shape == (0, 2, 4)
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(float(jnp.abs(a).max(initial=0)) == 0 for a in leaves), mode


def test_unbatched_gradients_have_unbatched_shapes():
    """``(T, D)`` inputs, ``(T, O)`` targets and ``(H,)`` states in every mode equal a batch of
    one; ``bptt_<mode>`` is ``bptt(mode=<mode>)`` and the default mode is manual."""
    params, xs, targets, kw = random_problem(jax.random.key(0), "elman_tanh", batch=1)
    auto = jb.bptt_auto(params, xs, targets, cell="elman_tanh")
    functions = {
        "auto": jb.bptt_auto,
        "manual": jb.bptt_manual,
        "fast": jb.bptt_fast,
        "checkpointed": jb.bptt_checkpointed,
    }
    assert tuple(functions) == jb.BPTT_MODES
    for mode, fn in functions.items():
        got = jb.bptt(params, xs[:, 0], targets[:, 0], cell="elman_tanh", mode=mode)
        assert got.xs.shape == xs[:, 0].shape and got.h0[0]["fwd"].shape == (6,), mode
        assert len(got.h0) == 1 and set(got.h0[0]) == {"fwd"}
        np.testing.assert_allclose(got.xs, auto.xs[:, 0], rtol=1e-12)
        np.testing.assert_allclose(_w_hh(got), _w_hh(auto), rtol=1e-12)
        np.testing.assert_allclose(got.loss, auto.loss, rtol=1e-12)
        assert not compare(fn(params, xs[:, 0], targets[:, 0], cell="elman_tanh"), got, 0.0)
    default = jb.bptt(params, xs[:, 0], targets[:, 0], cell="elman_tanh")
    assert not compare(
        default, jb.bptt_manual(params, xs[:, 0], targets[:, 0], cell="elman_tanh"), 0.0
    )
    value = jb.model_loss(params, xs[:, 0], targets[:, 0], cell="elman_tanh")
    np.testing.assert_allclose(value, auto.loss, rtol=1e-13)
    # An unbatched initial state (H,) is a batch of one too.
    h0 = jnp.linspace(-0.5, 0.5, 6, dtype=F64)
    want = jb.bptt_auto(params, xs, targets, cell="elman_tanh", h0=[{"fwd": h0[None]}])
    got = jb.bptt_manual(params, xs[:, 0], targets[:, 0], cell="elman_tanh", h0=[{"fwd": h0}])
    assert got.h0[0]["fwd"].shape == (6,)
    np.testing.assert_allclose(got.h0[0]["fwd"], want.h0[0]["fwd"][0], rtol=1e-12)
    np.testing.assert_allclose(_w_hh(got), _w_hh(want), rtol=1e-12)


def test_gradients_inside_user_jit():
    params, xs, targets, kw = random_problem(jax.random.key(0), "gru", random_lengths=True)
    lengths = kw.pop("lengths")

    @jax.jit
    def every_mode_jitted(p, x, n):
        return {m: jb.bptt(p, x, targets, mode=m, lengths=n, **kw) for m in OTHER_MODES}

    got = every_mode_jitted(params, xs, lengths)
    want = jb.bptt_auto(params, xs, targets, lengths=lengths, **kw)
    assert {m: compare(g, want, 1e-10) for m, g in got.items()} == dict.fromkeys(OTHER_MODES, [])


MODE_PARAMETERS = [
    "cell", "loss", "lengths", "h0", "dropout", "key", "residual", "options", "time_major",
    "resets", "output_dropout",
]  # fmt: skip


@pytest.mark.parametrize("name", ["bptt_auto", "bptt_manual", "bptt_fast", "bptt_checkpointed"])
def test_mode_functions_show_their_real_parameters(name):
    fn = getattr(jb, name)
    signature = inspect.signature(fn)
    params = signature.parameters
    assert list(params) == ["params", "xs", "targets", *MODE_PARAMETERS]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in MODE_PARAMETERS)
    assert params["cell"].default is inspect.Parameter.empty
    assert params["loss"].default == "mse" and params["dropout"].default == 0.0
    assert params["output_dropout"].default == 0.0
    assert params["residual"].default is False
    assert all(params[p].default is None for p in ("lengths", "h0", "key", "options", "resets"))
    assert params["time_major"].default is True
    bptt = inspect.signature(jb.bptt).parameters
    assert list(bptt) == ["params", "xs", "targets", "cell", "mode", *MODE_PARAMETERS[1:]]
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    for part in ("options=None", "residual=False", "cell", "h0=None", "key=None", "lengths=None"):
        assert part in text, (part, text)
    assert fn.__doc__ and "bptt(" in fn.__doc__


def test_sum_outer_is_a_module_attribute():
    """``import jax_bptt`` alone makes ``jax_bptt.scan.sum_outer`` reachable (a fresh process)."""
    code = "import jax_bptt; print(jax_bptt.scan.sum_outer.__name__, jax_bptt.modes.CORES.keys())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.startswith("sum_outer"), out


# ---------------------------------------------------------------------------------------------
# Losses


def test_losses_match_direct_computation():
    rng = np.random.default_rng(0)
    ys = rng.normal(size=(5, 3, 4))
    lengths = np.array([5, 2, 0])
    mse_t = rng.normal(size=(5, 3, 4))
    ce_t = rng.integers(0, 4, size=(5, 3))
    valid = [(t, b) for b in range(3) for t in range(lengths[b])]
    mse_terms = [np.mean((ys[t, b] - mse_t[t, b]) ** 2) for t, b in valid]

    def ce(t, b, target):
        return np.log(np.sum(np.exp(ys[t, b]))) - ys[t, b, target]

    ce_terms = [ce(t, b, ce_t[t, b]) for t, b in valid]
    last = [(lengths[b] - 1, b) for b in range(3) if lengths[b] > 0]
    lengths = jnp.asarray(lengths)
    cases = [
        ("mse", "per_step", "sum", mse_t, sum(mse_terms)),
        ("mse", "per_step", "mean", mse_t, np.mean(mse_terms)),
        ("cross_entropy", "per_step", "mean", ce_t, np.mean(ce_terms)),
        (
            "cross_entropy",
            "last_step",
            "mean",
            ce_t[0],
            np.mean([ce(t, b, ce_t[0, b]) for t, b in last]),
        ),
        (
            "mse",
            "last_step",
            "sum",
            mse_t[0],
            sum(np.mean((ys[t, b] - mse_t[0, b]) ** 2) for t, b in last),
        ),
    ]
    for kind, placement, reduction, targets, want in cases:
        loss = losses.check_loss(Loss(kind, placement, reduction))
        got = losses.sequence_loss(jnp.asarray(ys), jnp.asarray(targets), loss, lengths)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        # The hand-written dL/dy equals jax.grad of the loss.
        auto = jax.grad(
            lambda y, lo=loss, tg=targets: losses.sequence_loss(y, jnp.asarray(tg), lo, lengths)
        )
        np.testing.assert_allclose(
            losses.sequence_loss_grad(jnp.asarray(ys), jnp.asarray(targets), loss, lengths),
            auto(jnp.asarray(ys)),
            rtol=1e-12,
            atol=1e-15,
        )


def test_loss_value_and_string_form():
    assert losses.check_loss("cross_entropy") == Loss("cross_entropy", "per_step", "mean")
    assert Loss() == Loss("mse", "per_step", "mean")
    assert losses.check_loss(Loss("mse", "last_step", "sum")) == ("mse", "last_step", "sum")
    assert (losses.LOSSES, losses.PLACEMENTS) == (
        ("mse", "cross_entropy"),
        ("per_step", "last_step"),
    )
    assert set(losses.REDUCTIONS) == {"sum", "mean"}
