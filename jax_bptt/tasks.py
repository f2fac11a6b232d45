"""Synthetic and character-level sequence tasks for BPTT experiments.

All sequence arrays are time-major: inputs ``(T, B, ...)`` and per-step targets ``(T, B, ...)``.
Generators are pure functions of an explicit ``jax.random`` key; argument checks run in Python
before dispatching to a jitted kernel whose sizes are static, so bad input fails fast with a
message naming the argument instead of an opaque tracing error.

Tasks:

* Adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).
* Copy memory (Arjovsky, Shah & Bengio 2016).
* Next-character prediction on a text corpus (default: CPython's bundled ``pydoc_data`` help
  text, so no download is ever needed), with random-window and streaming layouts and
  n-gram reference baselines.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ADDING_BASELINE_MSE",
    "CharVocab",
    "adding_problem",
    "bigram_baseline_nats",
    "build_vocab",
    "char_stream",
    "copy_memory",
    "copy_memory_baseline",
    "copy_memory_vocab_size",
    "default_corpus_text",
    "load_corpus",
    "sample_char_batch",
    "split_train_val",
    "unigram_baseline_nats",
]


# --------------------------------------------------------------------------------------------
# Argument checking helpers


def _check_int(name: str, value, minimum: int) -> int:
    """Return ``value`` as a Python int, or raise naming ``name`` if it is not an int >= minimum."""
    # bool is an int subclass, but passing True as a size is always a bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_ids(name: str, ids, min_len: int, vocab_size: int | None = None):
    """Check that ``ids`` is a 1-D integer array with at least ``min_len`` entries, all in
    ``[0, vocab_size)`` if ``vocab_size`` is given (a NumPy array then)."""
    shape = getattr(ids, "shape", None)
    dtype = getattr(ids, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be a 1-D integer array, got {type(ids).__name__}")
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {dtype}")
    if shape[0] < min_len:
        raise ValueError(f"{name} must have length >= {min_len}, got {shape[0]}")
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, vocab_size={vocab_size}), got range [{ids.min()}, {ids.max()}]"
        )


# --------------------------------------------------------------------------------------------
# Adding problem

# Predicting the constant E[U1 + U2] = 1 is the best input-independent guess; its MSE is
# Var(U1 + U2) = Var(U1) + Var(U2) = 2 * (1 - 0)^2 / 12 = 1/6 for independent U[0, 1] values.
# A model has learned something only once its MSE drops clearly below this.
ADDING_BASELINE_MSE: float = 2.0 * (1.0 - 0.0) ** 2 / 12.0


@functools.partial(jax.jit, static_argnames=("batch_size", "seq_len", "dtype"))
def _adding_problem(key, batch_size: int, seq_len: int, dtype):
    k_val, k_first, k_second = jax.random.split(key, 3)
    half = seq_len // 2
    values = jax.random.uniform(k_val, (seq_len, batch_size), dtype=dtype)
    # One marker in each half guarantees the two marked positions differ and that the
    # network must remember the first value for at least ~T/2 steps on average.
    first = jax.random.randint(k_first, (batch_size,), 0, half)
    second = jax.random.randint(k_second, (batch_size,), half, seq_len)
    t = jnp.arange(seq_len)[:, None]
    markers = ((t == first[None, :]) | (t == second[None, :])).astype(dtype)
    inputs = jnp.stack([values, markers], axis=-1)
    targets = jnp.sum(values * markers, axis=0)[:, None]
    return inputs, targets


def adding_problem(key, batch_size: int, seq_len: int, dtype=jnp.float32):
    """Sample a batch of the adding problem.

    Channel 0 holds values ~ U[0, 1]; channel 1 is a marker that is 1 at exactly one step with
    ``t < seq_len // 2`` and one step with ``t >= seq_len // 2``, else 0.

    Args:
      key: ``jax.random`` key.
      batch_size: B >= 1.
      seq_len: T >= 2.
      dtype: floating dtype of both outputs.

    Returns:
      ``inputs`` of shape ``(T, B, 2)`` and ``targets`` of shape ``(B, 1)`` holding the sum of
      the two marked values. See ``ADDING_BASELINE_MSE`` for the trivial baseline.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 2)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return _adding_problem(key, batch_size, seq_len, dtype)


