"""Cells: each forward step against the PyTorch equations, each hand-derived backward step against
``jax.vjp`` of its forward, the bias-gradient contract, and the initialisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb
from jax_bptt import cells

CELL_NAMES = sorted(jb.CELLS)
F64 = jnp.float64
B, D, H = 3, 4, 5


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want), initial=0.0))
    err = float(np.max(np.abs(got - want), initial=0.0))
    return err / scale if scale > 0 else err


def _assert_trees_close(got, want, rtol):
    got_leaves, tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert tree == want_tree
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert _rel(a, b) <= rtol, (_rel(a, b), a, b)


def _random_state(cell, seed, batch_shape=(B,), scale=0.5):
    """A random state of ``cell`` (NumPy draws: no compile per shape)."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten(cell.zero_state(batch_shape, H, F64))
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(scale * rng.normal(size=a.shape)) for a in leaves]
    )


def _random_step(cell, seed):
    """Params, projected inputs ``xp``/``hp`` (b g), a previous state and a cotangent."""
    params = cell.init(jax.random.key(seed), D, H, F64)
    rng = np.random.default_rng(seed)
    gates = cell.num_gates * H
    xp = jnp.asarray(rng.normal(size=(B, gates)))
    hp = jnp.asarray(rng.normal(size=(B, gates)))
    return params, xp, hp, _random_state(cell, seed + 10), _random_state(cell, seed + 20, scale=1)


# ---------------------------------------------------------------------------------------------
# Registry and state helpers


def test_registry_and_get_cell():
    assert set(jb.CELLS) == {"elman_tanh", "elman_relu", "lstm", "gru"}
    assert [jb.CELLS[n].num_gates for n in ("elman_tanh", "elman_relu", "lstm", "gru")] == [
        1,
        1,
        4,
        3,
    ]
    for name, cell in jb.CELLS.items():
        assert cell.name == name
        assert jb.get_cell(name) is cell
        assert jb.get_cell(cell) is cell  # a Cell passes through
    assert (jb.ELMAN_TANH, jb.ELMAN_RELU, jb.LSTM, jb.GRU) == tuple(
        jb.CELLS[n] for n in ("elman_tanh", "elman_relu", "lstm", "gru")
    )
    with pytest.raises(ValueError, match="cell must be one of"):
        jb.get_cell("transformer")


@pytest.mark.parametrize("name", CELL_NAMES)
def test_zero_state_hidden_and_with_hidden(name):
    cell = jb.CELLS[name]
    state = cell.zero_state((2,), H, F64)
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.shape == (2, H) and leaf.dtype == F64
        np.testing.assert_array_equal(leaf, 0.0)
    assert cell.zero_state((), H, F64) is not None
    assert all(a.shape == (H,) for a in jax.tree_util.tree_leaves(cell.zero_state((), H, F64)))
    h = jnp.arange(2 * H, dtype=F64).reshape(2, H)
    replaced = cell.with_hidden(state, h)
    np.testing.assert_array_equal(cell.hidden(replaced), h)
    assert jax.tree_util.tree_structure(replaced) == jax.tree_util.tree_structure(state)
    if name == "lstm":  # the cell state is kept
        np.testing.assert_array_equal(replaced[1], state[1])


# ---------------------------------------------------------------------------------------------
# Forward: the PyTorch equations, written out in NumPy


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _numpy_step(name, p, state, x):
    p = {k: np.asarray(v) for k, v in p.items()}
    x = np.asarray(x)
    if name == "lstm":
        h, c = (np.asarray(s) for s in state)
        a = x @ p["W_xh"] + p["b_h"] + h @ p["W_hh"]
        a_i, a_f, a_g, a_o = np.split(a, 4, axis=-1)
        c = _sigmoid(a_f) * c + _sigmoid(a_i) * np.tanh(a_g)
        return _sigmoid(a_o) * np.tanh(c), c
    h = np.asarray(state)
    if name == "gru":
        x_r, x_z, x_n = np.split(x @ p["W_xh"] + p["b_h"], 3, axis=-1)
        h_r, h_z, h_n = np.split(h @ p["W_hh"], 3, axis=-1)
        r, z = _sigmoid(x_r + h_r), _sigmoid(x_z + h_z)
        n = np.tanh(x_n + r * (h_n + p["b_hn"]))
        return (1 - z) * n + z * h
    a = x @ p["W_xh"] + p["b_h"] + h @ p["W_hh"]
    return np.tanh(a) if name == "elman_tanh" else np.maximum(a, 0.0)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_step_equals_the_pytorch_equations(name):
    cell = jb.CELLS[name]
    params = cell.init(jax.random.key(1), D, H, F64)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)))
    state = _random_state(cell, 2)
    got = cells.step(cell, params, state, x)
    _assert_trees_close(got, _numpy_step(name, params, state, x), 1e-13)
    # Hoisted form: project_inputs + forward on (xp, hp) is the same step.
    xp = cells.project_inputs(params, x)
    np.testing.assert_allclose(xp, x @ params["W_xh"] + params["b_h"], rtol=1e-15)
    hp = cell.hidden(state) @ params["W_hh"]
    _assert_trees_close(cell.forward(params, xp, hp, state)[0], got, 0.0)


