"""Loading the weights users already have, with a report of what went where.

    report = pyfast.load_weights(model, "finetuned.ckpt")  # WeightsError if it does not fit
    print(report.describe())

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

Key prefixes
    `module.` (DDP), `_orig_mod.` (torch.compile), `model.` (Lightning) and the caller's `prefixes`
    may lead the checkpoint's keys, in any chain; and a checkpoint of an inner module lacks the
    prefix all the model's keys share (`vision_encoder.` of SamVisionModel). Each way of stripping a
    leading chain seen in the file, with or without putting the model's shared prefix in its place,
    is scored by how many model keys it hits; the best one wins, a caller's prefix wins a tie, and a
    way that maps two checkpoint tensors onto one model key is never used. Two ways that hit equally
    many model keys with different tensors are an error: the file is ambiguous.

What is refused (WeightsError, one line, naming the file)
    a shape mismatch (unless `strict_shapes=False`: then the mismatched tensors are skipped,
    listed, and a warning is logged; a mismatched tensor is never loaded), a load that matched
    nothing (with examples of both key styles, so a prefix problem is plain to see), and a load
    under `min_fraction` of the model. The fraction is the smaller of the fraction of the model's
    tensors loaded and the fraction of its elements loaded, so neither "all the biases but none of
    the weights" nor "one big embedding and nothing else" passes. A model tensor tied to a loaded
    one (the same Parameter under two names) counts as loaded.
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
from typing import Callable, Iterable, Optional

import torch
from torch import nn

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
DEFAULT_PREFIXES = ("module.", "_orig_mod.", "model.")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_MAX_DEPTH = 4
_MAX_STRATEGIES = 64


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model. `report` is set when a load was
    attempted (what matched, what did not), so a caller can still print it."""

    def __init__(self, message: str, report: Optional["LoadReport"] = None):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------ the report


def _shape(t) -> tuple:
    return tuple(int(s) for s in t.shape)


