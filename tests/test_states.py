"""Every step's full state (``unroll(..., return_states=True)``), in float64: the forward against a
Python loop of ``cells.step`` and PyTorch's ``LSTMCell``, and ``jax.grad`` of a loss of the states
(the LSTM's ``c_t`` included) through every mode against ``jax.grad`` through the plain scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb
from jax_bptt import cells
from jax_bptt.model import UNROLL_MODES

T, B, D, H, O = 7, 3, 3, 4, 2  # noqa: E741
LENGTHS = jnp.array([7, 3, 0])
TREE = jax.tree_util


def _problem(cell, num_layers=2, bidirectional=True):
    params = jb.init_model(
        jax.random.key(0), cell, D, H, O, num_layers=num_layers, bidirectional=bidirectional,
        dtype=jnp.float64,
    )  # fmt: skip
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    h0 = TREE.tree_map(
        lambda a: jax.random.normal(jax.random.key(a.size), a.shape, a.dtype),
        jb.init_state(params, B, cell=cell),
    ) if not bidirectional else None  # fmt: skip
    return params, xs, h0


def loop_states(cell, params, xs, lengths):
    """Reference: one ``cells.step`` at a time, per layer and direction, zero past each length."""
    cell = cells.get_cell(cell)
    inputs, all_states = xs, []
    for layer in params["layers"]:
        outs, layer_states = [], {}
        for name, reverse in (("fwd", False), ("bwd", True)):
            if name not in layer:
                continue
            p = layer[name]
            state = cell.zero_state((B,), H, jnp.float64)
            stacked = [None] * T
            for t in reversed(range(T)) if reverse else range(T):
                live = (t < lengths)[:, None]
                new = cells.step(cell, p, state, inputs[t])
                state = TREE.tree_map(lambda n, s, live=live: jnp.where(live, n, s), new, state)
                stacked[t] = TREE.tree_map(lambda s, live=live: jnp.where(live, s, 0), state)
            layer_states[name] = TREE.tree_map(lambda *s: jnp.stack(s), *stacked)
            outs.append(cell.hidden(layer_states[name]))
        inputs = jnp.concatenate(outs, axis=-1)
        all_states.append(layer_states)
    return inputs, all_states


def _weights(tree):
    """Fixed random weights for every leaf: a loss that reads every state, h and c alike."""
    leaves, treedef = TREE.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return TREE.tree_unflatten(
        treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


def _loss_of_states(params, xs, h0, *, cell, mode, weights, options=None):
    outputs, finals, states = jb.unroll(
        params, xs, cell=cell, h0=h0, lengths=LENGTHS, mode=mode, options=options,
        return_states=True,
    )  # fmt: skip
    read = TREE.tree_map(lambda w, s: jnp.sum(w * jnp.tanh(s)), weights, states)
    return (
        sum(TREE.tree_leaves(read))
        + jnp.sum(outputs**2)
        + sum(jnp.sum(f**3) for f in TREE.tree_leaves(finals))
    )


def _assert_close(got, want, rtol=1e-10):
    for a, b in zip(TREE.tree_leaves(got), TREE.tree_leaves(want), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-300)
        assert float(jnp.max(jnp.abs(a - b))) <= rtol * scale


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_states_match_a_python_loop(cell):
    params, xs, _ = _problem(cell)
    outputs, finals, states = jb.unroll(params, xs, cell=cell, lengths=LENGTHS, return_states=True)
    want_outputs, want_states = loop_states(cell, params, xs, LENGTHS)
    _assert_close(states, want_states, 1e-13)
    _assert_close(outputs, want_outputs, 1e-13)
    # the forward direction's final state is its state at the length, the backward's at step 0
    last = jnp.maximum(LENGTHS - 1, 0)
    live = (LENGTHS > 0)[:, None]

    def where_live(tree):
        return TREE.tree_map(lambda s: jnp.where(live, s, 0), tree)

    for layer, final in zip(states, finals, strict=True):
        at_length = TREE.tree_map(lambda s: s[last, jnp.arange(B)], layer["fwd"])
        _assert_close(where_live(at_length), where_live(final["fwd"]), 0)
        first = TREE.tree_map(lambda s: s[0], layer["bwd"])
        _assert_close(where_live(first), where_live(final["bwd"]), 0)
    # without return_states: the same two results, bitwise
    plain = jb.unroll(params, xs, cell=cell, lengths=LENGTHS)
    _assert_close(plain, (outputs, finals), 0)


CASES = [  # the LSTM (h and c) in every mode; the GRU's state is its h alone
    ("lstm", "fast", None),
    ("lstm", "fast", jb.ScanOptions(chunk_length=2)),  # the chunked backward: T = 3 * 2 + 1
    ("lstm", "checkpointed", jb.ScanOptions(segment_length=3)),  # T not a multiple of it
    ("lstm", "parallel", None),
    ("gru", "fast", jb.ScanOptions(chunk_length=2)),
]


@pytest.mark.parametrize(("cell", "mode", "options"), CASES)
def test_grad_of_states_matches_the_plain_scan(cell, mode, options):
    params, xs, _ = _problem(cell)
    weights = _weights(jb.unroll(params, xs, cell=cell, return_states=True)[2])
    kw = dict(cell=cell, weights=weights)
    want = jax.grad(_loss_of_states, argnums=(0, 1))(params, xs, None, mode="auto", **kw)
    got = jax.grad(_loss_of_states, argnums=(0, 1))(
        params, xs, None, mode=mode, options=options, **kw
    )
    _assert_close(got, want)


def test_grad_of_c_alone_unidirectional_with_h0():
    """Only ``c_t`` is read (``h`` gets no direct cotangent); ``h0`` gets its gradient too."""
    params, xs, h0 = _problem("lstm", num_layers=2, bidirectional=False)

    def loss(params, xs, h0, mode):
        _, _, states = jb.unroll(
            params, xs, cell="lstm", h0=h0, lengths=LENGTHS, mode=mode, return_states=True
        )
        return sum(jnp.sum(jnp.sin(layer["fwd"][1])) for layer in states)

    def loop_loss(params, xs, h0):  # the reference: a Python loop, differentiated by jax.grad
        cell, total, inputs = cells.get_cell("lstm"), 0.0, xs
        for layer, state in zip(params["layers"], h0, strict=True):
            state, hs = state["fwd"], []
            for t in range(T):
                live = (t < LENGTHS)[:, None]
                new = cells.step(cell, layer["fwd"], state, inputs[t])
                state = TREE.tree_map(lambda n, s, live=live: jnp.where(live, n, s), new, state)
                total = total + jnp.sum(jnp.sin(jnp.where(live, state[1], 0)))
                hs.append(jnp.where(live, state[0], 0))
            inputs = jnp.stack(hs)
        return total

    want = jax.grad(loop_loss, argnums=(0, 1, 2))(params, xs, h0)
    for mode in UNROLL_MODES:
        got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, h0, mode)
        _assert_close(got, want)


def test_layouts_batch_major_unbatched_and_empty():
    params, xs, _ = _problem("lstm")
    _, _, states = jb.unroll(params, xs, cell="lstm", lengths=LENGTHS, return_states=True)
    assert TREE.tree_leaves(TREE.tree_map(jnp.shape, states)) == [T, B, H] * 8
    _, _, batch_major = jb.unroll(
        params, xs.swapaxes(0, 1), cell="lstm", lengths=LENGTHS, time_major=False,
        return_states=True,
    )  # fmt: skip
    _assert_close(TREE.tree_map(lambda s: s.swapaxes(0, 1), batch_major), states, 0)
    _, finals, single = jb.unroll(params, xs[:, 0], cell="lstm", return_states=True)
    _assert_close(single, TREE.tree_map(lambda s: s[:, 0], states), 1e-13)  # B = 1: other GEMMs
    assert finals[0]["fwd"][0].shape == (H,)
    _, _, empty = jb.unroll(params, xs[:0], cell="lstm", return_states=True)
    assert TREE.tree_leaves(TREE.tree_map(jnp.shape, empty)) == [0, B, H] * 8
    with pytest.raises(TypeError, match="return_states must be a bool"):
        jb.unroll(params, xs, cell="lstm", return_states="yes")
    with pytest.raises(ValueError, match="return_states with backend 'pallas' needs an h-only"):
        pallas = jb.ScanOptions(backend="pallas")
        jb.unroll(params, xs, cell="lstm", mode="fast", options=pallas, return_states=True)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_h_and_c_match_torch_lstm_cell(num_layers):
    torch = pytest.importorskip("torch")
    from jax_bptt.torch_convert import from_torch

    torch.manual_seed(0)
    rnn = torch.nn.LSTM(D, H, num_layers=num_layers, dtype=torch.float64)
    params = from_torch(rnn, "lstm")
    params["readout"] = {"W_hy": jnp.zeros((H, O)), "b_y": jnp.zeros(O)}
    xs = np.asarray(jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64))
    _, _, states = jb.unroll(params, jnp.asarray(xs), cell="lstm", return_states=True)

    inputs = torch.tensor(xs)
    with torch.no_grad():
        for layer in range(num_layers):
            step = torch.nn.LSTMCell(D if layer == 0 else H, H, dtype=torch.float64)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(step, name).copy_(getattr(rnn, f"{name}_l{layer}"))
            h = c = torch.zeros(B, H, dtype=torch.float64)
            hs = []
            for t in range(T):
                h, c = step(inputs[t], (h, c))
                np.testing.assert_allclose(states[layer]["fwd"][0][t], h.numpy(), rtol=1e-12)
                np.testing.assert_allclose(states[layer]["fwd"][1][t], c.numpy(), rtol=1e-12)
                hs.append(h)
            inputs = torch.stack(hs)
        # and the top layer's h is nn.LSTM's output
        np.testing.assert_allclose(inputs.numpy(), rnn(torch.tensor(xs))[0].numpy(), rtol=1e-12)