# ---------------------------------------------------------------------------------------------
# Backward: cell.backward is the VJP of cell.forward


@pytest.mark.parametrize("name", CELL_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_backward_equals_vjp_of_forward(name, seed):
    cell = jb.CELLS[name]
    params, xp, hp, state_prev, d_state = _random_step(cell, seed)
    state, saved = cell.forward(params, xp, hp, state_prev)
    _, vjp = jax.vjp(lambda a, b, s: cell.forward(params, a, b, s)[0], xp, hp, state_prev)
    want_xp, want_hp, want_prev = vjp(d_state)
    d_prev, d_xp, d_hp = cell.backward(params, saved, state_prev, d_state)
    assert _rel(d_xp, want_xp) <= 1e-12
    assert _rel(d_hp, want_hp) <= 1e-12
    # d_state_prev is the direct path only (hp is an input here, so vjp gives exactly that).
    _assert_trees_close(d_prev, want_prev, 1e-12)
    assert jax.tree_util.tree_structure(d_prev) == jax.tree_util.tree_structure(state)
    assert float(np.max(np.abs(want_xp))) > 1e-3  # not vacuous


def test_relu_backward_at_zero_is_the_subgradient_of_jax_nn_relu():
    """At a pre-activation of exactly 0 the ReLU cell's derivative is 0, as ``jax.nn.relu``'s."""
    cell = jb.ELMAN_RELU
    params, xp, hp, state_prev, d_state = _random_step(cell, 0)
    xp = xp.at[:, :2].set(-hp[:, :2])  # z = 0 exactly on two units
    state, saved = cell.forward(params, xp, hp, state_prev)
    np.testing.assert_array_equal(state[:, :2], 0.0)
    _, vjp = jax.vjp(lambda a, b: cell.forward(params, a, b, state_prev)[0], xp, hp)
    want_xp, want_hp = vjp(d_state)
    _, d_xp, d_hp = cell.backward(params, saved, state_prev, d_state)
    np.testing.assert_array_equal(d_xp[:, :2], 0.0)
    np.testing.assert_array_equal(d_xp, want_xp)
    np.testing.assert_array_equal(d_hp, want_hp)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_bias_grads_contract(name):
    """``cell.bias_grads(sum d_xp, sum d_hp)`` is ``jax.grad`` of a scalar of one full step w.r.t.
    every bias (every non-matrix leaf), and the weight GEMMs give the matrices' gradients."""
    cell = jb.CELLS[name]
    params = cell.init(jax.random.key(2), D, H, F64)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, D)))
    state_prev = _random_state(cell, 3)
    weights = _random_state(cell, 4, scale=1.0)  # the scalar is sum(weights * state_t)

    def scalar(p):
        state = cells.step(cell, p, state_prev, x)
        pairs = zip(jax.tree.leaves(weights), jax.tree.leaves(state), strict=True)
        return sum(jnp.sum(w * s) for w, s in pairs)

    want = jax.grad(scalar)(params)
    xp = cells.project_inputs(params, x)
    hp = cell.hidden(state_prev) @ params["W_hh"]
    _, saved = cell.forward(params, xp, hp, state_prev)
    _, d_xp, d_hp = cell.backward(params, saved, state_prev, weights)
    got = cell.bias_grads(d_xp.sum(0), d_hp.sum(0))
    biases = {k for k in params if not k.startswith("W_")}
    assert set(got) == biases == ({"b_h", "b_hn"} if name == "gru" else {"b_h"})
    for k in biases:
        assert got[k].shape == params[k].shape
        assert _rel(got[k], want[k]) <= 1e-12, k
    assert _rel(x.T @ d_xp, want["W_xh"]) <= 1e-12
    assert _rel(cell.hidden(state_prev).T @ d_hp, want["W_hh"]) <= 1e-12


# ---------------------------------------------------------------------------------------------
# Initialisers


