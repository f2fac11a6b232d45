"""Conversion between jax_bptt params and PyTorch ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` weights.

torch is optional: this module imports without it, and only the functions that build torch
tensors or modules (``to_torch``, ``readout_to_torch``, ``to_torch_modules``) import it.
``from_torch`` accepts a module or a plain mapping of tensors / numpy arrays.

Layout (row-vector math here, column-vector math in PyTorch), for layer ``k`` and direction
suffix ``s`` (``""`` forward, ``"_reverse"`` backward)::

    W_xh = weight_ih_l{k}{s}.T            (d g)
    W_hh = weight_hh_l{k}{s}.T            (h g)
    b_h  = bias_ih + bias_hh              Elman, LSTM (gate order i, f, g, o is PyTorch's)
    b_h  = bias_ih + [bias_hh_r, bias_hh_z, 0],  b_hn = bias_hh_n      GRU (order r, z, n)
    W_hy = linear.weight.T (h o),   b_y = linear.bias (o,)

Going back, the combined bias goes to ``bias_ih`` and ``bias_hh`` gets zeros (GRU:
``[0, 0, b_hn]``); the function the module computes is the same, only the split of the bias
differs. ``elman_tanh`` is ``nn.RNN(nonlinearity="tanh")``, ``elman_relu`` is
``nonlinearity="relu"``.

Every module converts to ``jax_bptt.init_model``'s one layout, ``{"layers": [{"fwd": ...,
"bwd"?: ...}, ...], "readout": ...}``, at any ``num_layers`` and bidirectionality (a 1-layer
unidirectional module gives a list of one layer). PyTorch's ``h_0`` of shape
``(num_layers * dirs, B, H)`` is jax_bptt's ``h0[k]["fwd"]`` at index ``dirs * k`` and
``h0[k]["bwd"]`` at ``2 * k + 1``. PyTorch runs ``batch_first=False`` time-major like jax_bptt; a
``batch_first=True`` module has the same weights, so it converts too, but its inputs must be
transposed to ``(T, B, D)``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_bptt.cells import get_cell
from jax_bptt.validation import check_params

# nn.RNNBase.mode for each cell
TORCH_MODES = {"elman_tanh": "RNN_TANH", "elman_relu": "RNN_RELU", "lstm": "LSTM", "gru": "GRU"}
DIRECTIONS = (("fwd", ""), ("bwd", "_reverse"))
_RNN_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def _import_torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this function needs PyTorch: pip install 'jax_bptt[torch]' (torch==2.13.0, CPU)"
        ) from err
    return torch


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_module(obj) -> bool:
    return hasattr(obj, "state_dict") and callable(obj.state_dict)


# --------------------------------------------------------------------------------------------
# PyTorch -> jax_bptt


def _recurrent_state_dict(source, cell_name: str) -> dict[str, np.ndarray]:
    """The state dict of ``source`` as numpy arrays, after checking a module's settings."""
    if _is_module(source):
        torch = _import_torch()
        if not isinstance(source, torch.nn.RNNBase):
            raise TypeError(
                f"source must be an nn.RNN, nn.LSTM or nn.GRU (or its state dict), "
                f"got {type(source).__name__}"
            )
        if source.mode != TORCH_MODES[cell_name]:
            raise ValueError(
                f"cell={cell_name!r} needs a module with mode {TORCH_MODES[cell_name]!r}, got "
                f"{type(source).__name__} with mode {source.mode!r}"
            )
        if getattr(source, "proj_size", 0):
            raise ValueError(
                f"LSTMs with projections (proj_size={source.proj_size}) have no jax_bptt cell"
            )
        if not source.bias:
            raise ValueError(
                f"{type(source).__name__}(bias=False) has no bias_ih/bias_hh, but jax_bptt cells "
                "always have a bias; build the module with bias=True"
            )
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source must be a torch RNN module or a mapping of its state dict, "
            f"got {type(source).__name__}"
        )
    return {key: _numpy(value) for key, value in source.items()}


