"""The model at any depth: every BPTT mode against jax.grad, the stack against single layers
composed by hand, clear errors, and PyTorch as the independent reference.

One API serves every depth and direction (``init_model(num_layers=, bidirectional=)``,
``unroll``, ``bptt(mode=...)``). The PyTorch tests (skipped cleanly without torch) check the
stacking, the reverse direction under packed sequences, the final states and the many-to-one
summary for 1-3 layers, uni- and bidirectional: in manual mode, and the one- and three-layer
cases also in the fast or checkpointed mode (every mode meets ``auto`` at 1e-10 above).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_torch_rnn

from jax_bptt import modes
from jax_bptt.cells import get_cell, step
from jax_bptt.check import compare_gradients, relative_error
from jax_bptt.losses import Loss, sequence_loss
from jax_bptt.model import (
    dropout_masks,
    init_model,
    prepare,
    readout,
    run_checkpointed,
    run_fast,
    stack_loss,
    unroll,
)
from jax_bptt.modes import BPTT_MODES, Gradients, bptt
from jax_bptt.torch_convert import from_torch, to_torch, to_torch_modules

T, B, H, OUT = 5, 3, 4, 2
LENGTHS = np.array([5, 0, 3])  # a full, an empty and a padded sequence
CELLS = ("elman_tanh", "elman_relu", "lstm", "gru")
UNROLL_MODES = ("auto", "fast", "checkpointed")
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
# Every mode vs jax.grad: every cell, each feature on and off somewhere


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
    params = init_model(
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
        loss=Loss(loss, placement, reduction),
        lengths=jnp.asarray(LENGTHS) if with_lengths else None,
        h0=random_h0(cell, params, 2) if h0 else None,
        dropout=dropout,
        key=jax.random.key(3) if dropout else None,
        residual=residual,
    )
    return params, xs, targets, kwargs


# Every case in manual mode; these also in the fast and checkpointed modes: bidirectional + lengths
# + dropout + residual + h0 (lstm); unidirectional last step without lengths (the checkpointed
# mode's segmented stack, 3 layers); unidirectional per step with lengths and dropout (segments
# with local lengths and masks).
FAST_CASES = [CASES[4], CASES[1], CASES[3]]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_modes_match_autodiff(case):
    params, xs, targets, kwargs = case_inputs(case)
    with_lengths = kwargs["lengths"] is not None
    auto = bptt(params, xs, targets, mode="auto", **kwargs)
    manual = bptt(params, xs, targets, mode="manual", **kwargs)
    report = compare_gradients(manual, auto)
    assert report.ok, report.table()
    assert jax.tree_util.tree_structure(manual.params) == jax.tree_util.tree_structure(params)
    # every weight of every layer gets a gradient (the stack is really connected)
    for leaf in jax.tree_util.tree_leaves(manual.params):
        assert float(jnp.abs(leaf).max()) > 0
    if with_lengths:  # padding inputs cannot matter
        assert float(jnp.abs(manual.xs[LENGTHS[1] :, 1]).max()) == 0.0
    if case not in FAST_CASES:
        return
    for mode in ("fast", "checkpointed"):
        got = bptt(params, xs, targets, mode=mode, **kwargs)
        report = compare_gradients(got, auto, tolerance=GRAD_TOL, names=(mode, "auto"))
        assert report.ok, report.table()
        _assert_recurrences_are_custom_vjps(case, mode)


REMAT = ("checkpoint", "remat", "remat2")  # jax.checkpoint's primitive, by jax version


def _primitives(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in jaxpr.eqns]


def _sub_jaxpr(eqn):
    inner = eqn.params["jaxpr"]
    return getattr(inner, "jaxpr", inner)


def _assert_recurrences_are_custom_vjps(case, mode):
    """Every recurrence sits inside a custom_vjp (so its backward is the hand-written one): one
    call per layer and direction, and no scan left for autodiff to differentiate. The
    checkpointed mode of a unidirectional stack runs the whole stack segment by segment: one
    scan over segments whose body is a ``jax.checkpoint`` holding the custom_vjps."""
    params, xs, targets, kwargs = case_inputs(case)
    run = prepare(
        params, xs, cell=kwargs["cell"], lengths=kwargs["lengths"], h0=kwargs["h0"],
        dropout=kwargs["dropout"], key=kwargs["key"], residual=kwargs["residual"], options=None,
    )  # fmt: skip
    static = dict(
        cell=run.cell, loss=kwargs["loss"], residual=kwargs["residual"], options=run.options
    )
    bidirectional = "bwd" in params["layers"][0]
    if mode == "fast":
        loss_fn = functools.partial(stack_loss, run=run_fast, **static)
    elif bidirectional:
        loss_fn = functools.partial(stack_loss, run=run_checkpointed, **static)
    else:
        loss_fn = functools.partial(modes._segmented_loss, **static)
    batch = run.batch
    jaxpr = jax.make_jaxpr(loss_fn)(
        params, batch.h0, batch.xs, targets, batch.lengths, run.drops
    ).jaxpr
    num_runs = sum(len(layer) for layer in params["layers"])
    if mode == "checkpointed" and not bidirectional:
        (scan,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
        (remat,) = [eqn for eqn in _sub_jaxpr(scan).eqns if eqn.primitive.name in REMAT]
        jaxpr = _sub_jaxpr(remat)
    primitives = _primitives(jaxpr)
    assert primitives.count("custom_vjp_call") == num_runs, primitives
    assert "scan" not in primitives, primitives


def _core_reference(params, xs, targets, *, h0, lengths, loss, mask=1.0) -> Gradients:
    """The one-layer model written out by hand: a Python loop of ``cells.step``, the readout at
    every step (of the outputs times ``mask``: output dropout), and ``sequence_loss`` placing the
    terms itself (last step: ``t = length - 1``)."""
    cell = get_cell("lstm")
    valid = jnp.arange(T)[:, None] < lengths[None, :]

    def loss_fn(params, h0, xs):
        p, state, hs = params["layers"][0]["fwd"], h0[0]["fwd"], []
        for t in range(T):
            new = step(cell, p, state, xs[t])
            state = jax.tree_util.tree_map(
                lambda a, b, t=t: jnp.where(valid[t][:, None], a, b), new, state
            )
            hs.append(jnp.where(valid[t][:, None], cell.hidden(state), 0))
        ys = readout(params["readout"], jnp.stack(hs) * mask)
        return sequence_loss(ys, targets, loss, lengths)

    grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))
    value, (d_params, d_h0, d_xs) = grads(params, h0, xs)
    return Gradients(value, d_params, d_h0, d_xs)


@pytest.mark.parametrize("placement", ["per_step", "last_step"])
def test_one_layer_is_the_core_model(placement):
    """A 1-layer unidirectional stack is the plain single-layer model: same loss conventions,
    same gradients."""
    params = init_model(jax.random.key(8), "lstm", 3, H, OUT, dtype=jnp.float64)
    xs, targets = data(9, 3, "mse", placement)
    lengths, loss = jnp.asarray(LENGTHS), Loss("mse", placement)
    h0 = random_h0("lstm", params, 10)
    got = bptt(params, xs, targets, cell="lstm", mode="manual", loss=loss, lengths=lengths, h0=h0)
    reference = _core_reference(params, xs, targets, h0=h0, lengths=lengths, loss=loss)
    report = compare_gradients(got, reference, names=("manual", "by hand"))
    assert report.ok, report.table()


@pytest.mark.parametrize("placement", ["per_step", "last_step"])
def test_output_dropout_is_a_mask_before_the_readout(placement):
    """Output dropout on a one-layer model: every mode is the model by hand with the outputs times
    the mask; the mask is inverted dropout (0 or 1 / (1 - p)) drawn from the key."""
    params = init_model(jax.random.key(8), "lstm", 3, H, OUT, dtype=jnp.float64)
    xs, targets = data(9, 3, "cross_entropy", placement)
    lengths, loss = jnp.asarray(LENGTHS), Loss("cross_entropy", placement)
    h0, key = random_h0("lstm", params, 10), jax.random.key(11)
    (mask,) = dropout_masks(key, 0.0, params["layers"], xs, output_dropout=0.4)
    assert set(np.unique(np.asarray(mask)).tolist()) == {0.0, 1 / 0.6}
    reference = _core_reference(params, xs, targets, h0=h0, lengths=lengths, loss=loss, mask=mask)
    kw = dict(cell="lstm", loss=loss, lengths=lengths, h0=h0, key=key, output_dropout=0.4)
    for mode in BPTT_MODES:
        got = bptt(params, xs, targets, mode=mode, **kw)
        report = compare_gradients(got, reference, tolerance=GRAD_TOL, names=(mode, "by hand"))
        assert report.ok, report.table()
    # without output dropout the model is another one (the mask really is applied)
    plain = bptt(params, xs, targets, mode="manual", **{**kw, "output_dropout": 0.0, "key": None})
    assert abs(float(plain.loss) - float(reference.loss)) > 1e-3


def test_output_dropout_on_a_stack_keeps_the_masks_between_layers():
    """2 layers, dropout between and on the top: every mode meets auto, and the masks between
    layers are those of ``dropout`` alone (the top's key is folded in apart)."""
    case = CASES[3]  # elman_relu, 2 layers, lengths, dropout 0.3, residual, per-step CE
    params, xs, targets, kwargs = case_inputs(case)
    between = dropout_masks(kwargs["key"], 0.3, params["layers"], xs)
    both = dropout_masks(kwargs["key"], 0.3, params["layers"], xs, output_dropout=0.5)
    assert len(between) == 1 and len(both) == 2
    np.testing.assert_array_equal(both[0], between[0])
    assert set(np.unique(np.asarray(both[1])).tolist()) == {0.0, 2.0}
    kwargs = {**kwargs, "output_dropout": 0.5}
    auto = bptt(params, xs, targets, mode="auto", **kwargs)
    for mode in ("manual", "fast", "checkpointed"):
        got = bptt(params, xs, targets, mode=mode, **kwargs)
        report = compare_gradients(got, auto, tolerance=GRAD_TOL, names=(mode, "auto"))
        assert report.ok, report.table()
    without = bptt(params, xs, targets, mode="auto", **{**kwargs, "output_dropout": 0.0})
    assert abs(float(auto.loss) - float(without.loss)) > 1e-3  # the top mask is applied


@pytest.mark.parametrize("mode", BPTT_MODES)
def test_empty_sequence_has_no_last_step_term(mode):
    params = init_model(jax.random.key(0), "gru", 3, H, OUT, bidirectional=True, dtype=jnp.float64)
    xs, targets = jnp.zeros((0, B, 3)), jnp.ones((B, OUT))
    grads = bptt(params, xs, targets, cell="gru", mode=mode, loss=Loss("mse", "last_step"))
    assert float(grads.loss) == 0.0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads.params))


