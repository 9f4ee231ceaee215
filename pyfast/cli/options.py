"""Command-line flags generated from the TrainConfig field definitions.

Every field becomes `--field-name` with its help text and default; values arrive as text and go
through `pyfast.train.config.coerce`, the same coercion and checks as YAML values, so a bad value
gets the same one-line message from a flag or a file. `--data` is parsed into data specs by
argparse itself. `--fast` applies the FAST preset, `--config FILE.yaml` a YAML layer.
"""

from __future__ import annotations

import argparse
from typing import Iterable, Optional

from pyfast.data.spec import parse_data_spec
from pyfast.train.config import FAST, FIELDS, ConfigError, coerce, default_of, flag_name, kind_of, load_yaml, option_of

GROUP_TITLES = {"data": "data", "schedule": "schedule", "model": "model", "run": "run"}


flag = flag_name


def _default_text(name: str) -> str:
    opt = option_of(name)
    if opt.default_text is not None:
        return opt.default_text
    value = default_of(name)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def fast_help() -> str:
    settings = ", ".join(f"{flag(k)} {v}" for k, v in FAST.items() if k != "fast")
    return f"the quick preset: {settings}; flags given with it still win"


def _data_spec(text: str) -> str:
    # argparse turns a plain ValueError into "invalid value"; ArgumentTypeError keeps our message.
    try:
        return parse_data_spec(text).text
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_config_flags(parser: argparse.ArgumentParser, names: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """Add `--fast`, `--config` and one flag per config field (all of them, or `names`).

    Flags not given stay absent from the namespace (default SUPPRESS), so `config_layers` knows
    which ones the user set.
    """
    chosen = [n for n in FIELDS if n != "fast" and (names is None or n in set(names))]
    parser.set_defaults(config_flags=tuple(chosen))  # which attributes of the namespace are config fields
    parser.add_argument("--fast", action="store_true", help=fast_help())
    parser.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (keys as in a run's config.yaml)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in chosen:
        opt = option_of(name)
        group = groups.get(opt.group)
        if group is None:
            group = groups[opt.group] = parser.add_argument_group(GROUP_TITLES.get(opt.group, opt.group))
        base, _optional = kind_of(name)
        text = f"{opt.help} (default: {_default_text(name)})".replace("%", "%%")
        common = dict(dest=name, default=argparse.SUPPRESS, help=text)
        if base is bool:
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, **common)
        elif name == "data":
            group.add_argument(flag(name), action="append", type=_data_spec, metavar=opt.metavar, **common)
        elif base is list:
            group.add_argument(flag(name), nargs="+", metavar=opt.metavar or "VALUE", **common)
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else opt.metavar
            group.add_argument(flag(name), metavar=metavar, **common)
    return parser


def flag_values(args: argparse.Namespace) -> dict:
    """The config fields given as flags, coerced and checked (ConfigError names the flag)."""
    names = getattr(args, "config_flags", ())
    return {name: coerce(name, getattr(args, name), flag(name)) for name in names if hasattr(args, name)}


def config_layers(args: argparse.Namespace) -> list[dict]:
    """The layers above the defaults, in order: --fast, --config FILE, the flags."""
    layers = []
    if getattr(args, "fast", False):
        layers.append(dict(FAST))
    if getattr(args, "config", None):
        layers.append(load_yaml(args.config))
    layers.append(flag_values(args))
    return layers


__all__ = ["ConfigError", "add_config_flags", "config_layers", "fast_help", "flag", "flag_values"]
