"""Checkpoints that survive a crash mid-write, carry a checksum, and loads that say what they did.

`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, `os.replace`s it over
the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never half of
one. The file is a plain `torch.save` file (`torch.load` opens it) whose dict holds a `checksum`:
xxh3-64 over every value of the payload, tensors by their bytes. `load_checkpoint` recomputes it,
so flipped bytes anywhere in the data (a tensor of the optimizer state, a step count) are refused
with the file's name instead of loading silently; it loads with `weights_only=True`.

`load_state_dict_checked` strips `module.` / `_orig_mod.` prefixes (DDP, torch.compile), reports
missing, unexpected and shape-mismatched keys, and refuses a load that matched too little (the
`strict=False` load that silently loads nothing).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import xxhash
from torch import nn

from pyfast import _io
from pyfast.cache.keys import tensor_digest

_PREFIXES = ("module.", "_orig_mod.")
CHECKSUM_KEY = "checksum"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is damaged, or does not fit the model."""


def _feed(h, value) -> None:
    """Feeds a canonical description of `value` to the hash: type tags, then content."""
    if isinstance(value, torch.Tensor):
        h.update(b"T" + tensor_digest(value).encode())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(f"{type(value).__name__}:{value!r};".encode())  # repr: floats round-trip exactly
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__} in a checkpoint")


def payload_checksum(payload: dict) -> str:
    """xxh3-64 of everything in `payload` except its own checksum entry."""
    h = xxhash.xxh3_64()
    _feed(h, {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return f"xxh3_64:{h.hexdigest()}"


def save_checkpoint(path, payload: dict, *, serialize: Callable[[dict, io.BytesIO], None] | None = None) -> None:
    """Serialize `payload` (plus its checksum) with torch.save and write it atomically to `path`."""
    payload = {**payload, CHECKSUM_KEY: payload_checksum(payload)}
    buffer = io.BytesIO()
    (serialize or torch.save)(payload, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _io.atomic_write(path, [buffer.getbuffer()], sync_folder=True)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The payload saved at `path`, its checksum verified (and removed). Raises CheckpointError
    naming the file for a missing, unreadable, damaged or unchecked checkpoint."""
    where = os.fspath(path)
    try:
        payload = torch.load(where, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {where}") from None
    except Exception as error:  # a damaged file: say which and why, in one line
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {where}: {type(error).__name__}: {text}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where} does not hold a checkpoint dict")
    stored = payload.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise CheckpointError(f"checkpoint {where} has no checksum (not written by this version of pyfast); refusing it")
    try:
        actual = payload_checksum(payload)
    except TypeError as error:
        raise CheckpointError(f"checkpoint {where} is damaged: {error}") from None
    if actual != stored:
        raise CheckpointError(f"checkpoint {where} is damaged: its checksum does not match its contents ({stored} stored, {actual} now)")
    if map_location is not None and torch.device(map_location).type != "cpu":
        payload = _to_device(payload, torch.device(map_location))
    return payload


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


@dataclass
class LoadReport:
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)

    @property
    def matched_fraction(self) -> float:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        return len(self.loaded) / total if total else 1.0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 5) -> str:
        def some(items):
            shown = ", ".join(str(i) for i in items[:limit])
            return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")

        parts = [f"loaded {len(self.loaded)} tensors ({self.matched_fraction:.0%} of the model)"]
        if self.missing:
            parts.append(f"missing: {some(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected: {some(self.unexpected)}")
        if self.mismatched:
            parts.append("shape mismatch: " + some([f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]))
        return "; ".join(parts)


def load_state_dict_checked(
    model: nn.Module, state: dict, *, min_fraction: float = 0.9, log: Callable[[str], None] | None = print
) -> LoadReport:
    """Load what fits of `state` into `model`; report the rest; refuse if under `min_fraction` matched."""
    state = strip_prefixes(state)
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    if report.matched_fraction < min_fraction:
        raise CheckpointError(f"checkpoint matches too little of the model: {report.describe()}")
    model.load_state_dict(usable, strict=False)
    if log is not None and not report.clean:
        log(f"warning: partial checkpoint load: {report.describe()}")
    return report
