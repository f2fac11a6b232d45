"""Step-at-a-time inference: ``step`` equals ``unroll``, greedy generation equals a Python loop
over ``cells.step`` through every layer, and bad arguments fail with errors that name them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import init_model, predict, unroll
from jax_bptt.cells import get_cell
from jax_bptt.cells import step as cell_step
from jax_bptt.check import relative_error
from jax_bptt.generate import generate, init_state, step

TOL = 1e-12  # float64 (conftest): the same arithmetic, one GEMM per step instead of one in all
T, B, D, H, OUT = 6, 3, 2, 4, 3


def _assert_trees_close(candidate, reference, tol=TOL):
    assert jax.tree_util.tree_structure(candidate) == jax.tree_util.tree_structure(reference)
    for a, b in zip(
        jax.tree_util.tree_leaves(candidate), jax.tree_util.tree_leaves(reference), strict=True
    ):
        assert relative_error(a, b)[1] <= tol


def _has_residual(residual, layer):
    return residual is True or (residual == "except_first" and layer > 0)


# --------------------------------------------------------------------------------------------
# step == unroll


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize(
    ("cell", "num_layers", "residual", "input_size"),
    [
        ("lstm", 1, False, D),
        ("gru", 1, False, D),
        ("gru", 2, False, D),
        ("lstm", 2, "except_first", D),
        ("gru", 2, True, H),  # residual on layer 0 too: input_size == hidden_size
    ],
)
def test_step_by_step_equals_unroll(cell, num_layers, residual, input_size, batched):
    keys = jax.random.split(jax.random.key(num_layers), 3)
    params = init_model(keys[0], cell, input_size, H, OUT, num_layers=num_layers, dtype=jnp.float64)
    xs = jax.random.normal(keys[1], (T, B, input_size), jnp.float64)
    h0 = jax.tree_util.tree_map(
        lambda z: 0.5 * jax.random.normal(keys[2], z.shape, jnp.float64),
        init_state(params, B, cell=cell),
    )
    if not batched:
        xs, h0 = xs[:, 0], jax.tree_util.tree_map(lambda a: a[0], h0)
    model = dict(cell=cell, residual=residual)

    # From the zero state (init_state) and from a given one.
    for start in (init_state(params, B if batched else None, cell=cell), h0):
        _, want_finals = unroll(params, xs, h0=start, **model)
        want_ys = predict(params, xs, h0=start, **model)
        state = start
        for t in range(T):
            state, y = step(params, state, xs[t], **model)
            assert y.shape == want_ys[t].shape
            assert relative_error(y, want_ys[t])[1] <= TOL
        _assert_trees_close(state, want_finals)

    # A prompt through unroll, the rest step by step: the state unroll ends in is step's state.
    _, finals = unroll(params, xs[: T // 2], h0=h0, **model)
    state = finals
    for t in range(T // 2, T):
        state, _ = step(params, state, xs[t], **model)
    _assert_trees_close(state, unroll(params, xs, h0=h0, **model)[1])


# --------------------------------------------------------------------------------------------
# generate


def _greedy_reference(params, cell, prompt, length, residual=False):
    """Python loop over cells.step through every layer, argmax fed back one-hot."""
    cell = get_cell(cell)
    vocab, dtype = params["readout"]["W_hy"].shape[1], params["readout"]["W_hy"].dtype
    states = [
        cell.zero_state((), layer["fwd"]["W_hh"].shape[0], dtype) for layer in params["layers"]
    ]

    def feed(token):
        inputs = jax.nn.one_hot(token, vocab, dtype=dtype)
        for i, layer in enumerate(params["layers"]):
            states[i] = cell_step(cell, layer["fwd"], states[i], inputs)
            out = cell.hidden(states[i])
            inputs = out + inputs if _has_residual(residual, i) else out
        return inputs @ params["readout"]["W_hy"] + params["readout"]["b_y"]

    for token in prompt:
        logits = feed(token)
    expected = []
    for _ in range(length):
        expected.append(int(jnp.argmax(logits)))
        logits = feed(expected[-1])
    return expected


def test_greedy_generation_matches_a_python_loop():
    vocab = 5
    params = init_model(jax.random.key(2), "gru", vocab, 8, vocab, dtype=jnp.float64)
    prompt = np.array([1, 4, 0])
    tokens = generate(params, jax.random.key(0), prompt, 6, cell="gru", temperature=0.0)
    expected = _greedy_reference(params, "gru", prompt, 6)
    assert np.asarray(tokens).tolist() == expected

    sampled = generate(params, jax.random.key(0), prompt, 50, cell="gru", temperature=1.0)
    again = generate(params, jax.random.key(0), prompt, 50, cell="gru", temperature=1.0)
    assert sampled.shape == (50,) and np.array_equal(sampled, again)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < vocab
    # A very low temperature is (almost surely) greedy.
    cold = generate(params, jax.random.key(3), prompt, 6, cell="gru", temperature=1e-4)
    assert np.asarray(cold).tolist() == expected


@pytest.mark.parametrize("residual", [False, "except_first"])
def test_generate_with_a_two_layer_model(residual):
    vocab = 6
    params = init_model(jax.random.key(5), "lstm", vocab, 8, vocab, num_layers=2, dtype=jnp.float64)
    prompt = np.array([2, 0, 5, 1])
    greedy = generate(
        params, jax.random.key(0), prompt, 8, cell="lstm", residual=residual, temperature=0
    )
    assert greedy.dtype == jnp.int32
    assert np.asarray(greedy).tolist() == _greedy_reference(params, "lstm", prompt, 8, residual)

    sampled = generate(params, jax.random.key(1), prompt, 40, cell="lstm", residual=residual)
    again = generate(params, jax.random.key(1), prompt, 40, cell="lstm", residual=residual)
    other = generate(params, jax.random.key(2), prompt, 40, cell="lstm", residual=residual)
    assert sampled.shape == (40,) and np.array_equal(sampled, again)
    assert not np.array_equal(sampled, other)  # the key drives the sampling
    assert int(sampled.min()) >= 0 and int(sampled.max()) < vocab


# --------------------------------------------------------------------------------------------
# Bad arguments


def _zero_model(cell, input_size, output_size, **kwargs):
    """Zeros in ``init_model``'s layout, shapes by ``jax.eval_shape`` (nothing compiled)."""
    shapes = jax.eval_shape(
        lambda k: init_model(k, cell, input_size, 4, output_size, dtype=jnp.float64, **kwargs),
        jax.random.key(0),
    )
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_bidirectional_models_are_rejected():
    for num_layers in (1, 2):
        params = _zero_model("gru", 5, 5, num_layers=num_layers, bidirectional=True)
        with pytest.raises(ValueError, match="unidirectional"):
            generate(params, jax.random.key(0), np.array([1]), 3, cell="gru")
        with pytest.raises(ValueError, match="unidirectional"):
            init_state(params, 2, cell="gru")
        with pytest.raises(ValueError, match="unidirectional"):
            step(params, [{"fwd": np.zeros(4), "bwd": np.zeros(4)}] * num_layers,
                 np.zeros(5), cell="gru")  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt_ids": np.array([7])}, ValueError, r"prompt_ids must lie in \[0, 5\)"),
        ({"prompt_ids": np.array([0, -1])}, ValueError, r"prompt_ids must lie in \[0, 5\)"),
        ({"prompt_ids": np.array([], np.int32)}, ValueError, "prompt_ids"),
        ({"prompt_ids": np.array([[1, 2]])}, ValueError, "prompt_ids"),
        ({"prompt_ids": np.array([1.0])}, ValueError, "prompt_ids"),
        ({"length": 0}, ValueError, "length must be an int >= 1"),
        ({"length": 2.5}, ValueError, "length"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": math.nan}, ValueError, "temperature"),
        ({"temperature": math.inf}, ValueError, "temperature"),
        ({"temperature": True}, TypeError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, error, match):
    arguments = {"prompt_ids": np.array([1, 2]), "length": 3, "temperature": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        generate(_zero_model("lstm", 5, 5), jax.random.key(0), cell="lstm", **arguments)


def test_generate_needs_input_size_equal_to_output_size():
    with pytest.raises(ValueError, match="input_size == output_size.*input_size=5.*output_size=3"):
        generate(_zero_model("gru", 5, 3), jax.random.key(0), np.array([1]), 3, cell="gru")


def test_init_state_and_step_reject_bad_arguments():
    params = _zero_model("lstm", 5, 5, num_layers=2)
    with pytest.raises(ValueError, match="batch_size"):
        init_state(params, 0, cell="lstm")
    with pytest.raises(ValueError, match="residual"):
        step(params, init_state(params, 2, cell="lstm"), np.zeros((2, 5)), cell="lstm",
             residual="always")  # fmt: skip
    with pytest.raises(ValueError, match="residual=True"):  # layer 0 maps 5 features to 4
        generate(params, jax.random.key(0), np.array([1]), 3, cell="lstm", residual=True)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 5\) or \(5,\)"):
        step(params, init_state(params, 2, cell="lstm"), np.zeros((2, 3)), cell="lstm")
    with pytest.raises(TypeError, match="2 layers"):  # one state per layer
        step(params, init_state(params, 2, cell="lstm")[:1], np.zeros((2, 5)), cell="lstm")
