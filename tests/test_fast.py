"""The fast path (``fast_scan``: custom_vjp + hand-written backward) and the checkpointed mode
(``checkpointed_scan`` / segmented loss), in float64, against ``jax.grad`` through the plain scan
(``bptt_auto`` / ``unroll(mode="auto")``). Everything goes through the model-level API:
``unroll(..., mode="fast"|"checkpointed", options=ScanOptions(...))`` and
``bptt_fast``/``bptt_checkpointed``; a bidirectional model runs the reverse recurrence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bptt.backends import (
    PLATFORM_DEFAULTS,
    Backend,
    ScanOptions,
    backend_names,
    default_chunk_length,
    default_segment_length,
    get_backend,
    register_backend,
    resolve_options,
)
from jax_bptt.cells import ELMAN_TANH, GRU, LSTM, get_cell
from jax_bptt.check import compare_gradients, relative_error
from jax_bptt.losses import Loss
from jax_bptt.model import init_model, unroll
from jax_bptt.modes import (
    BPTT_MODES,
    bptt,
    bptt_auto,
    bptt_checkpointed,
    bptt_fast,
)
from jax_bptt.scan import backward_deltas, scan_states

# T = 7 is not a multiple of the default segment length ceil(sqrt(7)) = 3: padding is exercised.
T, B, D, H, OUT = 7, 3, 2, 4, 2
LENGTHS = np.array([7, 4, 0])  # full, partial and empty sequences
TOL = 1e-10


def random_problem(cell, steps=T, seed=0, bidirectional=False):
    """``(params, xs, ys, h0)``: a one-layer model and a random initial state per direction."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = init_model(keys[0], cell, D, H, OUT, bidirectional=bidirectional, dtype=jnp.float64)
    xs = jax.random.normal(keys[1], (steps, B, D), jnp.float64)
    ys = jax.random.normal(keys[2], (steps, B, OUT), jnp.float64)
    zero = get_cell(cell).zero_state((B,), H, jnp.float64)

    def state(key):
        leaf_keys = jax.random.split(key, len(jax.tree_util.tree_leaves(zero)))
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(zero),
            [jax.random.normal(k, (B, H), jnp.float64) for k in leaf_keys],
        )

    h0 = [{"fwd": state(keys[3])}]
    if bidirectional:
        h0[0]["bwd"] = state(jax.random.fold_in(keys[3], 1))
    return params, xs, ys, h0


def assert_close(candidate, reference):
    flat_c, tree_c = jax.tree_util.tree_flatten(candidate)
    flat_r, tree_r = jax.tree_util.tree_flatten(reference)
    assert tree_c == tree_r
    for a, b in zip(flat_c, flat_r, strict=True):
        assert relative_error(a, b)[1] <= TOL


def compiled_temp_bytes(fn, *args) -> int | None:
    """Bytes of temporary buffers XLA allocates for ``jax.jit(fn)(*args)`` (not counting
    arguments and outputs), or None when the backend does not report a memory analysis."""
    try:
        analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    temp = getattr(analysis, "temp_size_in_bytes", None)
    return None if temp is None else int(temp)


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
    kw = dict(cell=cell, loss=Loss("mse", placement, reduction), lengths=lengths, h0=h0)
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
        bptt_checkpointed(params, xs, targets, options=ScanOptions(segment_length=2), **kw),
        bptt_auto(params, xs, targets, **kw),
    )
    assert report.ok, report.table()


def user_loss(run, params, xs, h0, lengths):
    """A loss of the user's own: nonlinear in every output and in every final state."""
    hs, finals = run(params, xs, h0=h0, lengths=lengths)
    weights = jnp.arange(1, hs.shape[0] + 1, dtype=hs.dtype)[:, None, None]
    final_terms = sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree_util.tree_leaves(finals))
    return jnp.sum(weights * jnp.sin(hs)) + 2.0 * final_terms


def user_value_and_grads(cell, mode, options=None):
    """``jax.value_and_grad`` (params, xs, h0) of ``user_loss`` through ``unroll(mode=...)``."""
    run = functools.partial(unroll, cell=cell, mode=mode, options=options)
    return jax.value_and_grad(functools.partial(user_loss, run), argnums=(0, 1, 2))