def _layout(state_dict: Mapping) -> tuple[int, bool]:
    """``(num_layers, bidirectional)`` read off the keys; unknown keys are an error."""
    unknown = sorted(k for k in state_dict if not _RNN_KEY.match(k))
    if unknown:
        hint = ""
        if any(k.startswith("weight_hr_l") for k in unknown):
            hint = " (weight_hr_l*: LSTMs with proj_size > 0 have no jax_bptt cell)"
        raise ValueError(
            f"unexpected keys in the RNN state dict: {unknown}{hint}; expected only "
            "weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k} (and *_reverse); "
            "strip a parent module's prefix first"
        )
    if "weight_ih_l0" not in state_dict:
        raise ValueError(
            f"the RNN state dict is missing 'weight_ih_l0'; got keys {sorted(state_dict)}"
        )
    num_layers = 0
    while f"weight_ih_l{num_layers}" in state_dict:
        num_layers += 1
    return num_layers, "weight_ih_l0_reverse" in state_dict


def _get(state_dict: Mapping, key: str) -> np.ndarray:
    if key not in state_dict:
        hint = ""
        if key.startswith("bias"):
            hint = " (a module built with bias=False? jax_bptt cells always have a bias)"
        raise ValueError(f"the RNN state dict is missing {key!r}{hint}")
    return state_dict[key]


def _check_shape(key: str, value: np.ndarray, want: tuple[int, ...], meaning: str) -> None:
    if value.shape != want:
        raise ValueError(f"{key} has shape {value.shape}, expected {meaning} = {want}")


