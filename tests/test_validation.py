"""Bad input: a clear error naming the argument (or the params leaf), raised before any compiled
core runs (also under jit).

Every test here runs with the compiled cores (``modes.CORES``, ``modes._loss_core``,
``model._unroll_core``) replaced by a function that raises ``ReachedCore``: an error raised by
validation is raised before anything is compiled for the call.
"""

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_bptt as jb
from jax_bptt import backends, model, modes
from jax_bptt.backends import ScanOptions
from jax_bptt.losses import Loss

F64 = jnp.float64
T, B, D, H, OUT = 5, 3, 4, 6, 2


class ReachedCore(Exception):  # noqa: N818 -- a sentinel, not an error
    """Validation passed: the call got as far as a compiled core."""


def _reached(*args, **kwargs):
    raise ReachedCore


ORIGINAL_CORES = dict(modes.CORES)


@contextlib.contextmanager
def _cores_replaced():
    with (
        mock.patch.dict(modes.CORES, dict.fromkeys(modes.CORES, _reached)),
        mock.patch.object(modes, "_loss_core", _reached),
        mock.patch.object(model, "_unroll_core", _reached),
    ):
        yield


@pytest.fixture(scope="module", autouse=True)
def no_compile():
    with _cores_replaced():
        yield


def _random_problem(seed, cell, *, num_layers=1, bidirectional=False, input_size=D):
    """``(params, xs, targets, kwargs)`` in float64: numpy leaves, so editing them is free."""
    shapes = jax.eval_shape(  # init_model's layout, traced but not compiled
        lambda key: jb.init_model(
            key, cell, input_size, H, OUT, num_layers=num_layers, bidirectional=bidirectional,
            dtype=F64,
        ),
        jax.random.key(seed),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: 0.3 * rng.normal(size=s.shape), shapes)
    xs = rng.normal(size=(T, B, input_size))
    targets = rng.normal(size=(T, B, OUT))
    return params, xs, targets, dict(cell=cell, loss=Loss("mse"), lengths=None, h0=None)


@pytest.fixture(scope="module")
def problem():
    return _random_problem(0, "lstm")


def _call(problem, fn=None, **changes):
    params, xs, targets, kw = problem
    kw = {**kw, **changes}
    xs = kw.pop("xs", xs)
    targets = kw.pop("targets", targets)
    params = kw.pop("params", params)
    return (fn or jb.bptt_manual)(params, xs, targets, **kw)


def test_valid_inputs_reach_the_core(problem):
    """The control: valid inputs pass validation in every entry point."""
    params, xs, targets, kw = problem
    for mode in jb.BPTT_MODES:
        with pytest.raises(ReachedCore):
            jb.bptt(params, xs, targets, mode=mode, **kw)
    with pytest.raises(ReachedCore):
        jb.model_loss(params, xs, targets, **kw)
    with pytest.raises(ReachedCore):
        jb.unroll(params, xs, cell="lstm")
    with pytest.raises(ReachedCore):
        jb.predict(params, xs, cell="lstm")


# ---------------------------------------------------------------------------------------------
# The cases of the old test_errors.py


@pytest.mark.parametrize("mode", jb.BPTT_MODES)
def test_wrong_rank_of_inputs(problem, mode):
    params, xs, targets, kw = problem
    with pytest.raises(ValueError, match=r"xs must have shape \(T, B, D\)"):
        jb.bptt(params, xs[None], targets, mode=mode, **kw)
    with pytest.raises(ValueError, match="xs must have shape"):
        jb.unroll(params, xs[0, 0], cell="lstm")


def test_feature_size_mismatch(problem):
    with pytest.raises(ValueError, match="xs has feature size 3 .* input_size=4"):
        _call(problem, xs=np.ones((5, 3, 3)))


def test_batch_mismatch_initial_state(problem):
    h0 = [{"fwd": (np.zeros((2, 6)), np.zeros((2, 6)))}]
    with pytest.raises(ValueError, match=r"h0\[0\]\['fwd'\] leaves must have shape \(3, 6\)"):
        _call(problem, h0=h0)


