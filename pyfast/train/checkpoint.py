"""Checkpoints that survive a crash mid-write and loads that say what they did.

`save_checkpoint` writes to a temporary file in the same folder, fsyncs it, `os.replace`s it over
the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never half of
one. `load_checkpoint` loads with `weights_only=True`. `load_state_dict_checked` is
`pyfast.models.weights.apply_state_dict` (prefix stripping, report of missing, unexpected and
shape-mismatched keys, refusal of a load that matched too little) with the errors a checkpoint load
raises.
"""

from __future__ import annotations

import io
import os
from typing import Callable

import torch
from torch import nn

from pyfast import _io
from pyfast.models.weights import LoadReport, WeightsError, apply_state_dict, strip_prefixes  # noqa: F401


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
