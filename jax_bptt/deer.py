"""Parallel-in-time evaluation of a recurrence: DEER / quasi-DEER with an exact adjoint.

A scan computes ``s_t = f(s_{t-1}, x_t)`` one step after another: T sequential steps. Newton's
method on the stacked system ``s_t - f(s_{t-1}, x_t) = 0`` (all t at once) instead linearises every
step around the current guess ``s^k`` and solves the resulting *linear* recurrence

    s_t^{k+1} = A_t s_{t-1}^{k+1} + b_t,   A_t = J_t = df/ds (s_{t-1}^k, x_t),
    b_t = f(s_{t-1}^k, x_t) - A_t s_{t-1}^k,

with ``jax.lax.associative_scan`` over the pairs ``(A, b)``, ``(A2, b2) o (A1, b1) =
(A2 A1, A2 b1 + b2)``: O(log T) depth (Lim et al., ICLR 2024, "DEER"). ``method="full"`` keeps the
dense ``(S, S)`` Jacobians, O(T S^3) work and O(T S^2) memory per iteration; ``method="quasi"``
keeps only their diagonal, O(T S) (Gonzalez et al., NeurIPS 2024, "quasi-DEER"). The system is
lower block-triangular in time, so after k iterations the first k states are exact (in exact
arithmetic, for *any* A_t): at most T iterations, usually a handful when the dynamics contract.

The state is flattened per batch row to a vector of size S: ``h`` (S = H) for Elman and GRU,
``[h, c]`` (S = 2H) for the LSTM. Dimension letters as in ``jax_bptt.cells``; ``s`` is S.

Masks follow the package's masked scan (``jax_bptt.scan``): step t updates a row only where
``t < lengths[b]``; elsewhere ``A_t = I``, ``b_t = 0`` (the state is carried unchanged), so a
frozen step is solved exactly. A restart (``restart (t b)``, the state entering step t is
``h_reset``) makes that step's Jacobian zero: ``A_t = 0``, ``b_t = f(h_reset, x_t)``; the adjoint
then stops there too, and ``d h_reset`` sums the restarted steps' ``d state_{t-1}``.

The backward is a ``custom_vjp``: at the solution the adjoint is the linear recurrence
``lambda_t = dL/ds_t + A_{t+1}^T lambda_{t+1}``, one reverse associative scan with the exact
Jacobians; the parameter and input gradients are then a single ``jax.vjp`` of the step applied to
every t at once (the fast path's "weight gradients after the reverse scan", in parallel form).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import Cell, get_cell, project_inputs

Array = jax.Array
METHODS = ("quasi", "full")
# Default Newton tolerance on the relative fixed-point defect (see ``_defect``), by dtype: well
# above each dtype's rounding floor for long T, well below what a consumer of the states sees.
DEFAULT_TOL = {8: 1e-10, 4: 1e-5, 2: 1e-2}


class DeerInfo(NamedTuple):
    """How the Newton solve went (0-d arrays; inside ``jax.jit`` they are traced).

    Attributes:
      iterations: Newton iterations run (int32); 0 when the initial guess already met ``tol``.
      residual: the relative fixed-point defect of the last Newton iterate,
        ``max_tb |f(s_{t-1}, x_t) - s_t| / max(1, max_tb |s_t|)`` over the steps inside the
        lengths; NaN or inf if the iteration blew up. Reported before any fallback.
      converged: ``residual <= tol``.
      fell_back: the states came from the sequential scan instead (``not converged``).
    """

    iterations: Array
    residual: Array
    converged: Array
    fell_back: Array


class _Layout(NamedTuple):
    """How a state pytree maps to its flat ``(..., S)`` vector (static, hashable)."""

    treedef: Any
    sizes: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# The flat one-step function and its linearisations


def _flatten(state) -> Array:
    """State pytree with leaves ``(..., h_i)`` -> ``(..., S)``."""
    return jnp.concatenate(jax.tree_util.tree_leaves(state), axis=-1)


def _unflatten(flat: Array, layout: _Layout):
    splits = np.cumsum(layout.sizes)[:-1].tolist()
    return jax.tree_util.tree_unflatten(layout.treedef, jnp.split(flat, splits, axis=-1))


def _step_flat(cell: Cell, layout: _Layout, params, s_prev: Array, xp: Array) -> Array:
    """``f``: ``s_prev (..., s), xp (..., g) -> s (..., s)``, any leading dims."""
    state = _unflatten(s_prev, layout)
    hp = cell.hidden(state) @ params["W_hh"]
    return _flatten(cell.forward(params, xp, hp, state)[0])


def _linearise_full(cell, layout, params, s_prev, xp):
    """``(t b s), (t b g) -> f (t b s), J (t b s s)`` with ``J[..., i, j] = df_i / ds_prev_j``.

    jacfwd pushes S basis tangents through the step: O(S^2 G) per row and step, the price of
    the dense Jacobian that both ``method="full"`` and the exact adjoint need.
    """

    def row(s, x):
        out = _step_flat(cell, layout, params, s, x)
        return out, out

    jac, out = jax.vmap(jax.vmap(jax.jacfwd(row, has_aux=True)))(s_prev, xp)
    return out, jac


def _linearise_diag(cell, layout, params, s_prev, xp):
    """``(t b s), (t b g) -> f (t b s), diag J (t b s)``: the exact diagonal in O(S G) per row.

    ``jacfwd`` then ``diag`` would cost O(S^2 G) and memory O(S^2), which is what quasi-DEER is
    meant to avoid. The ``Cell`` contract makes ``forward`` pointwise in the hidden unit (unit i's
    outputs read only unit i of ``state_prev`` and the columns ``g*H + i`` of ``hp``), and
    ``hidden`` selects the h part of the state. So the diagonal entry for unit i of state leaf l
    is one JVP with tangent "ones on leaf l" into ``state_prev`` and, into ``hp``, only unit i's
    *own* contribution ``dh_i * W_hh[i, g*H + i]`` (the diagonal of each gate block), never the
    full ``dh @ W_hh`` that would mix in the off-diagonal units. One JVP per state leaf (1, or 2
    for the LSTM). For a cell that breaks the contract the diagonal would be wrong, which costs
    quasi-DEER iterations but not correctness: convergence is judged on the true ``f``.
    """
    w_hh = params["W_hh"]
    hidden_size, gates = w_hh.shape[0], cell.num_gates
    w_diag = jnp.concatenate(
        [jnp.diagonal(w_hh[:, g * hidden_size : (g + 1) * hidden_size]) for g in range(gates)]
    )
    state = _unflatten(s_prev, layout)
    hp = cell.hidden(state) @ w_hh
    leaves, treedef = jax.tree_util.tree_flatten(state)

    def forward(hp_, state_):
        return cell.forward(params, xp, hp_, state_)[0]

    diagonals = []
    for i in range(len(leaves)):
        tangent = jax.tree_util.tree_unflatten(
            treedef,
            [jnp.ones_like(a) if j == i else jnp.zeros_like(a) for j, a in enumerate(leaves)],
        )
        _, d_h = jax.jvp(cell.hidden, (state,), (tangent,))
        d_hp = jnp.concatenate([d_h] * gates, axis=-1) * w_diag
        out, d_out = jax.jvp(forward, (hp, state), (d_hp, tangent))
        diagonals.append(jax.tree_util.tree_leaves(d_out)[i])
    return _flatten(out), jnp.concatenate(diagonals, axis=-1)


# --------------------------------------------------------------------------------------------
# Linear recurrences by associative scan


def _apply(a: Array, s: Array, diag: bool) -> Array:
    return a * s if diag else (a @ s[..., None])[..., 0]


def _combine(earlier, later, diag: bool):
    a1, b1 = earlier
    a2, b2 = later
    return (a2 * a1 if diag else a2 @ a1), _apply(a2, b1, diag) + b2


def _linear_recurrence(a: Array, b: Array, s0: Array, diag: bool) -> Array:
    """``s_t = a_t s_{t-1} + b_t`` for all t: ``a (t b s s)`` or ``(t b s)``, ``b (t b s)``.

    ``s0`` is folded into ``b_0``, so the scan's b-part is the answer and its A-part (the prefix
    products) is only needed inside the combine.
    """
    b = b.at[0].add(_apply(a[0], s0, diag))
    _, states = jax.lax.associative_scan(functools.partial(_combine, diag=diag), (a, b))
    return states


def _previous(s0: Array, states: Array) -> Array:
    """``(b s), (t b s) -> (t b s)``: the state each step starts from."""
    return jnp.concatenate([s0[None], states[:-1]], axis=0)


def _entering(s0: Array, states: Array, restart, s_reset) -> Array:
    """The state each step starts from: ``_previous``, or ``s_reset (b s)`` where it restarts."""
    prev = _previous(s0, states)
    return prev if restart is None else jnp.where(restart[..., None], s_reset, prev)


def _transition(jac: Array, restart, mask: Array, diag: bool) -> Array:
    """``A_t``: ``jac`` (dense or diagonal) inside the lengths, ``I`` at frozen steps, and 0 at a
    restarted step inside its length."""
    expand = (..., None) if diag else (..., None, None)
    a = jnp.where(mask[expand], jac, 1.0 if diag else jnp.eye(jac.shape[-1], dtype=jac.dtype))
    return a if restart is None else jnp.where((restart & mask)[expand], 0.0, a)


def _defect(s0, states, f_prev, mask) -> Array:
    """Relative fixed-point defect ``max |f(s_{t-1}) - s_t| / max(1, max |s_t|)``.

    Frozen steps should equal their previous state; that holds exactly by construction (A = I,
    b = 0), so they are compared against it rather than against ``f``.
    """
    target = jnp.where(mask[..., None], f_prev, _previous(s0, states))
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(states)))
    return jnp.max(jnp.abs(target - states)) / scale


def _sequential(cell, layout, params, xp, s0, mask, restart=None, s_reset=None) -> Array:
    """The reference and fallback: a plain masked ``lax.scan``, ``(t b s)`` states."""

    def body(s, inputs):
        xp_t, mask_t, restart_t = inputs
        prev = s if restart_t is None else jnp.where(restart_t[:, None], s_reset, s)
        s = jnp.where(mask_t[:, None], _step_flat(cell, layout, params, prev, xp_t), s)
        return s, s

    return jax.lax.scan(body, s0, (xp, mask, restart))[1]


# --------------------------------------------------------------------------------------------
# The solve (forward) and its adjoint (backward)


def _newton(cell, layout, method, params, xs, s0, mask, init, controls, restart=None, s_reset=None):
    """Damped (quasi-)Newton on all steps at once, then the sequential scan if it failed.

    Damping: ``A_t = (1 - damping) J_t`` (or its diagonal) inside the lengths (frozen steps
    keep ``A_t = I``), with ``b_t = f(s^k_{t-1}) - A_t s^k_{t-1}`` built from that same A_t.
    Every choice of A_t has the same fixed point (the true states) and the same "first k states
    exact after k iterations" property, so damping never changes the answer or the T-iteration
    bound. What it changes is the growth of the prefix products ``A_t ... A_1`` inside the
    scan: they shrink by ``(1 - damping)^t``, so where the Jacobian products grow like
    ``exp(lambda t)`` (Lyapunov exponent lambda > 0) a damping with ``(1 - damping) exp(lambda)
    < 1`` keeps them bounded, at the price of Newton's fast local convergence. ``damping -> 1``
    is the Jacobi iteration (A = 0, ``s_t^{k+1} = f(s_{t-1}^k)``: one exact step per
    iteration). This is the part of ELK (Gonzalez et al. 2024) that matters for overflow, the
    Kalman filter's ``(1 - K) A`` with a fixed gain ``K = damping``, without its pull towards
    the previous iterate (which would break the T-iteration bound); it is not ELK's
    trust-region Kalman smoother.
    """
    tol, max_iters, damping = controls  # traced: changing them does not recompile
    diag = method == "quasi"
    xp = project_inputs(params, xs)

    def evaluate(states):
        """``f`` at every step's start, plus what the next solve needs of the linearisation.

        quasi: the diagonal comes with ``f`` from the same JVP, so it is computed here once and
        carried to the next iteration (one linearisation per iteration, no separate ``f``).
        full: only ``f``; the dense Jacobian (S tangents) is built in the iteration that uses
        it, so a converged iterate never pays for one.
        """
        s_prev = _entering(s0, states, restart, s_reset)
        if diag:
            return _linearise_diag(cell, layout, params, s_prev, xp)
        return _step_flat(cell, layout, params, s_prev, xp), None

    def body(carry):
        iteration, states, f_prev, jac, _ = carry
        s_prev = _entering(s0, states, restart, s_reset)
        if not diag:
            _, jac = _linearise_full(cell, layout, params, s_prev, xp)
        # a restart's A_t is 0, so its b_t is f(s_reset, x_t) itself
        a = _transition((1.0 - damping) * jac, restart, mask, diag)
        b = jnp.where(mask[..., None], f_prev - _apply(a, s_prev, diag), 0.0)
        states = _linear_recurrence(a, b, s0, diag)
        f_prev, jac = evaluate(states)
        return iteration + 1, states, f_prev, jac, _defect(s0, states, f_prev, mask)

    def keep_going(carry):
        iteration, *_, residual = carry
        # ``~(r <= tol)`` rather than ``r > tol``: a NaN residual must not read as converged,
        # and a non-finite one stops the loop (more iterations cannot repair an overflow).
        return (iteration < max_iters) & ~(residual <= tol) & jnp.isfinite(residual)

    f_prev, jac = evaluate(init)
    start = (jnp.int32(0), init, f_prev, jac, _defect(s0, init, f_prev, mask))
    iterations, states, *_, residual = jax.lax.while_loop(keep_going, body, start)
    converged = residual <= tol
    states = jax.lax.cond(
        converged,
        lambda: states,
        lambda: _sequential(cell, layout, params, xp, s0, mask, restart, s_reset),
    )
    return states, DeerInfo(iterations, residual, converged, ~converged)


_solve = jax.custom_vjp(_newton, nondiff_argnums=(0, 1, 2))


def _solve_fwd(
    cell, layout, method, params, xs, s0, mask, init, controls, restart=None, s_reset=None
):
    states, info = _newton(
        cell, layout, method, params, xs, s0, mask, init, controls, restart, s_reset
    )
    return (states, info), (params, xs, s0, mask, states, init, restart, s_reset)


def _solve_bwd(cell, layout, method, residuals, cotangents):
    """Adjoint at the solution, with the exact Jacobians whatever ``method`` the forward used.

    ``lambda_t = g_t + A_{t+1}^T lambda_{t+1}`` (``A = J`` inside the lengths, ``I`` at frozen
    steps, which pass the cotangent through untouched), solved as one associative scan run
    backwards in time. A step inside its length then sends ``lambda_t`` into ``f``: a single
    ``jax.vjp`` of the step over all (t, b) at once gives the summed parameter gradients, the
    input gradients and ``d s0 = J_0^T lambda_0``.
    """
    del method  # the adjoint does not depend on how the states were found
    params, xs, s0, mask, states, init, restart, s_reset = residuals
    g_states, _ = cotangents  # DeerInfo carries no gradient
    s_prev = _entering(s0, states, restart, s_reset)
    _, jac = _linearise_full(cell, layout, params, s_prev, project_inputs(params, xs))
    a = _transition(jac, restart, mask, diag=False)
    # Reversed time u = T-1-t: lambda_u = A_{t+1}^T lambda_{u-1} + g_u; the u = 0 matrix
    # multiplies the zero start, so any value does.
    a_rev = jnp.concatenate([jnp.zeros_like(a[:1]), jnp.swapaxes(a[1:], -1, -2)[::-1]], axis=0)
    adjoint = _linear_recurrence(a_rev, g_states[::-1], jnp.zeros_like(s0), diag=False)[::-1]
    into_step = jnp.where(mask[..., None], adjoint, 0.0)

    def step_all(params_, xs_, s_prev_):
        return _step_flat(cell, layout, params_, s_prev_, project_inputs(params_, xs_))

    _, vjp = jax.vjp(step_all, params, xs, s_prev)
    d_params, d_xs, d_prev = vjp(into_step)
    d_s_reset = None
    into_s0 = d_prev[0]
    if restart is not None:  # d_prev is 0 at frozen steps (into_step is): restarts inside count
        into_s0 = jnp.where(restart[0][:, None], 0.0, into_s0)
        d_s_reset = jnp.where(restart[..., None], d_prev, 0.0).sum(0)
    d_s0 = jnp.where(mask[0][:, None], into_s0, adjoint[0])
    # No gradient flows to the mask, the restarts, the warm start (the solution does not depend
    # on it) or the solver's controls.
    return d_params, d_xs, d_s0, None, jnp.zeros_like(init), (None, None, None), None, d_s_reset


_solve.defvjp(_solve_fwd, _solve_bwd)
_solve_jit = jax.jit(_solve, static_argnums=(0, 1, 2))


# --------------------------------------------------------------------------------------------
# Input checks (shapes and options are static: they run before any work, also under jit)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_options(method, tol, max_iters, damping, reverse) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tol is not None:
        if not _is_real(tol):
            raise TypeError(f"tol must be a float or None, got {type(tol).__name__}")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a finite float > 0, got {tol!r}")
    if max_iters is not None:
        if not isinstance(max_iters, numbers.Integral) or isinstance(max_iters, bool):
            raise TypeError(f"max_iters must be an int or None, got {type(max_iters).__name__}")
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters!r}")
    if not _is_real(damping):
        raise TypeError(f"damping must be a float in [0, 1), got {type(damping).__name__}")
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")


def _shape_of(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def _check_arrays(cell: Cell, params, xs, h0, lengths) -> tuple[_Layout, int, int]:
    """Validate params, ``xs (T, B, D)``, ``h0`` and ``lengths``; return the layout, T, B."""
    if not isinstance(params, dict) or not all(
        getattr(params.get(k), "ndim", None) == 2 for k in ("W_xh", "W_hh")
    ):
        raise TypeError(
            f"params must be a dict of cell {cell.name!r}'s params with 2-D 'W_xh' (D, G*H) and "
            f"'W_hh' (H, G*H), got {type(params).__name__}"
        )
    w_xh, w_hh = params["W_xh"], params["W_hh"]
    input_size, hidden_size, dtype = w_xh.shape[0], w_hh.shape[0], w_hh.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"params must be floating point, got W_hh dtype {dtype}")
    expected = jax.eval_shape(
        lambda key: cell.init(key, input_size, hidden_size, dtype), jax.random.key(0)
    )
    for name, want in expected.items():
        leaf = params.get(name)
        if getattr(leaf, "shape", None) != want.shape or leaf.dtype != want.dtype:
            raise ValueError(
                f"params[{name!r}] must be {want.dtype} with shape {want.shape} for cell "
                f"{cell.name!r} (D={input_size}, H={hidden_size}), got {_shape_of(leaf)}"
            )
    if set(params) != set(expected):
        raise ValueError(
            f"params must have exactly the leaves {sorted(expected)}, got {sorted(params)}"
        )
    if not hasattr(xs, "shape") or xs.ndim != 3 or xs.shape[2] != input_size:
        raise ValueError(f"xs must have shape (T, B, D={input_size}), got {_shape_of(xs)}")
    if xs.dtype != dtype:
        raise TypeError(f"xs must have the params' dtype {dtype}, got {xs.dtype}")
    steps, batch = xs.shape[:2]
    want = cell.zero_state((batch,), hidden_size, dtype)
    want_leaves, want_def = jax.tree_util.tree_flatten(want)
    got_leaves, got_def = jax.tree_util.tree_flatten(h0)
    if got_def != want_def or any(
        getattr(g, "shape", None) != w.shape or g.dtype != w.dtype
        for g, w in zip(got_leaves, want_leaves, strict=True)
    ):
        raise ValueError(
            f"h0 must be cell {cell.name!r}'s state with {dtype} leaves of shape (B={batch}, "
            f"H={hidden_size}) like {want_def}, got {jax.tree_util.tree_map(_shape_of, h0)}"
        )
    if lengths is not None:
        if not hasattr(lengths, "shape") or lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape (B={batch},), got {_shape_of(lengths)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"lengths must be integers, got {lengths.dtype}")
        if not isinstance(lengths, jax.core.Tracer):
            values = np.asarray(lengths)
            if values.size and (values.min() < 0 or values.max() > steps):
                raise ValueError(f"lengths must lie in [0, T={steps}], got {values.tolist()}")
    return _Layout(want_def, tuple(a.shape[-1] for a in want_leaves)), steps, batch


def _time_mask(lengths, steps: int, batch: int) -> Array:
    """``(t b)`` bool, True where step t is inside row b's sequence (``t < length``)."""
    if lengths is None:
        return jnp.ones((steps, batch), bool)
    return jnp.arange(steps)[:, None] < lengths[None, :]


