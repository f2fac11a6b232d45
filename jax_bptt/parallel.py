"""Data-parallel training on JAX's own SPMD partitioner (``jax.sharding``), and multi-host helpers.

Data parallelism. A 1-D device mesh with one axis, ``"batch"``. Every input is split along its
batch axis, params and optimizer state are replicated, and the jitted train step of
``jax_bptt.train.make_train_step`` runs unchanged: ``jax.jit`` sees committed, sharded arguments,
XLA's partitioner splits the computation by batch rows, and every contraction over the batch
(``dW_hh = sum_tb h_{t-1}^T d hp_t``, the readout's, the loss's sum) becomes a per-device partial
sum followed by an all-reduce that XLA inserts. Nothing in the model code knows about devices::

    params = jax_bptt.init_model(jax.random.key(0), "lstm", D, H, O, num_layers=2)
    opt = make_optimizer("adam", 1e-3)
    mesh = make_mesh()                                   # all devices, axis "batch"
    train_step = make_train_step(opt, cell="lstm", loss="mse", mode="manual")
    step = data_parallel_step(train_step, mesh)          # placement="per_step", as the loss's
    params, opt_state, info = step(params, opt.init(params), xs, targets)   # B % n == 0
    # xs (T, B, D), targets (T, B, O); h0 (optional) [{"fwd": state}, ...], one dict per layer

``data_parallel_step`` only places the arguments (``shard_batch``, ``replicate``) and pins the
outputs' shardings (params replicated, a truncated-BPTT carry batch-sharded) so that they feed the
next step without a copy; passing sharded arguments to the bare ``train_step`` gives the same
numbers. ``fit(data_parallel_step(train_step, mesh), ...)`` needs no other change. Any mode of
``jax_bptt.BPTT_MODES``, any depth and direction (with dropout and residual connections) and
truncated BPTT work, because the partitioner sees only the traced program.

Layout rule (``batch_dims``): where the batch axis is, per train-step argument.

    xs        (T, B, D)                          P(None, "batch")
    targets   per_step (T, B) / (T, B, O)        P(None, "batch")
              last_step (B,) / (B, O)            P("batch")
    lengths   (B,)                               P("batch")
    resets    (T, B)                             P(None, "batch")
    h0        state leaves (B, H), in the list   P("batch")
              of per-layer {"fwd", "bwd"?} dicts
    params, optimizer state                      P()  (replicated)

The targets' layout cannot be told from their shape ((T, B) per-step ids and (B, O) last-step
values are both 2-D), hence the explicit ``placement`` argument (the train step's
``Loss.placement``; a ``Loss`` itself is accepted too). A layout never changes the numbers, only
where they are computed: results equal the single-device ones up to the order of the batch sums
(``tests/test_parallel.py``: float64 loss and params after three Adam steps within 1e-12 relative
on 1, 2, 4 and 8 devices; every mode, a stacked bidirectional model with dropout and residual
connections, and truncated BPTT at one and two layers, on 8).

The fast path's chunked backward on a CPU mesh. On CPU the fast backward runs in chunks of about
2 MiB of ``d xp`` (``jax_bptt.backends.PLATFORM_DEFAULTS``) and carries the summed weight
gradients from chunk to chunk; XLA keeps that carry replicated, so it all-reduces the weight
gradients once per chunk instead of once per train step. The numbers are the same; to keep the
backward in one chunk (one all-reduce), build the step with
``make_train_step(..., options=ScanOptions(chunk_bytes=0))``. GPUs and TPUs run one chunk anyway.

Batch not divisible by the device count: ``shard_batch`` raises a ``ValueError`` naming the batch
size and the device count. ``pad_batch`` is the opt-in alternative for full-sequence training: it
appends zero rows with ``lengths = 0``; such a row has no loss term under either placement, so
the loss (``reduction="mean"`` divides by the number of counted terms) and every gradient equal
the unpadded ones. It does not apply to truncated BPTT, whose train step takes no ``lengths``:
there the number of streams must be a multiple of the device count.

Mesh axis type. ``jax.make_mesh`` (in jax 0.10.2) makes ``AxisType.Explicit`` axes by default, which
turn on sharding-in-types: every op must have an unambiguous output sharding, and the library's
unannotated code fails there (``einsum("tbh,tbo->ho")`` contracts a sharded axis; a scan carry
created unsharded meets a sharded one). ``make_mesh`` therefore asks for ``AxisType.Auto``: the
partitioner propagates the input shardings and inserts the collectives itself.

Tensor parallelism over H (not provided). Sharding ``W_hh``'s columns across a second mesh axis,
``P(None, "model")`` (with ``W_xh`` and ``b_h`` alike), is only an annotation, and XLA partitions
it correctly (the loss and gradient norm equal the unsharded step's to float32 round-off:
``experiments/scaling.py --tp``), but it puts collectives on the serial critical path of every
time step. The compiled LSTM train step has 11, 19 and 23 collectives inside its forward and
backward loop bodies (so per time step) on 2, 4 and 8 model shards, against none per time step
and one combined gradient all-reduce per train step for data parallelism
(``experiments/results/scaling_cpu.txt``): ``h`` must be all-gathered before every
``h @ W_hh``, ``d hp @ W_hh^T`` all-reduced in every backward step, and the gate-blocked column
layout (``[i|f|g|o]``) puts different gates of one hidden unit on different devices, which costs
collective-permutes on top. These are ~2T latency-bound collectives per train step; they pay only
when ``h @ W_hh`` per step dwarfs a collective's latency (H in the many thousands) or ``W_hh``
does not fit one device. A clean version needs a gate-interleaved parameter layout and a
``shard_map``-ped recurrence; it is not done here.

Multi-host (multi-controller JAX). Each process runs the same program on its own devices:

1. ``maybe_initialize_distributed()`` first thing (before any JAX computation): it calls
   ``jax.distributed.initialize`` when ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID`` are set, or under a multi-task Slurm or Open MPI launch (which jax
   auto-detects), and does nothing in a single process. jax 0.10.2 itself reads only
   ``JAX_COORDINATOR_ADDRESS`` (and ``JAX_COORDINATOR_PORT``, ``JAX_LOCAL_DEVICE_IDS``) from the
   environment; the process count and id come from this helper or from the cluster manager.
2. ``mesh = make_mesh()`` spans the devices of all processes.
3. Either every process builds the same global batch (e.g. ``fit``'s ``batch_fn`` is
   deterministic in its key) and passes it to the step as host (NumPy) arrays, which
   ``jax.device_put`` splits, checking that all processes agree; or each process loads only its
   rows, ``process_batch_slice(global_batch, jax.process_index(), jax.process_count())`` or its
   own loader, and ``make_global_batch(local_batch, mesh)`` assembles the global arrays with
   ``jax.make_array_from_process_local_data``; the step then leaves them where they are.
4. Replicated values (loss, params, optimizer state) are readable on every process; a
   batch-sharded one (a truncated-BPTT carry) is not, and needs
   ``jax.experimental.multihost_utils.process_allgather`` before it is printed or saved (so
   ``fit``'s checkpoints of a carry are single-process only for now).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_bptt.losses import PLACEMENTS, Loss
from jax_bptt.validation import check_choice, check_positive_int

BATCH_AXIS = "batch"
# jax.distributed.initialize's explicit arguments, read from these variables.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# --------------------------------------------------------------------------------------------
# Mesh and placement


def make_mesh(num_devices: int | None = None, axis_name: str = BATCH_AXIS, *, devices=None) -> Mesh:
    """A 1-D ``Mesh`` of ``num_devices`` devices (default all) with one ``Auto`` axis.

    Args:
      num_devices: how many of ``devices`` (default ``jax.devices()``, every process's) to use.
      axis_name: the mesh axis the batch is split over.
      devices: the devices to choose from.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(devices)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int):
        raise TypeError(f"num_devices must be an int or None, got {num_devices!r}")
    if not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"num_devices must be in [1, {len(devices)}] (the devices available), got {num_devices}"
        )
    # Auto, not make_mesh's default Explicit: see the module docstring.
    return jax.make_mesh(
        (num_devices,), (axis_name,), axis_types=(AxisType.Auto,), devices=devices[:num_devices]
    )