# --------------------------------------------------------------------------------------------
# Copy memory


def copy_memory_vocab_size(num_symbols: int = 8) -> int:
    """Number of token ids used by ``copy_memory``: blank 0, data 1..K, go marker K + 1."""
    num_symbols = _check_int("num_symbols", num_symbols, 1)
    return num_symbols + 2


def copy_memory_baseline(delay: int, num_symbols: int = 8, copy_length: int = 10) -> float:
    """Cross-entropy (nats per step) of the best memoryless predictor on ``copy_memory``.

    A predictor that knows the time step but nothing about the input content can output blank
    with probability 1 on the first ``delay + copy_length`` target steps (the target is always
    blank there, costing 0 nats) and must spread its mass uniformly over the ``num_symbols``
    data symbols on the last ``copy_length`` steps (each is i.i.d. uniform, costing
    ``ln(num_symbols)`` nats per step). Averaging over all ``T = delay + 2 * copy_length`` steps:

        copy_length * ln(num_symbols) / (delay + 2 * copy_length)

    This is the ``10 log 8 / (T + 20)`` baseline of Arjovsky et al. (2016), with their T = delay.
    """
    delay = _check_int("delay", delay, 1)
    num_symbols = _check_int("num_symbols", num_symbols, 1)
    copy_length = _check_int("copy_length", copy_length, 1)
    return copy_length * math.log(num_symbols) / (delay + 2 * copy_length)


@functools.partial(jax.jit, static_argnames=("batch_size", "delay", "num_symbols", "copy_length"))
def _copy_memory(key, batch_size: int, delay: int, num_symbols: int, copy_length: int):
    symbols = jax.random.randint(
        key, (copy_length, batch_size), 1, num_symbols + 1, dtype=jnp.int32
    )
    go = jnp.full((1, batch_size), num_symbols + 1, dtype=jnp.int32)

    def blanks(n):
        return jnp.zeros((n, batch_size), dtype=jnp.int32)

    # The go marker is the last input step before the recall window (t = copy_length + delay - 1),
    # so symbol i, shown at t = i, is due at t = delay + copy_length + i: every symbol must be
    # held for exactly delay + copy_length steps.
    inputs = jnp.concatenate([symbols, blanks(delay - 1), go, blanks(copy_length)], axis=0)
    targets = jnp.concatenate([blanks(delay + copy_length), symbols], axis=0)
    return inputs, targets


