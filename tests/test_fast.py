"""The fast path (custom_vjp + hand-written backward) and the checkpointed mode, in float64,
against ``jax.grad`` through the plain scan (``bptt_auto`` / ``unroll``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt import bptt, bptt_auto, compare_gradients, get_cell, init_model
from jax_bptt.bptt import backward_deltas
from jax_bptt.check import relative_error
from jax_bptt.fast import (
    BACKENDS,
    XLA_DEFAULT_UNROLL,
    bptt_checkpointed,
    bptt_fast,
    compiled_temp_bytes,
    default_chunk_length,
    default_segment_length,
    register_backend,
    resolve_unroll,
    unroll_checkpointed,
    unroll_fast,
)
from jax_bptt.modes import BPTT_MODES
from jax_bptt.unroll import scan_states, unroll

# T = 7 is not a multiple of the default segment length ceil(sqrt(7)) = 3: padding is exercised.
T, B, D, H, OUT = 7, 3, 2, 4, 2
LENGTHS = np.array([7, 4, 0])  # full, partial and empty sequences
TOL = 1e-10


def random_problem(cell, steps=T, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = init_model(keys[0], cell, D, H, OUT, dtype=jnp.float64)
    xs = jax.random.normal(keys[1], (steps, B, D), jnp.float64)
    ys = jax.random.normal(keys[2], (steps, B, OUT), jnp.float64)
    zero = get_cell(cell).zero_state((B,), H, jnp.float64)
    leaf_keys = jax.random.split(keys[3], len(jax.tree_util.tree_leaves(zero)))
    h0 = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(zero),
        [jax.random.normal(k, (B, H), jnp.float64) for k in leaf_keys],
    )
    return params, xs, ys, h0


def assert_close(candidate, reference):
    flat_c, tree_c = jax.tree_util.tree_flatten(candidate)
    flat_r, tree_r = jax.tree_util.tree_flatten(reference)
    assert tree_c == tree_r
    for a, b in zip(flat_c, flat_r, strict=True):
        assert relative_error(a, b)[1] <= TOL


# Every cell with and without lengths; the last-step loss with the "sum" reduction once more (and
# in test_single_step).
CASES = [  # (cell, lengths, placement, reduction)
    *[(cell, None, "per_step", "mean") for cell in ("elman_tanh", "elman_relu", "lstm", "gru")],
    *[(cell, LENGTHS, "per_step", "mean") for cell in ("elman_tanh", "elman_relu", "lstm", "gru")],
    ("gru", LENGTHS, "last_step", "sum"),
]


@pytest.mark.parametrize(
    "cell, lengths, placement, reduction",
    CASES,
    ids=[f"{c[0]}-{'lengths' if c[1] is not None else 'full'}-{c[2]}-{c[3]}" for c in CASES],
)
def test_fast_and_checkpointed_equal_auto(cell, lengths, placement, reduction):
    params, xs, ys, h0 = random_problem(cell)
    targets = ys if placement == "per_step" else ys[-1]
    kw = dict(cell=cell, placement=placement, reduction=reduction, lengths=lengths, h0=h0)
    reference = bptt_auto(params, xs, targets, **kw)
    for name, fn in (("fast", bptt_fast), ("checkpointed", bptt_checkpointed)):
        report = compare_gradients(fn(params, xs, targets, **kw), reference, names=(name, "auto"))
        assert report.ok, report.table()
    assert all(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree_util.tree_leaves(reference))


def test_checkpointed_cross_entropy_with_padded_integer_targets():
    params, xs, _, h0 = random_problem("gru")
    targets = jax.random.randint(jax.random.key(5), (T, B), 0, OUT)
    kw = dict(cell="gru", loss="cross_entropy", h0=h0)
    report = compare_gradients(
        bptt_checkpointed(params, xs, targets, segment_length=2, **kw),
        bptt_auto(params, xs, targets, **kw),
    )
    assert report.ok, report.table()


def user_loss(unroll_fn, params, xs, h0, lengths):
    """A loss of the user's own: nonlinear in every output and in the final state."""
    hs, final = unroll_fn(params, xs, h0, lengths)
    weights = jnp.arange(1, hs.shape[0] + 1, dtype=hs.dtype)[:, None, None]
    final_terms = sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree_util.tree_leaves(final))
    return jnp.sum(weights * jnp.sin(hs)) + 2.0 * final_terms


@pytest.mark.parametrize("cell, reverse", [("lstm", True), ("gru", False)])
def test_jax_grad_of_user_loss(cell, reverse):
    """params, xs and h0 gradients of a loss on every output and on the final state."""
    params, xs, _, h0 = random_problem(cell, seed=1)

    def value_and_grads(unroll_like, **kw):
        fn = functools.partial(unroll_like, cell, reverse=reverse, **kw)
        loss = jax.value_and_grad(functools.partial(user_loss, fn), argnums=(0, 1, 2))
        return jax.jit(loss)(params["cell"], xs, h0, LENGTHS)

    reference = value_and_grads(unroll)
    assert_close(value_and_grads(unroll_fast), reference)
    assert_close(value_and_grads(unroll_checkpointed, segment_length=2), reference)


