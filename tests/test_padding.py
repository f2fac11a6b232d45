"""Values past a sequence's length reach nothing: NaN/inf padding gives bitwise the result of zero
padding, in every mode, at every depth, forward and backward; class ids are range-checked where a
term counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_bptt as jb

T, B, D, H, OUT = 6, 3, 3, 4, 2
LENGTHS = jnp.array([6, 2, 0])
PAD = np.arange(T)[:, None] >= np.asarray(LENGTHS)[None, :]  # (T, B) True past each length

# (cell, num_layers, bidirectional, residual, loss kind): every cell, both losses, both depths
MODELS = [
    ("elman_tanh", 1, False, False, "mse"),
    ("lstm", 2, True, "except_first", "cross_entropy"),
    ("gru", 2, False, False, "mse"),
    ("elman_relu", 1, False, False, "cross_entropy"),
]


def _problem(cell, num_layers, bidirectional, kind, placement):
    keys = jax.random.split(jax.random.key(3), 4)
    params = jb.init_model(
        keys[0], cell, D, H, OUT, num_layers=num_layers, bidirectional=bidirectional,
        dtype=jnp.float64,
    )  # fmt: skip
    xs = jax.random.normal(keys[1], (T, B, D), jnp.float64)
    garbage_xs = jnp.where(PAD[..., None], jnp.nan, xs).at[T - 1, 1, 0].set(jnp.inf)
    zero_xs = jnp.where(PAD[..., None], 0.0, xs)
    if kind == "mse":
        ys = jax.random.normal(keys[2], (T, B, OUT), jnp.float64)
        garbage_ys, zero_ys = (
            jnp.where(PAD[..., None], jnp.nan, ys),
            jnp.where(PAD[..., None], 0, ys),
        )
    else:
        ys = jax.random.randint(keys[2], (T, B), 0, OUT)
        garbage_ys, zero_ys = jnp.where(PAD, -1, ys), jnp.where(PAD, 0, ys)  # -1: a padding id
    if placement == "last_step":
        garbage_ys = zero_ys = ys[0]
    return params, (garbage_xs, garbage_ys), (zero_xs, zero_ys)


def _bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert bool(jnp.all(jnp.isfinite(x))), "a value past a length leaked into the result"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# every mode at one layer and at two, every cell and both losses somewhere (compile time bounds
# the grid); the per-step/last-step placement alternates with the mode below
ELMAN_TANH, LSTM_BI, GRU_2, ELMAN_RELU = MODELS
CASES = [
    ("auto", ELMAN_TANH), ("auto", LSTM_BI),
    ("manual", ELMAN_RELU), ("manual", GRU_2),
    ("fast", ELMAN_RELU), ("fast", LSTM_BI),
    ("checkpointed", ELMAN_TANH), ("checkpointed", GRU_2),
]  # fmt: skip


@pytest.mark.parametrize(
    "mode, model", CASES, ids=[f"{m}-{c[0]}-L{c[1]}{'-bi' if c[2] else ''}" for m, c in CASES]
)
def test_garbage_padding_changes_nothing(mode, model):
    cell, num_layers, bidirectional, residual, kind = model
    placement = "per_step" if mode in ("auto", "fast") else "last_step"
    params, garbage, zeros = _problem(cell, num_layers, bidirectional, kind, placement)
    kw = dict(
        cell=cell, mode=mode, loss=jb.Loss(kind, placement), lengths=LENGTHS, residual=residual,
        dropout=0.3 if num_layers > 1 else 0.0, key=jax.random.key(1),
    )  # fmt: skip
    _bitwise_equal(jb.bptt(params, *garbage, **kw), jb.bptt(params, *zeros, **kw))


def test_garbage_padding_in_unroll_and_its_fast_gradient():
    params, (garbage_xs, _), (zero_xs, _) = _problem("gru", 2, True, "mse", "per_step")

    def loss(params, xs, mode):
        outputs, finals = jb.unroll(params, xs, cell="gru", lengths=LENGTHS, mode=mode)
        return jnp.sum(outputs**2) + sum(jnp.sum(f["fwd"] ** 2) for f in finals)

    for mode in ("auto", "fast", "checkpointed"):
        _bitwise_equal(
            jax.value_and_grad(loss, argnums=(0, 1))(params, garbage_xs, mode),
            jax.value_and_grad(loss, argnums=(0, 1))(params, zero_xs, mode),
        )


@settings(max_examples=25, deadline=None)
@given(
    bad=st.one_of(st.integers(-50, -1), st.integers(OUT, OUT + 50)),
    step=st.integers(0, T - 1),
    row=st.integers(0, B - 1),
    with_lengths=st.booleans(),
)
def test_class_ids_out_of_range_are_refused_where_they_count(bad, step, row, with_lengths):
    params = jb.init_model(jax.random.key(0), "gru", D, H, OUT)
    xs = jnp.ones((T, B, D), jnp.float32)
    lengths = LENGTHS if with_lengths else None
    ids = np.zeros((T, B), np.int32)
    ids[step, row] = bad
    counts = not with_lengths or step < int(LENGTHS[row])
    if counts:
        with pytest.raises(ValueError, match=r"targets must be class ids in \[0, 2\)"):
            jb.bptt_manual(params, xs, ids, cell="gru", loss="cross_entropy", lengths=lengths)
    else:  # padding may hold any id: it is never read
        jb.bptt_manual(params, xs, ids, cell="gru", loss="cross_entropy", lengths=lengths)


@pytest.mark.parametrize("bad", [-1, OUT, 10**6])
def test_last_step_class_ids_are_range_checked(bad):
    params = jb.init_model(jax.random.key(0), "lstm", D, H, OUT)
    ids = jnp.array([0, bad, 1])
    with pytest.raises(ValueError, match="targets must be class ids"):
        jb.model_loss(
            params,
            jnp.ones((T, B, D), jnp.float32),
            ids,
            cell="lstm",
            loss=jb.Loss("cross_entropy", "last_step"),
        )
