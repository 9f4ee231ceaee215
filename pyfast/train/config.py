"""The training configuration: one flat dataclass, layered defaults < --fast preset < YAML file < flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from pyfast._io import atomic_write_text

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BOX_LOSS_MODES = ("iou", "giou", "diou", "ciou")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


@dataclass
class TrainConfig:
    # data
    data: list = field(default_factory=list)  # --data specs; empty: the embedded synthetic set
    synthetic_samples: int = 512
    image_size: int = 128
    data_seed: int = 0
    val_fraction: float = 0.125
    max_skip_fraction: float = 0.05
    workers: Optional[int] = None  # None: 0 on CPU (the loop is compute-bound), 2 on CUDA
    # input-box noise (fractions of the box size), deterministic in (seed, epoch, sample)
    jitter_shift: float = 0.15
    jitter_scale: float = 0.2
    # schedule
    epochs: int = 12
    max_steps: Optional[int] = None  # a total across resumes; the lr schedule still spans --epochs
    batch_size: int = 16
    accumulate: int = 1
    lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    clip_norm: float = 1.0  # <= 0: no clipping
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    # model
    backbone: Optional[str] = None  # module:callable; None: the built-in TinyBackbone
    roi_size: int = 14
    context: float = 1.5
    hidden: int = 64
    iou_head: bool = True
    box_loss: str = "giou"
    box_weight: float = 1.0
    mask_weight: float = 1.0
    iou_weight: float = 0.5
    # run
    out: Optional[str] = None
    cache_dir: Optional[str] = None  # None: <out>/cache; "off": no cache
    checkpoint_every: int = 0  # optimizer steps between 'last' checkpoints (0: every epoch only)
    max_nonfinite_in_a_row: int = 10
    fast: bool = False

    def validate(self) -> "TrainConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("synthetic_samples", "image_size", "epochs", "batch_size", "accumulate", "roi_size", "hidden"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "data_seed", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        need(self.image_size >= 32, f"image_size must be >= 32, got {self.image_size}")
        need(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1), f"max_steps must be >= 1, got {self.max_steps!r}")
        need(self.workers is None or (isinstance(self.workers, int) and self.workers >= 0), f"workers must be >= 0, got {self.workers!r}")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(0.0 <= self.max_skip_fraction <= 1.0, f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.jitter_shift >= 0 and self.jitter_scale >= 0, "jitter_shift and jitter_scale must be >= 0")
        need(self.context >= 1.0, f"context must be >= 1, got {self.context}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.box_loss in BOX_LOSS_MODES, f"box_loss must be one of {', '.join(BOX_LOSS_MODES)}, got {self.box_loss!r}")
        need(self.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row must be >= 1")
        need(isinstance(self.data, list) and all(isinstance(d, str) for d in self.data), "data must be a list of KIND:PATH strings")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The quick preset: small images, a small set, a short schedule, the cache on.
FAST = {
    "image_size": 96,
    "synthetic_samples": 640,
    "epochs": 10,
    "batch_size": 16,
    "roi_size": 8,
    "hidden": 48,
    "warmup_steps": 10,
    "fast": True,
}

_FIELDS = {f.name for f in fields(TrainConfig)}


def check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")


def _coerce(name: str, value: Any) -> Any:
    """YAML gives ints for floats like `1` and strings for `1e-3`; bring them to the field's type."""
    current = TrainConfig.__dataclass_fields__[name].type
    if value is None:
        return None
    if "float" in str(current) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if name == "data" and isinstance(value, str):
        return [value]
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {error}".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {os.fspath(path)!r} must hold a mapping of option: value")
    check_keys(values, os.fspath(path))
    return values


def build_config(*layers: dict) -> TrainConfig:
    """TrainConfig from defaults updated by each layer in order (later wins); validated."""
    merged: dict = {}
    for layer in layers:
        check_keys(layer, "config")
        merged.update({k: _coerce(k, v) for k, v in layer.items()})
    try:
        config = TrainConfig(**merged)
    except TypeError as error:  # pragma: no cover - keys were checked
        raise ConfigError(str(error)) from None
    return config.validate()


def save_config(config: TrainConfig, path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.as_dict(), sort_keys=False))