def copy_memory(key, batch_size: int, delay: int, num_symbols: int = 8, copy_length: int = 10):
    """Sample a batch of the copy-memory task.

    Alphabet: 0 is blank, ``1..num_symbols`` are data, ``num_symbols + 1`` is the go marker
    (see ``copy_memory_vocab_size``). With ``T = delay + 2 * copy_length``:

    * inputs: ``copy_length`` random data symbols, ``delay - 1`` blanks, the go marker, then
      ``copy_length`` blanks.
    * targets: blanks for the first ``delay + copy_length`` steps, then the data symbols.

    Args:
      key: ``jax.random`` key.
      batch_size: B >= 1.
      delay: >= 1.
      num_symbols: K >= 1.
      copy_length: >= 1.

    Returns:
      ``inputs`` and ``targets``, both int32 of shape ``(T, B)``.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    delay = _check_int("delay", delay, 1)
    num_symbols = _check_int("num_symbols", num_symbols, 1)
    copy_length = _check_int("copy_length", copy_length, 1)
    return _copy_memory(key, batch_size, delay, num_symbols, copy_length)


# --------------------------------------------------------------------------------------------
# Character corpus


@functools.lru_cache(maxsize=1)
def default_corpus_text() -> str:
    """CPython's bundled ``pydoc_data.topics`` help text (~465k characters).

    It ships with every CPython install, so character-level experiments need no download.
    Topics are joined in sorted key order so the text is identical across runs.
    """
    import pydoc_data.topics  # local import: only needed for the default corpus

    topics = pydoc_data.topics.topics
    return "".join(topics[name] for name in sorted(topics))


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """Load a UTF-8 text corpus, or ``default_corpus_text()`` when ``path`` is None.

    Raises:
      TypeError: ``path`` is not None, str or PathLike.
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is a directory, not readable as UTF-8 text, or empty.
    """
    if path is None:
        return default_corpus_text()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be None, a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory, expected a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"path {path!r} is not valid UTF-8 text: {err}") from err
    except OSError as err:
        raise ValueError(f"path {path!r} could not be read: {err}") from err
    if not text:
        raise ValueError(f"path {path!r} is empty, expected non-empty text")
    return text


def _codepoints(text: str) -> np.ndarray:
    # UTF-32 gives one fixed-width code unit per character, so this vectorises encoding of
    # large corpora; surrogatepass keeps lone surrogates (e.g. from surrogateescape) encodable.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharVocab(NamedTuple):
    """Character vocabulary; id ``i`` is ``chars[i]``.

    Attributes:
      chars: the sorted unique characters, as a string.
    """

    chars: str

    @property
    def size(self) -> int:
        """Number of distinct characters (the model's input/output dimension)."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Map ``text`` to an int32 array of shape ``(len(text),)``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        table = _codepoints(self.chars)  # sorted, because chars is sorted by code point
        points = _codepoints(text)
        ids = np.searchsorted(table, points)
        unknown = table[np.minimum(ids, len(table) - 1)] != points
        if np.any(unknown):
            bad = sorted({chr(p) for p in points[unknown]})
            raise ValueError(f"text contains characters not in the vocabulary: {bad[:10]!r}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Map an integer array of shape ``(N,)`` back to a string."""
        arr = np.asarray(ids)
        if arr.shape == (0,):  # any dtype: np.asarray([]) is float64
            return ""
        _check_ids("ids", arr, 0, self.size)
        return "".join(self.chars[i] for i in arr.tolist())


def build_vocab(text: str) -> CharVocab:
    """Build a ``CharVocab`` from the unique characters of non-empty ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("text must be non-empty to build a vocabulary")
    return CharVocab("".join(sorted(set(text))))


def split_train_val(ids, val_fraction: float = 0.1):
    """Split ``ids`` of shape ``(N,)`` into a contiguous head (train) and tail (validation).

    A contiguous split (rather than shuffled windows) keeps validation text unseen in training.
    The validation part has ``round(N * val_fraction)`` entries. Both parts must have length
    >= 2 so each holds at least one (input, next-character) pair.
    """
    _check_ids("ids", ids, 0)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)):
        raise TypeError(f"val_fraction must be a float, got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = ids.shape[0]
    n_val = round(n * val_fraction)
    n_train = n - n_val
    if n_train < 2 or n_val < 2:
        raise ValueError(
            f"ids of length {n} with val_fraction={val_fraction} gives train/val lengths "
            f"{n_train}/{n_val}; both must be >= 2"
        )
    return ids[:n_train], ids[n_train:]


@functools.partial(jax.jit, static_argnames=("batch_size", "seq_len"))
def _sample_char_batch(key, ids, batch_size: int, seq_len: int):
    n = ids.shape[0]
    # Windows of seq_len + 1 ids: starts in [0, n - seq_len - 1] keep every window in range.
    starts = jax.random.randint(key, (batch_size,), 0, n - seq_len)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(ids, (s,), (seq_len + 1,)))(starts)
    windows = windows.astype(jnp.int32).T  # (T + 1, B), time-major
    return windows[:-1], windows[1:]


def sample_char_batch(key, ids, batch_size: int, seq_len: int):
    """Sample B random windows for next-character prediction.

    Args:
      key: ``jax.random`` key.
      ids: integer array of shape ``(N,)`` with ``N >= seq_len + 1``.
      batch_size: B >= 1 (static under jit).
      seq_len: T >= 1 (static under jit).

    Returns:
      ``inputs`` and ``targets``, int32 of shape ``(T, B)``, with
      ``targets[t, b] == inputs[t + 1, b]`` (the next character in the corpus).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    _check_ids("ids", ids, seq_len + 1)
    return _sample_char_batch(key, jnp.asarray(ids), batch_size, seq_len)


def char_stream(ids, batch_size: int):
    """Lay ``ids`` of shape ``(N,)`` out as B contiguous streams for truncated BPTT.

    The corpus is cut into B equal contiguous pieces (the ``N % B`` tail is dropped) and stacked
    time-major, so ``out[:, b] == ids[b * L:(b + 1) * L]`` with ``L = N // B``. Consecutive
    chunks ``out[t:t + k]`` continue each stream, letting the hidden state carry over; the
    targets of a chunk are ``out[t + 1:t + k + 1]``.

    Returns:
      int32 array of shape ``(N // B, B)``; requires ``N // B >= 2``.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_ids("ids", ids, 0)
    length = ids.shape[0] // batch_size
    if length < 2:
        raise ValueError(
            f"ids of length {ids.shape[0]} is too short for batch_size={batch_size}: each stream "
            "needs >= 2 ids"
        )
    ids = jnp.asarray(ids[: length * batch_size], dtype=jnp.int32)
    return ids.reshape(batch_size, length).T


# --------------------------------------------------------------------------------------------
# N-gram reference baselines


def _check_ngram_args(train_ids, val_ids, vocab_size, smoothing):
    vocab_size = _check_int("vocab_size", vocab_size, 1)
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float, np.floating)):
        raise TypeError(f"smoothing must be a float, got {type(smoothing).__name__}")
    # Zero smoothing would give infinite loss on any bigram unseen in training.
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    train, val = np.asarray(train_ids), np.asarray(val_ids)
    for name, arr in (("train_ids", train), ("val_ids", val)):
        _check_ids(name, arr, 2, vocab_size)
    return train.astype(np.int64), val.astype(np.int64), vocab_size, float(smoothing)


def unigram_baseline_nats(train_ids, val_ids, vocab_size: int, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats/char) on ``val_ids`` of an add-``smoothing`` unigram fit on train.

    Scored on ``val_ids[1:]`` so it is comparable with ``bigram_baseline_nats``.
    """
    train, val, v, alpha = _check_ngram_args(train_ids, val_ids, vocab_size, smoothing)
    counts = np.bincount(train, minlength=v).astype(np.float64)
    log_p = np.log(counts + alpha) - np.log(counts.sum() + alpha * v)
    return float(-np.mean(log_p[val[1:]]))


def bigram_baseline_nats(train_ids, val_ids, vocab_size: int, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats/char) on ``val_ids`` of an add-``smoothing`` character bigram model.

    ``p(b | a) = (count(a, b) + alpha) / (count(a) + alpha * V)`` with counts from consecutive
    pairs of ``train_ids``; scored on the ``len(val_ids) - 1`` consecutive pairs of ``val_ids``.
    A recurrent model should beat this to show it uses more than one character of context.
    """
    train, val, v, alpha = _check_ngram_args(train_ids, val_ids, vocab_size, smoothing)
    counts = np.bincount(train[:-1] * v + train[1:], minlength=v * v).reshape(v, v)
    counts = counts.astype(np.float64)
    log_p = np.log(counts + alpha) - np.log(counts.sum(axis=1, keepdims=True) + alpha * v)
    return float(-np.mean(log_p[val[:-1], val[1:]]))
