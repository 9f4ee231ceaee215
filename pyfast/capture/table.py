"""What a capture stores: the layer table a probe forward finds, and the per-batch packer checking
each output against it.

The probe runs the model once on two blank images with the hooks recording only names, shapes and
dtypes: every float tensor an output holds becomes a row (name, module, per-sample shape, pooling,
stored shape); a first dimension that is not the batch is an error. During the capture the
`BatchPacker` is the hooks' transform: it checks an output against its row, pools it and packs it
(`pyfast.pack`) in one piece per shard the batch falls into, so each shard gets exact statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from pyfast.cache import pack
from pyfast.capture import pooling
from pyfast.capture.errors import CaptureError
from pyfast.capture.hooks import ActivationHooks
from pyfast.capture.layers import ROOT_PATTERN

PROBE_BATCH = 2  # two images, so that a dimension that is not the batch cannot pass for it


@dataclass(frozen=True)
class CapturedTensor:
    """One row of the layer table: a stored tensor, the module it comes from and its shapes."""

    name: str
    module: str  # "" for the model itself
    output_shape: tuple  # per sample, as the module returns it
    shape: tuple  # per sample, as stored (after pooling)
    source_dtype: str
    pool_kind: str = "none"
    pool_dims: tuple = ()

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "module": self.module or ROOT_PATTERN,
            "output_shape": list(self.output_shape),
            "shape": list(self.shape),
            "output_dtype": self.source_dtype,
            "pool": pooling.describe(self.pool_kind, self.pool_dims),
        }

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _probe_forward(model: nn.Module, hooks: ActivationHooks, image_size: int, device, autocast) -> None:
    images = torch.zeros(PROBE_BATCH, 3, image_size, image_size, device=device)
    with hooks, torch.no_grad(), autocast():
        try:
            model(images)
        except CaptureError:
            raise
        except Exception as error:
            raise CaptureError(
                f"the model failed on a probe batch of {PROBE_BATCH} blank {image_size}x{image_size} images: "
                f"{type(error).__name__}: {error}"
            ) from error


def probe_layers(model: nn.Module, layers: Sequence[str], image_size: int, device: torch.device, autocast,
                 pool_specs: Sequence[pooling.PoolSpec]):
    """The layer table from one forward of two blank images: ([CapturedTensor], ignored, not_run).

    ignored: leaves that are not float tensors (name -> what they were); not_run: selected
    modules that never ran in that forward.
    """
    seen: Dict[str, tuple] = {}

    def record(name: str, tensor: torch.Tensor) -> None:
        seen[name] = (tuple(tensor.shape), dtype_name(tensor.dtype))

    hooks = ActivationHooks(model, layers, transform=record)
    _probe_forward(model, hooks, image_size, device, autocast)
    origins = hooks.origins
    ran = set(origins.values())
    not_run = [name for name in hooks.module_names if name not in ran]
    if not seen:
        what = f"; not stored: {', '.join(f'{k} ({v})' for k, v in hooks.ignored.items())}" if hooks.ignored else ""
        raise CaptureError(f"--layers {', '.join(layers)}: the selected modules produced no floating-point tensor{what}")
    pooling.check_patterns(pool_specs, list(seen))
    table = []
    for name, (shape, dtype) in seen.items():
        if len(shape) == 0 or shape[0] != PROBE_BATCH:
            raise CaptureError(
                f"{name}: output of shape {shape} for a batch of {PROBE_BATCH}: its first dimension is not the batch, "
                "so it cannot be split into samples; leave this layer out"
            )
        kind, dims = pooling.resolve(pooling.spec_for(name, pool_specs), name, shape)
        table.append(CapturedTensor(
            name=name, module=origins[name], output_shape=shape[1:],
            shape=pooling.pooled_shape(shape, kind, dims)[1:], source_dtype=dtype, pool_kind=kind, pool_dims=dims,
        ))
    return table, dict(hooks.ignored), not_run


def layer_listing(model: nn.Module, image_size: int, device: torch.device, autocast) -> List[tuple]:
    """(module name, class name, [(stored name, per-sample shape, dtype)]) for every module of the
    model, the model itself first as ".", from one forward of two blank images: what `--layers`
    can choose and what each choice would store."""
    seen: Dict[str, tuple] = {}

    def record(name: str, tensor: torch.Tensor) -> None:
        seen[name] = (tuple(tensor.shape[1:]), dtype_name(tensor.dtype))

    hooks = ActivationHooks(model, ["*", ROOT_PATTERN], transform=record)
    _probe_forward(model, hooks, image_size, device, autocast)
    outputs: Dict[str, list] = {}
    for name, (shape, dtype) in seen.items():
        outputs.setdefault(hooks.origins[name], []).append((name, shape, dtype))
    return [(name or ROOT_PATTERN, type(module).__name__, outputs.get(name, []))
            for name, module in model.named_modules()]


class BatchPacker:
    """The hooks' transform during a capture: checks each output against the layer table, pools it
    and packs it, one Packed per shard piece (row range) of the batch."""

    def __init__(self, table: Sequence[CapturedTensor], dtype: torch.dtype, overflow: str, nonfinite: str):
        self.table = {t.name: t for t in table}
        self.dtype, self.overflow, self.nonfinite = dtype, overflow, nonfinite
        self.batch_size = 0
        self.pieces: List[tuple] = []
        self.keys: List[str] = []

    def begin(self, batch_size: int, pieces: List[tuple], keys: List[str]) -> None:
        self.batch_size, self.pieces, self.keys = batch_size, pieces, keys

    def _hint(self, error: Exception) -> str:
        if isinstance(error, OverflowError):
            return "store bf16 (--dtype bf16) or clip to the range (--overflow saturate)"
        return "--nonfinite keep stores them as they are (and counts them)"

    def __call__(self, name: str, tensor: torch.Tensor):
        spec = self.table.get(name)
        if spec is None:
            raise CaptureError(
                f"{name}: an output the probe forward did not produce (known: {', '.join(list(self.table)[:5])}...); "
                "the model's outputs change with its input, which a capture cannot store"
            )
        expected = (self.batch_size, *spec.output_shape)
        if tuple(tensor.shape) != expected:
            raise CaptureError(
                f"{name}: shape {tuple(tensor.shape)} in this batch, expected {expected}: a capture stores one shape "
                "per layer (pool it, or leave it out)"
            )
        pieces = []
        with torch.autocast(tensor.device.type, enabled=False):
            pooled = pooling.pool(tensor, spec.pool_kind, spec.pool_dims)
            for start, stop in self.pieces:
                try:
                    pieces.append(pack({name: pooled[start:stop]}, dtype=self.dtype, overflow=self.overflow,
                                       nonfinite=self.nonfinite))
                except (ValueError, OverflowError) as error:
                    keys = ", ".join(self.keys[start:stop][:3])
                    raise CaptureError(f"{error}, in the batch of samples {keys}...; {self._hint(error)}") from None
        return pieces


