"""Loading the weights users already have, with a report of what went where.

    report = pyfast.load_weights(model, "finetuned.ckpt")  # WeightsError if it does not fit
    print(report.describe())

Three parts: `files` reads a checkpoint, sharded checkpoint or Hugging Face model directory into
one flat state dict and finds its config (`read_weights`, `WeightsFile`); `matching` maps its keys
onto the model's (DDP, torch.compile and Lightning prefixes, a checkpoint of an inner module),
refuses what does not fit and loads the rest (`apply_state_dict`); `report` holds what happened
(`LoadReport`) and the error that carries it (`WeightsError`). Each module's doc gives its rules.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

from torch import nn

from pyfast.models.weights.files import (
    CONFIG_KEYS,
    HF_WEIGHT_FILES,
    STATE_DICT_KEYS,
    TORCH_SUFFIXES,
    WeightsFile,
    read_weights,
)
from pyfast.models.weights.matching import DEFAULT_PREFIXES, apply_state_dict, strip_prefixes
from pyfast.models.weights.report import LoadReport, WeightsError

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_PREFIXES",
    "HF_WEIGHT_FILES",
    "STATE_DICT_KEYS",
    "TORCH_SUFFIXES",
    "LoadReport",
    "WeightsError",
    "WeightsFile",
    "apply_state_dict",
    "apply_weights_file",
    "load_weights",
    "read_weights",
    "strip_prefixes",
]


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
