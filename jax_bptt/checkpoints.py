"""Checkpoints: numpy ``.npz`` arrays (``allow_pickle=False``) plus a JSON metadata file.

A checkpoint directory holds ``checkpoint.json`` and the ``ckpt-<step>-<sha>.npz`` it names. Every
file is written atomically (temporary file in the same directory, ``fsync``, ``os.replace``, then
the directory ``fsync``), arrays first and metadata last, and the metadata records the arrays'
SHA-256, so a run killed at any moment leaves either the previous checkpoint or the new one, never
a mix or a torn file:

- everything that can fail before the kill-sensitive part (flattening, ``np.savez``, encoding the
  metadata as JSON) runs before the first byte is written, so a bad ``config`` or ``signature``
  leaves the directory as it was;
- the array file is named by its step and its content hash, so a new save never overwrites the
  file the current metadata names (re-saving a step with other values writes a second file);
- array files the new metadata does not name, and temporary files a killed writer left
  (``.<name>.<random>.tmp``), are removed only after the new metadata is in place.

Arrays are stored by position in the flattened pytrees (``params``, ``opt_state``, ``carry``);
loading unflattens them against templates (``init_model(...)``, ``optimizer.init(params)``), after
checking the model signature (cell, depth, directions, residual, sizes, dtype, tree structure) and
every leaf's shape and dtype, so a checkpoint from another model or optimizer fails with a clear
error before anything is written. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import get_cell
from jax_bptt.validation import check_params, check_stack_options

FORMAT = "jax_bptt-checkpoint-v1"
METADATA = "checkpoint.json"
TEMPORARY_SUFFIX = ".tmp"  # atomic_write_bytes' temporary files: .<name>.<random>.tmp
_ARRAY_FILE = re.compile(r"^ckpt-[0-9A-Za-z_-]+\.npz$")
# tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") in atomic_write_bytes: 8 random characters.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_GROUPS = ("params", "opt_state", "carry")


class Checkpoint(NamedTuple):
    """What ``load_checkpoint`` returns; ``key`` is a typed ``jax.random`` key."""

    step: int
    params: Any
    opt_state: Any
    carry: Any
    key: jax.Array
    skipped: int
    config: dict


def model_signature(params, cell, *, residual=False) -> dict:
    """What must match for a checkpoint to load into ``params``.

    Args:
      params: ``init_model`` params (any depth and direction), validated against ``cell``.
      cell: the model's cell (a name in ``jax_bptt.CELLS`` or a ``Cell``).
      residual: the run's residual setting (``False``, ``True`` or ``"except_first"``); it does
        not change the params' shapes but does change the function they compute.

    Returns:
      A JSON-serialisable dict: cell name, ``num_layers``, ``bidirectional``, ``residual``,
      input/hidden/output sizes, dtype, the params' tree structure and every leaf's shape (by
      path, e.g. ``"layers/0/fwd/W_hh"``). A 1-layer run never loads into a 2-layer one, nor a
      unidirectional one into a bidirectional one.

    Example:
      >>> params = init_model(jax.random.key(0), "gru", 3, 8, 2, num_layers=2)
      >>> sig = model_signature(params, "gru")
      >>> sig["num_layers"], sig["hidden_size"], sig["shapes"]["layers/1/fwd/W_xh"]
      (2, 8, [8, 24])
    """
    cell = get_cell(cell)
    shape = check_params(params, cell)
    check_stack_options(shape, 0.0, None, residual)
    return {
        "cell": cell.name,
        "num_layers": shape.num_layers,
        "bidirectional": len(shape.directions) == 2,
        "residual": residual,
        "input_size": int(shape.input_size),
        "hidden_size": int(shape.hidden_size),
        "output_size": int(shape.output_size),
        "dtype": str(np.dtype(shape.dtype)),
        "tree": str(jax.tree_util.tree_structure(params)),
        "shapes": {
            jax.tree_util.keystr(path, simple=True, separator="/"): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        },
    }


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk for the new file to survive a power cut.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / METADATA).is_file()


def remove_leftovers(directory: str | os.PathLike, keep: str | None = None) -> list[str]:
    """Remove what a killed writer can leave in ``directory``: ``atomic_write_bytes``' temporary
    files (``.<name>.<8 random characters>.tmp``, torn by definition) and every ``ckpt-*.npz`` but
    ``keep`` (the one the metadata names). Returns the names removed. ``save_checkpoint`` calls
    it once its metadata is in place."""
    removed = []
    for entry in Path(directory).iterdir():
        name = entry.name
        stale_array = name != keep and name.startswith("ckpt-") and name.endswith(".npz")
        if stale_array or (_TEMPORARY.match(name) and entry.is_file()):
            entry.unlink(missing_ok=True)
            removed.append(name)
    return sorted(removed)


def save_checkpoint(
    directory: str | os.PathLike, *, step: int, params, opt_state, key: jax.Array, signature: dict,
    carry=None, skipped: int = 0, config: dict | None = None,
) -> Path:  # fmt: skip
    """Write a checkpoint of a training run into ``directory`` (created if missing).

    Args:
      step: number of training steps done.
      params, opt_state, carry: pytrees of arrays (``carry`` e.g. a truncated-BPTT state).
      key: the run's ``jax.random`` key (typed or raw ``uint32``).
      signature: ``model_signature(params, cell, residual=...)``.
      skipped: number of updates skipped for a non-finite loss or gradient.
      config: JSON-serialisable run configuration, stored for reference.

    Returns:
      The path of the metadata file.
    """
    directory = Path(directory)
    arrays, counts = {}, {}
    for group, tree in zip(_GROUPS, (params, opt_state, carry), strict=True):
        leaves = jax.tree_util.tree_leaves(tree)
        counts[group] = len(leaves)
        for index, leaf in enumerate(leaves):
            arrays[f"{group}/{index:05d}"] = np.asarray(leaf)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    # Named by content: never the file the current metadata names, unless the bytes are the same.
    array_file = f"ckpt-{int(step):09d}-{digest[:16]}.npz"

    if jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key_data, key_impl = jax.random.key_data(key), str(jax.random.key_impl(key))
    else:
        key_data, key_impl = key, None
    # Encoded before anything is written: a value JSON cannot hold fails with the directory as is.
    encoded = _json_bytes({
        "format": FORMAT, "step": int(step), "skipped": int(skipped),
        "key_data": np.asarray(key_data).astype(np.uint32).tolist(), "key_impl": key_impl,
        "signature": signature, "leaves": counts,
        "opt_state_tree": str(jax.tree_util.tree_structure(opt_state)), "arrays": array_file,
        "sha256": digest, "config": config or {},
    })  # fmt: skip

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / array_file, data)
    meta_path = directory / METADATA
    atomic_write_bytes(meta_path, encoded)
    remove_leftovers(directory, keep=array_file)  # only after the new metadata is in place
    return meta_path


def _restore(group: str, template, arrays, count: int, where: Path):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != count:
        raise ValueError(
            f"checkpoint {where} has {count} {group} arrays but this run's {group} has "
            f"{len(leaves)} (a different optimizer or model?)"
        )
    restored = []
    for index, leaf in enumerate(leaves):
        saved = arrays[f"{group}/{index:05d}"]
        want_shape, want_dtype = np.shape(leaf), np.asarray(leaf).dtype
        if saved.shape != want_shape or saved.dtype != want_dtype:
            raise ValueError(
                f"checkpoint {where}: {group} leaf {index} is {saved.dtype}{list(saved.shape)} "
                f"but this run expects {want_dtype}{list(want_shape)}"
            )
        restored.append(jnp.asarray(saved))
    return jax.tree_util.tree_unflatten(treedef, restored)


def read_metadata(directory: str | os.PathLike) -> dict:
    path = Path(directory) / METADATA
    with open(path, encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format {metadata.get('format')!r})")
    return metadata


def load_checkpoint(
    directory: str | os.PathLike, *, params_template, opt_state_template, signature: dict,
    carry_template=None,
) -> Checkpoint:  # fmt: skip
    """Read the checkpoint in ``directory`` into the structure of the templates.

    Args:
      params_template: params of the model being resumed (e.g. ``init_model(...)``).
      opt_state_template: ``optimizer.init(params_template)``.
      signature: ``model_signature(params_template, cell, residual=...)``; must equal the
        saved one.
      carry_template: the structure of the saved carry (None if no carry was saved).

    Raises:
      FileNotFoundError: no checkpoint in ``directory``.
      ValueError: incompatible model/optimizer/carry, or arrays that fail their checksum.
    """
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no checkpoint ({METADATA}) in {directory}")
    metadata = read_metadata(directory)
    saved = metadata["signature"]
    diff = [
        f"{name}: checkpoint has {saved.get(name)!r}, this run has {signature.get(name)!r}"
        for name in sorted(set(saved) | set(signature))
        if saved.get(name) != signature.get(name)
    ]
    if diff:
        raise ValueError(
            f"checkpoint in {directory} is from an incompatible model:\n  " + "\n  ".join(diff)
        )
    if not isinstance(metadata.get("arrays"), str) or not _ARRAY_FILE.match(metadata["arrays"]):
        raise ValueError(
            f"checkpoint {directory}: metadata names the array file {metadata.get('arrays')!r}, "
            "not a ckpt-*.npz in the same directory"
        )
    array_path = directory / metadata["arrays"]
    if not array_path.is_file():
        raise ValueError(f"checkpoint {directory}: its array file {metadata['arrays']} is missing")
    data = array_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != metadata["sha256"]:
        raise ValueError(f"checkpoint arrays {array_path} do not match their recorded SHA-256")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    templates = (params_template, opt_state_template, carry_template)
    params, opt_state, carry = (
        _restore(group, template, arrays, metadata["leaves"][group], directory)
        for group, template in zip(_GROUPS, templates, strict=True)
    )
    key_data = jnp.asarray(np.asarray(metadata["key_data"], np.uint32))
    impl = metadata["key_impl"]
    key = key_data if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
    return Checkpoint(
        metadata["step"], params, opt_state, carry, key, metadata["skipped"], metadata["config"]
    )