def _some(items: list, limit: int) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class LoadReport:
    """What a load did. Key lists use the model's names, except `unexpected` (the checkpoint's)."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)
    tied: list = field(default_factory=list)  # model keys sharing a tensor with a loaded key
    ignored: list = field(default_factory=list)  # non-tensor entries of the state dict, skipped
    source: str = "state dict"
    format: str = ""
    state_key: Optional[str] = None  # where the state dict was found (None: the top level)
    other_state_keys: list = field(default_factory=list)
    config: object = None
    config_key: Optional[str] = None
    prefix: str = ""  # the leading chain stripped from the checkpoint's keys
    added_prefix: str = ""  # the model's shared prefix put in its place (a checkpoint of the inner module)
    model_tensors: int = 0
    model_elements: int = 0
    loaded_elements: int = 0
    checkpoint_tensors: int = 0
    checkpoint_elements: int = 0
    checkpoint_dtypes: dict = field(default_factory=dict)
    min_fraction: float = 0.0
    applied: bool = False  # the matched tensors were copied into the model (False when refused)

    @property
    def tensor_fraction(self) -> float:
        return (len(self.loaded) + len(self.tied)) / self.model_tensors if self.model_tensors else 1.0

    @property
    def element_fraction(self) -> float:
        return self.loaded_elements / self.model_elements if self.model_elements else 1.0

    @property
    def matched_fraction(self) -> float:
        """The smaller of the tensor and element fractions loaded."""
        return min(self.tensor_fraction, self.element_fraction)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def complete(self) -> bool:
        """Every tensor of the model came from the checkpoint (extra checkpoint keys allowed)."""
        return not (self.missing or self.mismatched)

    def describe(self, limit: int = 5) -> str:
        """One line: counts, then examples of what did not fit."""
        where = f" under {self.state_key!r}" if self.state_key else ""
        strip = f", prefix {self.prefix!r} stripped" if self.prefix else ""
        strip += f", prefix {self.added_prefix!r} added" if self.added_prefix else ""
        parts = [
            f"{'loaded' if self.applied else 'matched (not loaded)'} {len(self.loaded) + len(self.tied)} of "
            f"{self.model_tensors} tensors "
            f"({self.tensor_fraction:.0%} of the model's tensors, {self.element_fraction:.0%} of its elements)"
            f"{where}{strip}"
        ]
        if self.missing:
            parts.append(f"missing: {_some(self.missing, limit)}")
        if self.unexpected:
            parts.append(f"unexpected: {_some(self.unexpected, limit)}")
        if self.mismatched:
            parts.append("shape mismatch: " + _some([f"{k} {a} vs model {b}" for k, a, b in self.mismatched], limit))
        return "; ".join(parts)

    def lines(self, limit: int = 5) -> list:
        """The multi-line form `pyfast-doctor checkpoint` prints."""
        out = [
            f"{'loaded ' if self.applied else 'matched'}      {len(self.loaded) + len(self.tied):,} / "
            f"{self.model_tensors:,} tensors "
            f"({self.tensor_fraction:.1%}), {self.loaded_elements:,} / {self.model_elements:,} elements "
            f"({self.element_fraction:.1%})" + (f", {len(self.tied)} of them tied" if self.tied else ""),
            "prefix       " + (f"{self.prefix!r} stripped" if self.prefix else "none stripped")
            + (f", {self.added_prefix!r} added" if self.added_prefix else ""),
            f"missing      {len(self.missing):,}" + (f": {_some(self.missing, limit)}" if self.missing else ""),
            f"unexpected   {len(self.unexpected):,}" + (f": {_some(self.unexpected, limit)}" if self.unexpected else ""),
            f"mismatched   {len(self.mismatched):,}"
            + (": " + _some([f"{k} {a} vs model {b}" for k, a, b in self.mismatched], limit) if self.mismatched else ""),
        ]
        if self.ignored:
            out.append(f"ignored      {len(self.ignored):,} non-tensor entries: {_some(self.ignored, limit)}")
        return out

    def to_dict(self) -> dict:
        """JSON-able summary (counts, fractions, the first few keys of each list)."""
        return {
            "source": self.source,
            "format": self.format,
            "applied": self.applied,
            "state_key": self.state_key,
            "prefix": self.prefix,
            "added_prefix": self.added_prefix,
            "loaded": len(self.loaded) + len(self.tied),
            "model_tensors": self.model_tensors,
            "tensor_fraction": self.tensor_fraction,
            "element_fraction": self.element_fraction,
            "missing": self.missing[:20],
            "unexpected": self.unexpected[:20],
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched[:20]],
            "counts": {
                "missing": len(self.missing),
                "unexpected": len(self.unexpected),
                "mismatched": len(self.mismatched),
            },
        }


# ------------------------------------------------------------------ reading files


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
        if weights_only and "weights only load failed" in str(error).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"{path}: the file pickles Python objects{what} that weights_only loading refuses; if you trust "
                f"its source, load it with weights_only=False (pyfast-doctor checkpoint --unsafe-pickle), which "
                f"runs code from the file, or allowlist the class with torch.serialization.add_safe_globals"
            ) from None
        raise WeightsError(f"{path}: cannot read the checkpoint: {_one_line(error)}") from None
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


# ------------------------------------------------------------------ matching keys


def _normalise_prefixes(prefixes: Iterable[str]) -> tuple:
    out = []
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ValueError(f"prefixes must be non-empty strings, got {prefix!r}")
        out.append(prefix if prefix.endswith(".") else prefix + ".")
    return tuple(out)


def _leading_chain(key: str, prefixes: tuple) -> list:
    """The prefixes leading `key`, peeled greedily (longest first), e.g. ['module.', '_orig_mod.']."""
    chain = []
    ordered = sorted(prefixes, key=len, reverse=True)
    while True:
        for prefix in ordered:
            if key.startswith(prefix) and len(key) > len(prefix):
                chain.append(prefix)
                key = key[len(prefix):]
                break
        else:
            return chain


def strip_prefixes(state: Mapping, prefixes: Iterable[str] = DEFAULT_PREFIXES) -> dict:
    """`state` with every leading chain of `prefixes` removed from its keys (no matching involved)."""
    prefixes = _normalise_prefixes(prefixes)
    return {key[len("".join(_leading_chain(key, prefixes))):]: value for key, value in state.items()}


def _shared_prefixes(model_keys: Iterable[str]) -> list:
    """The dotted prefixes every model key starts with: `vision_encoder.` for SamVisionModel, whose
    encoder's own checkpoint lacks it."""
    keys = list(model_keys)
    parts = keys[0].split(".")[:-1] if keys else []
    out = []
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1]) + "."
        if not all(k.startswith(prefix) for k in keys):
            break
        out.append(prefix)
    return out


def _retarget(key: str, strip: str, add: str) -> str:
    return add + (key[len(strip):] if strip and key.startswith(strip) else key)


