"""Checkpoints that survive a crash mid-write, carry a checksum, and loads that say what they did.

`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, `os.replace`s it over
the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never half of
one. The file is a plain `torch.save` file (`torch.load` opens it) whose dict holds a `checksum`:
xxh3-64 over every value of the payload, tensors by their bytes. `load_checkpoint` recomputes it,
so flipped bytes anywhere in the data (a tensor of the optimizer state, a step count) are refused
with the file's name instead of loading silently; it loads with `weights_only=True`.

`load_state_dict_checked` is `pyfast.models.weights.apply_state_dict` (prefix stripping, report of
missing, unexpected and shape-mismatched keys, refusal of a load that matched too little) with the
errors a checkpoint load raises.
"""

from __future__ import annotations

import io
import os
from typing import Callable

import torch
import xxhash
from torch import nn

from pyfast import _io
from pyfast.cache.keys import tensor_digest
from pyfast.models.weights import LoadReport, WeightsError, apply_state_dict, strip_prefixes  # noqa: F401

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


def load_state_dict_checked(
    model: nn.Module, state: dict, *, min_fraction: float = 0.9, log: Callable[[str], None] | None = print
) -> LoadReport:
    """Load what fits of `state` into `model`; report the rest; refuse if under `min_fraction` matched."""
    try:
        report = apply_state_dict(model, state, min_fraction=min_fraction, strict_shapes=False, log=None,
                                  source="checkpoint")
    except WeightsError as error:
        raise CheckpointError(str(error)) from None
    if log is not None and not report.clean:
        log(f"warning: partial checkpoint load: {report.describe()}")
    return report