# --------------------------------------------------------------------------------------------
# Public API


def deer_unroll(
    cell,
    params,
    xs,
    h0,
    lengths=None,
    *,
    reverse=False,
    method="quasi",
    tol=None,
    max_iters=None,
    damping=0.0,
    init_states=None,
    restart=None,
    h_reset=None,
    all_states=False,
):
    """Run a cell over a sequence by parallel-in-time Newton (DEER / quasi-DEER).

    Same numbers as the sequential masked scan (``jax_bptt.unroll``), computed by Newton on all T
    steps at once; if Newton has not met ``tol`` after ``max_iters`` iterations (or blew up), the
    states come from the sequential ``lax.scan`` instead, and ``info.fell_back`` says so.
    ``jax.grad`` through it is exact (w.r.t. params, xs and h0): the backward is the adjoint at the
    solution, solved by a reverse associative scan with the *full* Jacobians in either method
    (``method`` only chooses the forward iteration), so it costs O(T B S^2) memory and O(T B S^3)
    work even for ``"quasi"``. It is exact whether or not the forward fell back.

    Args:
      cell: a name in ``jax_bptt.cells.CELLS`` or a ``Cell`` (forward pointwise per unit).
      params: the cell's params: ``W_xh (D, G*H)``, ``W_hh (H, G*H)``, ``b_h`` (GRU: ``b_hn``).
      xs: ``(T, B, D)`` inputs, time-major, the params' dtype.
      h0: initial state, leaves ``(B, H)`` (``(h, c)`` for the LSTM).
      lengths: ``(B,)`` ints in ``[0, T]``; a row updates only at steps ``t < length``.
      reverse: scan from step T-1 down to 0 (same mask), like ``unroll(..., reverse=True)``.
      method: ``"quasi"`` (diagonal Jacobians, O(T S) per iteration) or ``"full"`` (dense,
        O(T S^3) work, O(T S^2) memory per iteration, fewer iterations).
      tol: Newton stops when the relative fixed-point defect (``DeerInfo.residual``) is
        ``<= tol``; default 1e-10 for float64, 1e-5 for float32.
      max_iters: Newton iteration cap, default T (exact after T iterations in exact arithmetic).
      damping: in ``[0, 1)``; Newton uses ``(1 - damping) J`` for stability where Jacobian
        products grow (see ``_newton``); 0 is plain (quasi-)DEER. Never changes the answer.
      init_states: warm start, a state pytree with leaves ``(T, B, H)`` in the caller's time
        order (e.g. the previous training step's states); default ``h0`` at every step.
      restart: ``(T, B)`` bool or None: where set, the state entering step t (in the scan's
        order; with ``reverse`` the one after step t + 1) is ``h_reset`` (default ``h0``), and no
        gradient crosses (``jax_bptt.scan.restart_mask`` turns segment starts into this).
      all_states: return every step's whole state (h0's structure, leaves ``(T, B, H)``, zero
        where ``t >= length``) in place of ``hs``.

    Returns:
      ``(hs, final_state, info)``: ``hs (T, B, H)`` the hidden part of each step's state, zero
      where ``t >= length``; ``final_state`` the state after the scan's last step (after step 0
      with ``reverse``); ``info`` a ``DeerInfo``.

    Example:
      >>> params = cells.GRU.init(jax.random.key(0), 3, 8, jnp.float32)
      >>> xs, h0 = jnp.ones((64, 4, 3)), jnp.zeros((4, 8))
      >>> hs, h_T, info = deer_unroll("gru", params, xs, h0)
      >>> hs.shape, bool(info.converged)
      ((64, 4, 8), True)
    """
    cell = get_cell(cell)
    _check_options(method, tol, max_iters, damping, reverse)
    layout, steps, batch = _check_arrays(cell, params, xs, h0, lengths)
    dtype = params["W_hh"].dtype
    if restart is not None and (
        getattr(restart, "shape", None) != (steps, batch) or restart.dtype != jnp.bool_
    ):
        raise ValueError(
            f"restart must be bool of shape (T={steps}, B={batch}), got {_shape_of(restart)} "
            f"{getattr(restart, 'dtype', '')}"
        )
    if init_states is not None and (
        jax.tree_util.tree_structure(init_states) != layout.treedef
        or any(
            getattr(a, "shape", None) != (steps, *w.shape) or a.dtype != dtype
            for a, w in zip(*map(jax.tree_util.tree_leaves, (init_states, h0)), strict=True)
        )
    ):
        got = jax.tree_util.tree_map(_shape_of, init_states)
        raise ValueError(f"init_states must be h0's structure with leaves (T, B, H), got {got}")
    if steps == 0:
        info = DeerInfo(jnp.int32(0), jnp.zeros((), dtype), jnp.bool_(True), jnp.bool_(False))
        hs = jnp.zeros((0, batch, params["W_hh"].shape[0]), dtype)
        if all_states:
            hs = jax.tree_util.tree_map(lambda a: jnp.zeros((0, *a.shape), dtype), h0)
        return hs, h0, info
    tol = DEFAULT_TOL.get(jnp.dtype(dtype).itemsize, 1e-5) if tol is None else float(tol)
    max_iters = steps if max_iters is None else int(max_iters)

    mask = _time_mask(lengths, steps, batch)
    s0 = _flatten(h0)
    init = (
        jnp.broadcast_to(s0, (steps, *s0.shape)) if init_states is None else _flatten(init_states)
    )
    s_reset = None if restart is None else _flatten(h0 if h_reset is None else h_reset)
    if reverse:  # solve in scan order; the flips are linear and differentiate for free
        xs, mask, init = xs[::-1], mask[::-1], init[::-1]
        restart = None if restart is None else restart[::-1]
    controls = (jnp.asarray(tol, dtype), jnp.int32(max_iters), jnp.asarray(damping, dtype))
    states, info = _solve_jit(
        cell, layout, method, params, xs, s0, mask, init, controls, restart, s_reset
    )
    stacked = _unflatten(states, layout)
    hs = jax.tree_util.tree_map(
        lambda a: jnp.where(mask[..., None], a, 0.0)[:: -1 if reverse else 1],
        stacked if all_states else cell.hidden(stacked),
    )
    final = _unflatten(states[-1], layout)
    return hs, final, info