def _choose_prefixes(keys: list, model_keys: set, defaults: tuple, preferred: tuple, source: str) -> tuple:
    """(strip, add): the leading chain to remove from the checkpoint's keys and the model's shared
    prefix to put in its place that map the most checkpoint keys onto model keys (see the module doc)."""
    candidates = defaults + tuple(p for p in preferred if p not in defaults)
    counts: Counter = Counter()
    for key in keys:
        chain = _leading_chain(key, candidates)
        for j in range(1, len(chain) + 1):
            counts["".join(chain[:j])] += 1
    strips = [""] + [s for s, _ in counts.most_common(_MAX_STRATEGIES)]
    scored = []
    for strip in strips:
        uses_preferred = bool(strip) and any(p in preferred for p in _leading_chain(strip + "_", candidates))
        for add in [""] + _shared_prefixes(model_keys):
            pairs = {}
            for key in keys:
                target = _retarget(key, strip, add)
                if target in model_keys:
                    if target in pairs:  # two checkpoint tensors onto one model key: never this way
                        break
                    pairs[target] = key
            else:
                scored.append((len(pairs), uses_preferred, strip, add, pairs))
    best_hits = max(s[0] for s in scored)
    top = [s for s in scored if s[0] == best_hits]
    if any(s[1] for s in top):
        top = [s for s in top if s[1]]
    top.sort(key=lambda s: len(s[2]) + len(s[3]))
    for other in top[1:]:
        if best_hits and other[4] != top[0][4]:
            raise WeightsError(
                f"{source}: ambiguous keys: stripping {top[0][2]!r} or {other[2]!r} matches {best_hits} model "
                f"tensors with different checkpoint tensors; choose with prefixes=({top[0][2]!r},) or state_key=..."
            )
    return top[0][2], top[0][3]


def _key_groups(keys: Iterable[str], limit: int = 3) -> str:
    groups = Counter(k.split(".", 1)[0] + "." for k in keys if "." in k)
    return ", ".join(f"{g!r} ({n})" for g, n in groups.most_common(limit))


