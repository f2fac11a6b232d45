"""jax_bptt vs PyTorch (float64): converted weights compute the same outputs and gradients.

PyTorch is the independent reference here: its cells, its autograd and its packed sequences. The
tests that need torch skip cleanly without it; the error tests on numpy state dicts do not.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_torch_rnn

from jax_bptt import bptt_auto, bptt_manual, unroll
from jax_bptt.check import relative_error
from jax_bptt.losses import Loss
from jax_bptt.torch_convert import from_torch, readout_to_torch, to_torch, to_torch_modules

T, B, D, H, OUT = 5, 3, 3, 4, 2
LENGTHS = np.array([5, 2, 4])  # max == T so pad_packed_sequence gives back T steps
CELLS = ("elman_tanh", "elman_relu", "lstm", "gru")
FORWARD_TOL = 1e-12
GRAD_TOL = 1e-10


def make_rnn(torch, cell, seed=0, **kwargs):
    return make_torch_rnn(torch, cell, seed, D, H, **kwargs)


def make_data(seed=1):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(B, H)) * 0.5
    c0 = rng.normal(size=(B, H)) * 0.5
    targets = rng.normal(size=(T, B, OUT))
    return xs, h0, c0, targets


def random_readout(rng):
    ro = {"W_hy": (H, OUT), "b_y": (OUT,)}
    return {k: jnp.asarray(rng.uniform(-0.5, 0.5, s)) for k, s in ro.items()}


def random_params(cell, seed=2):
    """Our layout filled from numpy (no init_model: that would compile a few kernels)."""
    rng = np.random.default_rng(seed)
    g = {"lstm": 4, "gru": 3}.get(cell, 1)
    p = {"W_xh": (D, g * H), "W_hh": (H, g * H), "b_h": (g * H,), "b_hn": (H,)}
    fwd = {k: jnp.asarray(rng.uniform(-0.5, 0.5, s)) for k, s in p.items()}
    if cell != "gru":
        del fwd["b_hn"]
    return {"layers": [{"fwd": fwd}], "readout": random_readout(rng)}


def our_h0(cell, h0, c0):
    """A single-layer model's h0: one ``{"fwd": state}`` per layer."""
    state = (jnp.asarray(h0), jnp.asarray(c0)) if cell == "lstm" else jnp.asarray(h0)
    return [{"fwd": state}]


def torch_h0(torch, cell, h0, c0, requires_grad=False):
    h = torch.tensor(h0[None], requires_grad=requires_grad)
    c = torch.tensor(c0[None], requires_grad=requires_grad)
    return (h, c) if cell == "lstm" else h


def run_torch(torch, rnn, xs, state0, lengths=None):
    """``(outputs (T, B, H), final state)``; with lengths through a packed sequence."""
    x = xs if torch.is_tensor(xs) else torch.tensor(xs)
    if lengths is None:
        return rnn(x, state0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, final = rnn(packed, state0)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])
    return out, final


def assert_close(ours, reference, tol, what):
    reference = reference.detach().numpy() if hasattr(reference, "detach") else reference
    max_abs, rel = relative_error(ours, reference)
    assert rel <= tol, f"{what}: relative error {rel:.2e} (max abs {max_abs:.2e}) > {tol:.0e}"


def assert_final_states(cell, finals, final):
    assert len(finals) == 1 and set(finals[0]) == {"fwd"}
    ours = finals[0]["fwd"]
    if cell == "lstm":
        assert_close(ours[0], final[0][0], FORWARD_TOL, "final h")
        assert_close(ours[1], final[1][0], FORWARD_TOL, "final c")
    else:
        assert_close(ours, final[0], FORWARD_TOL, "final h")


# ------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "packed"])
def test_forward_matches_torch(torch, cell, with_lengths):
    rnn = make_rnn(torch, cell)
    params = from_torch(rnn, cell)
    assert set(params) == {"layers"} and len(params["layers"]) == 1  # no head: no readout
    params["readout"] = random_readout(np.random.default_rng(0))  # unroll reads only the layers
    xs, h0, c0, _ = make_data()
    lengths = LENGTHS if with_lengths else None
    with torch.no_grad():
        out, final = run_torch(torch, rnn, xs, torch_h0(torch, cell, h0, c0), lengths)
    hs, finals = unroll(
        params,
        jnp.asarray(xs),
        cell=cell,
        h0=our_h0(cell, h0, c0),
        lengths=None if lengths is None else jnp.asarray(lengths),
    )
    assert_close(hs, out, FORWARD_TOL, "all hidden states")
    assert_final_states(cell, finals, final)
    if with_lengths:  # both zero past the length, so the comparison above covers the padding
        assert float(np.abs(np.asarray(hs)[LENGTHS[1] :, 1]).max()) == 0.0


