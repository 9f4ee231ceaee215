"""Token and spatial pooling of captured activations, per layer.

`--pool [PATTERN=]KIND[:DIMS]`, repeatable. KIND is none, mean, max or cls. PATTERN (fnmatch, over
the stored tensor names) picks the layers it applies to; without one it applies to every layer.
When several specs match a layer the last one given wins. DIMS lists the tensor dimensions to
reduce (0 is the batch); without it they follow from the rank:

    (B, C)           nothing to pool: stored as is
    (B, T, C)        tokens: mean/max over T (dim 1); cls takes token 0
    (B, C, H, W...)  maps: mean/max over the spatial dims (2, 3, ...); cls is an error

Channels-last maps (SAM's hidden states are (B, h, w, C)) need their dims: `mean:1,2`. Means are
taken in float32 whatever the activation's dtype.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from pyfast.capture.errors import CaptureError
from pyfast.capture.layers import unknown_pattern_message

POOL_KINDS = ("none", "mean", "max", "cls")


@dataclass(frozen=True)
class PoolSpec:
    kind: str
    dims: Optional[Tuple[int, ...]] = None  # None: from the rank
    pattern: Optional[str] = None  # None: every layer
    text: str = ""


def parse_pool_spec(text: str) -> PoolSpec:
    """`mean`, `max:1,2`, `encoder.*=cls` -> PoolSpec; ValueError naming the problem."""
    raw = str(text).strip()
    pattern, eq, body = raw.rpartition("=")
    pattern = pattern.strip() if eq else None
    if eq and not pattern:
        raise ValueError(f"--pool {text!r}: empty layer pattern before '='")
    kind, colon, dims_text = body.partition(":")
    kind = kind.strip()
    if kind not in POOL_KINDS:
        raise ValueError(f"--pool {text!r}: unknown pooling {kind!r} (expected one of {', '.join(POOL_KINDS)})")
    dims = None
    if colon:
        try:
            dims = tuple(int(d) for d in dims_text.split(","))
        except ValueError:
            raise ValueError(f"--pool {text!r}: dims {dims_text!r} must be integers like 1,2") from None
        if kind == "none":
            raise ValueError(f"--pool {text!r}: 'none' takes no dims")
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"--pool {text!r}: dims must be distinct and >= 1 (0 is the batch)")
        if kind == "cls" and len(dims) != 1:
            raise ValueError(f"--pool {text!r}: cls takes token 0 along one dim")
    return PoolSpec(kind=kind, dims=dims, pattern=pattern, text=raw)


def parse_pool_specs(values: Sequence[str] | None) -> List[PoolSpec]:
    return [value if isinstance(value, PoolSpec) else parse_pool_spec(value) for value in (values or [])]


def spec_for(name: str, specs: Sequence[PoolSpec]) -> PoolSpec:
    """The spec that applies to the tensor `name`: the last one whose pattern matches it."""
    chosen = PoolSpec("none")
    for spec in specs:
        if spec.pattern is None or fnmatch.fnmatchcase(name, spec.pattern):
            chosen = spec
    return chosen


def check_patterns(specs: Sequence[PoolSpec], names: Sequence[str]) -> None:
    """Every pooling pattern must match a captured tensor."""
    for spec in specs:
        if spec.pattern is not None and not any(fnmatch.fnmatchcase(n, spec.pattern) for n in names):
            raise CaptureError(f"--pool {spec.text!r}: {unknown_pattern_message(spec.pattern, list(names), 'captured tensor')}")


def resolve(spec: PoolSpec, name: str, shape: Sequence[int]) -> Tuple[str, Tuple[int, ...]]:
    """(kind, dims) for a tensor of `shape` (batch included); ('none', ()) when nothing is pooled."""
    rank = len(shape)
    if spec.kind == "none" or (spec.dims is None and rank <= 2):
        return "none", ()
    if spec.dims is not None:
        bad = [d for d in spec.dims if d >= rank]
        if bad:
            raise CaptureError(f"--pool {spec.text!r}: {name} has shape {tuple(shape)}, no dim {bad[0]}")
        return spec.kind, tuple(sorted(spec.dims))
    if rank == 3:
        return spec.kind, (1,)
    if spec.kind == "cls":
        raise CaptureError(
            f"--pool {spec.text!r}: cls takes token 0 of (B, T, C) tokens, but {name} has shape {tuple(shape)}; "
            "give the token dim (cls:1) or pool it with mean/max"
        )
    return spec.kind, tuple(range(2, rank))


def pool(tensor: torch.Tensor, kind: str, dims: Tuple[int, ...]) -> torch.Tensor:
    """`tensor` reduced as resolved by `resolve`."""
    if kind == "none":
        return tensor
    if kind == "mean":
        return tensor.float().mean(dim=dims)
    if kind == "max":
        return tensor.amax(dim=dims)
    if kind == "cls":
        return tensor.select(dims[0], 0)
    raise AssertionError(f"unknown pooling {kind!r}")  # parse_pool_spec restricts the kinds


def pooled_shape(shape: Sequence[int], kind: str, dims: Tuple[int, ...]) -> Tuple[int, ...]:
    if kind == "none":
        return tuple(shape)
    return tuple(s for i, s in enumerate(shape) if i not in dims)


def describe(kind: str, dims: Tuple[int, ...]) -> str:
    """`none`, `mean:2,3`: the canonical text of a resolved pooling (manifest, fingerprints)."""
    return kind if kind == "none" else f"{kind}:{','.join(map(str, dims))}"
