"""Deep and bidirectional RNNs: hand-written BPTT through the stack vs jax.grad, and vs PyTorch.

The PyTorch tests (skipped cleanly without torch) are the independent reference for the stacking,
the reverse direction under packed sequences, the final states and the many-to-one summary.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt.bptt import Gradients, bptt_manual
from jax_bptt.cells import get_cell
from jax_bptt.check import compare_gradients, relative_error
from jax_bptt.deep import (
    check_deep_inputs,
    deep_bptt_auto,
    deep_bptt_fast,
    deep_bptt_manual,
    deep_model_loss,
    deep_unroll,
    dropout_masks,
    init_deep,
)
from jax_bptt.torch_convert import from_torch, to_torch, to_torch_modules
from jax_bptt.unroll import unroll

T, B, H, OUT = 5, 3, 4, 2
LENGTHS = np.array([5, 0, 3])  # a full, an empty and a padded sequence
CELLS = ("elman_tanh", "elman_relu", "lstm", "gru")
FORWARD_TOL = 1e-12
GRAD_TOL = 1e-10


def data(seed, input_size, loss, placement, batch=B):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(T, batch, input_size)))
    lead = (T, batch) if placement == "per_step" else (batch,)
    if loss == "mse":
        targets = jnp.asarray(rng.normal(size=(*lead, OUT)))
    else:
        targets = jnp.asarray(rng.integers(0, OUT, size=lead))
    return xs, targets


def random_h0(cell, params, seed):
    """A random state for every layer and direction (so d h0 is not trivially zero)."""
    rng = np.random.default_rng(seed)

    def state():
        h = jnp.asarray(rng.normal(size=(B, H)) * 0.5)
        return (h, jnp.asarray(rng.normal(size=(B, H)) * 0.5)) if cell == "lstm" else h

    return [{name: state() for name in layer} for layer in params["layers"]]


# ------------------------------------------------------------------------------------------
# Hand-written BPTT vs jax.grad: every cell, each feature on and off somewhere


CASES = [
    # cell, layers, bidirectional, lengths, dropout, residual, placement, loss, reduction, h0
    ("elman_tanh", 2, True, True, 0.3, "except_first", "per_step", "mse", "mean", False),
    ("elman_tanh", 3, False, False, 0.5, True, "last_step", "cross_entropy", "sum", True),
    ("elman_relu", 2, True, True, 0.0, False, "last_step", "mse", "mean", True),
    ("elman_relu", 2, False, True, 0.3, True, "per_step", "cross_entropy", "mean", False),
    ("lstm", 2, True, True, 0.3, "except_first", "last_step", "mse", "sum", True),
    ("lstm", 2, False, False, 0.0, False, "per_step", "mse", "mean", False),
    ("gru", 2, True, False, 0.3, True, "per_step", "cross_entropy", "mean", True),
    ("gru", 2, False, True, 0.0, "except_first", "last_step", "mse", "mean", False),
]


def case_id(case):
    cell, layers, bidir, lengths, dropout, residual, placement, loss, reduction, h0 = case
    return "-".join(
        [cell, f"L{layers}", "bi" if bidir else "uni", "len" if lengths else "full"]
        + [f"drop{dropout}", f"res={residual}", placement, loss, reduction, "h0" if h0 else "0"]
    )


def case_inputs(case):
    """``(params, xs, targets, kwargs)`` of a ``CASES`` entry (same seeds, so same compiles)."""
    cell, layers, bidir, with_lengths, dropout, residual, placement, loss, reduction, h0 = case
    # residual=True on layer 0 needs the input size to be the layer's output size
    input_size = (2 if bidir else 1) * H if residual is True else 3
    params = init_deep(
        jax.random.key(0),
        cell,
        input_size,
        H,
        OUT,
        num_layers=layers,
        bidirectional=bidir,
        dtype=jnp.float64,
    )
    xs, targets = data(1, input_size, loss, placement)
    kwargs = dict(
        cell=cell,
        loss=loss,
        placement=placement,
        reduction=reduction,
        lengths=jnp.asarray(LENGTHS) if with_lengths else None,
        h0=random_h0(cell, params, 2) if h0 else None,
        dropout=dropout,
        key=jax.random.key(3) if dropout else None,
        residual=residual,
    )
    return params, xs, targets, kwargs


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_manual_matches_autodiff(case):
    params, xs, targets, kwargs = case_inputs(case)
    with_lengths = kwargs["lengths"] is not None
    manual = deep_bptt_manual(params, xs, targets, **kwargs)
    auto = deep_bptt_auto(params, xs, targets, **kwargs)
    report = compare_gradients(manual, auto)
    assert report.ok, report.table()
    assert jax.tree_util.tree_structure(manual.params) == jax.tree_util.tree_structure(params)
    # every weight of every layer gets a gradient (the stack is really connected)
    for leaf in jax.tree_util.tree_leaves(manual.params):
        assert float(jnp.abs(leaf).max()) > 0
    if with_lengths:  # padding inputs cannot matter
        assert float(jnp.abs(manual.xs[LENGTHS[1] :, 1]).max()) == 0.0


# bidirectional + lengths + dropout + residual + h0 (lstm); unidirectional last step, no lengths
FAST_CASES = [CASES[4], CASES[1]]


@pytest.mark.parametrize("case", FAST_CASES, ids=[case_id(c) for c in FAST_CASES])
def test_fast_matches_autodiff(case):
    params, xs, targets, kwargs = case_inputs(case)
    fast = deep_bptt_fast(params, xs, targets, **kwargs)
    auto = deep_bptt_auto(params, xs, targets, **kwargs)  # compiled already by the test above
    report = compare_gradients(fast, auto, tolerance=GRAD_TOL, names=("fast", "auto"))
    assert report.ok, report.table()

    # every recurrence sits inside unroll_fast's custom_vjp (so its backward is the hand-written
    # one): one call per layer and direction, and no scan left for autodiff to differentiate
    cell = get_cell(kwargs["cell"])
    dropout, key, residual = kwargs["dropout"], kwargs["key"], kwargs["residual"]
    batch = check_deep_inputs(
        cell, params, xs, kwargs["h0"], kwargs["lengths"], dropout, key, residual
    )
    loss_fn = functools.partial(
        deep_model_loss,
        cell=cell,
        **{k: kwargs[k] for k in ("loss", "placement", "reduction")},
        residual=residual,
        fast=True,
    )
    jaxpr = jax.make_jaxpr(loss_fn)(
        params,
        batch.h0,
        batch.xs,
        targets,
        batch.lengths,
        dropout_masks(key, dropout, params["layers"], batch.xs),
    )
    primitives = [eqn.primitive.name for eqn in jaxpr.eqns]
    num_runs = sum(len(layer) for layer in params["layers"])
    assert primitives.count("custom_vjp_call") == num_runs, primitives
    assert "scan" not in primitives, primitives


@pytest.mark.parametrize("placement", ["per_step", "last_step"])
def test_one_layer_is_the_core_model(placement):
    """A 1-layer unidirectional stack is init_model's model: same loss conventions, same grads."""
    params = init_deep(jax.random.key(8), "lstm", 3, H, OUT, dtype=jnp.float64)
    xs, targets = data(9, 3, "mse", placement)
    kwargs = dict(cell="lstm", placement=placement, lengths=jnp.asarray(LENGTHS))
    deep = deep_bptt_manual(params, xs, targets, h0=random_h0("lstm", params, 10), **kwargs)
    core_params = {"cell": params["layers"][0]["fwd"], "readout": params["readout"]}
    core = bptt_manual(
        core_params, xs, targets, h0=random_h0("lstm", params, 10)[0]["fwd"], **kwargs
    )
    as_core = Gradients(
        deep.loss,
        {"cell": deep.params["layers"][0]["fwd"], "readout": deep.params["readout"]},
        deep.h0[0]["fwd"],
        deep.xs,
    )
    report = compare_gradients(as_core, core, names=("deep", "bptt_manual"))
    assert report.ok, report.table()


def test_empty_sequence_has_no_last_step_term():
    params = init_deep(jax.random.key(0), "gru", 3, H, OUT, bidirectional=True, dtype=jnp.float64)
    xs, targets = jnp.zeros((0, B, 3)), jnp.ones((B, OUT))
    grads = deep_bptt_manual(params, xs, targets, cell="gru", placement="last_step")
    assert float(grads.loss) == 0.0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads.params))


# ------------------------------------------------------------------------------------------
# Forward semantics against the single-layer unroll, composed by hand


def test_stack_is_single_layer_unrolls_composed_by_hand():
    cell, input_size = "gru", 2 * H
    params = init_deep(
        jax.random.key(4), cell, input_size, H, OUT, num_layers=2, bidirectional=True
    )
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    xs, _ = data(5, input_size, "mse", "per_step")
    lengths = jnp.asarray(LENGTHS)
    key = jax.random.key(6)
    outputs, finals = deep_unroll(
        cell, params, xs, lengths=lengths, dropout=0.5, key=key, residual=True
    )

    (drop,) = dropout_masks(key, 0.5, params["layers"], xs)
    assert set(np.unique(np.asarray(drop)).tolist()) == {0.0, 2.0}  # inverted dropout, p = 0.5
    valid = (np.arange(T)[:, None] < LENGTHS[None, :])[..., None]
    inputs = xs
    for i, layer in enumerate(params["layers"]):
        fwd, fwd_final = unroll(cell, layer["fwd"], inputs, lengths=lengths)
        bwd, bwd_final = unroll(cell, layer["bwd"], inputs, lengths=lengths, reverse=True)
        np.testing.assert_allclose(finals[i]["fwd"], fwd_final, rtol=0, atol=FORWARD_TOL)
        np.testing.assert_allclose(finals[i]["bwd"], bwd_final, rtol=0, atol=FORWARD_TOL)
        inputs = np.concatenate([fwd, bwd], axis=-1) + np.where(valid, inputs, 0)
        if i == 0:
            inputs = inputs * np.asarray(drop)
    np.testing.assert_allclose(outputs, inputs, rtol=0, atol=FORWARD_TOL)
    assert float(jnp.abs(outputs[LENGTHS[2] :, 2]).max()) == 0.0

    # the same key gives the same masks; dropout never touches the top layer's output
    again, _ = deep_unroll(cell, params, xs, lengths=lengths, dropout=0.5, key=key, residual=True)
    np.testing.assert_array_equal(again, outputs)
    other, _ = deep_unroll(
        cell, params, xs, lengths=lengths, dropout=0.5, key=jax.random.key(7), residual=True
    )
    assert float(jnp.abs(other - outputs).max()) > 0

    # one unbatched sequence is the batched computation with B = 1
    single, single_finals = deep_unroll(cell, params, xs[:, 0], residual=True)
    batched, batched_finals = deep_unroll(cell, params, xs[:, :1], residual=True)
    np.testing.assert_allclose(single, batched[:, 0], rtol=0, atol=FORWARD_TOL)
    np.testing.assert_allclose(
        single_finals[1]["bwd"], batched_finals[1]["bwd"][0], rtol=0, atol=FORWARD_TOL
    )


