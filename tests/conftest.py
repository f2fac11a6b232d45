"""Gradient tests run in float64: exact methods must agree to ~1e-10 relative, not 1e-3."""

import os
import tempfile

# One compilation cache for the test run's processes (both xdist workers and the experiments
# they start), set before jax is imported so subprocesses inherit it: many tests compile the same
# programs. It only saves time; the key covers the program, the jax version and the flags, so a
# hit is the same executable.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jax_bptt_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite's time is mostly XLA compiling small programs that then run for microseconds, and
# most of a compile is LLVM optimising the code. The tests check values, not speed, and the
# arithmetic is the same without those optimisations (no fast-math either way), so they are off:
# about a fifth less time on the 2-core CPU. (Tests run the benchmarks as smoke runs only.)
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# The keys the tests make are XLA RngBitGenerator keys, whose random draws compile in a fraction
# of threefry's time (nothing tested depends on which generator drew the numbers). The README's
# examples, the experiments and the CLI run in their own processes with JAX's default threefry.
jax.config.update("jax_default_prng_impl", "rbg")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="module")
def torch():
    """PyTorch, single-threaded (the tests that need it skip cleanly without it)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


# The modules that take longest (a minute or more of the suite's CPU time each), longest first.
SLOW_MODULES = ("test_modes.py", "test_resets.py", "test_model.py", "test_fast.py", "test_deer.py")


def pytest_collection_modifyitems(items):
    """Run the slowest modules first: xdist's loadfile hands modules out in collection order, and
    starting with the long ones lets the two workers finish together instead of one idling while
    the other works through a big module at the end."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))
