"""Tests for jax_bptt.tasks: shapes, layouts, baselines and argument validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_bptt import tasks
from jax_bptt.tasks import (
    ADDING_BASELINE_MSE,
    CharVocab,
    adding_problem,
    bigram_baseline_nats,
    build_vocab,
    char_stream,
    copy_memory,
    copy_memory_baseline,
    copy_memory_vocab_size,
    default_corpus_text,
    load_corpus,
    sample_char_batch,
    split_train_val,
    unigram_baseline_nats,
)


@pytest.fixture(scope="module")
def corpus():
    text = default_corpus_text()
    vocab = build_vocab(text)
    return text, vocab, vocab.encode(text)


# ------------------------------------------------------------------------------------------
# Adding problem
# ------------------------------------------------------------------------------------------


# Few distinct static shapes: each one costs a compilation, which dominates this file's runtime.
BATCH, SEQ_LEN = 64, 17


@pytest.mark.parametrize("seq_len", [2, SEQ_LEN])
def test_adding_problem_layout(seq_len):
    batch = BATCH
    inputs, targets = adding_problem(jax.random.key(0), batch, seq_len)
    assert inputs.shape == (seq_len, batch, 2) and inputs.dtype == jnp.float32
    assert targets.shape == (batch, 1) and targets.dtype == jnp.float32

    x = np.asarray(inputs, dtype=np.float64)
    values, markers = x[..., 0], x[..., 1]
    assert np.all((values >= 0.0) & (values < 1.0))
    assert set(np.unique(markers)) <= {0.0, 1.0}
    half = seq_len // 2
    np.testing.assert_array_equal(markers[:half].sum(axis=0), 1.0)
    np.testing.assert_array_equal(markers[half:].sum(axis=0), 1.0)

    # Independent numpy reference: look up the two marked positions explicitly.
    first = np.argmax(markers[:half], axis=0)
    second = half + np.argmax(markers[half:], axis=0)
    cols = np.arange(batch)
    expected = values[first, cols] + values[second, cols]
    np.testing.assert_allclose(np.asarray(targets)[:, 0], expected, rtol=1e-6)


def test_adding_problem_determinism():
    key = jax.random.key(3)
    x1, y1 = adding_problem(key, BATCH, SEQ_LEN)
    x2, y2 = adding_problem(key, BATCH, SEQ_LEN)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = adding_problem(jax.random.key(4), BATCH, SEQ_LEN)
    assert not np.array_equal(x1, x3)


def test_adding_problem_dtype_inside_user_jit():
    f = jax.jit(lambda k: adding_problem(k, BATCH, SEQ_LEN, dtype=jnp.bfloat16))
    x, y = f(jax.random.key(0))
    assert x.dtype == y.dtype == jnp.bfloat16
    assert x.shape == (SEQ_LEN, BATCH, 2) and y.shape == (BATCH, 1)


def test_adding_baseline_mse():
    assert ADDING_BASELINE_MSE == pytest.approx(1.0 / 6.0, rel=1e-15)
    n = 200_000
    _, targets = adding_problem(jax.random.key(1), n, 2)
    y = np.asarray(targets, dtype=np.float64)[:, 0]
    mse = np.mean((y - 1.0) ** 2)
    # (y - 1) is triangular on [-1, 1]: Var((y - 1)^2) = 1/15 - 1/36 = 7/180.
    se = math.sqrt(7.0 / 180.0 / n)
    assert abs(mse - ADDING_BASELINE_MSE) < 5 * se
    # Predicting 1.0 is the optimal constant because E[y] = 1.
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(ADDING_BASELINE_MSE / n)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"batch_size": 0, "seq_len": 10}, ValueError, "batch_size"),
        ({"batch_size": 2.0, "seq_len": 10}, TypeError, "batch_size"),
        ({"batch_size": True, "seq_len": 10}, TypeError, "batch_size"),
        ({"batch_size": 2, "seq_len": 1}, ValueError, "seq_len"),
        ({"batch_size": 2, "seq_len": "10"}, TypeError, "seq_len"),
        ({"batch_size": 2, "seq_len": 10, "dtype": jnp.int32}, TypeError, "dtype"),
        ({"batch_size": 2, "seq_len": 10, "dtype": "nonsense"}, TypeError, "dtype"),
    ],
)
def test_adding_problem_bad_input(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        adding_problem(jax.random.key(0), **kwargs)


# ------------------------------------------------------------------------------------------
# Copy memory
# ------------------------------------------------------------------------------------------


COPY_BATCH = 32
COPY_CONFIGS = [(100, 8, 10), (1, 3, 2)]  # (delay, num_symbols, copy_length); shared shapes


@pytest.mark.parametrize(("delay", "num_symbols", "copy_length"), COPY_CONFIGS)
def test_copy_memory_layout(delay, num_symbols, copy_length):
    batch = COPY_BATCH
    inputs, targets = copy_memory(jax.random.key(0), batch, delay, num_symbols, copy_length)
    total = delay + 2 * copy_length
    assert inputs.shape == targets.shape == (total, batch)
    assert inputs.dtype == targets.dtype == jnp.int32
    x, y = np.asarray(inputs), np.asarray(targets)
    go = num_symbols + 1
    assert copy_memory_vocab_size(num_symbols) == num_symbols + 2
    assert x.max() < copy_memory_vocab_size(num_symbols)

    data = x[:copy_length]
    for t in range(total):
        if t < copy_length:
            assert np.all((x[t] >= 1) & (x[t] <= num_symbols)), t
        elif t < copy_length + delay - 1:
            assert np.all(x[t] == 0), t
        elif t == copy_length + delay - 1:
            assert np.all(x[t] == go), t
        else:
            assert np.all(x[t] == 0), t
        if t < delay + copy_length:
            assert np.all(y[t] == 0), t
        else:
            np.testing.assert_array_equal(y[t], data[t - delay - copy_length])


def test_copy_memory_default_sizes_and_determinism():
    x1, y1 = copy_memory(jax.random.key(5), COPY_BATCH, 100)
    x2, y2 = copy_memory(jax.random.key(5), COPY_BATCH, 100)
    assert x1.shape == (120, COPY_BATCH)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, copy_memory(jax.random.key(6), COPY_BATCH, 100)[0])
    # All 8 data symbols appear among the 320 sampled ones.
    assert set(np.unique(np.asarray(x1)[:10])) == set(range(1, 9))


@pytest.mark.parametrize(("delay", "num_symbols", "copy_length"), COPY_CONFIGS)
def test_copy_memory_baseline_matches_memoryless_predictor(delay, num_symbols, copy_length):
    _, targets = copy_memory(jax.random.key(2), COPY_BATCH, delay, num_symbols, copy_length)
    y = np.asarray(targets)
    total = delay + 2 * copy_length
    vocab = copy_memory_vocab_size(num_symbols)
    # Optimal memoryless predictor: time-dependent distribution, independent of the input.
    probs = np.zeros((total, vocab), dtype=np.float64)
    probs[: delay + copy_length, 0] = 1.0
    probs[delay + copy_length :, 1 : num_symbols + 1] = 1.0 / num_symbols
    picked = probs[np.arange(total)[:, None], y]
    assert np.all(picked > 0)
    ce = -np.mean(np.log(picked))
    baseline = copy_memory_baseline(delay, num_symbols, copy_length)
    assert abs(ce - baseline) < 1e-6
    if (delay, num_symbols, copy_length) == (100, 8, 10):
        assert baseline == pytest.approx(10 * math.log(8) / 120)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"batch_size": 0, "delay": 5}, ValueError, "batch_size"),
        ({"batch_size": 2, "delay": 0}, ValueError, "delay"),
        ({"batch_size": 2, "delay": 5.0}, TypeError, "delay"),
        ({"batch_size": 2, "delay": 5, "num_symbols": 0}, ValueError, "num_symbols"),
        ({"batch_size": 2, "delay": 5, "copy_length": 0}, ValueError, "copy_length"),
    ],
)
def test_copy_memory_bad_input(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        copy_memory(jax.random.key(0), **kwargs)


def test_copy_memory_helpers_bad_input():
    with pytest.raises(ValueError, match="delay"):
        copy_memory_baseline(0)
    with pytest.raises(ValueError, match="num_symbols"):
        copy_memory_baseline(10, num_symbols=0)
    with pytest.raises(ValueError, match="copy_length"):
        copy_memory_baseline(10, copy_length=0)
    with pytest.raises(ValueError, match="num_symbols"):
        copy_memory_vocab_size(0)


# ------------------------------------------------------------------------------------------
# Corpus and vocabulary
# ------------------------------------------------------------------------------------------


def test_default_corpus(corpus):
    import pydoc_data.topics

    text, vocab, ids = corpus
    topics = pydoc_data.topics.topics
    assert text == "".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000
    assert load_corpus() == text
    assert vocab.size == len(set(text))
    assert ids.shape == (len(text),) and ids.dtype == np.int32


def test_load_corpus_from_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert load_corpus(p) == "héllo wörld\n"
    assert load_corpus(str(p)) == "héllo wörld\n"


def test_load_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="path.*directory"):
        load_corpus(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="path.*empty"):
        load_corpus(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa\x80")
    with pytest.raises(ValueError, match="path.*UTF-8"):
        load_corpus(binary)
    with pytest.raises(TypeError, match="path"):
        load_corpus(123)


def test_vocab_round_trip(corpus):
    text, vocab, ids = corpus
    assert isinstance(vocab, CharVocab)
    assert list(vocab.chars) == sorted(set(text))
    assert vocab.decode(ids) == text
    assert vocab.decode(jnp.asarray(ids[:100])) == text[:100]
    # ids follow sorted character order.
    assert vocab.encode(vocab.chars).tolist() == list(range(vocab.size))
    assert vocab.encode("").shape == (0,)
    assert vocab.decode(np.zeros((0,), np.int32)) == ""


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_vocab_round_trip_property(text):
    vocab = build_vocab(text)
    ids = vocab.encode(text)
    assert ids.dtype == np.int32
    assert np.all((ids >= 0) & (ids < vocab.size))
    assert vocab.decode(ids) == text


def test_vocab_errors():
    vocab = build_vocab("abc")
    with pytest.raises(ValueError, match="text"):
        build_vocab("")
    with pytest.raises(TypeError, match="text"):
        build_vocab(b"abc")
    with pytest.raises(ValueError, match="text"):
        vocab.encode("abz")
    with pytest.raises(TypeError, match="text"):
        vocab.encode(None)
    with pytest.raises(ValueError, match="ids"):
        vocab.decode(np.array([0, 3]))
    with pytest.raises(ValueError, match="ids"):
        vocab.decode(np.array([-1]))
    with pytest.raises(ValueError, match="ids"):
        vocab.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(TypeError, match="ids"):
        vocab.decode(np.array([0.5]))


def test_split_train_val():
    ids = np.arange(100, dtype=np.int32)
    train, val = split_train_val(ids)
    assert train.shape == (90,) and val.shape == (10,)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    train, val = split_train_val(jnp.arange(10), val_fraction=0.3)
    assert train.shape == (7,) and val.shape == (3,)
    np.testing.assert_array_equal(val, np.arange(7, 10))


def test_split_train_val_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(np.arange(100), val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(np.arange(100), val_fraction=1.0)
    with pytest.raises(TypeError, match="val_fraction"):
        split_train_val(np.arange(100), val_fraction="0.1")
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(np.arange(10), val_fraction=0.1)  # val would have 1 id
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(np.arange(10), val_fraction=0.9)  # train would have 1 id
    with pytest.raises(ValueError, match="ids"):
        split_train_val(np.zeros((4, 4), np.int32))
    with pytest.raises(TypeError, match="ids"):
        split_train_val(np.zeros(10, np.float32))
    with pytest.raises(TypeError, match="ids"):
        split_train_val([1, 2, 3, 4])


# ------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------


def test_sample_char_batch(corpus):
    _, _, ids = corpus
    raw = np.asarray(ids)
    batch, seq_len = 8, 32
    inputs, targets = sample_char_batch(jax.random.key(0), jnp.asarray(ids), batch, seq_len)
    assert inputs.shape == targets.shape == (seq_len, batch)
    assert inputs.dtype == targets.dtype == jnp.int32
    x, y = np.asarray(inputs), np.asarray(targets)
    np.testing.assert_array_equal(x[1:], y[:-1])
    # Each column is a contiguous window of the raw ids, and targets continue it by one.
    windows = np.lib.stride_tricks.sliding_window_view(raw, seq_len + 1)
    for b in range(batch):
        column = np.concatenate([x[:, b], y[-1:, b]])
        matches = np.nonzero(np.all(windows == column, axis=1))[0]
        assert matches.size >= 1
        start = matches[0]
        np.testing.assert_array_equal(y[:, b], raw[start + 1 : start + seq_len + 1])
    # Determinism, and different keys give different windows.
    x2, _ = sample_char_batch(jax.random.key(0), ids, batch, seq_len)
    np.testing.assert_array_equal(x, x2)
    x3, _ = sample_char_batch(jax.random.key(1), ids, batch, seq_len)
    assert not np.array_equal(x, x3)


def test_sample_char_batch_covers_edges_and_jits():
    # With N = seq_len + 1 there is exactly one window; with N = seq_len + 2, two.
    ids = jnp.arange(6, dtype=jnp.int32)
    x, y = sample_char_batch(jax.random.key(0), ids, 4, 5)
    np.testing.assert_array_equal(x, np.tile(np.arange(5)[:, None], (1, 4)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 6)[:, None], (1, 4)))
    ids = jnp.arange(7, dtype=jnp.int32)
    starts = set()
    f = jax.jit(sample_char_batch, static_argnames=("batch_size", "seq_len"))
    for i in range(5):
        x, _ = f(jax.random.key(i), ids, batch_size=16, seq_len=5)
        starts |= set(np.asarray(x)[0].tolist())
    assert starts == {0, 1}


def test_sample_char_batch_errors():
    ids = jnp.arange(10, dtype=jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="ids"):
        sample_char_batch(key, ids, 2, 10)
    with pytest.raises(ValueError, match="seq_len"):
        sample_char_batch(key, ids, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        sample_char_batch(key, ids, 0, 4)
    with pytest.raises(TypeError, match="ids"):
        sample_char_batch(key, ids.astype(jnp.float32), 2, 4)
    with pytest.raises(ValueError, match="ids"):
        sample_char_batch(key, ids.reshape(2, 5), 2, 4)


def test_char_stream():
    ids = np.arange(23, dtype=np.int32)
    out = char_stream(ids, 4)
    assert out.shape == (5, 4) and out.dtype == jnp.int32
    for b in range(4):
        np.testing.assert_array_equal(out[:, b], ids[b * 5 : (b + 1) * 5])
    # Consecutive chunks continue every stream.
    np.testing.assert_array_equal(np.asarray(out).T.reshape(-1), ids[:20])
    np.testing.assert_array_equal(char_stream(jnp.asarray(ids), 1)[:, 0], ids)
    with pytest.raises(ValueError, match="batch_size"):
        char_stream(ids, 12)
    with pytest.raises(ValueError, match="batch_size"):
        char_stream(ids, 0)
    with pytest.raises(ValueError, match="ids"):
        char_stream(ids.reshape(1, -1), 2)


# ------------------------------------------------------------------------------------------
# N-gram baselines
# ------------------------------------------------------------------------------------------


def test_bigram_baseline_small_example():
    train = np.array([0, 1, 0, 1, 0])  # pairs: 01, 10, 01, 10
    val = np.array([0, 1, 1])  # pairs: 01, 11
    alpha = 0.5
    # p(1|0) = (2 + .5) / (2 + 1); p(1|1) = (0 + .5) / (2 + 1)
    expected = -(math.log(2.5 / 3) + math.log(0.5 / 3)) / 2
    assert bigram_baseline_nats(train, val, 2, smoothing=alpha) == pytest.approx(expected)
    # unigram on val[1:] = [1, 1]: p(1) = (2 + .5) / (5 + 1)
    expected_uni = -math.log(2.5 / 6)
    assert unigram_baseline_nats(train, val, 2, smoothing=alpha) == pytest.approx(expected_uni)


def test_bigram_baseline_default_corpus(corpus):
    _, vocab, ids = corpus
    train, val = split_train_val(ids, 0.1)
    bigram = bigram_baseline_nats(train, val, vocab.size)
    unigram = unigram_baseline_nats(train, val, vocab.size)
    # Plain empirical unigram entropy of the training text, computed independently.
    freq = np.bincount(train, minlength=vocab.size) / train.size
    freq = freq[freq > 0]
    entropy = float(-(freq * np.log(freq)).sum())
    print(f"\nbigram {bigram:.4f} nats/char, unigram {unigram:.4f}, train entropy {entropy:.4f}")
    assert 1.5 < bigram < 3.5
    assert bigram < entropy and bigram < unigram
    assert abs(unigram - entropy) < 0.2


def test_ngram_baseline_errors():
    train, val = np.array([0, 1, 2]), np.array([1, 2])
    with pytest.raises(ValueError, match="smoothing"):
        bigram_baseline_nats(train, val, 3, smoothing=0.0)
    with pytest.raises(ValueError, match="train_ids"):
        bigram_baseline_nats(np.array([0]), val, 3)
    with pytest.raises(ValueError, match="val_ids"):
        bigram_baseline_nats(train, np.array([1, 5]), 3)
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_baseline_nats(train, val, 0)


def test_public_api_listed():
    for name in tasks.__all__:
        assert hasattr(tasks, name), name