# ------------------------------------------------------------------------------------------
# Errors: clear, naming the argument, before any work


@pytest.fixture(scope="module")
def small():
    params = init_deep(jax.random.key(0), "lstm", 3, H, OUT, num_layers=2, bidirectional=True)
    xs, targets = data(0, 3, "mse", "per_step")
    return params, xs.astype(jnp.float32), targets.astype(jnp.float32)


@pytest.mark.parametrize("num_layers", [0, -1, 1.5, True])
def test_init_rejects_bad_num_layers(num_layers):
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        init_deep(jax.random.key(0), "gru", 3, H, OUT, num_layers=num_layers)


def test_init_rejects_forget_bias_for_gru():
    with pytest.raises(ValueError, match="forget_bias"):
        init_deep(jax.random.key(0), "gru", 3, H, OUT, forget_bias=1.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dropout=1.0, key=jax.random.key(0)), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1, key=jax.random.key(0)), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(dropout="0.5"), TypeError, "dropout must be a float"),
        (dict(dropout=0.2), ValueError, "dropout=0.2 needs a PRNG key"),
        (dict(residual=True), ValueError, "residual=True adds layer 0's input.*3 features to 8"),
        (dict(residual="all"), ValueError, "residual must be one of"),
        (dict(h0=[None]), TypeError, "h0 must be a list with one"),
        (dict(h0=[{"fwd": None}, {"fwd": None}]), TypeError, r"h0\[0\] must be a dict"),
        (dict(lengths=np.array([1, 2])), ValueError, "lengths must have shape"),
    ],
    ids=["p=1", "p<0", "p-str", "no-key", "res-size", "res-choice", "h0-len", "h0-dirs", "len"],
)
def test_bad_arguments_are_named(small, kwargs, error, match):
    params, xs, targets = small
    for call in (
        lambda: deep_bptt_manual(params, xs, targets, cell="lstm", **kwargs),
        lambda: deep_bptt_auto(params, xs, targets, cell="lstm", **kwargs),
    ):
        with pytest.raises(error, match=match):
            call()
    unroll_kwargs = {k: v for k, v in kwargs.items() if k != "lengths"}
    if unroll_kwargs:
        with pytest.raises(error, match=match):
            deep_unroll("lstm", params, xs, **unroll_kwargs)


