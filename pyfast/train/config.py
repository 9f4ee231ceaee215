"""The training configuration: one flat dataclass whose field definitions are the single source of truth.

Each field carries its help text, group and limits. From them come the command-line flags
(`pyfast.cli.options` generates one per field), the YAML keys (`config.yaml`, `--config FILE`), and
the one coercion and validation path both go through (`coerce`), so a value is accepted or refused
with the same message wherever it comes from. Settings layer as defaults < `--fast` (FAST) <
`--config FILE.yaml` < flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

import yaml

from pyfast._io import atomic_write_text
from pyfast.data.spec import DEFAULT_MAX_SKIP_FRACTION, parse_data_spec
from pyfast.train.memory import check_settings, parse_rule

DEFAULT_IMAGE_SIZE = 128  # without --image-size and a backbone that declares its own
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BOX_LOSS_MODES = ("iou", "giou", "diou", "ciou")
CACHE_DTYPES = ("fp16", "bf16")
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


@dataclass(frozen=True)
class Option:
    """What a field means and accepts (the metadata of a TrainConfig field).

    minimum / maximum: inclusive bounds; above: an exclusive lower bound; choices: the accepted
    values; metavar: the flag's placeholder; default_text: how help shows the default.
    """

    help: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple | None = None
    metavar: str | None = None
    default_text: str | None = None


def option(default=MISSING, *, factory=MISSING, **meta):
    return field(default=default, default_factory=factory, metadata={"option": Option(**meta)})


@dataclass
class TrainConfig:
    # ---- data
    data: list = option(
        factory=list, group="data", metavar="KIND:PATH[,key=value...]", default_text="the embedded synthetic set",
        help="a data source, repeatable. KIND: synthetic, npz (a folder of .npz files) or coco (an instances "
        "JSON, with images=DIR). Options: optional=1 (skip when missing), max_samples=N; synthetic: "
        "num_samples=N,image_size=S,seed=K",
    )
    synthetic_samples: int = option(512, group="data", minimum=1, metavar="N",
                                    help="samples of the embedded synthetic set used when no --data is given")
    data_seed: int = option(0, group="data", minimum=0, metavar="K", help="seed of the embedded synthetic set")
    image_size: Optional[int] = option(None, group="data", minimum=32, metavar="S",
                                       default_text=f"the backbone's input size, else {DEFAULT_IMAGE_SIZE}",
                                       help="square input size: every image is letterboxed to S x S. A backbone "
                                       "that declares its input size (hf: encoders) refuses another, except ViT/DINO "
                                       "at a multiple of their patch size (position embeddings interpolated)")
    val_fraction: float = option(0.125, group="data", above=0.0, below=1.0, metavar="F",
                                 help="fraction of the samples held out for validation (a fixed split)")
    max_skip_fraction: float = option(DEFAULT_MAX_SKIP_FRACTION, group="data", minimum=0.0, maximum=1.0, metavar="F",
                                      help="stop when more than this fraction of the samples fail to load")
    workers: Optional[int] = option(None, group="data", minimum=0, metavar="N", default_text="0 on CPU, 2 on CUDA",
                                    help="DataLoader worker processes (they also read the feature cache)")
    jitter_shift: float = option(0.15, group="data", minimum=0.0, metavar="X",
                                 help="input-box noise: centre shift, as a fraction of the box size")
    jitter_scale: float = option(0.2, group="data", minimum=0.0, metavar="X",
                                 help="input-box noise: width and height scaled by exp(U(-X, X))")
    # ---- schedule
    epochs: int = option(12, group="schedule", minimum=1, metavar="N", help="passes over the training set")
    max_steps: Optional[int] = option(None, group="schedule", minimum=1, metavar="N", default_text="none",
                                      help="stop after N optimizer steps in all, counted across resumes "
                                      "(the lr schedule still spans --epochs)")
    batch_size: int = option(16, group="schedule", minimum=1, metavar="B", help="samples per micro-batch")
    accumulate: int = option(1, group="schedule", minimum=1, metavar="N", help="micro-batches per optimizer step")
    lr: float = option(1e-2, group="schedule", above=0.0, metavar="X", help="peak learning rate (AdamW)")
    weight_decay: float = option(1e-4, group="schedule", minimum=0.0, metavar="X",
                                 help="AdamW weight decay (not applied to biases and norms)")
    warmup_steps: int = option(20, group="schedule", minimum=0, metavar="N",
                               help="linear warm-up steps before the cosine decay")
    clip_norm: float = option(1.0, group="schedule", metavar="X", help="gradient norm bound (<= 0: no clipping)")
    precision: str = option("auto", group="schedule", choices=PRECISIONS,
                            help="auto: bf16 autocast on CUDA (fp16 + GradScaler where bf16 is unsupported), fp32 on CPU")
    device: str = option("auto", group="schedule", metavar="DEVICE", help=f"{DEVICE_FORMS} (auto: cuda when available)")
    seed: int = option(0, group="schedule", minimum=0, metavar="K", help="seed of the heads' init, data order and box noise")
    # ---- model
    backbone: Optional[str] = option(None, group="model", metavar="MODULE:CALLABLE|hf:PATH", default_text="a small seeded conv stack",
                                     help="frozen feature extractor: a callable building an nn.Module that maps "
                                     "(B, 3, S, S) images in [0, 1] to a tensor, tuple or dict of (B, C, h, w) maps, "
                                     "or hf:PATH[,layers=A+B][,size=N], a SAM / HQ-SAM / ViT / DINOv2 / DINOv3 model "
                                     "directory or cached model id (never downloaded)")
    backbone_weights: Optional[str] = option(None, group="model", metavar="PATH", default_text="the backbone's own",
                                             help="weights to load into the backbone: .pt/.pth/.bin/.ckpt (Lightning, DDP, "
                                             "torch.compile), .safetensors, *.index.json or a model directory; every "
                                             "tensor of the backbone must load, and the load report is printed and kept "
                                             "in summary.json")
    backbone_weights_prefix: list = option(factory=list, group="model", metavar="P", default_text="none",
                                           help="other key prefixes to strip from --backbone-weights (module., "
                                           "_orig_mod. and model. always are tried)")
    backbone_weights_key: Optional[str] = option(None, group="model", metavar="KEY", default_text="found by looking",
                                                 help="where the state dict is in --backbone-weights (a dotted path, "
                                                 "e.g. ema)")
    backbone_weights_unsafe_pickle: bool = option(False, group="model",
                                                  help="read --backbone-weights with torch.load(weights_only=False), for "
                                                  "a checkpoint that pickles Python objects: runs code from the file, "
                                                  "only for files you trust")
    feature_maps: list = option(factory=list, group="model", metavar="NAME", default_text="the only map, or the last",
                                help="the backbone output maps the heads use, by name (a tensor is 'features', a "
                                "tuple's maps are '0', '1', ...; hf: encoders name theirs after layers=: early, "
                                "last, layer3); every map is cached")
    roi_size: int = option(14, group="model", minimum=2, metavar="R", help="RoIAlign output size of the heads")
    context: float = option(1.5, group="model", minimum=1.0, metavar="X", help="each box's RoI is widened by this factor")
    hidden: int = option(64, group="model", minimum=1, metavar="C", help="channels of the heads' conv layers")
    iou_head: bool = option(True, group="model", help="predict each mask's IoU (trained towards pyfast.mask_iou)")
    box_loss: str = option("giou", group="model", choices=BOX_LOSS_MODES, help="IoU variant of the box loss")
    box_weight: float = option(1.0, group="model", minimum=0.0, metavar="W", help="weight of the box loss")
    mask_weight: float = option(1.0, group="model", minimum=0.0, metavar="W", help="weight of the mask loss")
    iou_weight: float = option(0.5, group="model", minimum=0.0, metavar="W", help="weight of the IoU head's loss")
    # ---- run
    out: Optional[str] = option(None, group="run", metavar="RUN_DIR", default_text="runs/train-DATE-TIME",
                                help="run directory; one that already holds a run is refused (continue it with --resume)")
    cache_dir: Optional[str] = option(None, group="run", metavar="DIR", default_text="RUN_DIR/cache",
                                      help="feature cache folder, shareable between runs; off: no cache")
    cache_dtype: str = option("fp16", group="run", choices=CACHE_DTYPES,
                              help="storage dtype of the features (bf16 for encoders beyond float16's range)")
    checkpoint_every: int = option(0, group="run", minimum=0, metavar="N",
                                   help="also save checkpoints/last.pt every N optimizer steps (0: at epoch ends)")
    max_nonfinite_in_a_row: int = option(10, group="run", minimum=1, metavar="N",
                                         help="stop after N optimizer steps in a row with a non-finite loss or gradient")
    memory_every: int = option(10, group="run", minimum=1, metavar="N",
                               help="sample the process's host, DataLoader-worker and CUDA memory and open descriptors "
                               "every N optimizer steps (memory.jsonl, metrics.jsonl, the leak verdict in summary.json)")
    max_memory_growth: Optional[float] = option(None, group="run", above=0.0, metavar="MB_PER_1000_STEPS",
                                                default_text="none",
                                                help="stop the run (checkpoint saved, exit 3) when host, worker or CUDA "
                                                "memory grows faster than this by the leak rule (sustained, confident)")
    memory_rule: Optional[str] = option(None, group="run", metavar="KEY=VALUE[,...]", default_text="the default rule",
                                        help="the leak rule's settings: host_mb, workers_mb, cuda_mb, fds (bounds per "
                                        "1000 steps; 10, 10, 10, 5), warmup_steps (200), window (60 samples), "
                                        "min_samples (20), min_steps (200), confidence (0.95)")
    dist_timeout: float = option(600.0, group="run", above=0.0, metavar="S",
                                 help="with several processes (torchrun): seconds a collective waits for the other "
                                 "ranks before the run stops with an error")
    fast: bool = option(False, group="run", help="the quick preset (recorded; the --fast flag applies FAST)")

    def validate(self) -> "TrainConfig":
        """Every field coerced and checked (the same checks as flags and YAML values), then the data
        specs parsed. Returns self; raises ConfigError naming the field."""
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        for text in self.data:
            try:
                parse_data_spec(text)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.max_memory_growth is not None and not math.isfinite(self.max_memory_growth):
            raise ConfigError(f"max_memory_growth must be a finite number > 0, got {self.max_memory_growth!r}")
        try:
            check_settings(self.memory_every, parse_rule(self.memory_rule))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_specs(self) -> list:
        """The SourceSpecs to train on: `data`, or the embedded synthetic set at `image_size`."""
        texts = self.data or [
            f"synthetic:,num_samples={self.synthetic_samples},image_size={self.image_size or DEFAULT_IMAGE_SIZE},"
            f"seed={self.data_seed}"
        ]
        return [parse_data_spec(text) for text in texts]


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

FIELDS = {f.name: f for f in fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def flag_name(name: str) -> str:
    """The command-line flag of field `name`: `--batch-size` for batch_size."""
    return "--" + name.replace("_", "-")


def option_of(name: str) -> Option:
    return FIELDS[name].metadata["option"]


def default_of(name: str) -> Any:
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def kind_of(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field: int, float, str, bool or list."""
    hint = _TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union
    base = args[0] if optional else hint
    return (typing.get_origin(base) or base), optional