def _is_transformers_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def apply_state_dict(
    module: nn.Module,
    state: Mapping,
    *,
    prefixes: Iterable[str] = (),
    min_fraction: float = 1.0,
    strict_shapes: bool = True,
    rename: Optional[Callable[[str], Optional[str]]] = None,
    source: str = "state dict",
    log: Optional[Callable[[str], None]] = print,
    report: Optional[LoadReport] = None,
) -> LoadReport:
    """Load what fits of the flat `state` into `module` and report; the matching and refusals of the
    module doc. `rename(key) -> key or None` maps (or drops) checkpoint keys before prefixes are
    considered, for checkpoints in another library's naming (default for a transformers model:
    transformers' own rules from the names it saves to the names of its modules, and its
    `base_model_prefix` as a prefix). `log` receives one warning line when the
    load is partial (missing or skipped mismatched tensors)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    preferred = _normalise_prefixes(prefixes)
    if rename is None and _is_transformers_model(module):
        from pyfast.models.hf import transformers_key_renamer

        rename = transformers_key_renamer(module)
        base = getattr(module, "base_model_prefix", "")
        preferred += (f"{base}.",) if base and f"{base}." not in preferred else ()
    report = report or LoadReport(source=source)
    report.min_fraction = min_fraction

    tensors, origin = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            report.ignored.append(str(key))
            continue
        name = str(key)
        if rename is not None:
            try:
                name = rename(name)
            except WeightsError as error:
                raise WeightsError(f"{source}: {error}") from None
            if name is None:
                report.ignored.append(str(key))
                continue
        if name in tensors:
            raise WeightsError(f"{source}: checkpoint keys {origin[name]!r} and {key!r} both name {name!r}")
        tensors[name], origin[name] = value, key
    report.checkpoint_tensors = len(tensors)
    report.checkpoint_elements = sum(t.numel() for t in tensors.values())
    report.checkpoint_dtypes = dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors.values()))

    own = {k: v for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    report.model_tensors = len(own)
    report.model_elements = sum(v.numel() for v in own.values())
    strip, add = (_choose_prefixes(list(tensors), set(own), DEFAULT_PREFIXES, preferred, source)
                  if tensors and own else ("", ""))
    report.prefix, report.added_prefix = strip, add

    usable = {}
    claimed = set()
    for key, value in tensors.items():
        target = _retarget(key, strip, add)
        if target not in own or target in claimed:
            report.unexpected.append(key)
        elif _shape(value) != _shape(own[target]):
            report.mismatched.append((target, _shape(value), _shape(own[target])))
            claimed.add(target)
        else:
            usable[target] = value
            claimed.add(target)
    loaded_ids = {id(own[k]) for k in usable}
    mismatched_keys = {k for k, _, _ in report.mismatched}
    for key, value in own.items():
        if key in usable:
            report.loaded.append(key)
            report.loaded_elements += value.numel()
        elif id(value) in loaded_ids and key not in mismatched_keys:
            report.tied.append(key)
            report.loaded_elements += value.numel()
        elif key not in mismatched_keys:
            report.missing.append(key)

    if report.mismatched and strict_shapes:
        key, theirs, ours = report.mismatched[0]
        rest = f"strict_shapes=False loads the other {len(usable)}" if usable else "no tensor fits"
        raise WeightsError(
            f"{source}: {len(report.mismatched)} of the model's {report.model_tensors} tensors have another shape "
            f"in the checkpoint (e.g. {key}: checkpoint {theirs} vs model {ours}): was it made with another "
            f"config? ({rest})",
            report,
        )
    if own and not usable:
        hint = (
            f"; {len(report.mismatched)} matched by name but have other shapes" if report.mismatched else
            f"; checkpoint keys look like {next(iter(tensors))!r} ({_key_groups(tensors)}), model keys like "
            f"{next(iter(own))!r}: pass prefixes=... or state_key=..." if tensors else "; the checkpoint holds no tensors"
        )
        raise WeightsError(f"{source}: checkpoint matches too little of the model: nothing matched{hint}", report)
    if report.matched_fraction < min_fraction:
        missing = f"; missing e.g. {_some(report.missing, 3)}" if report.missing else ""
        if report.mismatched:
            key, theirs, ours = report.mismatched[0]
            missing += (f"; {len(report.mismatched)} have another shape in the checkpoint (shape mismatch, e.g. "
                        f"{key}: checkpoint {theirs} vs model {ours})")
        raise WeightsError(
            f"{source}: checkpoint matches too little of the model: {len(report.loaded) + len(report.tied)} "
            f"of {report.model_tensors} tensors ({report.tensor_fraction:.1%}), {report.element_fraction:.1%} of the "
            f"elements; need {min_fraction:.0%} (min_fraction){missing}",
            report,
        )
    module.load_state_dict(usable, strict=False)
    report.applied = True
    if log is not None and not report.complete:
        log(f"warning: {source}: partial load: {report.describe()}")
    return report


def load_weights(
    module: nn.Module,
    path,
    *,
    prefixes: Iterable[str] = (),
    min_fraction: float = 1.0,
    weights_only: bool = True,
    strict_shapes: bool = True,
    map_location="cpu",
    state_key: Optional[str] = None,
    rename: Optional[Callable[[str], Optional[str]]] = None,
    log: Optional[Callable[[str], None]] = print,
) -> LoadReport:
    """Load the weights at `path` into `module` and return the LoadReport; raise WeightsError (one
    line naming the file; `.report` set once matching began) when the file cannot be read or the
    weights do not fit. See the module doc for files, state-dict lookup, prefixes and refusals.

    prefixes: extra leading prefixes to strip (`module.`, `_orig_mod.`, `model.` always are tried).
    min_fraction: the least fraction of the model to load (default 1.0: every tensor).
    weights_only: False unpickles arbitrary objects (runs code from the file): only for files you
    trust; the report's `format` and a log line say when it was used.
    """
    if not weights_only and log is not None:
        log(f"warning: {os.fspath(path)}: loading with weights_only=False: the file may run code")
    found = read_weights(path, state_key=state_key, weights_only=weights_only, map_location=map_location)
    return apply_weights_file(module, found, prefixes=prefixes, min_fraction=min_fraction,
                              strict_shapes=strict_shapes, rename=rename, log=log)


def apply_weights_file(module: nn.Module, found: WeightsFile, **options) -> LoadReport:
    """`apply_state_dict` of a file already read by `read_weights`, the report carrying what was
    found around the state dict (format, where, config)."""
    report = LoadReport(
        source=found.path, format=found.format, state_key=found.state_key, other_state_keys=found.other_state_keys,
        config=found.config, config_key=found.config_key, ignored=list(found.ignored),
    )
    return apply_state_dict(module, found.state_dict, source=found.path, report=report, **options)
