"""Flattening whatever a module returns into named tensors.

A forward may return a tensor, a tuple or list, a dict, a namedtuple, a dataclass or a
transformers `ModelOutput` (a dict of its non-None fields), nested in any way. Each tensor gets a
stable dotted name from its path: `layer` for a tensor, `layer.0` / `layer.1` for a tuple,
`layer.logits` for a dict key or a field. `None` leaves are absences and produce nothing; other
leaves (ints, strings, ...) are returned apart so that the caller can report them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Iterator, Tuple

import torch

_MAX_DEPTH = 16


def iter_leaves(name: str, value, _depth: int = 0) -> Iterator[Tuple[str, object]]:
    """(dotted name, leaf) for every non-None leaf of `value`, in a stable order: mapping
    order, field order, index order."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        yield name, value
        return
    if _depth >= _MAX_DEPTH:
        yield name, value  # reported as a leaf that cannot be stored
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from iter_leaves(f"{name}.{key}", item, _depth + 1)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple: its field names
        for key, item in zip(value._fields, value):
            yield from iter_leaves(f"{name}.{key}", item, _depth + 1)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from iter_leaves(f"{name}.{index}", item, _depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from iter_leaves(f"{name}.{field.name}", getattr(value, field.name), _depth + 1)
    else:
        yield name, value


def describe_leaf(value) -> str:
    """`int64 tensor (2, 5)`, `int`, ...: what a leaf that is not stored was."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} tensor {tuple(value.shape)}"
    return type(value).__name__


def is_storable(value) -> bool:
    """Floating-point tensors are stored; integer and bool tensors and other leaves are not."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()
