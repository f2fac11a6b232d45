"""Higher-order gradients through the fast path: reverse over reverse works (the hand-written
backward is ordinary JAX code, so it is differentiated again); forward mode does not (JAX cannot
apply ``jvp`` to a ``custom_vjp``), and says so."""

import jax
import jax.numpy as jnp
import pytest

import jax_bptt as jb
from jax_bptt.check import relative_error


def _problem():
    params = jb.init_model(jax.random.key(0), "gru", 3, 4, 2, num_layers=2, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (6, 2, 3), jnp.float64)
    return params, xs


def _loss(params, xs, mode):
    outputs, finals = jb.unroll(params, xs, cell="gru", mode=mode, lengths=jnp.array([6, 3]))
    return jnp.sum(jnp.tanh(outputs)) + jnp.sum(finals[0]["fwd"] ** 2)


@pytest.mark.parametrize("mode", ["fast", "checkpointed"])
def test_hessian_vector_product_by_reverse_over_reverse(mode):
    params, xs = _problem()
    v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape, p.dtype), params)

    def hvp(mode):  # d/dp <grad L(p), v>: the gradient of a gradient
        inner = lambda p: jax.tree.reduce(  # noqa: E731
            jnp.add, jax.tree.map(jnp.vdot, jax.grad(_loss)(p, xs, mode), v)
        )
        return jax.grad(inner)(params)

    for a, b in zip(jax.tree.leaves(hvp(mode)), jax.tree.leaves(hvp("auto")), strict=True):
        assert relative_error(a, b)[1] <= 1e-10


def test_forward_mode_through_the_fast_path_is_refused():
    params, xs = _problem()
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: _loss(p, xs, "fast"), (params,), (params,))
    # the automatic mode has forward mode: jvp of the plain scan
    value, tangent = jax.jvp(lambda p: _loss(p, xs, "auto"), (params,), (params,))
    assert jnp.isfinite(tangent)
