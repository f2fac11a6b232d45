"""Resets inside a sequence: against a Python-loop reference, and against the pieces run apart.

The reference runs every batch row on its own, one ``cells.step`` at a time through every layer
and direction, restarting from ``h0`` where ``resets`` says (the backward direction where the next
step starts a segment), with the loss written out term by term: independent of the scans, the
masks, the stack code, the hand-written backward and ``losses.py``. Its gradients are
``jax.grad`` of that loop. Float64 (conftest): exact methods agree to 1e-10 relative.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb
from jax_bptt import parallel
from jax_bptt.cells import get_cell, step
from jax_bptt.check import relative_error
from jax_bptt.model import dropout_masks
from jax_bptt.truncated import truncated_bptt, window_bounds

TOL = 1e-10
T, B, D, H, OUT = 6, 3, 2, 3, 2
LENGTHS = np.array([6, 5, 4])
RESETS = np.zeros((T, B), bool)
RESETS[3, 0] = True  # row 0: [0, 3) [3, 6)
RESETS[[0, 2, 4], 1] = True  # row 1: a no-op at 0, then [0, 2) [2, 4) [4, 5), padding after
RESETS[5, 2] = True  # row 2: a reset in the padding, which nothing reads
OPTIONS = jb.ScanOptions(chunk_length=4, segment_length=4)  # chunks and padded segments
MODES = (*jb.BPTT_MODES, "parallel")


def _has_residual(residual, layer):
    return residual is True or (residual == "except_first" and layer > 0)


def _direction(cell, p, xs, h0, resets, reverse):
    """One row's recurrence over its valid steps ``xs (L, F)``: outputs ``(L, H)``, final."""
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    state, outs = h0, [None] * len(xs)
    for t in order:
        starts_here = resets[t + 1] if reverse else resets[t]
        if starts_here and (t + 1 < len(xs) if reverse else True):
            state = h0
        state = step(cell, p, state, xs[t][None])
        outs[t] = cell.hidden(state)[0]
    return (jnp.stack(outs) if outs else jnp.zeros((0, p["W_hh"].shape[0]))), state


def reference_forward(params, h0, xs, *, cell, lengths, resets, residual=False, drops=None):
    """Top-layer outputs ``(T, B, F)`` (zero past each length) and final states, row by row."""
    cell = get_cell(cell)
    resets = np.concatenate([resets, np.zeros((1, xs.shape[1]), bool)])  # resets[T]: none
    rows, finals = [], []
    for b in range(xs.shape[1]):
        length = int(lengths[b])
        inputs, row_finals = xs[:length, b], []
        for i, layer in enumerate(params["layers"]):
            outs, final = [], {}
            for name, reverse in (("fwd", False), ("bwd", True)):
                if name in layer:
                    start = jax.tree_util.tree_map(lambda a, b=b: a[b : b + 1], h0[i][name])
                    hs, final[name] = _direction(
                        cell, layer[name], inputs, start, resets[:, b], reverse
                    )
                    outs.append(hs)
            out = jnp.concatenate(outs, axis=-1)
            out = out + inputs if _has_residual(residual, i) else out
            if drops is not None and i < len(params["layers"]) - 1:
                out = out * drops[i][:length, b]
            inputs = out
            row_finals.append(final)
        pad = jnp.zeros((xs.shape[0] - length, inputs.shape[-1]), xs.dtype)
        rows.append(jnp.concatenate([inputs, pad]))
        finals.append(row_finals)
    stacked = jax.tree_util.tree_map(lambda *r: jnp.concatenate(r), *finals)
    return jnp.stack(rows, axis=1), stacked


def reference_loss(params, h0, xs, targets, *, cell, lengths, resets, kind, **kw):
    """The per-step loss, mean over valid terms, written out term by term."""
    outputs, _ = reference_forward(params, h0, xs, cell=cell, lengths=lengths, resets=resets, **kw)
    ro = params["readout"]
    terms = []
    for b in range(xs.shape[1]):
        for t in range(int(lengths[b])):
            y = outputs[t, b] @ ro["W_hy"] + ro["b_y"]
            if kind == "mse":
                terms.append(jnp.mean((y - targets[t, b]) ** 2))
            else:
                terms.append(jax.nn.logsumexp(y) - y[targets[t, b]])
    return sum(terms) / len(terms)