@functools.lru_cache
def _user_loss_reference(cell, reverse):
    """``(args, jax.grad through unroll(mode="auto"))`` of the user loss, once per process."""
    params, xs, _, h0 = random_problem(cell, seed=1, bidirectional=reverse)
    args = (params, xs, h0, LENGTHS)
    return args, jax.jit(user_value_and_grads(cell, "auto"))(*args)


@pytest.mark.parametrize("cell, reverse", [("lstm", True), ("gru", False)])
def test_jax_grad_of_user_loss(cell, reverse):
    """params, xs and h0 gradients of a loss on every output and on the final states; reverse:
    a bidirectional layer, whose backward direction is the reverse recurrence."""
    args, reference = _user_loss_reference(cell, reverse)
    assert_close(jax.jit(user_value_and_grads(cell, "fast"))(*args), reference)
    checkpointed = user_value_and_grads(cell, "checkpointed", ScanOptions(segment_length=2))
    assert_close(jax.jit(checkpointed)(*args), reference)


@pytest.mark.parametrize("chunk_length", [1, 2, 3])  # T = 7: 2 and 3 leave a shorter last chunk
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", ["elman_tanh", "lstm", "gru"])  # one reference after another
def test_backward_in_chunks_equals_auto(cell, reverse, chunk_length):
    """The chunked backward (carried d state, summed weight gradients, the rest chunk first or
    last by direction) gives jax.grad's gradients for params, xs, h0 and the final states;
    reverse: a bidirectional layer (both directions chunked)."""
    args, reference = _user_loss_reference(cell, reverse)
    loss = user_value_and_grads(cell, "fast", ScanOptions(chunk_length=chunk_length))
    assert_close(jax.jit(loss)(*args), reference)


@pytest.mark.parametrize(
    "cell, options", [("gru", ScanOptions(chunk_length=3)), ("lstm", ScanOptions(unroll=3))]
)
def test_bptt_fast_with_options_equals_auto(cell, options):
    """Chunked and unrolled fast paths give jax.grad's gradients (the references are cached from
    test_fast_and_checkpointed_equal_auto)."""
    params, xs, ys, h0 = random_problem(cell)
    kw = dict(cell=cell, lengths=LENGTHS, h0=h0)
    report = compare_gradients(
        bptt_fast(params, xs, ys, options=options, **kw), bptt_auto(params, xs, ys, **kw)
    )
    assert report.ok, report.table()


def test_default_chunk_length():
    """2 MiB of ``d xp`` per chunk on CPU, rounded down to a power of two; one chunk elsewhere."""
    cpu, gpu = PLATFORM_DEFAULTS["cpu"].chunk_bytes, PLATFORM_DEFAULTS["gpu"].chunk_bytes
    assert cpu == 2 * 2**20 and gpu is None
    assert default_chunk_length(256, 64, 512, 4, cpu) == 16  # 128 KiB per step
    assert default_chunk_length(16384, 4, 96, 4, cpu) == 1024
    assert default_chunk_length(128, 16, 256, 4, cpu) == 128  # fits: one chunk
    assert default_chunk_length(10, 4096, 4096, 8, cpu) == 1
    assert default_chunk_length(256, 64, 512, 4, gpu) == 256
    assert default_chunk_length(256, 64, 512, 4, 0) == 256  # chunk_bytes=0: one chunk
    assert default_chunk_length(0, 64, 512, 4, cpu) == 1