@functools.lru_cache
def _user_loss_reference(cell, reverse):
    params, xs, _, h0 = random_problem(cell, seed=1)
    fn = functools.partial(unroll, cell, reverse=reverse)
    loss = jax.value_and_grad(functools.partial(user_loss, fn), argnums=(0, 1, 2))
    return loss(params["cell"], xs, h0, LENGTHS)


@pytest.mark.parametrize("cell", ["elman_tanh", "lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk_length", [1, 2, 3])  # T = 7: 2 and 3 leave a shorter last chunk
def test_backward_in_chunks_equals_auto(cell, reverse, chunk_length):
    """The chunked backward (carried d state, summed weight gradients, the rest chunk first or
    last by direction) gives jax.grad's gradients for params, xs, h0 and the final state."""
    params, xs, _, h0 = random_problem(cell, seed=1)
    fn = functools.partial(unroll_fast, cell, reverse=reverse, chunk_length=chunk_length)
    loss = jax.value_and_grad(functools.partial(user_loss, fn), argnums=(0, 1, 2))
    assert_close(
        jax.jit(loss)(params["cell"], xs, h0, LENGTHS), _user_loss_reference(cell, reverse)
    )


def test_bptt_fast_in_chunks_equals_auto():
    params, xs, ys, h0 = random_problem("gru")
    kw = dict(cell="gru", lengths=LENGTHS, h0=h0)
    report = compare_gradients(
        bptt_fast(params, xs, ys, chunk_length=3, **kw), bptt_auto(params, xs, ys, **kw)
    )
    assert report.ok, report.table()


def test_default_chunk_length():
    """2 MiB of ``d xp`` per chunk on CPU, rounded down to a power of two; one chunk elsewhere."""
    assert default_chunk_length(256, 64, 512, 4, platform="cpu") == 16  # 128 KiB per step
    assert default_chunk_length(16384, 4, 96, 4, platform="cpu") == 1024
    assert default_chunk_length(128, 16, 256, 4, platform="cpu") == 128  # fits: one chunk
    assert default_chunk_length(10, 4096, 4096, 8, platform="cpu") == 1
    assert default_chunk_length(256, 64, 512, 4, platform="gpu") == 256
    assert default_chunk_length(0, 64, 512, 4, platform="cpu") == 1


@pytest.mark.parametrize("chunk_length", [0, 2.5, True, "4"])
def test_bad_chunk_length_raises_before_work(chunk_length):
    params, xs, ys, _ = random_problem("elman_tanh", steps=2)
    with pytest.raises(ValueError, match="chunk_length"):
        bptt_fast(params, xs, ys, cell="elman_tanh", chunk_length=chunk_length)
    with pytest.raises(ValueError, match="chunk_length"):
        unroll_fast("elman_tanh", params["cell"], xs, chunk_length=chunk_length)


def test_unrolled_fast_path():
    params, xs, ys, h0 = random_problem("lstm")
    kw = dict(cell="lstm", lengths=LENGTHS, h0=h0)
    report = compare_gradients(
        bptt_fast(params, xs, ys, unroll=3, **kw), bptt_auto(params, xs, ys, **kw)
    )  # the reference is cached from test_fast_and_checkpointed_equal_auto
    assert report.ok, report.table()


@pytest.fixture(scope="module")
def elman_problem():
    params, xs, _, h0 = random_problem("elman_tanh", seed=2)
    args = (params["cell"], xs, h0, LENGTHS)
    loss = functools.partial(user_loss, functools.partial(unroll, "elman_tanh"))
    return args, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)


@pytest.mark.parametrize("segment_length, scan_unroll", [(1, 1), (5, 2), (50, 1)])
def test_checkpointed_segment_lengths(elman_problem, segment_length, scan_unroll):
    """One step per segment, T = 7 not divisible by 5, and a segment longer than T are exact,
    also with an unrolled inner scan."""
    args, reference = elman_problem
    fn = functools.partial(
        unroll_checkpointed, "elman_tanh", segment_length=segment_length, unroll=scan_unroll
    )
    loss = jax.value_and_grad(functools.partial(user_loss, fn), argnums=(0, 1, 2))
    assert_close(jax.jit(loss)(*args), reference)


def test_single_step():
    params, xs, ys, h0 = random_problem("lstm", steps=1)
    kw = dict(cell="lstm", lengths=np.array([1, 0, 1]), h0=h0, placement="last_step")
    reference = bptt_auto(params, xs, ys[0], **kw)
    for fn in (bptt_fast, bptt_checkpointed):
        report = compare_gradients(fn(params, xs, ys[0], **kw), reference)
        assert report.ok, report.table()