def _cell_from_state_dict(state_dict, cell, layer: int, suffix: str, input_size, dtype) -> dict:
    """One (layer, direction) of a PyTorch state dict as jax_bptt cell params."""
    names = {n: f"{n}_l{layer}{suffix}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    w_ih, w_hh, b_ih, b_hh = (_get(state_dict, names[n]) for n in names)
    g = cell.num_gates
    if w_hh.ndim != 2 or w_hh.shape[0] != g * w_hh.shape[1]:
        raise ValueError(
            f"{names['weight_hh']} has shape {w_hh.shape}, but cell {cell.name!r} needs "
            f"({g} * hidden_size, hidden_size): is this the state dict of the right cell?"
        )
    hidden_size = w_hh.shape[1]
    gh = g * hidden_size
    in_meaning = "(num_gates * hidden_size, input_size)"
    if input_size is None:
        if w_ih.ndim != 2 or w_ih.shape[0] != gh:
            raise ValueError(f"{names['weight_ih']} has shape {w_ih.shape}, expected {in_meaning}")
        input_size = w_ih.shape[1]
    _check_shape(names["weight_ih"], w_ih, (gh, input_size), in_meaning)
    _check_shape(names["bias_ih"], b_ih, (gh,), "(num_gates * hidden_size,)")
    _check_shape(names["bias_hh"], b_hh, (gh,), "(num_gates * hidden_size,)")
    if cell.name == "gru":
        b_h = b_ih + np.concatenate([b_hh[: 2 * hidden_size], np.zeros_like(b_hh[:hidden_size])])
        extra = {"b_hn": b_hh[2 * hidden_size :]}
    else:
        b_h, extra = b_ih + b_hh, {}
    arrays = {"W_xh": w_ih.T, "W_hh": w_hh.T, "b_h": b_h, **extra}
    return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


def readout_from_torch(head, *, dtype=None) -> dict:
    """``nn.Linear`` (or its state dict) -> ``{"W_hy": weight.T, "b_y": bias}``.

    A ``bias=False`` head gets ``b_y = 0``, which computes the same function.
    """
    if _is_module(head):
        head = head.state_dict()
    if not isinstance(head, Mapping) or "weight" not in head:
        got = sorted(head) if isinstance(head, Mapping) else type(head).__name__
        raise TypeError(
            f"head must be an nn.Linear or a mapping with 'weight' (and 'bias'), got {got}"
        )
    weight = _numpy(head["weight"])
    if weight.ndim != 2:
        raise ValueError(f"head weight must be (output_size, hidden), got shape {weight.shape}")
    bias = _numpy(head["bias"]) if head.get("bias") is not None else np.zeros_like(weight[:, 0])
    _check_shape("head bias", bias, (weight.shape[0],), "(output_size,)")
    return {"W_hy": jnp.asarray(weight.T, dtype), "b_y": jnp.asarray(bias, dtype)}


def from_torch(source, cell, head=None, *, dtype=None) -> dict:
    """PyTorch weights -> jax_bptt params (``init_model``'s layout, any depth and direction).

    Args:
      source: an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` or its ``state_dict()`` (tensors or numpy
        arrays; keys without a parent module's prefix), any ``num_layers``, uni- or
        bidirectional.
      cell: the jax_bptt cell (name or ``Cell``) the module computes; a module's ``mode`` (and
        ``nonlinearity``) must match it.
      head: optional ``nn.Linear`` (or ``{"weight", "bias"}``) applied to every output: becomes
        ``"readout"``. Without it the result has no ``"readout"`` entry (``to_torch`` takes it as
        it is; add a readout before ``jax_bptt.unroll`` / ``bptt``, which need one).
      dtype: cast every array (default: keep the source's dtype; float64 needs jax x64 enabled).

    Returns:
      ``{"layers": [{"fwd": cell_params, "bwd"?: cell_params}, ...], "readout"?: {"W_hy", "b_y"}}``
      with one entry per PyTorch layer.

    Example:
      >>> rnn, linear = torch.nn.GRU(3, 8, num_layers=2), torch.nn.Linear(8, 2)
      >>> params = from_torch(rnn, "gru", head=linear)
      >>> len(params["layers"]), sorted(params["layers"][0]["fwd"]), params["readout"]["W_hy"].shape
      (2, ['W_hh', 'W_xh', 'b_h', 'b_hn'], (8, 2))
    """
    cell = get_cell(cell)
    state_dict = _recurrent_state_dict(source, cell.name)
    num_layers, bidirectional = _layout(state_dict)
    directions = DIRECTIONS if bidirectional else DIRECTIONS[:1]
    layers, input_size = [], None
    for layer in range(num_layers):
        converted = {}
        for name, suffix in directions:
            p = _cell_from_state_dict(state_dict, cell, layer, suffix, input_size, dtype)
            converted[name] = p
            # layer 0's backward direction is checked against the forward's input size
            input_size = p["W_xh"].shape[0]
        layers.append(converted)
        # every later layer reads the concatenated outputs of both directions
        input_size = len(directions) * converted["fwd"]["W_hh"].shape[0]
    extra_keys = sorted(k for k in state_dict if int(_RNN_KEY.match(k).group(2)) >= num_layers)
    if extra_keys:
        raise ValueError(f"the state dict skips layer {num_layers}: it has {extra_keys}")
    params: dict[str, Any] = {"layers": layers}
    if head is not None:
        params["readout"] = readout_from_torch(head, dtype=dtype)
        features, got = input_size, params["readout"]["W_hy"].shape[0]
        if got != features:
            raise ValueError(
                f"head weight has in_features={got} but the RNN's outputs have {features} "
                f"features (hidden_size * num_directions)"
            )
    return params


# --------------------------------------------------------------------------------------------
# jax_bptt -> PyTorch


def _layers_of(params, cell) -> list[dict]:
    """The validated ``[{"fwd": ..., "bwd"?: ...}]`` of ``init_model``-layout params.

    Every leaf is checked against ``cell`` (``jax_bptt.validation.check_params``); the
    ``"readout"`` may be absent (``from_torch`` without a head).
    """
    if not isinstance(params, Mapping) or not isinstance(params.get("layers"), list | tuple):
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(
            "params must be init_model's layout {'layers': [{'fwd': cell_params, 'bwd'?: ...}, "
            f"...], 'readout'?: {{'W_hy', 'b_y'}}}}, got {got}"
        )
    layers = list(params["layers"])
    for i, layer in enumerate(layers):  # the wrong cell's params: say so before the leaf checks
        for name in ("fwd", "bwd"):
            p = layer.get(name) if isinstance(layer, Mapping) else None
            w_hh = p.get("W_hh") if isinstance(p, Mapping) else None
            shape = tuple(np.shape(w_hh)) if w_hh is not None else None
            if shape is not None and (len(shape) != 2 or shape[1] != cell.num_gates * shape[0]):
                raise ValueError(
                    f"layer {i} ({name}) W_hh has shape {shape}, but cell {cell.name!r} needs "
                    f"(H, {cell.num_gates} * H): are these the params of another cell?"
                )
    readout = params.get("readout")
    if readout is None and layers and isinstance(layers[-1], Mapping):
        # check_params wants a readout: a stand-in of the top layer's width, checked trivially.
        top = [p for p in layers[-1].values() if isinstance(p, Mapping) and "W_hh" in p]
        dtype = np.asarray(top[0]["W_hh"]).dtype if top else np.float32
        features = sum(np.shape(p["W_hh"])[0] for p in top)
        readout = {"W_hy": np.zeros((features, 1), dtype), "b_y": np.zeros((1,), dtype)}
    check_params({"layers": layers, "readout": readout}, cell)
    return layers


def _torch_tensor(torch, array):
    return torch.from_numpy(np.array(array))  # a copy: jax arrays are read-only


def to_torch(params, cell) -> dict:
    """jax_bptt params -> the state dict of the equivalent ``nn.RNN``/``nn.LSTM``/``nn.GRU``.

    ``params`` in ``init_model``'s layout (the ``"readout"`` is optional and not part of the
    result: see ``readout_to_torch``). Keys and shapes are those of
    ``module.state_dict()``, so ``module.load_state_dict(to_torch(params, cell))`` works for a
    module of matching sizes and dtype (``to_torch_modules`` builds one).
    """
    torch = _import_torch()
    cell = get_cell(cell)
    state_dict = {}
    for layer, directions in enumerate(_layers_of(params, cell)):
        for name, suffix in DIRECTIONS:
            if name not in directions:
                continue
            p = {k: np.asarray(v) for k, v in directions[name].items()}
            b_hh = np.zeros_like(p["b_h"])
            if cell.name == "gru":  # [0, 0, b_hn]
                b_hh[-p["b_hn"].shape[0] :] = p["b_hn"]
            values = dict(
                weight_ih=p["W_xh"].T, weight_hh=p["W_hh"].T, bias_ih=p["b_h"], bias_hh=b_hh
            )
            for key, value in values.items():
                state_dict[f"{key}_l{layer}{suffix}"] = _torch_tensor(torch, value)
    return state_dict


def readout_to_torch(params) -> dict:
    """The readout -> ``nn.Linear`` state dict ``{"weight": W_hy.T, "bias": b_y}``.

    ``params``: ``init_model``-layout params (their ``"readout"`` is converted) or the readout
    ``{"W_hy", "b_y"}`` itself.
    """
    torch = _import_torch()
    readout = params.get("readout") if isinstance(params, Mapping) else None
    if readout is None and isinstance(params, Mapping) and "layers" not in params:
        readout = params
    if not isinstance(readout, Mapping) or not {"W_hy", "b_y"} <= set(readout):
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(
            "readout_to_torch takes params with a 'readout' {'W_hy', 'b_y'} (or that readout "
            f"itself), got {got}"
        )
    return {
        "weight": _torch_tensor(torch, np.asarray(readout["W_hy"]).T),
        "bias": _torch_tensor(torch, readout["b_y"]),
    }


def to_torch_modules(params, cell):
    """Build ``(rnn, head)``: the PyTorch modules computing what ``params`` compute.

    ``rnn`` is an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (``batch_first=False``) with the params'
    num_layers, bidirectionality and dtype; ``head`` the ``nn.Linear`` readout, or None when
    ``params`` has no ``"readout"``.

    Example:
      >>> params = init_model(jax.random.key(0), "lstm", 3, 8, 2, num_layers=2)
      >>> rnn, head = to_torch_modules(params, "lstm")
      >>> rnn.num_layers, head.weight.shape
      (2, torch.Size([2, 8]))
    """
    torch = _import_torch()
    cell = get_cell(cell)
    layers = _layers_of(params, cell)
    first = layers[0]["fwd"]
    dtype = _torch_tensor(torch, first["W_xh"][:0]).dtype
    input_size, hidden_size = first["W_xh"].shape[0], first["W_hh"].shape[0]
    kwargs = dict(num_layers=len(layers), bidirectional="bwd" in layers[0], dtype=dtype)
    if cell.name in ("lstm", "gru"):
        module = getattr(torch.nn, cell.name.upper())
    else:
        module = functools.partial(torch.nn.RNN, nonlinearity=cell.name.removeprefix("elman_"))
    rnn = module(input_size, hidden_size, **kwargs)
    rnn.load_state_dict(to_torch(params, cell))
    head = None
    if params.get("readout") is not None:
        head = torch.nn.Linear(*np.shape(params["readout"]["W_hy"]), dtype=dtype)
        head.load_state_dict(readout_to_torch(params))
    return rnn, head