def test_initial_state_structure(problem):
    with pytest.raises(TypeError, match=r"h0\[0\]\['fwd'\] must have the structure of lstm"):
        _call(problem, h0=[{"fwd": np.zeros((3, 6))}])
    # The old single-layer layout (a bare state) is not a list of layers.
    with pytest.raises(TypeError, match="h0 must be a list with one"):
        _call(problem, h0=(np.zeros((3, 6)), np.zeros((3, 6)), np.zeros((3, 6))))
    with pytest.raises(TypeError, match="h0 must be a list with one"):
        _call(problem, h0=np.zeros((3, 6)))


def test_batch_mismatch_targets(problem):
    with pytest.raises(ValueError, match=r"targets .* must have shape \(T, B, O\) = \(5, 3, 2\)"):
        _call(problem, targets=np.zeros((5, 2, 2)))
    with pytest.raises(ValueError, match=r"targets .* placement='last_step' .* \(B, O\)"):
        _call(problem, loss=Loss("mse", "last_step"))


def test_target_dtypes(problem):
    with pytest.raises(TypeError, match="targets for loss='cross_entropy' must be integer"):
        _call(problem, loss=Loss("cross_entropy"), targets=np.zeros((5, 3)))
    with pytest.raises(TypeError, match="targets for loss='mse' must be floating"):
        _call(problem, targets=np.zeros((5, 3, 2), np.int32))


def test_class_ids_out_of_range(problem):
    ids = np.zeros((5, 3), np.int32)
    ids[1, 1] = 2
    with pytest.raises(ValueError, match=r"targets must be class ids in \[0, 2\)"):
        _call(problem, loss=Loss("cross_entropy"), targets=ids)
    ids[1, 1] = 0
    ids[4, 2] = -1  # past the length 4: padding may hold anything
    with pytest.raises(ReachedCore):
        _call(problem, loss=Loss("cross_entropy"), targets=ids, lengths=np.array([5, 5, 4]))


def test_batch_mismatch_lengths(problem):
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        _call(problem, lengths=np.array([1, 2]))


def test_lengths_outside_range(problem):
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        _call(problem, lengths=jnp.array([1, 6, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        _call(problem, lengths=np.array([-1, 2, 2]))


def test_lengths_dtype(problem):
    with pytest.raises(TypeError, match="lengths must be integers"):
        _call(problem, lengths=np.array([1.0, 2.0, 3.0]))


def test_non_float_inputs(problem):
    """Changed on purpose: integer xs are token ids now, so the old int32 ``(T, B, D)`` case is a
    rank error of token ids; other non-float inputs are still refused."""
    with pytest.raises(TypeError, match="xs must be floating point or integer token ids"):
        _call(problem, xs=np.ones((5, 3, 4), bool))
    with pytest.raises(TypeError, match="xs must be floating point or integer token ids"):
        _call(problem, xs=np.ones((5, 3, 4), np.complex128))
    with pytest.raises(ValueError, match=r"token ids xs must have shape \(T, B\) or \(T,\)"):
        _call(problem, xs=np.ones((5, 3, 4), np.int32))
    with pytest.raises(ValueError, match=r"token ids xs must lie in \[0, 4\)"):
        _call(problem, xs=np.full((5, 3), 4, np.int32))
    with pytest.raises(TypeError, match="xs must be an array"):
        _call(problem, xs=[[[0.0] * 4] * 3] * 5)


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("cell", "transformer", "cell must be one of"),
        ("loss", "hinge", r"loss\.kind must be one of"),
        ("loss", Loss("mse", "middle"), r"loss\.placement must be one of"),
        ("loss", Loss("mse", "per_step", "max"), r"loss\.reduction must be one of"),
    ],
)
def test_unknown_names(problem, argument, value, message):
    """(Changed: placement and reduction are fields of ``loss`` now, and the message names the
    field.)"""
    with pytest.raises(ValueError, match=message):
        _call(problem, **{argument: value})


def test_unknown_mode_and_init(problem):
    params, xs, targets, kw = problem
    with pytest.raises(ValueError, match="mode must be one of"):
        jb.bptt(params, xs, targets, mode="magic", **kw)
    with pytest.raises(ValueError, match="mode must be one of"):
        jb.unroll(params, xs, cell="lstm", mode="manual")
    with pytest.raises(ValueError, match="recurrent_init must be one of"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, recurrent_init="zeros")
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1"):
        jb.init_model(jax.random.key(0), "gru", 2, 0, 1)
    with pytest.raises(ValueError, match="forget_bias applies to the lstm cell only"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, forget_bias=1.0)
    for name, args in (("input_size", (0, 3, 1)), ("output_size", (2, 3, 1.5))):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            jb.init_model(jax.random.key(0), "gru", *args)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, num_layers=0)
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, bidirectional=1)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        jb.init_model(jax.random.key(0), "gru", 2, 3, 1, dtype=jnp.int32)


