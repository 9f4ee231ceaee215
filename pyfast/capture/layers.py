"""Choosing the modules to capture by name patterns.

Patterns are fnmatch-style and matched against the names of `model.named_modules()`
(`encoder.layers.*.mlp`; `*` also crosses dots). `--layers` values may be repeated and
comma-separated. The pattern `.` names the model itself: its forward output is captured as
`output` (`output.0`, `output.logits`, ... for structured outputs). Every pattern must match at
least one module; one that matches none is an error listing the closest names.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable, List

from torch import nn

from pyfast.capture.errors import CaptureError

ROOT_PATTERN = "."
ROOT_OUTPUT = "output"  # the flat name of the model's own output
_WILDCARDS = "*?["


def split_patterns(values: Iterable[str]) -> List[str]:
    """`['a.*,b', 'c']` -> `['a.*', 'b', 'c']`: repeated and comma-separated values, in order,
    without duplicates or empty items."""
    if isinstance(values, str):
        values = [values]
    out: List[str] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out


def _close_names(pattern: str, names: List[str], limit: int = 5) -> List[str]:
    """Names near `pattern`: difflib on the pattern as written and with its wildcards taken out."""
    found: List[str] = []
    literal = pattern
    for char in _WILDCARDS:
        literal = literal.replace(char, "0")
    for probe in (pattern, literal):
        for name in difflib.get_close_matches(probe, names, n=limit, cutoff=0.6):
            if name not in found:
                found.append(name)
    return found[:limit]


def unknown_pattern_message(pattern: str, names: List[str], what: str = "module") -> str:
    """`no module matches 'encoder.layers.*.mlp'; did you mean '*encoder.layers.*.mlp'? close names: ...`"""
    parts = [f"no {what} matches {pattern!r}"]
    # A wrapper adds a prefix (`model.` of an hf: backbone): a leading `*` would fix the pattern.
    if not pattern.startswith("*") and any(fnmatch.fnmatchcase(n, "*" + pattern) for n in names):
        parts.append(f"did you mean {'*' + pattern!r} (a prefix is missing)?")
    close = _close_names(pattern, names)
    if close:
        parts.append("close names: " + ", ".join(close))
    elif names:
        parts.append(f"{len(names)} names exist, e.g. " + ", ".join(names[:5]))
    return "; ".join(parts)


def resolve_layers(model: nn.Module, patterns: Iterable[str]) -> List[str]:
    """The module names (`""` for the model itself) selected by `patterns`, in the model's order.

    Raises CaptureError for no pattern at all and for a pattern that matches no module.
    """
    patterns = split_patterns(patterns)
    if not patterns:
        raise CaptureError("--layers: no layer pattern given (e.g. --layers 'encoder.layers.*.mlp'; '.' is the model's output)")
    names = [name for name, _module in model.named_modules() if name]
    chosen = set()
    for pattern in patterns:
        if pattern == ROOT_PATTERN:
            chosen.add("")
            continue
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise CaptureError(f"--layers: {unknown_pattern_message(pattern, names)}")
        chosen.update(matched)
    return [name for name, _module in model.named_modules() if name in chosen]


def output_prefix(module_name: str) -> str:
    """The flat name under which a module's output is stored: its own name, `output` for the model."""
    return module_name or ROOT_OUTPUT