def test_resolve_options_defaults():
    """None means the platform's default; the chunk length follows chunk_bytes (G = gates * H),
    unroll, chunk and segment lengths are capped at T; the result is all ints (static)."""
    lstm = functools.partial(resolve_options, cell=LSTM, hidden_size=128, dtype=jnp.float32)
    shape = (256, 64, 3)  # LSTM H=128: G = 512, 128 KiB of float32 d xp per step
    cpu = lstm(ScanOptions(), xs_shape=shape, platform="cpu")
    assert cpu == ScanOptions(
        unroll=PLATFORM_DEFAULTS["cpu"].unroll,
        backend="xla",
        chunk_length=16,
        chunk_bytes=2 * 2**20,
        segment_length=16,
    )
    gpu = lstm(ScanOptions(), xs_shape=shape, platform="gpu")
    assert gpu == ScanOptions(8, "xla", 256, None, 16)
    assert lstm(ScanOptions(chunk_bytes=2**20), xs_shape=shape, platform="cpu").chunk_length == 8
    assert lstm(ScanOptions(chunk_bytes=0), xs_shape=shape, platform="cpu").chunk_length == 256
    assert lstm(ScanOptions(chunk_bytes=2**20), xs_shape=shape, platform="gpu").chunk_length == 8
    # float64 doubles the bytes per step: half the chunk
    f64 = resolve_options(ScanOptions(), LSTM, shape, 128, jnp.float64, platform="cpu")
    assert f64.chunk_length == 8
    # capped at T = 5 (a longer unroll or chunk only costs compile time and memory)
    short = (5, 64, 3)
    assert lstm(ScanOptions(), xs_shape=short, platform="gpu").unroll == 5
    capped = lstm(
        ScanOptions(unroll=16, chunk_length=9, segment_length=50), xs_shape=short, platform="cpu"
    )
    assert capped == ScanOptions(5, "xla", 5, 2 * 2**20, 5)
    assert lstm(ScanOptions(unroll=True), xs_shape=short, platform="cpu").unroll is True
    assert lstm(ScanOptions(unroll=4), xs_shape=short, platform="cpu").unroll == 4
    # a platform without defaults: unroll 1, one chunk
    assert lstm(ScanOptions(), xs_shape=shape, platform="metal") == ScanOptions(
        1, "xla", 256, None, 16
    )
    # T = 0 still resolves to ints >= 1
    assert lstm(ScanOptions(), xs_shape=(0, 64, 3), platform="cpu") == ScanOptions(
        1, "xla", 1, 2 * 2**20, 1
    )
    # the default platform is jax.default_backend()
    assert lstm(ScanOptions(), xs_shape=shape) == lstm(
        ScanOptions(), xs_shape=shape, platform=jax.default_backend()
    )


@pytest.mark.parametrize("chunk_length", [0, 2.5, True, "4"])
def test_bad_chunk_length_raises_before_work(chunk_length):
    params, xs, ys, _ = random_problem("elman_tanh", steps=2)
    options = ScanOptions(chunk_length=chunk_length)
    with pytest.raises(ValueError, match="chunk_length"):
        bptt_fast(params, xs, ys, cell="elman_tanh", options=options)
    with pytest.raises(ValueError, match="chunk_length"):
        unroll(params, xs, cell="elman_tanh", mode="fast", options=options)


@pytest.mark.parametrize("segment_length, scan_unroll", [(1, 1), (5, 2), (50, 1)])
def test_checkpointed_segment_lengths(segment_length, scan_unroll):
    """One step per segment, T = 7 not divisible by 5, and a segment longer than T are exact,
    also with an unrolled inner scan, forward and reverse (a bidirectional Elman layer)."""
    args, reference = _user_loss_reference("elman_tanh", True)
    options = ScanOptions(unroll=scan_unroll, segment_length=segment_length)
    loss = user_value_and_grads("elman_tanh", "checkpointed", options)
    assert_close(jax.jit(loss)(*args), reference)


def test_single_step():
    params, xs, ys, h0 = random_problem("lstm", steps=1)
    kw = dict(cell="lstm", lengths=np.array([1, 0, 1]), h0=h0, loss=Loss("mse", "last_step"))
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

    def loss_of(mode, p, x, n):
        hs, finals = unroll(p, x, cell="gru", lengths=n, mode=mode)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(finals[0]["fwd"] ** 2)

    grads = jax.vmap(jax.grad(functools.partial(loss_of, "fast")), in_axes=(None, 0, 0))
    per_example = jax.jit(grads)(params, per_sequence, LENGTHS)
    batched = jax.jit(jax.grad(functools.partial(loss_of, "auto")))(params, xs, LENGTHS)
    assert_close(jax.tree_util.tree_map(lambda a: a.sum(0), per_example), batched)