def test_bad_params(problem):
    _, xs, targets, kw = problem
    with pytest.raises(TypeError, match="params must be a dict"):
        jb.bptt_manual({"W_xh": 1}, xs, targets, **kw)


def test_old_params_layout_is_refused(problem):
    """The old ``{"cell", "readout"}`` layout: the error points to ``init_model``'s layout."""
    params, xs, targets, kw = problem
    old = {"cell": params["layers"][0]["fwd"], "readout": params["readout"]}
    with pytest.raises(TypeError, match=r"params must be a dict \{'layers'.* keys \['cell'"):
        jb.bptt_manual(old, xs, targets, **kw)


def test_errors_raised_at_trace_time_under_jit(problem):
    params, xs, targets, kw = problem
    bad = jax.jit(lambda p, x: jb.bptt_manual(p, x, targets, **kw))
    with pytest.raises(ValueError, match="xs has feature size"):
        bad(params, jnp.ones((5, 3, 7), F64))
    with pytest.raises(TypeError, match="xs has dtype float32 but the params are float64"):
        bad(params, jnp.ones((5, 3, 4), jnp.float32))


# ---------------------------------------------------------------------------------------------
# New cases: the params checked against the cell, Loss and ScanOptions fields, deep h0


# Every leaf of a 2-layer bidirectional GRU (b_hn too) and its rank: (where, path, ndim), with
# ``where`` spelled as the error messages spell it.
DEEP_GRU_LEAVES = [
    (f"params['layers'][{i}][{d!r}]", ("layers", i, d, name), 2 if name.startswith("W") else 1)
    for i in (0, 1)
    for d in ("fwd", "bwd")
    for name in ("W_xh", "W_hh", "b_h", "b_hn")
] + [("params['readout']", ("readout", "W_hy"), 2), ("params['readout']", ("readout", "b_y"), 1)]


def _replaced(params, path, value):
    """A copy of ``params`` with the leaf at ``path`` replaced (``value`` None: deleted)."""
    params = jax.tree_util.tree_map(lambda a: a, params)  # new containers, same leaves
    node = params
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return params


def _get(params, path):
    for key in path:
        params = params[key]
    return params


# The sizes are read off these dims (input, hidden and output size): a wrong one there makes every
# leaf that depends on it "wrong"; those are tested on their own below.
DEFINING = {
    (("layers", 0, "fwd", "W_xh"), 0),
    (("layers", 0, "fwd", "W_hh"), 0),
    (("readout", "W_hy"), 1),
}


@pytest.fixture(scope="module")
def deep_gru():
    """A 2-layer bidirectional GRU: every kind of leaf (b_hn too) at every depth and direction."""
    return _random_problem(1, "gru", num_layers=2, bidirectional=True)