def test_initialisers():
    """(test_core) Uniform bounds, orthogonal gate blocks, IRNN, the LSTM forget bias."""
    key = jax.random.key(0)
    hidden = 32
    params = jax.tree_util.tree_map(np.asarray, jb.init_model(key, "lstm", 5, hidden, 2, dtype=F64))
    bound = 1 / np.sqrt(hidden)
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == np.float64
        assert np.abs(leaf).max() <= bound
    cell_params = params["layers"][0]["fwd"]
    assert set(params["layers"][0]) == {"fwd"}
    assert cell_params["W_xh"].shape == (5, 4 * hidden)
    assert cell_params["W_hh"].shape == (hidden, 4 * hidden)
    assert params["readout"]["W_hy"].shape == (hidden, 2)

    ortho = jb.init_model(key, "gru", 5, hidden, 2, recurrent_init="orthogonal", dtype=F64)
    for gate in np.split(np.asarray(ortho["layers"][0]["fwd"]["W_hh"]), 3, axis=1):
        np.testing.assert_allclose(gate.T @ gate, np.eye(hidden), atol=1e-12)

    irnn = jb.init_model(key, "elman_relu", 5, hidden, 2, recurrent_init="identity")
    np.testing.assert_array_equal(irnn["layers"][0]["fwd"]["W_hh"], np.eye(hidden))
    np.testing.assert_array_equal(irnn["layers"][0]["fwd"]["b_h"], 0.0)

    lstm = jb.init_model(key, "lstm", 5, hidden, 2, forget_bias=1.0)
    b_h = np.asarray(lstm["layers"][0]["fwd"]["b_h"])
    assert b_h.dtype == np.float32  # the default dtype
    np.testing.assert_array_equal(b_h[hidden : 2 * hidden], 1.0)
    assert np.abs(b_h[:hidden]).max() <= bound
    assert np.abs(b_h[2 * hidden :]).max() <= bound


def test_init_helpers():
    key = jax.random.key(3)
    drawn = cells.uniform_init(key, {"w": (200, 50), "b": (50,)}, 16, F64)
    assert list(drawn) == ["w", "b"] and drawn["w"].shape == (200, 50) and drawn["b"].shape == (50,)
    for u in drawn.values():
        assert u.dtype == F64
        assert float(np.abs(u).max()) <= 0.25 and float(np.abs(u).max()) > 0.23  # fills the range
    ortho = cells.orthogonal_blocks(key, 6, 4, F64)
    assert ortho.shape == (6, 24)
    for block in np.split(np.asarray(ortho), 4, axis=1):
        np.testing.assert_allclose(block @ block.T, np.eye(6), atol=1e-12)
    blocks = np.split(np.asarray(ortho), 4, axis=1)
    assert float(np.abs(blocks[0] - blocks[1]).max()) > 0.1  # independent per gate
    np.testing.assert_array_equal(cells.identity_blocks(3, 2, F64), np.hstack([np.eye(3)] * 2))
    assert cells.RECURRENT_INITS == ("uniform", "orthogonal", "identity")


@pytest.mark.parametrize("name", CELL_NAMES)
@pytest.mark.parametrize("recurrent_init", ["uniform", "orthogonal", "identity"])
def test_cell_init_layout(name, recurrent_init):
    cell = jb.CELLS[name]
    params = cell.init(jax.random.key(4), D, H, F64, recurrent_init)
    gates = cell.num_gates * H
    want = {"W_xh": (D, gates), "W_hh": (H, gates), "b_h": (gates,)}
    if name == "gru":
        want["b_hn"] = (H,)
    assert {k: v.shape for k, v in params.items()} == want
    assert all(v.dtype == F64 for v in params.values())
    bound = 1 / np.sqrt(H)
    assert float(np.abs(params["W_xh"]).max()) <= bound
    if recurrent_init == "identity":
        np.testing.assert_array_equal(params["W_hh"], np.tile(np.eye(H), (1, cell.num_gates)))
    elif recurrent_init == "orthogonal":
        for block in np.split(np.asarray(params["W_hh"]), cell.num_gates, axis=1):
            np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-12)
    else:
        assert float(np.abs(params["W_hh"]).max()) <= bound
    if name.startswith("elman") and recurrent_init == "identity":
        np.testing.assert_array_equal(params["b_h"], 0.0)  # the IRNN
    else:
        assert float(np.abs(params["b_h"]).max()) <= bound
        assert float(np.abs(params["b_h"]).max()) > 0


def test_lstm_forget_bias_in_cell_init():
    params = jb.LSTM.init(jax.random.key(5), D, H, F64, "uniform", 2.5)
    np.testing.assert_array_equal(params["b_h"][H : 2 * H], 2.5)
    assert float(np.abs(params["b_h"][:H]).max()) <= 1 / np.sqrt(H)
    default = jb.LSTM.init(jax.random.key(5), D, H, F64)
    assert float(np.abs(default["b_h"]).max()) <= 1 / np.sqrt(H)


def test_init_model_layout_at_depth():
    params = jb.init_model(
        jax.random.key(6), "gru", 3, 8, 2, num_layers=2, bidirectional=True, dtype=F64
    )
    assert len(params["layers"]) == 2
    assert params["layers"][0]["fwd"]["W_xh"].shape == (3, 24)
    assert params["layers"][1]["bwd"]["W_xh"].shape == (16, 24)
    assert params["readout"]["W_hy"].shape == (16, 2)
    assert float(np.abs(params["readout"]["W_hy"]).max()) <= 1 / np.sqrt(16)
    # Every cell gets its own key.
    fwd, bwd = params["layers"][0]["fwd"], params["layers"][0]["bwd"]
    assert float(np.abs(fwd["W_hh"] - bwd["W_hh"]).max()) > 0.01