# ------------------------------------------------------------------------------------------
# Forward semantics against single layers, composed by hand


def single_layer(cell, p, inputs, lengths, reverse):
    """One direction of one layer as a Python loop of ``cells.step`` from the zero state: the
    state frozen past each length, outputs zero there; reverse from step T - 1 down to 0."""
    cell = get_cell(cell)
    valid = np.arange(inputs.shape[0])[:, None] < np.asarray(lengths)[None, :]
    state = cell.zero_state((inputs.shape[1],), p["W_hh"].shape[0], inputs.dtype)
    hs = [None] * inputs.shape[0]
    order = range(inputs.shape[0])
    for t in reversed(order) if reverse else order:
        new = step(cell, p, state, inputs[t])
        state = jnp.where(valid[t][:, None], new, state)
        hs[t] = jnp.where(valid[t][:, None], cell.hidden(state), 0)
    return jnp.stack(hs), state


def test_stack_is_single_layer_unrolls_composed_by_hand():
    cell, input_size = "gru", 2 * H
    params = init_model(
        jax.random.key(4), cell, input_size, H, OUT, num_layers=2, bidirectional=True
    )
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    xs, _ = data(5, input_size, "mse", "per_step")
    lengths = jnp.asarray(LENGTHS)
    key = jax.random.key(6)

    (drop,) = dropout_masks(key, 0.5, params["layers"], xs)
    assert set(np.unique(np.asarray(drop)).tolist()) == {0.0, 2.0}  # inverted dropout, p = 0.5
    valid = (np.arange(T)[:, None] < LENGTHS[None, :])[..., None]
    inputs, want_finals = xs, []
    for i, layer in enumerate(params["layers"]):
        fwd, fwd_final = single_layer(cell, layer["fwd"], inputs, lengths, reverse=False)
        bwd, bwd_final = single_layer(cell, layer["bwd"], inputs, lengths, reverse=True)
        want_finals.append({"fwd": fwd_final, "bwd": bwd_final})
        inputs = np.concatenate([fwd, bwd], axis=-1) + np.where(valid, inputs, 0)
        if i == 0:
            inputs = inputs * np.asarray(drop)

    kw = dict(cell=cell, lengths=lengths, dropout=0.5, key=key, residual=True)
    for mode in UNROLL_MODES:  # the forward is the same whichever backward a mode prepares
        outputs, finals = unroll(params, xs, mode=mode, **kw)
        for i, want in enumerate(want_finals):
            for name in ("fwd", "bwd"):
                np.testing.assert_allclose(finals[i][name], want[name], rtol=0, atol=FORWARD_TOL)
        np.testing.assert_allclose(outputs, inputs, rtol=0, atol=FORWARD_TOL)
        assert float(jnp.abs(outputs[LENGTHS[2] :, 2]).max()) == 0.0

    # the same key gives the same masks; dropout never touches the top layer's output
    outputs, _ = unroll(params, xs, **kw)
    again, _ = unroll(params, xs, **kw)
    np.testing.assert_array_equal(again, outputs)
    other, _ = unroll(params, xs, **{**kw, "key": jax.random.key(7)})
    assert float(jnp.abs(other - outputs).max()) > 0

    # one unbatched sequence is the batched computation with B = 1
    single, single_finals = unroll(params, xs[:, 0], cell=cell, residual=True)
    batched, batched_finals = unroll(params, xs[:, :1], cell=cell, residual=True)
    np.testing.assert_allclose(single, batched[:, 0], rtol=0, atol=FORWARD_TOL)
    np.testing.assert_allclose(
        single_finals[1]["bwd"], batched_finals[1]["bwd"][0], rtol=0, atol=FORWARD_TOL
    )


