"""Reading weights files: a checkpoint, a sharded checkpoint or a Hugging Face model directory
as one flat state dict, with what was found around it (format, where, config).

Files
    `.pt` / `.pth` / `.bin` / `.ckpt`: `torch.load(weights_only=True)`, memory-mapped when the file
    is in torch's zip format. A file that pickles Python objects is refused with a message naming
    the object; `weights_only=False` lifts that (it runs code from the file: only for files you
    trust), and the report's `format` then says so. `.safetensors`: safetensors. A sharded
    checkpoint: its `*.index.json`. A Hugging Face model directory: `model.safetensors`,
    `model.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json` (the
    first present), with `config.json` as the config.

Where the state dict is
    A mapping whose leaves are all tensors is a state dict (nested mappings are flattened with
    `.`: `{"head": {"w": t}}` -> `head.w`). Otherwise the first of `STATE_DICT_KEYS` present that
    holds one, searched in that order and recursively (Lightning's `state_dict`, `model_state_dict`,
    DETR's `model`, ...; raw weights before EMA weights; the report names the other candidates it
    saw, e.g. `ema`, and `state_key="ema"` picks one explicitly; dotted paths walk nested dicts).
    Failing all that, the tensors at the top level, other entries ignored and reported. The config
    comes from the first of `CONFIG_KEYS` present, top level first, or `config.json`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pyfast.models.weights.report import WeightsError, _shape

STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
)
CONFIG_KEYS = ("model_config", "config", "hyper_parameters", "hparams", "args", "cfg")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_MAX_DEPTH = 4


@dataclass
class WeightsFile:
    """A checkpoint as read: its flat state dict and what was found around it."""

    path: str
    format: str
    state_dict: dict
    state_key: Optional[str] = None
    other_state_keys: list = field(default_factory=list)
    config: object = None
    config_key: Optional[str] = None
    top_level: dict = field(default_factory=dict)  # top-level key -> short description
    metadata: dict = field(default_factory=dict)  # safetensors header metadata
    ignored: list = field(default_factory=list)

    @property
    def num_elements(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())

    @property
    def dtypes(self) -> dict:
        return dict(Counter(str(t.dtype).replace("torch.", "") for t in self.state_dict.values()).most_common())


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _torch_load(path: str, weights_only: bool, map_location) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if weights_only and "weights only load failed" in str(error).lower() and found:
            raise WeightsError(
                f"{path}: the file pickles Python objects ({found.group(1)}) that weights_only loading refuses; if you trust "
                f"its source, load it with weights_only=False (pyfast-doctor checkpoint --unsafe-pickle), which "
                f"runs code from the file, or allowlist the class with torch.serialization.add_safe_globals"
            ) from None
        # no object named: not a pickle torch writes (a damaged or foreign file); say what the unpickler saw
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        reason = detail.group(1).strip() if detail else _one_line(error)
        raise WeightsError(f"{path}: cannot read the checkpoint: not a torch checkpoint, or a damaged one ({reason})") from None
    except Exception as error:  # a damaged or foreign file: say which and why, in one line
        raise WeightsError(f"{path}: cannot read the checkpoint: {_one_line(error)}") from None


def _safetensors_load(path: str, map_location) -> tuple:
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(path, device=device), metadata
    except Exception as error:
        raise WeightsError(f"{path}: cannot read the safetensors file: {_one_line(error)}") from None


def _file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".index.json"):
        return "index"
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(TORCH_SUFFIXES):
        return "torch"
    with open(path, "rb") as handle:  # an unusual name: sniff the content
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    raise WeightsError(
        f"{path}: unrecognised weights format (expected .pt/.pth/.bin/.ckpt, .safetensors, a *.index.json "
        f"or a Hugging Face model directory)"
    )


def _read_index(path: str, weights_only: bool, map_location) -> tuple:
    try:
        with open(path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"{path}: not a sharded-checkpoint index (no readable weight_map): {_one_line(error)}") from None
    folder = os.path.dirname(path)
    shards = sorted(set(weight_map.values()))
    state: dict = {}
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise WeightsError(f"{path}: shard {shard} is missing")
        if _file_kind(shard_path) == "safetensors":
            part, _ = _safetensors_load(shard_path, map_location)
        else:
            part = _torch_load(shard_path, weights_only, map_location)
        for key, value in part.items():
            if key in state:
                raise WeightsError(f"{path}: tensor {key} is in two shards")
            state[key] = value
    absent = [key for key in weight_map if key not in state]
    if absent:
        raise WeightsError(f"{path}: {len(absent)} tensors of the index are in no shard (e.g. {absent[0]})")
    kind = "safetensors" if shards and shards[0].endswith(".safetensors") else "torch"
    return state, f"sharded {kind} ({len(shards)} shards)"


def _describe_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {_shape(value)}"
    if isinstance(value, Mapping):
        tensors = sum(1 for _ in _tensor_leaves(value))
        return f"dict of {len(value)}" + (f", {tensors} tensors" if tensors else "")
    if isinstance(value, nn.Module):
        return f"nn.Module {type(value).__name__}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__


def _tensor_leaves(obj: Mapping, prefix: str = "", depth: int = 0):
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, Mapping) and depth < _MAX_DEPTH:
            yield from _tensor_leaves(value, name + ".", depth + 1)


def _is_state_dict(obj) -> bool:
    """A mapping whose leaves are all tensors (at least one)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _is_state_dict(v)) for v in obj.values()
    )