@pytest.mark.parametrize("cell", CELLS)
def test_round_trip_computes_the_same_function(torch, cell):
    rnn = make_rnn(torch, cell, seed=3)
    state_dict = to_torch(from_torch(rnn.state_dict(), cell), cell)
    assert set(state_dict) == set(rnn.state_dict())
    fresh = make_rnn(torch, cell, seed=4)
    fresh.load_state_dict(state_dict)
    xs, h0, c0, _ = make_data(seed=5)
    with torch.no_grad():
        want, want_final = rnn(torch.tensor(xs), torch_h0(torch, cell, h0, c0))
        got, got_final = fresh(torch.tensor(xs), torch_h0(torch, cell, h0, c0))
    assert_close(got.numpy(), want, FORWARD_TOL, "outputs")
    for a, b in zip(
        got_final if cell == "lstm" else [got_final],
        want_final if cell == "lstm" else [want_final],
        strict=True,
    ):
        assert_close(a.numpy(), b, FORWARD_TOL, "final state")
    # the weights are copied exactly; only the bias split changes
    np.testing.assert_array_equal(state_dict["weight_hh_l0"], rnn.weight_hh_l0.detach())


@pytest.mark.parametrize("cell", CELLS)
def test_to_torch_modules_compute_our_model(torch, cell):
    params = random_params(cell)
    rnn, head = to_torch_modules(params, cell)
    assert rnn.weight_ih_l0.dtype == torch.float64 and head.weight.shape == (OUT, H)
    for given in (params, params["readout"]):  # the model's params or its readout alone
        np.testing.assert_array_equal(readout_to_torch(given)["weight"], head.weight.detach())
    xs, h0, c0, _ = make_data(seed=6)
    with torch.no_grad():
        out, final = rnn(torch.tensor(xs), torch_h0(torch, cell, h0, c0))
        ys = head(out)
    hs, finals = unroll(params, jnp.asarray(xs), cell=cell, h0=our_h0(cell, h0, c0))
    assert_close(hs, out, FORWARD_TOL, "outputs")
    assert_close(hs @ params["readout"]["W_hy"] + params["readout"]["b_y"], ys, FORWARD_TOL, "ys")
    assert_final_states(cell, finals, final)


# ------------------------------------------------------------------------------------------
# Gradients: torch autograd vs our hand-written BPTT (and jax.grad)


def torch_per_step_mse(torch, ys, targets, lengths):
    """jax_bptt's per-step ``mse`` with ``mean``: mean over outputs, then over valid (t, b)."""
    terms = ((ys - torch.tensor(targets)) ** 2).mean(-1)  # (T, B)
    if lengths is None:
        return terms.mean()
    valid = torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]
    return torch.where(valid, terms, 0.0).sum() / valid.sum()