# ------------------------------------------------------------------------------------------
# Errors: clear, naming the argument, before any work


@pytest.fixture(scope="module")
def small():
    params = init_model(jax.random.key(0), "lstm", 3, H, OUT, num_layers=2, bidirectional=True)
    xs, targets = data(0, 3, "mse", "per_step")
    return params, xs.astype(jnp.float32), targets.astype(jnp.float32)


@pytest.mark.parametrize("num_layers", [0, -1, 1.5, True])
def test_init_rejects_bad_num_layers(num_layers):
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        init_model(jax.random.key(0), "gru", 3, H, OUT, num_layers=num_layers)


def test_init_rejects_forget_bias_for_gru():
    with pytest.raises(ValueError, match="forget_bias"):
        init_model(jax.random.key(0), "gru", 3, H, OUT, forget_bias=1.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dropout=1.0, key=jax.random.key(0)), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1, key=jax.random.key(0)), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(dropout="0.5"), TypeError, "dropout must be a float"),
        (dict(dropout=0.2), ValueError, "dropout=0.2 needs a PRNG key"),
        (dict(output_dropout=1.0, key=jax.random.key(0)), ValueError, r"output_dropout must be in"),
        (dict(output_dropout=0.2), ValueError, "output_dropout=0.2 needs a PRNG key"),
        (dict(residual=True), ValueError, "residual=True adds layer 0's input.*3 features to 8"),
        (dict(residual="all"), ValueError, "residual must be one of"),
        (dict(h0=[None]), TypeError, "h0 must be a list with one"),
        (dict(h0=[{"fwd": None}, {"fwd": None}]), TypeError, r"h0\[0\] must be a dict"),
        (dict(lengths=np.array([1, 2])), ValueError, "lengths must have shape"),
    ],
    ids=[
        "p=1",
        "p<0",
        "p-str",
        "no-key",
        "out-p=1",
        "out-no-key",
        "res-size",
        "res-choice",
        "h0-len",
        "h0-dirs",
        "len",
    ],
)
def test_bad_arguments_are_named(small, kwargs, error, match):
    params, xs, targets = small
    for mode in BPTT_MODES:
        with pytest.raises(error, match=match):
            bptt(params, xs, targets, cell="lstm", mode=mode, **kwargs)
    for mode in UNROLL_MODES if "output_dropout" not in kwargs else ():  # a bptt argument
        with pytest.raises(error, match=match):
            unroll(params, xs, cell="lstm", mode=mode, **kwargs)


def test_bad_params_and_targets_are_named(small):
    params, xs, targets = small
    ro = params["readout"]
    with pytest.raises(TypeError, match="params must be a dict {'layers'"):
        unroll({"cell": params["layers"][0]["fwd"], "readout": ro}, xs, cell="lstm")
    mixed = {"layers": [params["layers"][0], {"fwd": params["layers"][1]["fwd"]}], "readout": ro}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\] must have the directions"):
        unroll(mixed, xs, cell="lstm")
    swapped = {"layers": params["layers"][::-1], "readout": ro}
    with pytest.raises(
        ValueError, match=r"params\['layers'\]\[1\]\['fwd'\]\['W_xh'\] must have shape \(8, 16\)"
    ):
        unroll(swapped, xs, cell="lstm")
    with pytest.raises(
        ValueError, match="xs has feature size 2 but the params expect input_size=3"
    ):
        unroll(params, xs[..., :2], cell="lstm")
    uni = {"layers": [{"fwd": layer["fwd"]} for layer in params["layers"]], "readout": ro}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\['fwd'\]\['W_xh'\]"):
        unroll(uni, xs, cell="lstm")
    no_readout = {"layers": params["layers"]}
    with pytest.raises(TypeError, match="readout"):
        bptt(no_readout, xs, targets, cell="lstm")
    with pytest.raises(ValueError, match="targets for loss='mse', placement='last_step'"):
        bptt(params, xs, targets, cell="lstm", loss=Loss("mse", "last_step"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        bptt(params, xs, targets, cell="lstm", loss=Loss("mse", reduction="max"))


# ------------------------------------------------------------------------------------------
# PyTorch: stacked and bidirectional modules, packed sequences, h_n


TORCH_LENGTHS = np.array([5, 2, 4])  # packed sequences need lengths >= 1; max == T
D = 3


def make_rnn(torch, cell, seed, **kwargs):
    return make_torch_rnn(torch, cell, seed, D, H, **kwargs)


def assert_close(ours, reference, tol, what):
    reference = reference.detach().numpy() if hasattr(reference, "detach") else reference
    max_abs, rel = relative_error(ours, reference)
    assert rel <= tol, f"{what}: relative error {rel:.2e} (max abs {max_abs:.2e}) > {tol:.0e}"


def torch_state_as_ours(cell, state, num_layers, directions):
    """PyTorch's ``(num_layers * directions, B, H)`` h_n (and c_n) -> ``[{"fwd", "bwd"?}]``."""
    names = ("fwd", "bwd")[:directions]
    if cell == "lstm":
        h, c = state
        return [
            {d: (h[directions * i + j], c[directions * i + j]) for j, d in enumerate(names)}
            for i in range(num_layers)
        ]
    return [{d: state[directions * i + j] for j, d in enumerate(names)} for i in range(num_layers)]


# The four two-layer bidirectional cases in manual mode; one and three layers, uni- and
# bidirectional, in manual mode and one more (whose unroll runs in that mode too).
TORCH_CASES = [  # cell, placement, num_layers, bidirectional, modes
    ("elman_tanh", "per_step", 2, True, ("manual",)),
    ("elman_relu", "last_step", 2, True, ("manual",)),
    ("lstm", "last_step", 2, True, ("manual",)),
    ("gru", "per_step", 2, True, ("manual",)),
    ("lstm", "per_step", 1, False, ("manual", "checkpointed")),
    ("elman_tanh", "last_step", 3, False, ("manual", "fast")),
    ("gru", "last_step", 3, True, ("manual", "checkpointed")),
]


@pytest.mark.parametrize(
    "cell, placement, layers, bidirectional, modes",
    TORCH_CASES,
    ids=[f"{c}-{p}-L{n}-{'bi' if b else 'uni'}" for c, p, n, b, _ in TORCH_CASES],
)
def test_stack_matches_torch_packed(torch, cell, placement, layers, bidirectional, modes):
    directions = 2 if bidirectional else 1
    rnn = make_rnn(torch, cell, seed=10, num_layers=layers, bidirectional=bidirectional)
    torch.manual_seed(11)
    head = torch.nn.Linear(directions * H, OUT, dtype=torch.float64)
    params = from_torch(rnn, cell, head=head)
    rng = np.random.default_rng(12)
    xs = rng.normal(size=(T, B, D))
    h0 = rng.normal(size=(directions * layers, B, H)) * 0.5
    c0 = rng.normal(size=(directions * layers, B, H)) * 0.5
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
    else:  # many-to-one reads PyTorch's h_n of the top layer, every direction
        h_n = final[0] if cell == "lstm" else final
        summary = torch.cat([h_n[-2], h_n[-1]], dim=-1) if bidirectional else h_n[-1]
        loss = ((head(summary) - torch.tensor(targets)) ** 2).mean()
    loss.backward()

    as_ours = functools.partial(torch_state_as_ours, cell, num_layers=layers, directions=directions)
    our_h0 = as_ours((jnp.asarray(h0), jnp.asarray(c0)) if cell == "lstm" else jnp.asarray(h0))
    lengths = jnp.asarray(TORCH_LENGTHS)
    want_finals = as_ours(
        tuple(f.detach().numpy() for f in final) if cell == "lstm" else final.detach().numpy()
    )
    unroll_mode = modes[-1] if modes[-1] in UNROLL_MODES else "auto"
    outputs, finals = unroll(
        params, jnp.asarray(xs), cell=cell, h0=our_h0, lengths=lengths, mode=unroll_mode
    )
    assert_close(outputs, out, FORWARD_TOL, f"{unroll_mode} outputs")
    for got, want in zip(
        jax.tree_util.tree_leaves(finals), jax.tree_util.tree_leaves(want_finals), strict=True
    ):
        assert_close(got, np.asarray(want), FORWARD_TOL, f"{unroll_mode} final states")

    torch_d_h0 = (
        (state0[0].grad.numpy(), state0[1].grad.numpy()) if cell == "lstm" else state0.grad.numpy()
    )
    for bptt_mode in modes:
        grads = bptt(
            params,
            jnp.asarray(xs),
            jnp.asarray(targets),
            cell=cell,
            mode=bptt_mode,
            loss=Loss("mse", placement),
            lengths=lengths,
            h0=our_h0,
        )
        assert_close(grads.loss, loss.detach().numpy(), FORWARD_TOL, f"{bptt_mode} loss")
        for i, layer in enumerate(grads.params["layers"]):
            assert set(layer) == ({"fwd", "bwd"} if bidirectional else {"fwd"})
            for direction, suffix in (("fwd", ""), ("bwd", "_reverse"))[:directions]:
                g = layer[direction]
                tensor = {
                    n: getattr(rnn, f"{n}_l{i}{suffix}").grad for n in ("weight_ih", "weight_hh")
                }
                where = f"{bptt_mode} layer {i} {direction}"
                assert_close(g["W_xh"], tensor["weight_ih"].T, GRAD_TOL, f"{where} W_xh")
                assert_close(g["W_hh"], tensor["weight_hh"].T, GRAD_TOL, f"{where} W_hh")
                bias_ih = getattr(rnn, f"bias_ih_l{i}{suffix}").grad
                assert_close(g["b_h"], bias_ih, GRAD_TOL, where)
                if cell == "gru":
                    b_hh = getattr(rnn, f"bias_hh_l{i}{suffix}").grad
                    assert_close(g["b_hn"], b_hh[2 * H :], GRAD_TOL, f"{where} b_hn")
        readout_grads = grads.params["readout"]
        assert_close(readout_grads["W_hy"], head.weight.grad.T, GRAD_TOL, f"{bptt_mode} W_hy")
        assert_close(readout_grads["b_y"], head.bias.grad, GRAD_TOL, f"{bptt_mode} b_y")
        assert_close(grads.xs, x.grad, GRAD_TOL, f"{bptt_mode} xs")
        for got, want in zip(
            jax.tree_util.tree_leaves(grads.h0),
            jax.tree_util.tree_leaves(as_ours(torch_d_h0)),
            strict=True,
        ):
            assert_close(got, want, GRAD_TOL, f"{bptt_mode} h0")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_round_trip_and_modules(torch, cell):
    rnn = make_rnn(torch, cell, seed=20, num_layers=3, bidirectional=True)
    params = from_torch(rnn.state_dict(), cell)
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

    uni = make_rnn(torch, cell, seed=22, num_layers=2)
    params = from_torch(uni, cell)
    assert [set(layer) for layer in params["layers"]] == [{"fwd"}, {"fwd"}]
    one = make_rnn(torch, cell, seed=23)  # a single layer is a stack of one
    params = from_torch(one, cell)
    assert [set(layer) for layer in params["layers"]] == [{"fwd"}]
    assert params["layers"][0]["fwd"]["W_hh"].shape == (H, get_cell(cell).num_gates * H)


def test_state_dict_errors():
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
    assert len(from_torch(sd, "gru")["layers"]) == 2
    with pytest.raises(ValueError, match="weight_ih_l1 has shape"):
        from_torch({**sd, "weight_ih_l1": np.zeros((3 * H, H))}, "gru")
    with pytest.raises(ValueError, match="missing 'bias_hh_l1_reverse'"):
        from_torch({k: v for k, v in sd.items() if k != "bias_hh_l1_reverse"}, "gru")
    with pytest.raises(ValueError, match="skips layer"):
        from_torch({**sd, "weight_ih_l3": np.zeros(1)}, "gru")
    with pytest.raises(ValueError, match="in_features=4.*8 features"):
        from_torch(sd, "gru", head={"weight": np.ones((OUT, H))})