def _find_state_dict(obj, depth: int = 0) -> Optional[tuple]:
    """(path, flat state dict, other candidate keys) of the first state dict in `obj`, or None."""
    if isinstance(obj, nn.Module):
        return None, dict(obj.state_dict()), []
    if not isinstance(obj, Mapping) or depth >= _MAX_DEPTH:
        return None
    # the known keys first: {"model": sd, "ema": sd} is a checkpoint, not one state dict
    present = [key for key in STATE_DICT_KEYS if key in obj and not isinstance(obj[key], torch.Tensor)]
    for key in present:
        found = _find_state_dict(obj[key], depth + 1)
        if found is not None:
            inner, state, _ = found
            others = [k for k in present if k != key and _find_state_dict(obj[k], depth + 1) is not None]
            return (f"{key}.{inner}" if inner else key), state, others
    if _is_state_dict(obj):
        return None, dict(_tensor_leaves(obj)), []
    return None


def _find_config(obj, state_key: Optional[str]) -> tuple:
    """(key, config) from the first CONFIG_KEYS entry: at the top level, then along `state_key`."""
    containers = [("", obj)]
    node = obj
    for part in (state_key or "").split(".") if state_key else []:
        if not isinstance(node, Mapping) or part not in node:
            break
        node = node[part]
        containers.append((containers[-1][0] + part + ".", node))
    for prefix, container in containers:
        if isinstance(container, Mapping):
            for key in CONFIG_KEYS:
                if key in container and not isinstance(container[key], torch.Tensor):
                    return prefix + key, _plain_config(container[key])
    return None, None


def _plain_config(value):
    """Dicts stay dicts; a Namespace or another object with attributes becomes a dict of them."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return dict(vars(value))
    return value


def _walk(obj, dotted: str, path: str):
    node = obj
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            keys = ", ".join(map(str, node.keys())) if isinstance(node, Mapping) else type(node).__name__
            raise WeightsError(f"{path}: state_key {dotted!r}: no {part!r} here (found: {keys})")
        node = node[part]
    return node


def read_weights(
    path, *, state_key: Optional[str] = None, weights_only: bool = True, map_location="cpu"
) -> WeightsFile:
    """Read a checkpoint file, sharded checkpoint or Hugging Face model directory (see the module doc)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    config = config_key = None
    metadata: dict = {}
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        found = next((n for n in HF_WEIGHT_FILES if n in names), None)
        if found is None:
            listing = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") or "nothing"
            raise WeightsError(
                f"{path}: not a model directory: none of {', '.join(HF_WEIGHT_FILES)} (found: {listing})"
            )
        if "config.json" in names:
            try:
                with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                    config, config_key = json.load(handle), "config.json"
            except (OSError, ValueError) as error:
                raise WeightsError(f"{path}: config.json is not readable JSON: {_one_line(error)}") from None
        inner = read_weights(os.path.join(path, found), state_key=state_key, weights_only=weights_only,
                             map_location=map_location)
        inner.path = path
        inner.format = f"Hugging Face directory ({found}: {inner.format})"
        if config_key is not None:
            inner.config, inner.config_key = config, config_key
        return inner

    try:
        kind = _file_kind(path)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read: {_one_line(error)}") from None
    if kind == "index":
        obj, fmt = _read_index(path, weights_only, map_location)
    elif kind == "safetensors":
        obj, metadata = _safetensors_load(path, map_location)
        fmt = "safetensors"
    else:
        obj = _torch_load(path, weights_only, map_location)
        fmt = "torch pickle (weights_only)" if weights_only else "torch pickle (weights_only=False: full unpickling)"

    top_level = {str(k): _describe_value(v) for k, v in obj.items()} if isinstance(obj, Mapping) else {}
    ignored: list = []
    if state_key:
        located = _find_state_dict(_walk(obj, state_key, path))
        if located is None:
            raise WeightsError(f"{path}: state_key {state_key!r} holds no tensors")
        state, others = located[1], []
        where = state_key + (f".{located[0]}" if located[0] else "")
    else:
        located = _find_state_dict(obj)
        if located is not None:
            where, state, others = located
        elif isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()):
            # tensors next to other entries at the top level: take the tensors, say what was left
            where, others = None, []
            state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            ignored = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        else:
            what = ", ".join(f"{k} ({d})" for k, d in top_level.items()) if top_level else f"a {type(obj).__name__}"
            raise WeightsError(
                f"{path}: no state dict found (looked for a dict of tensors, then under "
                f"{', '.join(STATE_DICT_KEYS)}); top-level keys: {what}; pass state_key=... to pick one"
            )
    config_key_in, config_in = _find_config(obj, where)
    if config_key_in is not None:
        config, config_key = config_in, config_key_in
    return WeightsFile(
        path=path, format=fmt, state_dict=state, state_key=where, other_state_keys=others, config=config,
        config_key=config_key, top_level=top_level, metadata=metadata, ignored=ignored,
    )