def test_checkpointed_temp_memory_is_a_fraction_of_auto():
    steps = 1024
    params = init_model(jax.random.key(0), "elman_tanh", D, 16, OUT, dtype=jnp.float64)
    xs, ys = jnp.ones((steps, 2, D)), jnp.ones((steps, 2, OUT))
    auto = compiled_temp_bytes(functools.partial(bptt_auto, cell="elman_tanh"), params, xs, ys)
    ckpt = compiled_temp_bytes(
        functools.partial(bptt_checkpointed, cell="elman_tanh"), params, xs, ys
    )
    if auto is None or ckpt is None:
        pytest.skip("this backend reports no memory analysis")
    # auto keeps O(T) buffers, checkpointed O(sqrt T): states at 32 boundaries plus one segment.
    assert ckpt <= auto / 8, (ckpt, auto)


def test_under_jit_and_vmap():
    params, xs, ys, h0 = random_problem("gru", seed=3)

    @jax.jit
    def traced(params, xs, ys, lengths):  # lengths is a tracer here: no value checks possible
        return bptt_fast(params, xs, ys, cell="gru", lengths=lengths, h0=h0)

    report = compare_gradients(
        traced(params, xs, ys, LENGTHS),
        bptt_auto(params, xs, ys, cell="gru", lengths=LENGTHS, h0=h0),
    )
    assert report.ok, report.table()

    # vmap over unbatched sequences (T, D) with scalar lengths, against the batched unroll.
    per_sequence = jnp.swapaxes(xs, 0, 1)  # (B, T, D)

    def loss_of(unroll_like, p, x, n):
        hs, final = unroll_like("gru", p, x, lengths=n)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(final**2)

    grads = jax.vmap(jax.grad(functools.partial(loss_of, unroll_fast)), in_axes=(None, 0, 0))
    per_example = jax.jit(grads)(params["cell"], per_sequence, LENGTHS)
    batched = jax.jit(jax.grad(functools.partial(loss_of, unroll)))(params["cell"], xs, LENGTHS)
    assert_close(jax.tree_util.tree_map(lambda a: a.sum(0), per_example), batched)


def test_swappable_backend_is_used():
    calls = {"forward": 0, "backward": 0}

    def counting_scan_states(*args, **kwargs):
        calls["forward"] += 1
        return scan_states(*args, **kwargs)

    def counting_backward_deltas(*args, **kwargs):
        calls["backward"] += 1
        return backward_deltas(*args, **kwargs)

    register_backend("counting", counting_scan_states, counting_backward_deltas, {"cpu": 2})
    try:
        params, xs, ys, h0 = random_problem("elman_relu", seed=4)
        kw = dict(cell="elman_relu", h0=h0, lengths=LENGTHS)
        got = bptt_fast(params, xs, ys, backend="counting", **kw)
        assert calls == {"forward": 1, "backward": 1}
        assert compare_gradients(got, bptt_auto(params, xs, ys, **kw)).ok
        assert resolve_unroll(None, "counting", platform="cpu") == 2
        assert resolve_unroll(None, "counting", platform="gpu") == 1
    finally:
        del BACKENDS["counting"]


def test_defaults_and_registry():
    assert resolve_unroll(None, platform="cpu") == XLA_DEFAULT_UNROLL["cpu"]
    assert resolve_unroll(None, platform="gpu") == XLA_DEFAULT_UNROLL["gpu"]
    assert resolve_unroll(4) == 4
    assert default_segment_length(16384) == 128 and default_segment_length(7) == 3
    assert BPTT_MODES["fast"] is bptt_fast and BPTT_MODES["checkpointed"] is bptt_checkpointed
    params, xs, ys, h0 = random_problem("elman_tanh")  # the shapes of a case above: no compile
    got = bptt(params, xs, ys, mode="checkpointed", cell="elman_tanh", h0=h0)
    assert compare_gradients(got, bptt_auto(params, xs, ys, cell="elman_tanh", h0=h0)).ok


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(unroll=0), "unroll"),
        (dict(unroll=2.5), "unroll"),
        (dict(backend="cuda"), "backend"),
        (dict(segment_length=0), "segment_length"),
    ],
)
def test_bad_arguments_raise_before_work(kwargs, message):
    params, xs, ys, _ = random_problem("elman_tanh", steps=2)
    with pytest.raises(ValueError, match=message):
        bptt_checkpointed(params, xs, ys, cell="elman_tanh", **kwargs)
    with pytest.raises(ValueError, match=message):
        unroll_checkpointed("elman_tanh", params["cell"], xs, **kwargs)
    with pytest.raises(ValueError, match="feature size"):
        unroll_fast("elman_tanh", params["cell"], xs[..., :1])
