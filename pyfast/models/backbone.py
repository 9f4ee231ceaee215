"""Frozen feature extractors.

`TinyBackbone` is the default: a small conv stack with seeded random weights (no download), enough
to carry edges and shapes to the heads. Any other extractor plugs in through
`load_backbone("module:callable")`: the callable builds an `nn.Module` mapping (B, 3, S, S) images in
[0, 1] to a tensor, a tuple or a dict of (B, C, h, w) feature maps (multi-level encoders return
several). `load_backbone("hf:PATH")` loads a Hugging Face encoder (SAM, HQ-SAM, ViT, DINOv2/v3;
`pyfast.models.hf`); `weights=PATH` loads a checkpoint into the backbone through
`pyfast.load_weights` (its report is `backbone.weights_report`). `feature_maps` names the maps (a tensor is "features", a
tuple's maps are "0", "1", ...), and `probe` finds each map's channels and stride by running the
backbone once.

A backbone may carry `preprocess: dict` (whatever shapes its features beyond the letterbox: sizes,
mean/std, padding; it goes into the feature-cache fingerprint) and `input_size: int | None` (the
square input size it expects: the training job's image size when `--image-size` is not given). A
backbone that also runs at other sizes says so with `check_input_size(size) -> note | None`, raising
BackboneError for a size it cannot take; without it, another `--image-size` is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BACKBONE = "pyfast.models.backbone:TinyBackbone"


class BackboneError(ValueError):
    """A backbone that cannot be loaded or does not produce (B, C, h, w) feature maps."""


class TinyBackbone(nn.Module):
    """Local contrast normalisation, then a Conv3x3-ReLU stack with seeded weights (stride =
    product of `strides`, 4 by default). Deterministic for a given `seed`.

    Subtracting each pixel's local mean (a `contrast_window`-pixel box filter) removes the slow
    background shading, so even random filters respond to object boundaries rather than to
    absolute colour.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 64),
        strides: tuple[int, ...] = (2, 2, 1),
        seed: int = 0,
        contrast_window: int = 9,
    ):
        super().__init__()
        self.contrast_window = int(contrast_window)
        if len(strides) != len(channels):
            raise ValueError(f"strides {strides} must have one entry per layer of {channels}")
        layers: list[nn.Module] = []
        cin = 3
        for cout, stride in zip(channels, strides):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = cin
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.body:
                if isinstance(m, nn.Conv2d):
                    fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = self.contrast_window
        local_mean = F.avg_pool2d(images, k, stride=1, padding=k // 2, count_include_pad=False)
        return self.body((images - local_mean) * 8.0)


def load_backbone(spec: str | None = None, *, weights=None, log=print, **weight_options) -> nn.Module:
    """Build the backbone named by `module:callable` (default: TinyBackbone) or `hf:PATH[,options]`,
    frozen and in eval mode; `weights`: a checkpoint to load into it (every tensor must load)."""
    spec = spec or DEFAULT_BACKBONE
    if spec.startswith("hf:"):
        from pyfast.models.hf import load_hf_backbone

        return load_hf_backbone(spec, weights=weights, log=log, **weight_options)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BackboneError(f"--backbone must look like module:callable or hf:PATH, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(f"cannot import backbone module {module_name!r}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise BackboneError(f"module {module_name!r} has no attribute {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise BackboneError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    model = freeze(model)
    if weights is not None:
        from pyfast.models.weights import load_weights

        model.weights_report = load_weights(model, weights, log=log, **weight_options)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_NOT_A_MAP = {
    2: " (an embedding per image has no spatial map: return the encoder's feature map instead of its pooled output)",
    3: " (tokens? reshape (B, h*w, C) tokens to (B, C, h, w), or load a transformers encoder with hf:PATH)",
}


def feature_maps(output) -> dict[str, torch.Tensor]:
    """A backbone's output as an ordered dict name -> (B, C, h, w) map.

    A tensor is {"features": t}; a tuple or list is {"0": t0, "1": t1, ...}; a dict keeps its str
    keys and order. Anything else, or a map that is not 4-D, raises BackboneError naming it.
    """
    if isinstance(output, torch.Tensor):
        maps = {"features": output}
    elif isinstance(output, Mapping):
        maps = dict(output)
        for name in maps:
            if not isinstance(name, str) or not name:
                raise BackboneError(f"backbone returned a dict with key {name!r}: map names must be non-empty str")
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        maps = {str(i): t for i, t in enumerate(output)}
    else:
        raise BackboneError(f"backbone must return a tensor, a tuple or a dict of (B, C, h, w) maps, got {type(output).__name__}")
    if not maps:
        raise BackboneError("backbone returned no feature map")
    for name, t in maps.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            hint = _NOT_A_MAP.get(t.dim(), "") if isinstance(t, torch.Tensor) else ""
            raise BackboneError(f"backbone output {name!r} must be a (B, C, h, w) feature map, got {shape}{hint}")
    return maps


@dataclass(frozen=True)
class FeatureMap:
    """One feature map of a backbone at a given input size: (channels, size, size), `stride` input
    pixels per map cell."""

    name: str
    channels: int
    size: int
    stride: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


@torch.no_grad()
def probe(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> dict[str, FeatureMap]:
    """Every feature map of `model` at `image_size` (name -> FeatureMap, in output order), found by
    running it once on a blank image."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    maps = feature_maps(model(x))
    found = {}
    for name, y in maps.items():
        if y.shape[0] != 1:
            raise BackboneError(f"backbone output {name!r} has batch size {y.shape[0]} for a batch of 1")
        h, w = y.shape[-2:]
        if h != w or h == 0 or image_size % h != 0:
            raise BackboneError(
                f"backbone output {name!r} maps a {image_size}x{image_size} image to {h}x{w}: "
                "need a square map whose size divides the input"
            )
        found[name] = FeatureMap(name, int(y.shape[1]), int(h), image_size // int(h))
    return found