def torch_gradients(torch, cell, rnn, head, xs, h0, c0, targets, lengths):
    x = torch.tensor(xs, requires_grad=True)
    state0 = torch_h0(torch, cell, h0, c0, requires_grad=True)
    out, _ = run_torch(torch, rnn, x, state0, lengths)
    loss = torch_per_step_mse(torch, head(out), targets, lengths)
    loss.backward()
    return loss, x, state0


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "packed"])
def test_gradients_match_torch_autograd(torch, cell, with_lengths):
    rnn = make_rnn(torch, cell, seed=7)
    torch.manual_seed(8)
    head = torch.nn.Linear(H, OUT, dtype=torch.float64)
    params = from_torch(rnn, cell, head=head)
    xs, h0, c0, targets = make_data(seed=9)
    lengths = LENGTHS if with_lengths else None
    loss, x, state0 = torch_gradients(torch, cell, rnn, head, xs, h0, c0, targets, lengths)

    kwargs = dict(
        cell=cell,
        loss=Loss("mse", "per_step", "mean"),
        h0=our_h0(cell, h0, c0),
        lengths=None if lengths is None else jnp.asarray(lengths),
    )
    # bptt_auto == bptt_manual with lengths is the core tests' job; one torch check of each here
    for method in (bptt_manual,) if with_lengths else (bptt_manual, bptt_auto):
        grads = method(params, jnp.asarray(xs), jnp.asarray(targets), **kwargs)
        name = method.__name__
        assert_close(grads.loss, loss.detach().numpy(), FORWARD_TOL, f"{name} loss")
        assert len(grads.params["layers"]) == 1
        g = grads.params["layers"][0]["fwd"]
        assert_close(g["W_xh"], rnn.weight_ih_l0.grad.T, GRAD_TOL, f"{name} W_xh")
        assert_close(g["W_hh"], rnn.weight_hh_l0.grad.T, GRAD_TOL, f"{name} W_hh")
        # the combined bias: its gradient is torch's bias_ih gradient
        assert_close(g["b_h"], rnn.bias_ih_l0.grad, GRAD_TOL, f"{name} b_h")
        if cell == "gru":
            assert_close(g["b_hn"], rnn.bias_hh_l0.grad[2 * H :], GRAD_TOL, f"{name} b_hn")
            assert_close(g["b_h"][: 2 * H], rnn.bias_hh_l0.grad[: 2 * H], GRAD_TOL, "b_hh r, z")
        else:
            assert_close(g["b_h"], rnn.bias_hh_l0.grad, GRAD_TOL, f"{name} b_h vs bias_hh")
        assert_close(grads.params["readout"]["W_hy"], head.weight.grad.T, GRAD_TOL, "W_hy")
        assert_close(grads.params["readout"]["b_y"], head.bias.grad, GRAD_TOL, "b_y")
        assert_close(grads.xs, x.grad, GRAD_TOL, f"{name} xs")
        d_h0 = grads.h0[0]["fwd"]
        if cell == "lstm":
            assert_close(d_h0[0], state0[0].grad[0], GRAD_TOL, f"{name} h0")
            assert_close(d_h0[1], state0[1].grad[0], GRAD_TOL, f"{name} c0")
        else:
            assert_close(d_h0, state0.grad[0], GRAD_TOL, f"{name} h0")


# ------------------------------------------------------------------------------------------
# Errors


def numpy_state_dict(cell, hidden=H, inputs=D, gates=None):
    gates = gates or {"lstm": 4, "gru": 3}.get(cell, 1)
    rng = np.random.default_rng(0)
    return {
        "weight_ih_l0": rng.normal(size=(gates * hidden, inputs)),
        "weight_hh_l0": rng.normal(size=(gates * hidden, hidden)),
        "bias_ih_l0": rng.normal(size=(gates * hidden,)),
        "bias_hh_l0": rng.normal(size=(gates * hidden,)),
    }


def test_numpy_state_dict_converts_with_the_documented_bias_split():
    sd = numpy_state_dict("gru")
    params = from_torch(sd, "gru", head={"weight": np.ones((OUT, H)), "bias": np.zeros(OUT)})
    assert len(params["layers"]) == 1 and set(params["layers"][0]) == {"fwd"}
    p = params["layers"][0]["fwd"]
    np.testing.assert_array_equal(p["W_xh"], sd["weight_ih_l0"].T)
    np.testing.assert_array_equal(p["W_hh"], sd["weight_hh_l0"].T)
    b_hh = sd["bias_hh_l0"]
    np.testing.assert_allclose(p["b_h"][: 2 * H], sd["bias_ih_l0"][: 2 * H] + b_hh[: 2 * H])
    np.testing.assert_array_equal(p["b_h"][2 * H :], sd["bias_ih_l0"][2 * H :])
    np.testing.assert_array_equal(p["b_hn"], b_hh[2 * H :])


def test_head_without_bias_gets_zero_b_y():
    params = from_torch(numpy_state_dict("lstm"), "lstm", head={"weight": np.ones((OUT, H))})
    np.testing.assert_array_equal(params["readout"]["b_y"], np.zeros(OUT))


