"""A cell from its forward alone: ``make_cell`` derives the backward by ``jax.vjp``, and every mode
runs it. LSTM and GRU rebuilt that way give the hand-written cells' gradients; a cell the library
does not ship (a minimal gated unit) trains."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jax_bptt as jb
from jax_bptt import cells
from jax_bptt.check import relative_error

TOL = 1e-12  # float64: derived and hand-written backward are the same sums


def _forward_only(cell):
    return lambda params, xp, hp, state: cell.forward(params, xp, hp, state)[0]


DERIVED = {
    "lstm": cells.make_cell(
        "lstm_derived", num_gates=4, forward=_forward_only(cells.LSTM), init=cells.LSTM.init,
        zero_state=cells.LSTM.zero_state, hidden=cells.LSTM.hidden,
        with_hidden=cells.LSTM.with_hidden,
    ),
    "gru": cells.make_cell(
        "gru_derived", num_gates=3, forward=_forward_only(cells.GRU), init=cells.GRU.init,
        pointwise_params=("b_hn",),  # read inside the reset gate, not through hp
    ),
    "elman_tanh": cells.make_cell(
        "tanh_derived", num_gates=1, forward=lambda p, xp, hp, h: jnp.tanh(xp + hp)
    ),
}  # fmt: skip


def _assert_close(candidate, reference, tol=TOL):
    leaves_c, leaves_r = jax.tree.leaves(candidate), jax.tree.leaves(reference)
    assert len(leaves_c) == len(leaves_r)
    for a, b in zip(leaves_c, leaves_r, strict=True):
        assert relative_error(a, b)[1] <= tol


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_backward_step_equals_the_hand_written_one(name):
    hand, derived = cells.get_cell(name), DERIVED[name]
    keys = jax.random.split(jax.random.key(0), 5)
    params = hand.init(keys[0], 3, 5, jnp.float64)
    gh = hand.num_gates * 5
    xp, hp = (jax.random.normal(k, (4, gh), jnp.float64) for k in keys[1:3])
    state = jax.tree.map(
        lambda z: jax.random.normal(keys[3], z.shape, jnp.float64),
        hand.zero_state((4,), 5, jnp.float64),
    )
    d_state = jax.tree.map(lambda z: jax.random.normal(keys[4], z.shape, jnp.float64), state)
    new_h, saved_h = hand.forward(params, xp, hp, state)
    new_d, saved_d = derived.forward(params, xp, hp, state)
    _assert_close(new_d, new_h)
    d_prev_h, d_xp_h, d_hp_h = hand.backward(params, saved_h, state, d_state)
    d_prev_d, d_xp_d, d_hp_d, *pointwise = derived.backward(params, saved_d, state, d_state)
    _assert_close((d_prev_d, d_xp_d, d_hp_d), (d_prev_h, d_xp_h, d_hp_h))
    if name == "gru":  # b_hn's gradient: the n-part of d hp, summed over the batch
        _assert_close(pointwise[0]["b_hn"], d_hp_h[:, 10:].sum(0))


@pytest.mark.parametrize("mode", jb.BPTT_MODES)
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_rebuilt_cells_give_the_hand_written_gradients_in_every_mode(name, mode):
    hand, derived = cells.get_cell(name), DERIVED[name]
    params = jb.init_model(
        jax.random.key(1), hand, 3, 5, 2, num_layers=2, bidirectional=True, dtype=jnp.float64
    )
    xs = jax.random.normal(jax.random.key(2), (7, 3, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(3), (7, 3, 2), jnp.float64)
    kw = dict(lengths=jnp.array([7, 3, 0]), dropout=0.2, key=jax.random.key(4))
    options = jb.ScanOptions(chunk_length=2, segment_length=3)
    reference = jb.bptt_manual(params, xs, ys, cell=hand, **kw)
    _assert_close(
        jb.bptt(params, xs, ys, cell=derived, mode=mode, options=options, **kw), reference
    )


def test_derived_cell_with_lengths_gives_no_pointwise_gradient_past_them():
    """A frozen step's params gradient is zero: lengths 0 give the same b_hn gradient as a batch
    without those rows."""
    cell = DERIVED["gru"]
    params = jb.init_model(jax.random.key(5), cell, 2, 3, 1, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(6), (5, 2, 2), jnp.float64)
    ys = jax.random.normal(jax.random.key(7), (5, 2, 1), jnp.float64)
    both = jb.bptt_manual(
        params, xs, ys, cell=cell, lengths=jnp.array([5, 0]), loss=jb.Loss(reduction="sum")
    )
    first = jb.bptt_manual(params, xs[:, :1], ys[:, :1], cell=cell, loss=jb.Loss(reduction="sum"))
    _assert_close(both.params, first.params)


def _mgu(params, xp, hp, h_prev):
    """Minimal gated unit (Zhou et al. 2016): one forget gate, applied inside the candidate too."""
    x_f, x_n = jnp.split(xp, 2, axis=-1)
    h_f, h_n = jnp.split(hp, 2, axis=-1)
    f = jax.nn.sigmoid(x_f + h_f)
    return (1 - f) * h_prev + f * jnp.tanh(x_n + f * h_n)


MGU = cells.make_cell("mgu", num_gates=2, forward=_mgu)


def test_a_cell_the_library_does_not_ship_matches_a_python_loop_and_trains():
    params = jb.init_model(jax.random.key(8), MGU, 2, 16, 1, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(9), (12, 8, 2), jnp.float64)
    ys = jnp.cumsum(xs[..., :1], 0) / 4  # a running sum: needs memory

    def loop_loss(params):  # independent: Python loop over full steps, plain MSE
        p, ro, h, total = params["layers"][0]["fwd"], params["readout"], jnp.zeros((8, 16)), 0.0
        for t in range(12):
            h = _mgu(p, xs[t] @ p["W_xh"] + p["b_h"], h @ p["W_hh"], h)
            total = total + jnp.mean((h @ ro["W_hy"] + ro["b_y"] - ys[t]) ** 2)
        return total / 12

    manual = jb.bptt_manual(params, xs, ys, cell=MGU)
    assert relative_error(manual.loss, loop_loss(params))[1] <= TOL
    _assert_close(manual.params, jax.grad(loop_loss)(params), 1e-10)

    opt = optax.adam(1e-2)
    step = jb.make_train_step(opt, cell=MGU, mode="fast")
    opt_state, losses = opt.init(params), []
    for _ in range(60):
        params, opt_state, info = step(params, opt_state, xs, ys)
        losses.append(float(info.loss))
    assert losses[-1] < 0.2 * losses[0]


def test_make_cell_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_gates"):
        cells.make_cell("x", num_gates=0, forward=_mgu)
    with pytest.raises(TypeError, match="forward"):
        cells.make_cell("x", num_gates=1, forward=None)
    with pytest.raises(ValueError, match="name"):
        cells.make_cell("", num_gates=1, forward=_mgu)
    params = jb.init_model(jax.random.key(0), DERIVED["gru"], 2, 16, 1, dtype=jnp.float32)
    with pytest.raises(ValueError, match="pallas"):
        jb.bptt_fast(
            params, jnp.ones((3, 2, 2), jnp.float32), jnp.ones((3, 2, 1), jnp.float32),
            cell=DERIVED["gru"], options=jb.ScanOptions(backend="pallas"),
        )  # fmt: skip