def lyapunov_exponent(cell, params, xs, h0, lengths=None) -> Array:
    """Largest Lyapunov exponent of the trajectory, per step (a diagnostic, float scalar).

    Runs the sequential masked scan and carries one tangent vector per row alongside it:
    ``v_t = J_t v_{t-1} / ||J_t v_{t-1}||`` (a JVP of the step, renormalised every step: the
    one-vector case of the QR method of Benettin et al. 1980), and returns
    ``sum_{b, t < length_b} log ||J_t v_{t-1}|| / sum_b length_b``, the rows' growth rates
    pooled by length. ``v_0`` is a fixed pseudo-random unit vector per row (key 0), so the number
    is deterministic; for a finite T it includes the transient of aligning ``v`` with the top
    direction. Negative: perturbations die out (Newton / DEER converge in few iterations);
    positive: chaos, where errors grow like ``exp(lambda t)`` and parallel-in-time Newton needs
    up to T iterations. For ``h_t = h_{t-1} (a Q)`` with Q orthogonal it is ``log a``.

    Args:
      cell, params, xs, h0, lengths: as in ``deer_unroll``; ``xs (T, B, D)`` with ``T >= 1``.

    Returns:
      A 0-d array in the params' dtype (nats per step).
    """
    cell = get_cell(cell)
    layout, steps, batch = _check_arrays(cell, params, xs, h0, lengths)
    if steps == 0:
        raise ValueError("xs must have at least one step (T >= 1) for a Lyapunov exponent")
    if lengths is not None and not isinstance(lengths, jax.core.Tracer) and not np.any(lengths):
        raise ValueError("lengths are all 0: no step to measure a Lyapunov exponent on")
    return _lyapunov_jit(cell, layout, params, xs, _flatten(h0), _time_mask(lengths, steps, batch))


def _lyapunov(cell, layout, params, xs, s0, mask):
    xp = project_inputs(params, xs)
    tangent = jax.random.normal(jax.random.key(0), s0.shape, s0.dtype)
    tangent = tangent / jnp.linalg.norm(tangent, axis=-1, keepdims=True)

    def body(carry, inputs):
        s, v = carry
        xp_t, mask_t = inputs
        s_new, v_new = jax.jvp(lambda s_: _step_flat(cell, layout, params, s_, xp_t), (s,), (v,))
        growth = jnp.linalg.norm(v_new, axis=-1)
        keep = mask_t[:, None]
        carry = (jnp.where(keep, s_new, s), jnp.where(keep, v_new / growth[:, None], v))
        return carry, jnp.where(mask_t, jnp.log(growth), 0.0)

    _, logs = jax.lax.scan(body, (s0, tangent), (xp, mask))
    return jnp.sum(logs) / jnp.sum(mask)


_lyapunov_jit = jax.jit(_lyapunov, static_argnums=(0, 1))