def test_bad_params_and_targets_are_named(small):
    params, xs, targets = small
    with pytest.raises(TypeError, match="params must be a dict {'layers'"):
        deep_unroll("lstm", {"cell": params["layers"][0]["fwd"]}, xs)
    mixed = {"layers": [params["layers"][0], {"fwd": params["layers"][1]["fwd"]}]}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\] has directions"):
        deep_unroll("lstm", mixed, xs)
    swapped = {"layers": params["layers"][::-1], "readout": params["readout"]}
    with pytest.raises(
        ValueError, match="xs has feature size 3 but the params expect input_size=8"
    ):
        deep_unroll("lstm", swapped, xs)
    uni = {"layers": [{"fwd": layer["fwd"]} for layer in params["layers"]]}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\['fwd'\]\['W_xh'\]"):
        deep_unroll("lstm", uni, xs)
    no_readout = {"layers": params["layers"]}
    with pytest.raises(TypeError, match="readout"):
        deep_bptt_manual(no_readout, xs, targets, cell="lstm")
    with pytest.raises(ValueError, match="targets for loss='mse', placement='last_step'"):
        deep_bptt_manual(params, xs, targets, cell="lstm", placement="last_step")
    with pytest.raises(ValueError, match="reduction must be one of"):
        deep_bptt_manual(params, xs, targets, cell="lstm", reduction="max")


# ------------------------------------------------------------------------------------------
# PyTorch: multi-layer bidirectional modules, packed sequences, h_n


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


TORCH_LENGTHS = np.array([5, 2, 4])  # packed sequences need lengths >= 1; max == T
D = 3


def make_torch_rnn(torch, cell, seed, **kwargs):
    torch.manual_seed(seed)
    kwargs = dict(input_size=D, hidden_size=H, dtype=torch.float64, **kwargs)
    if cell == "lstm":
        return torch.nn.LSTM(**kwargs)
    if cell == "gru":
        return torch.nn.GRU(**kwargs)
    return torch.nn.RNN(nonlinearity=cell.removeprefix("elman_"), **kwargs)