def _problem(cell, num_layers, bidirectional, kind="mse", seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = jb.init_model(
        keys[0], cell, D, H, OUT, num_layers=num_layers, bidirectional=bidirectional,
        dtype=jnp.float64,
    )  # fmt: skip
    xs = jax.random.normal(keys[1], (T, B, D), jnp.float64)
    if kind == "mse":
        targets = jax.random.normal(keys[2], (T, B, OUT), jnp.float64)
    else:
        targets = jax.random.randint(keys[2], (T, B), 0, OUT)
    zero = get_cell(cell).zero_state((B,), H, jnp.float64)
    names = ("fwd", "bwd") if bidirectional else ("fwd",)
    layer_keys = iter(jax.random.split(keys[3], num_layers * len(names)))

    def random_state(key):
        return jax.tree_util.tree_map(lambda z: 0.5 * jax.random.normal(key, z.shape), zero)

    h0 = [{name: random_state(next(layer_keys)) for name in names} for _ in range(num_layers)]
    return params, xs, targets, h0


def assert_trees_close(candidate, reference, tol=TOL):
    assert jax.tree_util.tree_structure(candidate) == jax.tree_util.tree_structure(reference)
    leaves = zip(
        jax.tree_util.tree_leaves(candidate), jax.tree_util.tree_leaves(reference), strict=True
    )
    for a, b in leaves:
        assert relative_error(a, b)[1] <= tol


# (cell, num_layers, bidirectional, residual, dropout, loss kind)
ONE_LAYER = ("lstm", 1, False, False, 0.0, "mse")
BIDIRECTIONAL = ("gru", 2, True, False, 0.0, "cross_entropy")
RESIDUAL_DROPOUT = ("elman_tanh", 2, False, "except_first", 0.3, "mse")
CASES = [ONE_LAYER, BIDIRECTIONAL, RESIDUAL_DROPOUT]


@functools.lru_cache(maxsize=len(CASES))
def _reference(case):
    cell, num_layers, bidirectional, residual, dropout, kind = case
    params, xs, targets, h0 = _problem(cell, num_layers, bidirectional, kind)
    key = jax.random.key(5)
    drops = dropout_masks(key, dropout, params["layers"], xs) if dropout else None
    kw = dict(cell=cell, lengths=LENGTHS, resets=RESETS, residual=residual, drops=drops)
    outputs, finals = reference_forward(params, h0, xs, **kw)
    loss, grads = jax.value_and_grad(
        lambda p, h, x: reference_loss(p, h, x, targets, kind=kind, **kw), argnums=(0, 1, 2)
    )(params, h0, xs)
    model = dict(
        cell=cell, lengths=jnp.asarray(LENGTHS), h0=h0, resets=jnp.asarray(RESETS),
        residual=residual, options=OPTIONS,
    )  # fmt: skip
    if dropout:
        model.update(dropout=dropout, key=key)
    return (params, xs, targets, kind), model, (outputs, finals), jb.Gradients(loss, *grads)


@pytest.mark.parametrize(
    "case, mode",
    [(ONE_LAYER, mode) for mode in MODES]
    + [(BIDIRECTIONAL, mode) for mode in MODES]
    + [(RESIDUAL_DROPOUT, "manual"), (RESIDUAL_DROPOUT, "checkpointed")],
    ids=lambda c: c if isinstance(c, str) else f"{c[0]}-{c[1]}layer-bi{c[2]}",
)
def test_modes_match_the_python_loop(case, mode):
    (params, xs, targets, kind), model, (outputs, finals), reference = _reference(case)
    if mode in ("auto", "parallel"):  # the other modes' forward is manual's: the loss checks it
        unrolled, unrolled_finals = jb.unroll(params, xs, mode=mode, **model)
        assert_trees_close((unrolled, unrolled_finals), (outputs, finals))
    grads = jb.bptt(params, xs, targets, mode=mode, loss=kind, **model)
    assert_trees_close(grads, reference)
    if mode == "auto" and "dropout" not in model:  # evaluation entry points
        loss = jb.model_loss(params, xs, targets, loss=kind, **model)
        assert relative_error(loss, reference.loss)[1] <= TOL
        predicted = jb.predict(params, xs, **model)
        readout = outputs @ params["readout"]["W_hy"] + params["readout"]["b_y"]
        mask = np.arange(T)[:, None] < LENGTHS[None, :]
        assert (
            relative_error(
                np.where(mask[..., None], predicted, 0), np.where(mask[..., None], readout, 0)
            )[1]
            <= TOL
        )


# --------------------------------------------------------------------------------------------
# A packed row is its pieces run on their own


PIECES = (2, 2, 2)  # three sequences packed into one row of T = 6 (one compile for the pieces)


@pytest.mark.parametrize(
    "mode, bidirectional", [("manual", True), ("fast", False), ("checkpointed", True)]
)
def test_packed_row_equals_its_pieces(mode, bidirectional):
    params, xs, _, h0 = _problem("lstm", 2, bidirectional, seed=3)
    xs, h0 = xs[:, :1], jax.tree_util.tree_map(lambda a: a[:1], h0)
    targets = jax.random.normal(jax.random.key(9), (T, 1, OUT), jnp.float64)
    starts = np.cumsum((0, *PIECES))[:-1]
    resets = np.zeros((T, 1), bool)
    resets[starts] = True
    loss = jb.Loss("mse", reduction="sum")
    kw = dict(cell="lstm", h0=h0, options=OPTIONS)
    packed_out, _ = jb.unroll(params, xs, resets=jnp.asarray(resets), **kw)
    packed = jb.bptt(params, xs, targets, mode=mode, loss=loss, resets=jnp.asarray(resets), **kw)
    outs, pieces = [], []
    for start, size in zip(starts, PIECES, strict=True):
        piece = slice(start, start + size)
        outs.append(jb.unroll(params, xs[piece], **kw)[0])
        pieces.append(jb.bptt(params, xs[piece], targets[piece], mode=mode, loss=loss, **kw))
    assert relative_error(packed_out, jnp.concatenate(outs))[1] <= TOL
    summed = jax.tree_util.tree_map(lambda *g: sum(g), *[(g.loss, g.params, g.h0) for g in pieces])
    assert_trees_close((packed.loss, packed.params, packed.h0), summed)
    assert relative_error(packed.xs, jnp.concatenate([g.xs for g in pieces]))[1] <= TOL


# --------------------------------------------------------------------------------------------
# Token ids, batch-major, unbatched


def test_token_ids_batch_major_and_unbatched():
    cell, V, mode = "gru", 4, "manual"
    params = jb.init_model(jax.random.key(1), cell, V, H, OUT, num_layers=2, dtype=jnp.float64)
    ids = jax.random.randint(jax.random.key(2), (T, B), 0, V)
    targets = jax.random.randint(jax.random.key(3), (T, B), 0, OUT)
    kw = dict(cell=cell, loss="cross_entropy", mode=mode, lengths=jnp.asarray(LENGTHS))
    resets = jnp.asarray(RESETS)
    one_hot = jax.nn.one_hot(ids, V, dtype=jnp.float64)
    reference = jb.bptt(params, one_hot, targets, resets=resets, **{**kw, "mode": "auto"})
    by_ids = jb.bptt(params, ids, targets, resets=resets, **kw)
    assert_trees_close((by_ids.loss, by_ids.params), (reference.loss, reference.params))
    batch_major = jb.bptt(
        params, one_hot.swapaxes(0, 1), targets.T, resets=resets.T, time_major=False, **kw
    )
    assert_trees_close(batch_major.params, reference.params)
    assert relative_error(batch_major.xs.swapaxes(0, 1), reference.xs)[1] <= TOL
    outputs, _ = jb.unroll(params, ids, cell=cell, resets=resets)
    row, _ = jb.unroll(params, ids[:, 1], cell=cell, resets=resets[:, 1])  # one sequence: (T,)
    assert relative_error(row, outputs[:, 1])[1] <= TOL


# --------------------------------------------------------------------------------------------
# Truncated BPTT and the train step


def _window_reference_loss(params, cell, xs, targets, h_start, h_reset, resets, start, end, k1):
    """Loss of the last k1 steps of window [start, end), from the constant h_start."""
    cell = get_cell(cell)
    state, terms = h_start, []
    for t in range(start, end):
        new = []
        inputs = xs[t]
        for i, layer in enumerate(params["layers"]):
            s = jax.tree_util.tree_map(
                lambda r, c, t=t: jnp.where(resets[t][:, None], r, c),
                h_reset[i]["fwd"],
                state[i]["fwd"],
            )
            s = step(cell, layer["fwd"], s, inputs)
            inputs = cell.hidden(s)
            new.append({"fwd": s})
        state = new
        if t >= end - k1:
            y = inputs @ params["readout"]["W_hy"] + params["readout"]["b_y"]
            terms.append(
                jnp.mean(
                    jax.nn.logsumexp(y, -1) - jnp.take_along_axis(y, targets[t][:, None], -1)[:, 0]
                )
            )
    return sum(terms) / len(terms), state


K1, K2 = 2, 4
STREAM_RESETS = np.zeros((T, B), bool)
STREAM_RESETS[[1, 2, 4], [0, 1, 2]] = True  # steps 2 and 4 start windows (k2 - k1 = 2)


@functools.lru_cache(maxsize=1)
def _truncated_reference():
    """The stream, its true states (restarts included) and the mean of the window gradients."""
    cell, k1, k2, resets = "lstm", K1, K2, STREAM_RESETS
    params, xs, _, h0 = _problem(cell, 2, False)
    targets = jax.random.randint(jax.random.key(4), (T, B), 0, OUT)
    total, states = None, {}
    state = h0
    for t in range(T):  # the stream's true states, restarts included: states[t] is after t
        _, state = _window_reference_loss(params, cell, xs, targets, state, h0, resets, t, t + 1, 1)
        states[t] = state
    for block in range(T // k1):
        start, end = window_bounds(block, k1, k2)
        h_start = h0 if start == 0 else states[start - 1]
        window = functools.partial(
            _window_reference_loss, cell=cell, xs=xs, targets=targets, h_start=h_start, h_reset=h0,
            resets=resets, start=start, end=end, k1=k1,
        )  # fmt: skip
        grads = jax.grad(lambda p, window=window: window(p)[0])(params)
        total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
    mean = jax.tree_util.tree_map(lambda g: g / (T // k1), total)
    return (params, xs, targets, h0), mean, states[T + k1 - k2 - 1]


@pytest.mark.parametrize("mode", ["auto", "manual", "checkpointed"])
def test_truncated_bptt_with_resets_matches_a_reference(mode):
    (params, xs, targets, h0), mean, carry = _truncated_reference()
    stream = truncated_bptt(
        params, xs, targets, cell="lstm", k1=K1, k2=K2, loss="cross_entropy", h0=h0, mode=mode,
        resets=jnp.asarray(STREAM_RESETS), options=OPTIONS,
    )  # fmt: skip
    assert_trees_close(stream.params, mean)
    assert_trees_close(stream.carry, carry)


def test_train_step_takes_resets():
    params, xs, targets, _ = _problem("gru", 1, False)
    opt = jb.make_optimizer("sgd", 0.1)
    resets = jnp.asarray(RESETS)
    train_step = jb.make_train_step(opt, cell="gru", mode="fast")
    new, _, info = train_step(params, opt.init(params), xs, targets, resets=resets)
    grads = jb.bptt(params, xs, targets, cell="gru", mode="auto", resets=resets)
    assert relative_error(info.loss, grads.loss)[1] <= TOL
    assert_trees_close(new, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads.params))
    plain = jb.bptt(params, xs, targets, cell="gru", mode="auto")
    assert abs(float(plain.loss - grads.loss)) > 1e-6  # the resets changed something
    sharded = parallel.data_parallel_step(train_step, parallel.make_mesh())
    assert_trees_close(sharded(params, opt.init(params), xs, targets, resets=resets)[0], new)


# --------------------------------------------------------------------------------------------
# Bad resets


@pytest.mark.parametrize(
    "resets, error, match",
    [
        (np.zeros((T, B), np.int32), TypeError, "resets must be bool"),
        (np.zeros((B, T), bool), ValueError, r"resets must have shape \(6, 3\)"),
        (np.zeros((T,), bool), ValueError, r"resets must have shape \(6, 3\)"),
    ],
)
def test_bad_resets_are_named(resets, error, match):
    params, xs, targets, _ = _problem("gru", 1, False)
    with pytest.raises(error, match=match):
        jb.bptt(params, xs, targets, cell="gru", resets=resets)
    with pytest.raises(error, match=match):
        jb.unroll(params, xs, cell="gru", resets=resets)


def test_pallas_backend_refuses_resets():
    params, xs, _, _ = _problem("gru", 1, False)
    with pytest.raises(ValueError, match="backend 'pallas' cannot run resets"):
        jb.unroll(
            params, xs, cell="gru", resets=jnp.asarray(RESETS),
            options=jb.ScanOptions(backend="pallas"),
        )  # fmt: skip