class TestParamsAgainstTheCell:
    def test_wrong_cell_for_the_params(self, problem):
        params, xs, targets, kw = problem  # LSTM params
        with pytest.raises(
            ValueError,
            match=r"params\['layers'\]\[0\]\['fwd'\] must have the leaves .*cell 'gru'.*"
            r"missing \['b_hn'\]",
        ):
            _call(problem, cell="gru")
        with pytest.raises(
            ValueError,
            match=r"params\['layers'\]\[0\]\['fwd'\]\['W_(hh|xh)'\] must have shape \([46], 6\) "
            r"\(cell 'elman_tanh'",
        ):
            _call(problem, cell="elman_tanh")
        gru_params = _random_problem(2, "gru")[0]
        with pytest.raises(ValueError, match=r"unexpected \['b_hn'\]"):
            _call(problem, params=gru_params)

    @pytest.mark.parametrize(
        "where, path, axis",
        [
            (where, path, axis)
            for where, path, ndim in DEEP_GRU_LEAVES
            for axis in range(ndim)
            if (path, axis) not in DEFINING
        ],
    )
    @settings(max_examples=4, deadline=None)
    @given(data=st.data())
    def test_each_weight_with_a_wrong_shape(self, deep_gru, where, path, axis, data):
        """Any leaf at any layer and direction, any axis, any wrong size: the error names the
        leaf and the shape it must have, in every mode."""
        params, xs, targets, kw = deep_gru
        leaf = _get(params, path)
        shape = list(leaf.shape)
        sizes = [1, shape[axis] - 1, shape[axis] + 1, 2 * shape[axis]]
        shape[axis] = data.draw(st.sampled_from([n for n in sizes if n not in (0, shape[axis])]))
        bad = _replaced(params, path, np.zeros(shape))
        message = re.escape(f"{where}[{path[-1]!r}] must have shape {tuple(leaf.shape)}")
        mode = data.draw(st.sampled_from(jb.BPTT_MODES))
        with pytest.raises(ValueError, match=message):
            jb.bptt(bad, xs, targets, mode=mode, **kw)

    @pytest.mark.parametrize("path, axis", sorted(DEFINING))
    def test_a_defining_dim_changes_the_sizes(self, deep_gru, path, axis):
        """The input, hidden and output sizes are read off layer 0's forward ``W_xh``, ``W_hh``
        and the readout's ``W_hy``: a wrong one there is reported against the sizes it implies."""
        params, xs, targets, kw = deep_gru
        leaf = _get(params, path)
        shape = list(leaf.shape)
        shape[axis] += 1
        bad = _replaced(params, path, np.zeros(shape))
        if path[-1] == "W_xh":  # the params are consistent with input_size 4 ... but not xs
            match = r"params\['layers'\]\[0\]\['bwd'\]\['W_xh'\] must have shape \(5, 18\)"
        elif path[-1] == "W_hh":  # hidden_size 7: W_hh is checked first and named
            match = r"params\['layers'\]\[0\]\['fwd'\]\['W_hh'\] must have shape \(7, 21\) .*7\)"
        else:  # output_size 3
            match = r"params\['readout'\]\['b_y'\] must have shape \(3,\)"
        with pytest.raises(ValueError, match=match):
            jb.bptt_manual(bad, xs, targets, **kw)

    @pytest.mark.parametrize("name", ["W_xh", "W_hh", "b_h", "b_hn"])
    def test_a_missing_weight(self, deep_gru, name):
        params, xs, targets, kw = deep_gru
        bad = _replaced(params, ("layers", 1, "bwd", name), None)
        with pytest.raises(
            (ValueError, TypeError),
            match=rf"params\['layers'\]\[1\]\['bwd'\] must have the leaves .*missing \['{name}'\]",
        ):
            jb.bptt_manual(bad, xs, targets, **kw)
        bad = _replaced(params, ("readout", "b_y"), None)
        with pytest.raises(ValueError, match=r"params\['readout'\] must have the leaves"):
            jb.bptt_manual(bad, xs, targets, **kw)

    def test_a_missing_layer_direction(self, deep_gru):
        params, xs, targets, kw = deep_gru
        bad = _replaced(params, ("layers", 1, "bwd"), None)
        with pytest.raises(ValueError, match=r"params\['layers'\]\[1\] must have the directions"):
            jb.bptt_manual(bad, xs, targets, **kw)

    def test_params_of_another_float_dtype_than_xs(self, problem):
        """Changed on purpose: xs must have the params' dtype (nothing is cast silently)."""
        params, xs, targets, kw = problem
        params32 = jax.tree_util.tree_map(lambda a: a.astype(np.float32), params)
        with pytest.raises(TypeError, match="xs has dtype float64 but the params are float32"):
            jb.bptt_manual(params32, xs, targets.astype(np.float32), **kw)
        with pytest.raises(TypeError, match="xs has dtype float32 but the params are float64"):
            jb.bptt_manual(params, xs.astype(np.float32), targets, **kw)
        with pytest.raises(TypeError, match="xs has dtype float32"):
            jb.unroll(params, xs.astype(np.float32), cell="lstm")

    def test_one_leaf_of_another_dtype(self, deep_gru):
        params, xs, targets, kw = deep_gru
        for path in (("layers", 1, "bwd", "b_hn"), ("readout", "W_hy")):
            bad = _replaced(params, path, _get(params, path).astype(np.float32))
            where = r"params\['readout'\]" if path[0] == "readout" else r".*\[1\]\['bwd'\]"
            with pytest.raises(
                TypeError, match=rf"{where}\['{path[-1]}'\] has dtype float32, but the model's"
            ):
                jb.bptt_manual(bad, xs, targets, **kw)
        bad = jax.tree_util.tree_map(lambda a: a.astype(np.int32), params)
        with pytest.raises(TypeError, match="params must be floating point"):
            jb.bptt_manual(bad, xs, targets, **kw)