def _axis_of(mesh: Mesh, axis_name: str | None) -> str:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axis_name = mesh.axis_names[0] if axis_name is None else axis_name
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    return axis_name


def batch_dims(placement: str | Loss = "per_step") -> dict[str, int]:
    """Train-step argument name -> the position of its batch axis (the layout rule).

    ``placement``: the loss's placement, ``"per_step"`` or ``"last_step"`` (or the ``Loss``).
    """
    if isinstance(placement, Loss):
        placement = placement.placement
    check_choice("placement", placement, PLACEMENTS)
    targets = 1 if placement == "per_step" else 0
    return {"xs": 1, "targets": targets, "lengths": 0, "h0": 0, "resets": 1}


def batch_sharding(mesh: Mesh, batch_dim: int, axis_name: str | None = None) -> NamedSharding:
    """``NamedSharding`` splitting array axis ``batch_dim`` over the mesh axis, e.g.
    ``P(None, "batch")`` for ``batch_dim=1``."""
    axis_name = _axis_of(mesh, axis_name)
    return NamedSharding(mesh, P(*([None] * batch_dim), axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def _put(x, sharding):
    # Skip arrays already placed: cheap, and needed for global arrays that span other processes.
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    return jax.device_put(x, sharding)


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` (params, optimizer state) copied to all devices of ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


def check_divisible(batch: Mapping[str, Any], num_devices: int, *, placement="per_step") -> int:
    """The batch size ``B``, after checking that ``batch`` is a dict of train-step arguments whose
    every array has the same batch size, a multiple of ``num_devices``."""
    dims = batch_dims(placement)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of train-step arguments, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(dims))
    if unknown:
        raise ValueError(f"batch keys must be among {sorted(dims)}, got unknown keys {unknown}")
    sizes = set()
    for name, value in batch.items():
        for leaf in jax.tree_util.tree_leaves(value):
            shape = np.shape(leaf)
            if len(shape) <= dims[name]:
                raise ValueError(
                    f"{name} must have its batch axis at position {dims[name]} "
                    f"(placement={placement!r}), got shape {shape}"
                )
            sizes.add((name, shape[dims[name]]))
    batch_sizes = {size for _, size in sizes}
    if len(batch_sizes) > 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
    if not batch_sizes:
        raise ValueError("batch holds no arrays")
    (batch_size,) = batch_sizes
    if batch_size % num_devices:
        raise ValueError(
            f"batch size B={batch_size} is not divisible by the {num_devices} devices of the "
            f"mesh; use a multiple of {num_devices}, or pad_batch(batch, {num_devices}) to add "
            "masked rows (full-sequence training only)"
        )
    return batch_size


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, placement="per_step", axis_name=None):
    """Split a dict of train-step arguments (``xs``, ``targets``, ``h0``, ``lengths``; None values
    pass through) along their batch axes over the mesh (see ``batch_dims``); returns a dict.

    Raises:
      ValueError: the batch size is not a multiple of the mesh axis size.
    """
    axis_name = _axis_of(mesh, axis_name)
    check_divisible(batch, mesh.shape[axis_name], placement=placement)
    return _map_batch(
        lambda x, dim: _put(x, batch_sharding(mesh, dim, axis_name)), batch, placement
    )


def _map_batch(fn, batch: Mapping[str, Any], placement) -> dict:
    """``fn(leaf, batch_dim)`` on every leaf of a train-step batch dict."""
    dims = batch_dims(placement)
    return {
        name: jax.tree_util.tree_map(functools.partial(fn, dim=dims[name]), value)
        for name, value in batch.items()
    }


def pad_batch(batch: Mapping[str, Any], multiple: int, *, placement: str = "per_step") -> dict:
    """Pad the batch to a multiple of ``multiple`` rows with zero rows of length 0.

    ``lengths`` is added (``T`` for the real rows) when absent. A length-0 row has no loss term,
    so with either reduction the loss and gradients equal the unpadded batch's (not for
    truncated BPTT, which takes no ``lengths``). Returns the padded dict.
    """
    multiple = check_positive_int("multiple", multiple)
    if batch.get("xs") is None:
        raise ValueError("pad_batch needs batch['xs'] (T, B, D) to know T and B")
    batch_size = check_divisible(batch, 1, placement=placement)
    num_steps = np.shape(batch["xs"])[0]
    padding = -batch_size % multiple
    # NumPy in, NumPy out: host data stays on the host until shard_batch places it.
    xp = np if isinstance(batch["xs"], np.ndarray) else jnp
    lengths = batch.get("lengths")
    if lengths is None:
        lengths = xp.full((batch_size,), num_steps, np.int32)
    if padding == 0:
        return {**batch, "lengths": lengths}

    def pad(x, dim):
        widths = [(0, 0)] * np.ndim(x)
        widths[dim] = (0, padding)
        return xp.pad(x, widths)  # zeros: finite inputs, valid class id 0

    padded = _map_batch(pad, {k: v for k, v in batch.items() if k != "lengths"}, placement)
    padded["lengths"] = pad(lengths, 0)  # the new rows get length 0: no loss, no gradient
    return padded


# --------------------------------------------------------------------------------------------
# The data-parallel train step


def data_parallel_step(
    train_step: Callable, mesh: Mesh, *, placement="per_step", axis_name=None
) -> Callable:
    """Run a ``make_train_step`` step data-parallel over ``mesh``; same call signature.

    ``step(params, opt_state, xs, targets, h0=None, lengths=None, key=None) -> (params,
    opt_state, StepInfo)``: the batch arguments are split with ``shard_batch`` (``placement``
    must be the train step's ``Loss.placement``, or pass that ``Loss``), params, optimizer state
    and the dropout ``key`` replicated (no copy when already placed), and the unchanged
    ``train_step`` is traced inside a ``jax.jit`` whose outputs are constrained to params and
    optimizer state replicated and ``StepInfo.carry`` (a truncated-BPTT state, one
    ``{"fwd": state}`` per layer) batch-sharded. ``resets=`` (segment starts) is split like ``xs``.

    Example:
      >>> step = data_parallel_step(make_train_step(opt, cell="gru", loss="mse"), make_mesh())
      >>> params, opt_state, info = step(params, opt.init(params), xs, targets)
    """
    axis_name = _axis_of(mesh, axis_name)
    batch_dims(placement)  # validates placement now
    replicated_sharding = replicated(mesh)
    state_sharding = batch_sharding(mesh, 0, axis_name)

    @jax.jit
    def sharded_step(params, opt_state, batch, key=None):
        extra = {} if key is None else {"key": key}  # the dropout key of deep models
        params, opt_state, info = train_step(params, opt_state, **batch, **extra)
        constrain = jax.lax.with_sharding_constraint
        params = constrain(params, replicated_sharding)
        opt_state = constrain(opt_state, replicated_sharding)
        if info.carry is not None:
            info = info._replace(carry=constrain(info.carry, state_sharding))
        return params, opt_state, info

    def step(params, opt_state, xs, targets, h0=None, lengths=None, key=None, resets=None):
        batch = {"xs": xs, "targets": targets, "h0": h0, "lengths": lengths, "resets": resets}
        batch = {name: value for name, value in batch.items() if value is not None}
        batch = shard_batch(batch, mesh, placement=placement, axis_name=axis_name)
        key = None if key is None else replicate(key, mesh)
        return sharded_step(replicate(params, mesh), replicate(opt_state, mesh), batch, key)

    step.mesh = mesh
    step.needs_key = getattr(train_step, "needs_key", False)
    step.jitted = sharded_step  # for inspection: step.jitted.lower(params, opt_state, batch)
    return step


# --------------------------------------------------------------------------------------------
# Multi-host


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {environ[name]!r}") from None


def _cluster_processes(environ: Mapping[str, str]) -> int:
    """Process count of a Slurm or Open MPI launch that jax auto-detects, else 1."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(name in environ for name in slurm):
        return _env_int(environ, "SLURM_NTASKS")
    if "OMPI_MCA_orte_hnp_uri" in environ and "OMPI_COMM_WORLD_SIZE" in environ:
        return _env_int(environ, "OMPI_COMM_WORLD_SIZE")
    return 1


def maybe_initialize_distributed(
    environ: Mapping[str, str] | None = None, *, initialize: Callable | None = None
) -> bool:
    """Call ``jax.distributed.initialize`` when the environment describes a multi-process run.

    - ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
      ``JAX_PROCESS_ID`` all set: initialize with them (a partial set is a ``ValueError``).
    - Otherwise a Slurm (``SLURM_NTASKS > 1``) or Open MPI (``OMPI_COMM_WORLD_SIZE > 1``) launch:
      ``initialize()`` without arguments, jax's own auto-detection.
    - Otherwise (one process) nothing.

    Must run before any JAX computation; a second call does nothing. ``environ`` (default
    ``os.environ``) and ``initialize`` (default ``jax.distributed.initialize``) are parameters
    for testing. Returns whether it initialized.
    """
    environ = os.environ if environ is None else environ
    if initialize is None:
        if jax.distributed.is_initialized():
            return False
        initialize = jax.distributed.initialize
    given = [name for name in DISTRIBUTED_ENV if environ.get(name)]
    if given:
        missing = [name for name in DISTRIBUTED_ENV if name not in given]
        if missing:
            raise ValueError(
                f"multi-process JAX needs all of {DISTRIBUTED_ENV}; {given} are set but "
                f"{missing} are not"
            )
        num_processes = _env_int(environ, "JAX_NUM_PROCESSES")
        process_id = _env_int(environ, "JAX_PROCESS_ID")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES={num_processes}), "
                f"got {process_id}"
            )
        initialize(
            coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    if _cluster_processes(environ) > 1:
        initialize()
        return True
    return False


def process_batch_slice(
    global_batch: Mapping[str, Any], process_index: int, process_count: int, *, placement="per_step"
) -> dict:
    """This process's rows of a global batch: the contiguous block
    ``[i B / P, (i + 1) B / P)`` of the batch axis of every array (``B`` a multiple of ``P``).

    Feed the result to ``make_global_batch``. The block a process holds need not be the block
    its devices hold in the global array's order; each row is still used exactly once, which is
    all a batch-mean loss needs.
    """
    for name, value in (("process_index", process_index), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    batch_size = check_divisible(global_batch, 1, placement=placement)
    if batch_size % process_count:
        raise ValueError(
            f"global batch size B={batch_size} is not divisible by the {process_count} processes"
        )
    rows = batch_size // process_count
    start = process_index * rows

    def take(x, dim):
        return x[(slice(None),) * dim + (slice(start, start + rows),)]

    return _map_batch(take, global_batch, placement)


def make_global_batch(
    local_batch: Mapping[str, Any], mesh: Mesh, *, placement="per_step", axis_name=None
) -> dict:
    """Global batch-sharded arrays from each process's rows
    (``jax.make_array_from_process_local_data``); the global batch is the processes' rows
    together. In a single process this equals ``shard_batch(local_batch, mesh)``."""
    axis_name = _axis_of(mesh, axis_name)
    check_divisible(local_batch, 1, placement=placement)

    def assemble(x, dim):
        sharding = batch_sharding(mesh, dim, axis_name)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return _map_batch(assemble, local_batch, placement)