@pytest.mark.parametrize(
    "edit, cell, match",
    [
        (lambda sd: sd.pop("bias_hh_l0"), "elman_tanh", "missing 'bias_hh_l0'.*bias=False"),
        (lambda sd: sd.pop("weight_hh_l0"), "lstm", "missing 'weight_hh_l0'"),
        (lambda sd: sd.update(bias_ih_l0=np.zeros(3)), "elman_tanh", "bias_ih_l0 has shape"),
        (lambda sd: sd.update(weight_ih_l0=np.zeros((5, 3))), "elman_tanh", "weight_ih_l0 has"),
        (lambda sd: sd.update({"rnn.extra": np.zeros(1)}), "gru", "unexpected keys.*rnn.extra"),
        (lambda sd: sd.update(weight_hr_l0=np.zeros(1)), "lstm", "proj_size"),
        # a second layer / a backward direction converts, but only with all four of its arrays
        (lambda sd: sd.update(weight_ih_l1=np.zeros(1)), "gru", "missing 'weight_hh_l1'"),
        (lambda sd: sd.update(weight_ih_l0_reverse=np.zeros(1)), "gru", "missing 'weight_hh_l0_r"),
    ],
    ids=["no-bias", "no-weight", "bias-shape", "w-ih-shape", "extra", "proj", "layers", "bidir"],
)
def test_bad_state_dict_names_the_key(edit, cell, match):
    sd = numpy_state_dict(cell)
    edit(sd)
    with pytest.raises(ValueError, match=match):
        from_torch(sd, cell)


def test_wrong_cell_for_state_dict_names_weight_hh():
    with pytest.raises(ValueError, match="weight_hh_l0 has shape.*'gru' needs"):
        from_torch(numpy_state_dict("lstm"), "gru")


def test_head_size_mismatch():
    with pytest.raises(ValueError, match="in_features=5"):
        from_torch(numpy_state_dict("gru"), "gru", head={"weight": np.ones((OUT, 5))})


def test_bad_params_for_to_torch(torch):
    with pytest.raises(TypeError, match="params must be"):
        to_torch({"weights": 1}, "gru")
    lstm_params = random_params("lstm")
    with pytest.raises(TypeError, match="params must be"):  # the old single-layer layout
        to_torch({"cell": lstm_params["layers"][0]["fwd"]}, "lstm")
    with pytest.raises(ValueError, match="W_hh has shape.*'gru' needs"):
        to_torch(lstm_params, "gru")
    fwd = dict(lstm_params["layers"][0]["fwd"], b_h=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"\['b_h'\] must have shape \(16,\)"):
        to_torch({"layers": [{"fwd": fwd}]}, "lstm")
    with pytest.raises(TypeError, match="readout"):
        readout_to_torch({"layers": lstm_params["layers"]})


def test_module_errors(torch):
    with pytest.raises(ValueError, match="mode 'LSTM'.*mode 'GRU'"):
        from_torch(make_rnn(torch, "gru"), "lstm")
    with pytest.raises(ValueError, match="mode 'RNN_TANH'.*mode 'RNN_RELU'"):
        from_torch(make_rnn(torch, "elman_relu"), "elman_tanh")
    with pytest.raises(ValueError, match="bias=False"):
        from_torch(make_rnn(torch, "gru", bias=False), "gru")
    with pytest.raises(ValueError, match="proj_size=2"):
        from_torch(make_rnn(torch, "lstm", proj_size=2), "lstm")
    # stacked and bidirectional modules convert to the same layout (their parity: test_deep.py)
    stacked = from_torch(make_rnn(torch, "lstm", num_layers=2), "lstm")["layers"]
    assert [set(layer) for layer in stacked] == [{"fwd"}, {"fwd"}]
    bidirectional = from_torch(make_rnn(torch, "elman_tanh", bidirectional=True), "elman_tanh")
    assert [set(layer) for layer in bidirectional["layers"]] == [{"fwd", "bwd"}]
    with pytest.raises(TypeError, match="nn.RNN, nn.LSTM or nn.GRU"):
        from_torch(torch.nn.Linear(2, 2), "gru")


def test_module_imports_and_converts_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "import numpy as np\n"
        "from jax_bptt.torch_convert import from_torch, to_torch\n"
        "sd = {k: np.ones(s) for k, s in [('weight_ih_l0', (4, 3)), ('weight_hh_l0', (4, 4)),"
        " ('bias_ih_l0', (4,)), ('bias_hh_l0', (4,))]}\n"
        "assert from_torch(sd, 'elman_tanh')['layers'][0]['fwd']['b_h'].tolist() == [2.0] * 4\n"
        "try:\n    to_torch({'layers': []}, 'gru')\nexcept ImportError as e:\n"
        "    assert 'needs PyTorch' in str(e)\nelse:\n    raise SystemExit('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