class TestLossAndOptions:
    @pytest.mark.parametrize(
        "loss, error, message",
        [
            (Loss("hinge"), ValueError, r"loss\.kind must be one of \('mse', 'cross_entropy'\)"),
            (Loss("mse", "first_step"), ValueError, r"loss\.placement must be one of"),
            (Loss("mse", "per_step", "median"), ValueError, r"loss\.reduction must be one of"),
            (Loss("cross_entropy", "last_step", None), ValueError, r"loss\.reduction"),
            (3, TypeError, r"loss must be a jax_bptt\.Loss"),
            (("mse", "per_step", "mean"), TypeError, r"loss must be a jax_bptt\.Loss"),
        ],
    )
    def test_bad_loss_fields(self, problem, loss, error, message):
        for fn in (jb.bptt_auto, jb.bptt_checkpointed, jb.model_loss):
            with pytest.raises(error, match=message):
                _call(problem, fn=fn, loss=loss)

    @pytest.mark.parametrize(
        "options, error, message",
        [
            (ScanOptions(unroll=0), ValueError, r"ScanOptions\.unroll must be None or an int >= 1"),
            (ScanOptions(unroll=2.5), ValueError, r"ScanOptions\.unroll"),
            (ScanOptions(unroll=-1), ValueError, r"ScanOptions\.unroll"),
            (ScanOptions(unroll=False), ValueError, r"ScanOptions\.unroll"),
            (ScanOptions(chunk_length=0), ValueError, r"ScanOptions\.chunk_length"),
            (ScanOptions(chunk_length=1.0), ValueError, r"ScanOptions\.chunk_length"),
            (ScanOptions(segment_length=0), ValueError, r"ScanOptions\.segment_length"),
            (ScanOptions(chunk_bytes=-1), ValueError, r"ScanOptions\.chunk_bytes"),
            (ScanOptions(backend="nope"), ValueError, r"backend must be 'auto' or one of"),
            ({"unroll": 2}, TypeError, r"options must be a jax_bptt\.ScanOptions"),
        ],
    )
    def test_bad_scan_options(self, problem, options, error, message):
        params, xs, targets, kw = problem
        calls = [lambda m=m: jb.bptt(params, xs, targets, mode=m, options=options, **kw)
                 for m in jb.BPTT_MODES]  # fmt: skip
        calls += [
            lambda: jb.model_loss(params, xs, targets, options=options, **kw),
            lambda: jb.unroll(params, xs, cell="lstm", options=options),
            lambda: jb.predict(params, xs, cell="lstm", options=options),
        ]
        for call in calls:
            with pytest.raises(error, match=message):
                call()

    def test_options_beyond_t_are_capped(self):
        resolve = backends.resolve_options
        got = resolve(
            ScanOptions(unroll=100, chunk_length=100, segment_length=100), jb.LSTM, (T, B, D), H,
            F64, platform="cpu",
        )  # fmt: skip
        assert got == ScanOptions(T, "xla", T, 2 * 2**20, T)
        assert resolve(ScanOptions(unroll=True), jb.LSTM, (T, B, D), H, F64, "cpu").unroll is True
        gpu = resolve(ScanOptions(), jb.GRU, (T, B, D), H, F64, platform="gpu")
        assert gpu == ScanOptions(T, "xla", T, None, 3)  # unroll 8 capped at T; one chunk
        cpu = resolve(ScanOptions(), jb.GRU, (100, B, D), H, F64, platform="cpu")
        assert cpu.unroll == 1 and cpu.segment_length == 10 and cpu.chunk_length == 100
        empty = resolve(ScanOptions(unroll=4), jb.GRU, (0, B, D), H, F64, platform="cpu")
        assert (empty.unroll, empty.chunk_length, empty.segment_length) == (1, 1, 1)
        # A budget of 2 KiB of d xp (B * 3H * 8 = 432 bytes a step) gives chunks of 4 steps.
        small = resolve(ScanOptions(chunk_bytes=2048), jb.GRU, (T, B, D), H, F64, "cpu")
        assert small.chunk_length == 4
        assert backends.check_options(None) == ScanOptions()

    def test_an_unroll_beyond_t_is_the_unroll_of_t(self, problem):
        """Capped before the cores see it: the same compiled core, the same result."""
        params, xs, targets, kw = problem
        with mock.patch.dict(modes.CORES, ORIGINAL_CORES):
            capped = jb.bptt_fast(params, xs, targets, options=ScanOptions(unroll=100), **kw)
            exact = jb.bptt_fast(params, xs, targets, options=ScanOptions(unroll=T), **kw)
        for a, b in zip(jax.tree.leaves(capped), jax.tree.leaves(exact), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_register_backend_checks(self):
        with pytest.raises(ValueError, match="backend name must be a new non-empty str"):
            jb.register_backend("xla", backends.get_backend("xla"))
        with pytest.raises(ValueError, match="backend name must be a new non-empty str"):
            jb.register_backend("auto", backends.get_backend("xla"))
        with pytest.raises(TypeError, match="backend must be a Backend of two callables"):
            jb.register_backend("mine", (len, 3))
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            backends.get_backend("nope")


@pytest.fixture(scope="module")
def deep_lstm():
    return _random_problem(3, "lstm", num_layers=2, bidirectional=True)


def _good_h0(num_layers=2, batch=(B,)):
    state = (np.zeros((*batch, H)), np.zeros((*batch, H)))
    return [{"fwd": state, "bwd": state} for _ in range(num_layers)]


class TestStateAndLengths:
    def test_good_deep_h0_passes(self, deep_lstm):
        params, xs, targets, kw = deep_lstm
        with pytest.raises(ReachedCore):
            jb.bptt_manual(params, xs, targets, **{**kw, "h0": _good_h0()})

    @pytest.mark.parametrize(
        "fault", ["shape", "batch", "structure", "missing", "not_a_dict", "extra"]
    )
    @pytest.mark.parametrize("direction", ["fwd", "bwd"])
    @pytest.mark.parametrize("layer", [0, 1])
    def test_bad_h0_per_layer(self, deep_lstm, layer, direction, fault):
        params, xs, targets, kw = deep_lstm
        h0 = _good_h0()
        state = h0[layer][direction]
        where = rf"h0\[{layer}\]\['{direction}'\]"
        if fault == "shape":
            h0[layer] = {**h0[layer], direction: (state[0], np.zeros((B, H + 1)))}
            error, match = ValueError, rf"{where} leaves must have shape \(3, 6\)"
        elif fault == "batch":
            h0[layer] = {**h0[layer], direction: (np.zeros((B + 1, H)), state[1])}
            error, match = ValueError, rf"{where} leaves must have shape \(3, 6\)"
        elif fault == "structure":
            h0[layer] = {**h0[layer], direction: state[0]}
            error, match = TypeError, rf"{where} must have the structure of lstm"
        elif fault == "missing":
            h0[layer] = {k: v for k, v in h0[layer].items() if k != direction}
            error, match = TypeError, rf"h0\[{layer}\] must be a dict with keys \['fwd', 'bwd'\]"
        elif fault == "not_a_dict":
            h0[layer] = state
            error, match = TypeError, rf"h0\[{layer}\] must be a dict with keys \['fwd', 'bwd'\]"
        else:
            h0[layer] = {**h0[layer], "up": state}
            error, match = TypeError, rf"h0\[{layer}\] must be a dict with keys"
        with pytest.raises(error, match=match):
            jb.bptt_manual(params, xs, targets, **{**kw, "h0": h0})

    @pytest.mark.parametrize("num_layers", [0, 1, 3])
    def test_h0_with_the_wrong_number_of_layers(self, deep_lstm, num_layers):
        params, xs, targets, kw = deep_lstm
        with pytest.raises(TypeError, match=r"h0 must be a list with one .* \(2 layers\)"):
            jb.bptt_manual(params, xs, targets, **{**kw, "h0": _good_h0(num_layers)})

    def test_unbatched_h0_and_lengths(self, problem):
        params, xs, targets, kw = problem
        single = dict(xs=xs[:, 0], targets=targets[:, 0])
        with pytest.raises(ValueError, match=r"h0\[0\]\['fwd'\] leaves must have shape \(6,\)"):
            _call(problem, **single, h0=[{"fwd": (np.zeros((1, H)), np.zeros((1, H)))}])
        with pytest.raises(ValueError, match=r"lengths must have shape \(\)"):
            _call(problem, **single, lengths=np.array([3]))
        with pytest.raises(ReachedCore):
            _call(problem, **single, lengths=np.array(3), h0=[{"fwd": (np.zeros(H),) * 2}])

    @settings(max_examples=30, deadline=None)
    @given(
        lengths=st.lists(st.integers(-3, T + 3), min_size=B, max_size=B).filter(
            lambda n: min(n) < 0 or max(n) > T
        ),
        mode=st.sampled_from(jb.BPTT_MODES),
    )
    def test_lengths_out_of_range(self, problem, lengths, mode):
        params, xs, targets, kw = problem
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
            jb.bptt(params, xs, targets, mode=mode, **{**kw, "lengths": np.array(lengths)})

    def test_dropout_and_residual(self, problem):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            _call(problem, dropout=1.0)
        with pytest.raises(TypeError, match="dropout must be a float"):
            _call(problem, dropout="0.1")
        with pytest.raises(ValueError, match="dropout=0.5 acts between stacked layers"):
            _call(problem, dropout=0.5, key=jax.random.key(0))  # one layer
        with pytest.raises(ValueError, match="residual must be one of"):
            _call(problem, residual="always")
        with pytest.raises(ValueError, match="residual=True adds layer 0's input"):
            _call(problem, residual=True)  # input_size 4 != hidden_size 6

    def test_dropout_needs_a_key(self, deep_lstm):
        params, xs, targets, kw = deep_lstm
        with pytest.raises(ValueError, match="dropout=0.5 needs a PRNG key"):
            jb.bptt_manual(params, xs, targets, dropout=0.5, **kw)
        with pytest.raises(ReachedCore):
            jb.bptt_manual(params, xs, targets, dropout=0.5, key=jax.random.key(0), **kw)
