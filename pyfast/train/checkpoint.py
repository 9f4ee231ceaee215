"""Checkpoints that survive a crash mid-write and loads that say what they did.

`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, `os.replace`s it over
the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never half of
one. `load_checkpoint` loads with `weights_only=True`.

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
from torch import nn

from pyfast import _io

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(path, payload: dict, *, serialize: Callable[[dict, io.BytesIO], None] | None = None) -> None:
    """Serialize `payload` with torch.save and write it atomically to `path`."""
    buffer = io.BytesIO()
    (serialize or torch.save)(payload, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _io.atomic_write(path, [buffer.getbuffer()], sync_folder=True)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The payload saved at `path`. Raises CheckpointError naming the file for a missing or unreadable checkpoint."""
    where = os.fspath(path)
    try:
        payload = torch.load(where, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {where}") from None
    except Exception as error:  # a damaged file: say which and why, in one line
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {where}: {type(error).__name__}: {text}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where} does not hold a checkpoint dict")
    return payload


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