def _bounds(opt: Option) -> str:
    parts = []
    if opt.minimum is not None:
        parts.append(f">= {opt.minimum:g}")
    if opt.above is not None:
        parts.append(f"> {opt.above:g}")
    if opt.maximum is not None:
        parts.append(f"<= {opt.maximum:g}")
    if opt.below is not None:
        parts.append(f"< {opt.below:g}")
    return " and ".join(parts)


def coerce(name: str, value: Any, label: str | None = None) -> Any:
    """`value` for field `name` in the field's type, checked against its limits.

    Strings are parsed (flags arrive as text; YAML gives `1e-3` as a string); YAML's ints become
    floats where the field is a float. `label` names the value in errors (e.g. `--lr` or
    `run.yaml: lr`); default: the field name. Raises ConfigError.
    """
    label = label or name
    base, optional = kind_of(name)
    opt = option_of(name)
    bounds = _bounds(opt)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{label} must be {expected}, got {value!r}")

    if value is None or (optional and base is int and isinstance(value, str) and value.strip().lower() in ("none", "auto")):
        if optional:
            return None
        fail("set" if base is not list else "a list")
    if base is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if base is int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                fail("an integer" + (f" {bounds}" if bounds else ""))
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer" + (f" {bounds}" if bounds else ""))
        number = value
    elif base is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                fail("a number" + (f" {bounds}" if bounds else ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number" + (f" {bounds}" if bounds else ""))
        value = float(value)
        if not math.isfinite(value):
            fail("a finite number" + (f" {bounds}" if bounds else ""))
        number = value
    elif base is str:
        if not isinstance(value, str) or not value:
            fail("a non-empty string")
        number = None
    else:  # list of str
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            fail("a list of non-empty strings")
        value = list(value)
        number = None
    if number is not None:
        if (
            (opt.minimum is not None and number < opt.minimum)
            or (opt.maximum is not None and number > opt.maximum)
            or (opt.above is not None and number <= opt.above)
            or (opt.below is not None and number >= opt.below)
        ):
            fail(("an integer " if base is int else "a number ") + bounds)
    if opt.choices is not None and value not in opt.choices:
        fail(f"one of {', '.join(map(str, opt.choices))}")
    if name == "device" and not _DEVICE.match(value):
        fail(DEVICE_FORMS)
    return value


def check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")


def load_yaml(path: str | os.PathLike) -> dict:
    """The options in a YAML file, coerced and checked; every failure is a one-line ConfigError naming the file."""
    where = f"config file {os.fspath(path)!r}"
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a folder, not a YAML file") from None
    except OSError as error:
        raise ConfigError(f"{where} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {error}".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must hold a mapping of option: value")
    check_keys(values, where)
    return {name: coerce(name, value, f"{where}: {name}") for name, value in values.items()}


def build_config(*layers: dict) -> TrainConfig:
    """TrainConfig from defaults updated by each layer in order (later wins); validated."""
    merged: dict = {}
    for layer in layers:
        check_keys(layer, "config")
        merged.update(layer)
    return TrainConfig(**merged).validate()


def save_config(config: TrainConfig, path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.as_dict(), sort_keys=False))