def test_swappable_backend_is_used():
    calls = {"forward": 0, "backward": 0}

    def counting_scan_states(*args, **kwargs):
        calls["forward"] += 1
        return scan_states(*args, **kwargs)

    def counting_backward_deltas(*args, **kwargs):
        calls["backward"] += 1
        return backward_deltas(*args, **kwargs)

    from jax_bptt import backends

    register_backend("counting", Backend(counting_scan_states, counting_backward_deltas))
    try:
        assert "counting" in backend_names()
        assert get_backend("counting").scan_states is counting_scan_states
        params, xs, ys, h0 = random_problem("elman_relu", seed=4)
        kw = dict(cell="elman_relu", h0=h0, lengths=LENGTHS)
        got = bptt_fast(params, xs, ys, options=ScanOptions(backend="counting"), **kw)
        assert calls == {"forward": 1, "backward": 1}
        assert compare_gradients(got, bptt_auto(params, xs, ys, **kw)).ok
        # a registered backend gets the platform's defaults like the built-in one
        options = ScanOptions(backend="counting")
        for platform in ("cpu", "gpu"):
            resolved = resolve_options(options, ELMAN_TANH, (T, B, D), H, jnp.float64, platform)
            assert resolved.backend == "counting"
            assert resolved.unroll == min(PLATFORM_DEFAULTS[platform].unroll, T)
    finally:
        backends._REGISTERED.pop("counting", None)
    assert "counting" not in backend_names()


@pytest.mark.parametrize("name", ["", "xla", "pallas", "auto", 3])
def test_register_backend_rejects_taken_names(name):
    with pytest.raises(ValueError, match="backend name must be a new non-empty str"):
        register_backend(name, Backend(scan_states, backward_deltas))
    with pytest.raises(TypeError, match="backend must be a Backend"):
        register_backend("mine", (scan_states, backward_deltas))


def test_defaults_and_registry():
    cpu = resolve_options(ScanOptions(), GRU, (T, B, D), H, jnp.float64, platform="cpu")
    assert cpu.unroll == PLATFORM_DEFAULTS["cpu"].unroll
    gpu = resolve_options(ScanOptions(), GRU, (64, B, D), H, jnp.float64, platform="gpu")
    assert gpu.unroll == PLATFORM_DEFAULTS["gpu"].unroll
    assert resolve_options(ScanOptions(unroll=4), GRU, (T, B, D), H, jnp.float64).unroll == 4
    assert default_segment_length(16384) == 128 and default_segment_length(7) == 3
    assert BPTT_MODES == ("auto", "manual", "fast", "checkpointed")
    assert {"xla", "pallas"} <= set(backend_names())
    params, xs, ys, h0 = random_problem("elman_tanh")  # the shapes of a case above: no compile
    got = bptt(params, xs, ys, mode="checkpointed", cell="elman_tanh", h0=h0)
    assert compare_gradients(got, bptt_auto(params, xs, ys, cell="elman_tanh", h0=h0)).ok


@pytest.mark.parametrize(
    "options, message",
    [
        (ScanOptions(unroll=0), "unroll"),
        (ScanOptions(unroll=2.5), "unroll"),
        (ScanOptions(backend="cuda"), "backend"),
        (ScanOptions(segment_length=0), "segment_length"),
    ],
)
def test_bad_arguments_raise_before_work(options, message):
    params, xs, ys, _ = random_problem("elman_tanh", steps=2)
    with pytest.raises(ValueError, match=message):
        bptt_checkpointed(params, xs, ys, cell="elman_tanh", options=options)
    with pytest.raises(ValueError, match=message):
        unroll(params, xs, cell="elman_tanh", mode="checkpointed", options=options)
    with pytest.raises(ValueError, match="feature size"):
        unroll(params, xs[..., :1], cell="elman_tanh", mode="fast")
