"""`--data KIND:PATH[,key=value...]` source specifications and the shared command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence

SOURCE_KINDS = ("synthetic", "npz", "coco")
DEFAULT_DATA_SPEC = "synthetic:"
DEFAULT_MAX_SKIP_FRACTION = 0.05

_COMMON_OPTIONS = ("optional", "max_samples")
_KIND_OPTIONS = {
    "synthetic": _COMMON_OPTIONS + ("num_samples", "image_size", "seed"),
    "npz": _COMMON_OPTIONS,
    "coco": _COMMON_OPTIONS + ("images",),
}
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class SourceSpec:
    """One parsed `--data` value. `path` is kept as written: it names the source in tables and logs."""

    kind: str
    path: str = ""
    optional: bool = False
    max_samples: Optional[int] = None
    images: Optional[str] = None  # coco: the image folder
    num_samples: Optional[int] = None  # synthetic
    image_size: Optional[int] = None  # synthetic
    seed: Optional[int] = None  # synthetic
    text: str = ""  # the spec as given, for error messages

    @property
    def label(self) -> str:
        """How tables and skip records name this source, e.g. `npz (/data/x)` or `synthetic`."""
        return f"{self.kind} ({self.path})" if self.path else self.kind


def _parse_int(text: str, option: str, spec: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--data {spec!r}: option {option}={text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"--data {spec!r}: option {option}={value} must be >= {minimum}")
    return value


def _parse_bool(text: str, option: str, spec: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE_WORDS:
        return True
    if lowered in _FALSE_WORDS:
        return False
    raise ValueError(f"--data {spec!r}: option {option}={text!r} must be 1 or 0")


def parse_data_spec(text: str) -> SourceSpec:
    """Parse `KIND:PATH[,key=value...]`, e.g. `npz:/data/x,optional=1` or `synthetic:,num_samples=64`.

    Raises ValueError naming the unknown kind or option, or the malformed value.
    """
    if not isinstance(text, str):
        raise TypeError(f"data spec must be a str, got {type(text).__name__}")
    kind, colon, rest = text.partition(":")
    kind = kind.strip()
    if not colon:
        raise ValueError(
            f"--data {text!r}: expected KIND:PATH[,key=value...] with KIND one of {', '.join(SOURCE_KINDS)}"
        )
    if kind not in SOURCE_KINDS:
        raise ValueError(f"--data {text!r}: unknown source kind {kind!r} (expected one of {', '.join(SOURCE_KINDS)})")
    path, *option_items = rest.split(",")
    path = path.strip()
    allowed = _KIND_OPTIONS[kind]
    values = {}
    for item in option_items:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"--data {text!r}: option {item!r} is not key=value")
        if key not in allowed:
            raise ValueError(
                f"--data {text!r}: unknown option {key!r} for {kind} sources (allowed: {', '.join(allowed)})"
            )
        if key in values:
            raise ValueError(f"--data {text!r}: option {key!r} given twice")
        values[key] = value.strip()

    fields = {"kind": kind, "path": path, "text": text}
    if "optional" in values:
        fields["optional"] = _parse_bool(values["optional"], "optional", text)
    if "max_samples" in values:
        fields["max_samples"] = _parse_int(values["max_samples"], "max_samples", text, minimum=1)
    if "num_samples" in values:
        fields["num_samples"] = _parse_int(values["num_samples"], "num_samples", text, minimum=1)
    if "image_size" in values:
        fields["image_size"] = _parse_int(values["image_size"], "image_size", text, minimum=32)
    if "seed" in values:
        fields["seed"] = _parse_int(values["seed"], "seed", text, minimum=0)
    if "images" in values:
        if not values["images"]:
            raise ValueError(f"--data {text!r}: option images= needs a folder")
        fields["images"] = values["images"]

    if kind in ("npz", "coco") and not path:
        raise ValueError(f"--data {text!r}: {kind} sources need a PATH ({kind}:PATH)")
    if kind == "coco" and "images" not in fields:
        raise ValueError(f"--data {text!r}: coco sources need images=DIR (the folder the file_names are relative to)")
    return SourceSpec(**fields)


def _spec_argument(text: str) -> SourceSpec:
    # argparse turns a plain ValueError into "invalid value"; ArgumentTypeError keeps our message.
    try:
        return parse_data_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fraction_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-skip-fraction {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--max-skip-fraction {value} must be between 0 and 1")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--data SPEC` (repeatable) and `--max-skip-fraction F`, shared by pyfast-train and pyfast-doctor.

    `args.data` is a list of SourceSpec or None when no --data was given; `data_specs_from_args`
    applies the default (the embedded synthetic set).
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        action="append",
        type=_spec_argument,
        default=None,  # not a list: argparse would append to the shared default
        metavar="KIND:PATH[,key=value...]",
        help=(
            "a data source, repeatable. KIND is synthetic, npz (a folder of .npz files) or coco "
            "(an instances JSON, with images=DIR). Options: optional=1 (skip when missing), "
            "max_samples=N; synthetic: num_samples=N,image_size=S,seed=K. "
            f"Default: {DEFAULT_DATA_SPEC}"
        ),
    )
    group.add_argument(
        "--max-skip-fraction",
        type=_fraction_argument,
        default=DEFAULT_MAX_SKIP_FRACTION,
        metavar="F",
        help="abort when more than this fraction of the samples fail to load (default: %(default)s)",
    )
    return parser


def data_specs_from_args(args: argparse.Namespace, default: Sequence[str] = (DEFAULT_DATA_SPEC,)) -> List[SourceSpec]:
    """The `--data` specs of parsed arguments, or the parsed `default` specs when none were given."""
    if args.data:
        return list(args.data)
    return [parse_data_spec(text) for text in default]
