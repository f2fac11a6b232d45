"""Gradient tests run in float64: exact methods must agree to ~1e-10 relative, not 1e-3."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def torch():
    """PyTorch, single-threaded (the tests that need it skip cleanly without it)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch
