"""Gradient tests run in float64: exact methods must agree to ~1e-10 relative, not 1e-3."""

import jax

jax.config.update("jax_enable_x64", True)
