"""Tests for jax_bptt.diagnostics and jax_bptt.figures: per-step and per-term gradients against
independent computations, Pascanu et al.'s (2013) Jacobian results, and the experiment's quick
mode."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import Loss, bptt_auto, get_cell, init_model
from jax_bptt.cells import make_cell, step
from jax_bptt.check import relative_error
from jax_bptt.diagnostics import (
    LINEAR,
    gradient_flow,
    jacobian_norms,
    recurrent_spectrum,
    scale_recurrent,
    term_flow,
)
from jax_bptt.figures import unrolled_network
from jax_bptt.losses import sequence_loss
from jax_bptt.model import readout

TOL = 1e-10
T, B, D, H, OUT = 5, 2, 3, 3, 2  # steps, batch, input, hidden, output
LENGTHS = jnp.array([5, 3])
REPO = pathlib.Path(__file__).resolve().parents[1]


def tree_rel_errors(candidate, reference) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(candidate)[0]
    refs = jax.tree_util.tree_leaves(reference)
    return {
        jax.tree_util.keystr(p): relative_error(a, b)[1]
        for (p, a), b in zip(flat, refs, strict=True)
    }


def model_and_data(cell, loss, placement, seed=0):
    params = init_model(jax.random.key(seed), cell, D, H, OUT, dtype=jnp.float64)
    k_x, k_y, k_h = jax.random.split(jax.random.key(seed + 1), 3)
    xs = jax.random.normal(k_x, (T, B, D), jnp.float64)
    shape = (T, B) if placement == "per_step" else (B,)
    if loss == "mse":
        targets = jax.random.normal(k_y, (*shape, OUT), jnp.float64)
    else:
        targets = jax.random.randint(k_y, shape, 0, OUT)
    # A nonzero h0, so that h_0^T d hp_1 (step 1's term of dW_hh) is not trivially zero.
    leaves, structure = jax.tree_util.tree_flatten(get_cell(cell).zero_state((B,), H, jnp.float64))
    h0 = jax.tree_util.tree_unflatten(
        structure,
        [
            0.5 * jax.random.normal(jax.random.fold_in(k_h, i), a.shape)
            for i, a in enumerate(leaves)
        ],
    )
    return params, xs, targets, h0


def perturbed_outputs(cell, params, xs, h0, lengths, eps):
    """Independent forward: a Python loop of ``cells.step`` with ``eps[t]`` added to state
    ``h_t`` (t = 0..T), so ``d loss / d eps`` is ``dL/d state_t`` for every t. ``h0`` is the
    bare state (the model's ``h0`` is ``[{"fwd": h0}]``)."""
    cell = get_cell(cell)
    tree_map = jax.tree_util.tree_map
    state = tree_map(lambda a, e: a + e[0], h0, eps)
    ys = []
    for t in range(xs.shape[0]):
        new = step(cell, params["layers"][0]["fwd"], state, xs[t])
        live = (t < lengths)[:, None]  # past its length a sequence's state is frozen
        new = tree_map(lambda n, s, live=live: jnp.where(live, n, s), new, state)
        state = tree_map(lambda a, e, t=t: a + e[t + 1], new, eps)
        ys.append(readout(params["readout"], jnp.where(live, cell.hidden(state), 0)))
    return jnp.stack(ys)


CASES = [
    ("elman_tanh", "mse", "per_step"),
    ("lstm", "cross_entropy", "per_step"),
    ("gru", "mse", "last_step"),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def flow_case(request):
    cell, loss, placement = request.param
    params, xs, targets, h0 = model_and_data(cell, loss, placement)
    kw = dict(cell=cell, loss=Loss(loss, placement), lengths=LENGTHS, h0=[{"fwd": h0}])
    return request.param, params, xs, targets, kw, gradient_flow(params, xs, targets, **kw)


def test_step_contributions_sum_to_the_full_gradient(flow_case):
    _, params, xs, targets, kw, flow = flow_case
    auto = bptt_auto(params, xs, targets, **kw)
    summed = jax.tree_util.tree_map(lambda a: a.sum(0), flow.steps)
    errors = tree_rel_errors(summed, auto.params)
    assert max(errors.values()) <= TOL, errors
    assert jax.tree_util.tree_structure(summed) == jax.tree_util.tree_structure(auto.params)
    w_hh = params["layers"][0]["fwd"]["W_hh"]
    assert flow.steps["layers"][0]["fwd"]["W_hh"].shape == (T, H, w_hh.shape[1])
    assert relative_error(flow.loss, auto.loss)[1] <= TOL
    # Row 0 of d_states is dL/dh_0; past a sequence's length no gradient reaches its state.
    d_h0 = jax.tree_util.tree_map(lambda a: a[0], flow.d_states)
    assert max(tree_rel_errors(d_h0, auto.h0[0]["fwd"]).values()) <= TOL
    assert np.all(np.asarray(flow.d_hidden)[LENGTHS[1] + 1 :, 1] == 0)


def test_state_gradients_match_a_perturbed_forward(flow_case):
    (cell, loss, placement), params, xs, targets, kw, flow = flow_case
    h0 = kw["h0"][0]["fwd"]
    eps = jax.tree_util.tree_map(lambda a: jnp.zeros((T + 1, *a.shape), a.dtype), h0)

    def loss_of(eps):
        ys = perturbed_outputs(cell, params, xs, h0, LENGTHS, eps)
        return sequence_loss(ys, targets, Loss(loss, placement, "mean"), lengths=LENGTHS)

    reference = jax.jit(jax.grad(loss_of))(eps)
    errors = tree_rel_errors(flow.d_states, reference)
    assert max(errors.values()) <= TOL, errors
    assert flow.d_hidden.shape == (T + 1, B, H)


def test_padding_reaches_nothing(flow_case):
    """NaN inputs and NaN (or -1 class id) targets past a length give bitwise the same flow and
    Jacobian norms as the finite padding (the model masks padding before use)."""
    (cell, loss, placement), params, xs, targets, kw, flow = flow_case
    padded_xs = xs.at[LENGTHS[1] :, 1].set(jnp.nan)
    if placement == "per_step":
        targets = targets.at[LENGTHS[1] :, 1].set(jnp.nan if loss == "mse" else -1)
    padded = gradient_flow(params, padded_xs, targets, **kw)
    leaves = jax.tree_util.tree_leaves
    for got, want in zip(leaves(padded), leaves(flow), strict=True):
        np.testing.assert_array_equal(got, want)
    jac_kw = dict(cell=cell, h0=kw["h0"], lengths=LENGTHS)
    np.testing.assert_array_equal(
        jacobian_norms(params, padded_xs, **jac_kw), jacobian_norms(params, xs, **jac_kw)
    )


def test_term_flow_splits_the_gradient_by_loss_term():
    cell = "lstm"  # a two-leaf state (h, c): the hardest case for the recording
    params, xs, targets, h0 = model_and_data(cell, "mse", "per_step", seed=3)
    kw = dict(cell=cell, loss=Loss(reduction="sum"), h0=[{"fwd": h0}])
    terms = term_flow(params, xs, targets, **kw)
    auto = bptt_auto(params, xs, targets, **kw)
    summed = jax.tree_util.tree_map(lambda a: a.sum(0), terms.terms)
    errors = tree_rel_errors(summed, auto.params)
    assert max(errors.values()) <= TOL, errors
    w_hh = params["layers"][0]["fwd"]["W_hh"]
    assert terms.terms["layers"][0]["fwd"]["W_hh"].shape == (T, *w_hh.shape)

    # dL_t/d state_k for all (t, k), against the perturbed forward, one loss term at a time.
    eps = jax.tree_util.tree_map(lambda a: jnp.zeros((T + 1, *a.shape), a.dtype), h0)

    def term_losses(eps):
        ys = perturbed_outputs(cell, params, xs, h0, jnp.full((B,), T), eps)
        return jnp.stack(
            [
                sequence_loss(ys[t : t + 1], targets[t : t + 1], Loss("mse", "per_step", "sum"))
                for t in range(T)
            ]
        )

    reference = jax.jit(jax.jacrev(term_losses))(eps)  # leaves (T, T+1, B, H)
    assert max(tree_rel_errors(terms.d_states, reference).values()) <= TOL
    norms = np.asarray(jnp.linalg.norm(terms.d_hidden, axis=-1))  # (T, T+1, B)
    after = np.arange(T + 1)[None, :] > np.arange(1, T + 1)[:, None]
    assert np.all(norms[after] == 0)  # L_t does not depend on later states
    assert np.all(norms[~after] > 0)


def _gain_init(key, input_size, hidden_size, dtype=jnp.float32, recurrent_init="uniform"):
    params = get_cell("elman_tanh").init(key, input_size, hidden_size, dtype, recurrent_init)
    return {**params, "a": jnp.linspace(0.5, 1.5, hidden_size, dtype=dtype)}


# h_t = tanh(a * (x_t W_xh + b_h + h_{t-1} W_hh)): a gain ``a`` the forward reads itself, whose
# gradient the reverse scan sums over t (the backward is derived by jax.vjp).
GAIN_TANH = make_cell(
    "gain_tanh",
    num_gates=1,
    forward=lambda p, xp, hp, h_prev: jnp.tanh(p["a"] * (xp + hp)),
    init=_gain_init,
    pointwise_params=("a",),
)


def test_flows_of_token_ids_and_a_cell_with_pointwise_params():
    """Per-step terms of a pointwise param (its backward re-run per step) and of ``W_xh`` for
    token ids (rows scattered per step) still sum to ``jax.grad``'s gradient."""
    params = init_model(jax.random.key(8), GAIN_TANH, D, H, OUT, dtype=jnp.float64)
    k_x, k_y = jax.random.split(jax.random.key(9))
    ids = jax.random.randint(k_x, (T, B), 0, D)
    targets = jax.random.normal(k_y, (T, B, OUT), jnp.float64)
    kw = dict(cell=GAIN_TANH, lengths=LENGTHS)
    flow = gradient_flow(params, ids, targets, **kw)
    terms = term_flow(params, ids, targets, **kw)
    auto = bptt_auto(params, ids, targets, **kw)
    assert auto.xs is None and flow.steps["layers"][0]["fwd"]["a"].shape == (T, H)
    for split in (flow.steps, terms.terms):
        summed = jax.tree_util.tree_map(lambda a: a.sum(0), split)
        errors = tree_rel_errors(summed, auto.params)
        assert max(errors.values()) <= TOL, errors
    d_h0 = jax.tree_util.tree_map(lambda a: a[0], flow.d_states)
    assert max(tree_rel_errors(d_h0, auto.h0[0]["fwd"]).values()) <= TOL


def linear_rnn(rho, hidden=4, seed=0):
    params = init_model(
        jax.random.key(seed), LINEAR, D, hidden, OUT, dtype=jnp.float64, recurrent_init="orthogonal"
    )
    cell_params = params["layers"][0]["fwd"]
    return {**params, "layers": [{"fwd": {**cell_params, "W_hh": rho * cell_params["W_hh"]}}]}


@pytest.mark.parametrize("method", ["exact", "power"])
@pytest.mark.parametrize("rho", [0.8, 1.25])
def test_linear_rnn_jacobian_norm_is_rho_to_the_distance(rho, method):
    """Pascanu et al. (2013): for h_t = h_{t-1} W_hh + ..., dh_T/dh_t = (W_hh^T)^(T-t), whose
    norm is rho^(T-t) when W_hh = rho Q with Q orthogonal."""
    num_steps = 12
    xs = jax.random.normal(jax.random.key(5), (num_steps, 1, D), jnp.float64)
    norms = jacobian_norms(linear_rnn(rho), xs, cell=LINEAR, method=method, num_iters=5)
    expected = rho ** np.arange(num_steps, -1, -1.0)
    assert norms.shape == (num_steps + 1, 1)
    assert relative_error(norms[:, 0] / expected, np.ones(num_steps + 1))[1] <= TOL


def test_tanh_rnn_jacobian_norm_is_bounded_by_the_top_singular_value():
    """With largest singular value s < 1 and |tanh'| <= 1, ||dh_T/dh_t|| <= s^(T-t)."""
    num_steps, s = 12, 0.8
    params = init_model(jax.random.key(2), "elman_tanh", D, 4, OUT, dtype=jnp.float64)
    params = scale_recurrent(params, s, cell="elman_tanh")
    xs = jax.random.normal(jax.random.key(6), (num_steps, B, D), jnp.float64)
    norms = np.asarray(jacobian_norms(params, xs, cell="elman_tanh"))
    bound = s ** np.arange(num_steps, -1, -1.0)
    assert np.all(norms <= bound[:, None] * (1 + 1e-12))
    # Saturation makes the bound strict far back, and the norms are not trivially zero.
    assert np.all(norms[0] < 0.9 * bound[0]) and np.all(norms[0] > 0)


def test_power_iteration_matches_the_exact_jacobian_norm():
    cell = "lstm"  # the h -> h block of a (2H, 2H) state Jacobian
    params, xs, _, h0 = model_and_data(cell, "mse", "per_step", seed=4)
    kw = dict(cell=cell, h0=[{"fwd": h0}], lengths=LENGTHS)
    exact = jacobian_norms(params, xs, **kw)
    power = jacobian_norms(params, xs, **kw, method="power", num_iters=300)
    assert exact.shape == (T + 1, B)
    assert relative_error(power, exact)[1] <= 1e-8
    # Past a sequence's length the state is frozen: the Jacobian is the identity there.
    np.testing.assert_array_equal(np.asarray(exact)[LENGTHS[1] :, 1], 1.0)


@pytest.mark.parametrize("method", ["exact", "power"])
def test_jacobian_norms_of_token_ids_equal_those_of_one_hot_inputs(method):
    """Token ids are rows of ``W_xh``: the same recurrence as one-hot float inputs."""
    params, _, _, h0 = model_and_data("gru", "mse", "per_step", seed=3)
    ids = jax.random.randint(jax.random.key(7), (T, B), 0, D)
    kw = dict(cell="gru", h0=[{"fwd": h0}], lengths=LENGTHS, method=method, num_iters=50)
    from_ids = jacobian_norms(params, ids, **kw)
    from_one_hot = jacobian_norms(params, jax.nn.one_hot(ids, D, dtype=jnp.float64), **kw)
    assert from_ids.shape == (T + 1, B) and np.all(np.asarray(from_ids) > 0)
    assert relative_error(from_ids, from_one_hot)[1] <= TOL


def test_recurrent_spectrum_and_scaling_per_gate_block():
    params = init_model(
        jax.random.key(0), "lstm", D, 4, OUT, dtype=jnp.float64, recurrent_init="orthogonal"
    )
    spectrum = recurrent_spectrum(params, cell="lstm")
    assert [b.name for b in spectrum] == ["i", "f", "g", "o"]
    for block in spectrum:  # orthogonal blocks: every singular value and |eigenvalue| is 1
        np.testing.assert_allclose(block.singular_values, 1.0, rtol=1e-12)
        assert abs(block.spectral_radius - 1.0) <= 1e-12
    uniform = init_model(jax.random.key(1), "gru", D, 4, OUT, dtype=jnp.float64)
    before = recurrent_spectrum(uniform, cell="gru")
    after = recurrent_spectrum(scale_recurrent(uniform, 0.7, cell="gru"), cell="gru")
    assert [b.name for b in after] == ["r", "z", "n"]
    for b0, b1 in zip(before, after, strict=True):
        expected = 0.7 * b0.singular_values / b0.singular_values[0]
        np.testing.assert_allclose(b1.singular_values, expected, rtol=1e-12)
    elman = init_model(jax.random.key(2), "elman_tanh", D, 3, OUT, dtype=jnp.float64)
    elman["layers"][0]["fwd"]["W_hh"] = jnp.eye(3)
    assert [b.name for b in recurrent_spectrum(elman, cell="elman_tanh")] == ["W_hh"]


def test_unbatched_inputs_drop_the_batch_axis():
    params, xs, targets, _ = model_and_data("elman_tanh", "mse", "per_step")
    one = gradient_flow(params, xs[:, 0], targets[:, 0], cell="elman_tanh")
    assert one.d_hidden.shape == (T + 1, H)
    auto = bptt_auto(params, xs[:, 0], targets[:, 0], cell="elman_tanh")
    summed = jax.tree_util.tree_map(lambda a: a.sum(0), one.steps)
    assert max(tree_rel_errors(summed, auto.params).values()) <= TOL
    assert relative_error(one.d_hidden[0], auto.h0[0]["fwd"])[1] <= TOL


def test_bad_inputs_give_the_core_api_errors():
    params, xs, targets, _ = model_and_data("elman_tanh", "mse", "per_step")
    with pytest.raises(ValueError, match="input_size=3"):
        gradient_flow(params, xs[..., :2], targets, cell="elman_tanh")
    with pytest.raises(ValueError, match=r"targets for loss='mse', placement='per_step'"):
        term_flow(params, xs, targets[0], cell="elman_tanh")
    cell_params = params["layers"][0]["fwd"]
    with pytest.raises(TypeError, match="params must be a dict"):
        gradient_flow(cell_params, xs, targets, cell="elman_tanh")
    with pytest.raises(ValueError, match=r"h0\[0\]\['fwd'\] leaves must have shape \(2, 3\)"):
        jacobian_norms(params, xs, cell="elman_tanh", h0=[{"fwd": jnp.zeros((B, H + 1))}])
    with pytest.raises(ValueError, match="method must be one of"):
        jacobian_norms(params, xs, cell="elman_tanh", method="svd")
    # A cell's params where the model's are expected: the error names what was given.
    with pytest.raises(
        TypeError, match=r"params must be a dict .* got keys \['W_hh', 'W_xh', 'b_h'\]"
    ):
        jacobian_norms(cell_params, xs, cell="elman_tanh")
    with pytest.raises(ValueError, match="num_iters"):
        jacobian_norms(params, xs, cell="elman_tanh", method="power", num_iters=0)


@pytest.mark.parametrize(
    "num_layers, bidirectional", [(2, False), (1, True)], ids=["two_layers", "bidirectional"]
)
def test_single_recurrence_diagnostics_reject_other_models(num_layers, bidirectional):
    params = init_model(
        jax.random.key(0), "gru", D, H, OUT, num_layers=num_layers, bidirectional=bidirectional,
        dtype=jnp.float64,
    )  # fmt: skip
    xs = jnp.ones((T, B, D), jnp.float64)
    targets = jnp.zeros((T, B, OUT), jnp.float64)
    for name, call in (
        ("gradient_flow", lambda: gradient_flow(params, xs, targets, cell="gru")),
        ("term_flow", lambda: term_flow(params, xs, targets, cell="gru")),
        ("jacobian_norms", lambda: jacobian_norms(params, xs, cell="gru")),
    ):
        with pytest.raises(ValueError, match=f"{name} analyses one recurrence.*one unidirectional"):
            call()


def test_spectrum_and_scaling_of_a_chosen_layer_and_direction():
    params = init_model(
        jax.random.key(4), "lstm", D, 4, OUT, num_layers=2, bidirectional=True, dtype=jnp.float64
    )

    def top(p, layer, direction):
        return [
            b.singular_values[0]
            for b in recurrent_spectrum(p, cell="lstm", layer=layer, direction=direction)
        ]

    one = scale_recurrent(params, 0.5, cell="lstm", layer=1, direction="bwd")
    np.testing.assert_allclose(top(one, 1, "bwd"), 0.5, rtol=1e-12)
    np.testing.assert_allclose(top(one, -1, "bwd"), 0.5, rtol=1e-12)  # from the top
    for layer, direction in ((0, "fwd"), (0, "bwd"), (1, "fwd")):  # untouched
        np.testing.assert_array_equal(
            one["layers"][layer][direction]["W_hh"], params["layers"][layer][direction]["W_hh"]
        )
    np.testing.assert_array_equal(one["readout"]["W_hy"], params["readout"]["W_hy"])
    every = scale_recurrent(params, 0.9, cell="lstm")  # every layer and direction
    for layer, direction in ((0, "fwd"), (0, "bwd"), (1, "fwd"), (1, "bwd")):
        np.testing.assert_allclose(top(every, layer, direction), 0.9, rtol=1e-12)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        recurrent_spectrum(params, cell="lstm", layer=2)
    with pytest.raises(ValueError, match="direction must be one of"):
        scale_recurrent(params, 0.5, cell="lstm", direction="up")
    single = init_model(jax.random.key(4), "lstm", D, 4, OUT, dtype=jnp.float64)
    with pytest.raises(ValueError, match="direction 'bwd' is not in this model"):
        recurrent_spectrum(single, cell="lstm", direction="bwd")
    with pytest.raises(ValueError, match="top_singular_value must be >= 0"):
        scale_recurrent(single, -1.0, cell="lstm")
    with pytest.raises(
        ValueError, match="params\\['layers'\\]\\[0\\]\\['fwd'\\] must have the leaves"
    ):
        recurrent_spectrum(single, cell="gru")  # the cell is checked against the params


def test_unrolled_network_picture(tmp_path):
    path = unrolled_network("gru", 3, tmp_path / "pics" / "unrolled.png", hidden_size=8)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="num_steps"):
        unrolled_network("gru", 0, tmp_path / "u.png")
    with pytest.raises(ValueError, match="cell must be one of"):
        unrolled_network("transformer", 3, tmp_path / "u.png")


def test_experiment_quick_mode(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "gradient_flow_experiment", REPO / "experiments" / "gradient_flow.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--quick", "--out", str(tmp_path)])
    for name in ("tanh_spectral_sweep", "gated_adding", "term_heatmap", "unrolled"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["quick"] is True
    steps = summary["tanh_sweep"]["steps"]
    for row in summary["tanh_sweep"]["rows"]:  # the bound of the test above, on the sweep
        if row["s"] <= 1.0:
            assert row["jacobian_T_to_0"] <= row["s"] ** steps