def assert_close(ours, reference, tol, what):
    reference = reference.detach().numpy() if hasattr(reference, "detach") else reference
    max_abs, rel = relative_error(ours, reference)
    assert rel <= tol, f"{what}: relative error {rel:.2e} (max abs {max_abs:.2e}) > {tol:.0e}"


def torch_state_as_ours(cell, state, num_layers):
    """PyTorch's ``(num_layers * 2, B, H)`` h_n (and c_n) -> ``[{"fwd", "bwd"}]``."""
    if cell == "lstm":
        h, c = state
        return [
            {d: (h[2 * i + j], c[2 * i + j]) for j, d in enumerate(("fwd", "bwd"))}
            for i in range(num_layers)
        ]
    return [{d: state[2 * i + j] for j, d in enumerate(("fwd", "bwd"))} for i in range(num_layers)]


@pytest.mark.parametrize(
    "cell, placement",
    [
        ("elman_tanh", "per_step"),
        ("elman_relu", "last_step"),
        ("lstm", "last_step"),
        ("gru", "per_step"),
    ],
)
def test_bidirectional_stack_matches_torch_packed(torch, cell, placement):
    layers = 2
    rnn = make_torch_rnn(torch, cell, seed=10, num_layers=layers, bidirectional=True)
    torch.manual_seed(11)
    head = torch.nn.Linear(2 * H, OUT, dtype=torch.float64)
    params = from_torch(rnn, cell, head=head, deep=True)
    rng = np.random.default_rng(12)
    xs = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(2 * layers, B, H)) * 0.5
    c0 = rng.normal(size=(2 * layers, B, H)) * 0.5
    targets = rng.normal(size=(T, B, OUT) if placement == "per_step" else (B, OUT))

    x = torch.tensor(xs, requires_grad=True)
    state0 = (
        (torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True))
        if cell == "lstm"
        else torch.tensor(h0, requires_grad=True)
    )
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, torch.tensor(TORCH_LENGTHS), enforce_sorted=False
    )
    out_packed, final = rnn(packed, state0)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_packed, total_length=T)
    valid = torch.arange(T)[:, None] < torch.tensor(TORCH_LENGTHS)[None, :]
    if placement == "per_step":  # jax_bptt's mse mean: mean over outputs, then valid (t, b)
        terms = ((head(out) - torch.tensor(targets)) ** 2).mean(-1)
        loss = torch.where(valid, terms, 0.0).sum() / valid.sum()
    else:  # many-to-one reads PyTorch's h_n of the top layer, both directions
        h_n = final[0] if cell == "lstm" else final
        summary = torch.cat([h_n[-2], h_n[-1]], dim=-1)
        loss = ((head(summary) - torch.tensor(targets)) ** 2).mean()
    loss.backward()

    our_h0 = torch_state_as_ours(
        cell, (jnp.asarray(h0), jnp.asarray(c0)) if cell == "lstm" else jnp.asarray(h0), layers
    )
    lengths = jnp.asarray(TORCH_LENGTHS)
    outputs, finals = deep_unroll(cell, params, jnp.asarray(xs), our_h0, lengths)
    assert_close(outputs, out, FORWARD_TOL, "outputs")
    want_finals = torch_state_as_ours(
        cell, tuple(f.detach().numpy() for f in final) if cell == "lstm" else final.detach(), 2
    )
    for got, want in zip(
        jax.tree_util.tree_leaves(finals), jax.tree_util.tree_leaves(want_finals), strict=True
    ):
        assert_close(got, np.asarray(want), FORWARD_TOL, "final states")

    grads = deep_bptt_manual(
        params,
        jnp.asarray(xs),
        jnp.asarray(targets),
        cell=cell,
        placement=placement,
        lengths=lengths,
        h0=our_h0,
    )
    assert_close(grads.loss, loss.detach().numpy(), FORWARD_TOL, "loss")
    for i, layer in enumerate(grads.params["layers"]):
        for direction, suffix in (("fwd", ""), ("bwd", "_reverse")):
            g = layer[direction]
            tensor = {n: getattr(rnn, f"{n}_l{i}{suffix}").grad for n in ("weight_ih", "weight_hh")}
            where = f"layer {i} {direction}"
            assert_close(g["W_xh"], tensor["weight_ih"].T, GRAD_TOL, f"{where} W_xh")
            assert_close(g["W_hh"], tensor["weight_hh"].T, GRAD_TOL, f"{where} W_hh")
            assert_close(g["b_h"], getattr(rnn, f"bias_ih_l{i}{suffix}").grad, GRAD_TOL, where)
            if cell == "gru":
                b_hh = getattr(rnn, f"bias_hh_l{i}{suffix}").grad
                assert_close(g["b_hn"], b_hh[2 * H :], GRAD_TOL, f"{where} b_hn")
    assert_close(grads.params["readout"]["W_hy"], head.weight.grad.T, GRAD_TOL, "W_hy")
    assert_close(grads.params["readout"]["b_y"], head.bias.grad, GRAD_TOL, "b_y")
    assert_close(grads.xs, x.grad, GRAD_TOL, "xs")
    torch_d_h0 = (
        (state0[0].grad.numpy(), state0[1].grad.numpy()) if cell == "lstm" else state0.grad.numpy()
    )
    for got, want in zip(
        jax.tree_util.tree_leaves(grads.h0),
        jax.tree_util.tree_leaves(torch_state_as_ours(cell, torch_d_h0, layers)),
        strict=True,
    ):
        assert_close(got, want, GRAD_TOL, "h0")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_deep_round_trip_and_modules(torch, cell):
    rnn = make_torch_rnn(torch, cell, seed=20, num_layers=3, bidirectional=True)
    params = from_torch(rnn.state_dict(), cell, deep=True)
    assert len(params["layers"]) == 3 and set(params["layers"][2]) == {"fwd", "bwd"}
    assert params["layers"][1]["fwd"]["W_xh"].shape[0] == 2 * H
    state_dict = to_torch(params, cell)
    assert set(state_dict) == set(rnn.state_dict())
    rebuilt, head = to_torch_modules(params, cell)
    assert head is None and rebuilt.num_layers == 3 and rebuilt.bidirectional
    x = torch.tensor(np.random.default_rng(21).normal(size=(T, B, D)))
    with torch.no_grad():
        want, _ = rnn(x)
        got, _ = rebuilt(x)
    assert_close(got.numpy(), want, FORWARD_TOL, "round-trip outputs")

    uni = make_torch_rnn(torch, cell, seed=22, num_layers=2)
    params = from_torch(uni, cell, deep=True)
    assert [set(layer) for layer in params["layers"]] == [{"fwd"}, {"fwd"}]


def test_deep_state_dict_errors():
    rng = np.random.default_rng(0)
    sd = {
        f"{n}_l{k}{s}": rng.normal(size=shape)
        for k in range(2)
        for s in ("", "_reverse")
        for n, shape in (
            ("weight_ih", (3 * H, D if k == 0 else 2 * H)),
            ("weight_hh", (3 * H, H)),
            ("bias_ih", (3 * H,)),
            ("bias_hh", (3 * H,)),
        )
    }
    assert len(from_torch(sd, "gru", deep=True)["layers"]) == 2
    with pytest.raises(ValueError, match="weight_ih_l1 has shape"):
        from_torch({**sd, "weight_ih_l1": np.zeros((3 * H, H))}, "gru", deep=True)
    with pytest.raises(ValueError, match="missing 'bias_hh_l1_reverse'"):
        from_torch({k: v for k, v in sd.items() if k != "bias_hh_l1_reverse"}, "gru", deep=True)
    with pytest.raises(ValueError, match="skips layer"):
        from_torch({**sd, "weight_ih_l3": np.zeros(1)}, "gru", deep=True)
    with pytest.raises(ValueError, match="in_features=4.*8 features"):
        from_torch(sd, "gru", head={"weight": np.ones((OUT, H))}, deep=True)
