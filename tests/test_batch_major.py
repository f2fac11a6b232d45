"""Batch-major layout (``time_major=False``): ``(B, T, D)`` in, ``(B, T, ...)`` out, exactly the
time-major results transposed, everywhere the model takes a sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bptt as jb

T, B, D, H, O = 6, 3, 3, 4, 2  # noqa: E741
LENGTHS = jnp.array([6, 2, 0])


def _problem(kind="mse"):
    params = jb.init_model(
        jax.random.key(0), "lstm", D, H, O, num_layers=2, bidirectional=True, dtype=jnp.float64
    )
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    if kind == "mse":
        ys = jax.random.normal(jax.random.key(2), (T, B, O), jnp.float64)
    else:
        ys = jax.random.randint(jax.random.key(2), (T, B), 0, O)
    return params, xs, ys


def _equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("mode", jb.BPTT_MODES)
def test_bptt_batch_major_is_time_major_transposed(mode):
    params, xs, ys = _problem("cross_entropy" if mode in ("manual", "fast") else "mse")
    kind = "mse" if ys.ndim == 3 else "cross_entropy"
    kw = dict(
        cell="lstm", mode=mode, loss=kind, lengths=LENGTHS, dropout=0.3, key=jax.random.key(3)
    )
    time_major = jb.bptt(params, xs, ys, **kw)
    batch_major = jb.bptt(params, xs.swapaxes(0, 1), ys.swapaxes(0, 1), time_major=False, **kw)
    _equal(batch_major._replace(xs=batch_major.xs.swapaxes(0, 1)), time_major)


def test_unroll_predict_and_loss_batch_major():
    params, xs, ys = _problem()
    outputs, finals = jb.unroll(params, xs, cell="lstm", lengths=LENGTHS)
    outputs_b, finals_b = jb.unroll(
        params, xs.swapaxes(0, 1), cell="lstm", lengths=LENGTHS, time_major=False
    )
    assert outputs_b.shape == (B, T, 2 * H)
    _equal((outputs_b.swapaxes(0, 1), finals_b), (outputs, finals))
    preds = jb.predict(params, xs.swapaxes(0, 1), cell="lstm", time_major=False)
    _equal(preds.swapaxes(0, 1), jb.predict(params, xs, cell="lstm"))
    loss = jb.model_loss(params, xs, ys, cell="lstm", lengths=LENGTHS)
    loss_b = jb.model_loss(
        params, xs.swapaxes(0, 1), ys.swapaxes(0, 1), cell="lstm", lengths=LENGTHS,
        time_major=False,
    )  # fmt: skip
    _equal(loss_b, loss)
    last = jb.Loss("mse", "last_step")  # last-step targets (B, O) have no time axis to move
    _equal(
        jb.model_loss(params, xs.swapaxes(0, 1), ys[0], cell="lstm", loss=last, time_major=False),
        jb.model_loss(params, xs, ys[0], cell="lstm", loss=last),
    )


def test_truncated_and_train_step_batch_major():
    params = jb.init_model(jax.random.key(0), "gru", D, H, O, num_layers=2, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (12, B, D), jnp.float64)
    ys = jax.random.randint(jax.random.key(2), (12, B), 0, O)
    _equal(
        jb.truncated_bptt(
            params, xs.swapaxes(0, 1), ys.T, cell="gru", k1=4, k2=6, time_major=False
        ),
        jb.truncated_bptt(params, xs, ys, cell="gru", k1=4, k2=6),
    )
    opt = jb.make_optimizer("adam", 1e-2)
    for truncation in (None, (4, 6)):
        steps = [
            jb.make_train_step(
                opt, cell="gru", loss="cross_entropy", truncation=truncation, time_major=major
            )
            for major in (True, False)
        ]
        window = xs[:6] if truncation else xs
        targets = ys[:6] if truncation else ys
        _equal(
            steps[1](params, opt.init(params), window.swapaxes(0, 1), targets.T)[:2],
            steps[0](params, opt.init(params), window, targets)[:2],
        )


def test_time_major_must_be_a_bool():
    params, xs, _ = _problem()
    with pytest.raises(TypeError, match="time_major must be a bool"):
        jb.unroll(params, xs, cell="lstm", time_major="no")
