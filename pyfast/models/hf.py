"""Frozen image encoders from Hugging Face transformers: `--backbone hf:PATH[,layers=...][,size=N]`.

PATH is a local model directory (`save_pretrained` output, a downloaded snapshot) or a model id
already in the Hugging Face cache (`HF_HUB_CACHE`); nothing is ever downloaded. Supported:
SAM's vision encoder (`SamVisionModel`, also from a full `SamModel` directory), HQ-SAM's
(`SamHQVisionModel` / `SamHQModel`), ViT, DINOv2 (with or without registers) and DINOv3-ViT. The
architecture comes from `config.json`; the weights go through `pyfast.load_weights` and must cover
every tensor of the encoder (a SAM directory's prompt encoder and mask decoder are reported as
unexpected and left out).

The module takes (B, 3, S, S) images in [0, 1], normalizes them as the model's own image processor
does (`preprocessor_config.json` when present: rescale factor, mean, std; otherwise the family's
defaults below) and returns feature maps (B, C, h, w):

    layers=last       (default) the model's own output: SAM's neck map, ViT/DINO's final-normed tokens
    layers=K          hidden state K as Hugging Face numbers them: 0 the embeddings, K the output of
                      block K (1-based); negative K counts from the end (-1: the last block)
    layers=early      SAM/HQ-SAM: the first global-attention block's output, the early ViT feature
                      HQ-SAM fuses with the final one (block 3 of ViT-B); `layers=early+last` is HQ-SAM's pair
    layers=3+last     several maps, joined by '+': a dict name -> map ("layer3", "last", "early")

Tokens are reshaped to maps, the CLS and register tokens dropped. One map is returned as a tensor,
several as a dict in the order given. The module is frozen and stays in eval mode; it runs under
`torch.no_grad()`; autocast is the caller's (the training loop wraps the backbone in its own).

Sizes and resizing. `input_size` is the square side the encoder expects: SAM's `image_size` (1024;
its patch embedding accepts nothing else), the processor's crop or resize size for ViT and DINO
(224); ViT/DINO also run at any multiple of their patch size (position embeddings interpolated),
and `size=N` sets another default. pyfast letterboxes every image to S x S itself: the longest side
resized to S (bilinear), padded bottom-right. For SAM that is its processor's own geometry
(longest side to 1024, bilinear, bottom-right pad; the short side is rounded where SAM's processor
floors it, at most one pixel apart); the pad differs: SAM pads the normalized image with 0 (the
mean colour), pyfast pads with black before normalizing. ViT's processor squashes to 224 x 224 and
DINO's resizes the short side to 256 and center-crops 224; a refinement head needs the whole image
and undistorted boxes, so the letterbox replaces both, and the normalization is exactly theirs.
`preprocess` lists everything that shapes the features, for the feature cache's fingerprint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from pyfast.models.backbone import BackboneError
from pyfast.models.weights import LoadReport, WeightsError, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
PREPROCESSOR_FILE = "preprocessor_config.json"
INSTALL_HINT = "pip install 'pyfast[hf]' (or pip install transformers)"


@dataclass(frozen=True)
class Family:
    """How one kind of encoder is built, walked and fed."""

    model_class: str  # transformers class of the encoder
    kind: str  # "sam": maps (B, h, w, C) + a neck; "tokens": (B, T, C) with leading CLS/register tokens
    mean: tuple
    std: tuple
    default_size: Optional[int]  # None: the config's image_size
    nested_config: bool = False  # the directory may hold the full model's config (vision_config inside)


FAMILIES = {
    "sam": Family("SamVisionModel", "sam", IMAGENET_MEAN, IMAGENET_STD, None, True),
    "sam_vision_model": Family("SamVisionModel", "sam", IMAGENET_MEAN, IMAGENET_STD, None),
    "sam_hq": Family("SamHQVisionModel", "sam", IMAGENET_MEAN, IMAGENET_STD, None, True),
    "sam_hq_vision_model": Family("SamHQVisionModel", "sam", IMAGENET_MEAN, IMAGENET_STD, None),
    "vit": Family("ViTModel", "tokens", HALF, HALF, None),
    "dinov2": Family("Dinov2Model", "tokens", IMAGENET_MEAN, IMAGENET_STD, 224),
    "dinov2_with_registers": Family("Dinov2WithRegistersModel", "tokens", IMAGENET_MEAN, IMAGENET_STD, 224),
    "dinov3_vit": Family("DINOv3ViTModel", "tokens", IMAGENET_MEAN, IMAGENET_STD, 224),
}


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise BackboneError(f"hf: backbones need the transformers package ({error}): {INSTALL_HINT}") from None
    return transformers


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class HFSpec:
    path: str
    layers: tuple = ("last",)
    size: Optional[int] = None
    text: str = ""


def parse_hf_spec(text: str) -> HFSpec:
    """`hf:PATH[,layers=A+B][,size=N]` (the `hf:` may be left out)."""
    body = text[3:] if text.startswith("hf:") else text
    path, *items = body.split(",")
    path = path.strip()
    if not path:
        raise BackboneError(f"--backbone {text!r}: expected hf:PATH (a model directory or a cached model id)")
    layers, size = ("last",), None
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise BackboneError(f"--backbone {text!r}: option {item!r} must look like key=value")
        if key == "layers":
            layers = tuple(part.strip() for part in value.split("+"))
            if not all(layers):
                raise BackboneError(f"--backbone {text!r}: layers={value!r} has an empty item")
        elif key == "size":
            if not value.isdigit() or int(value) < 1:
                raise BackboneError(f"--backbone {text!r}: size={value!r} must be a positive integer")
            size = int(value)
        else:
            raise BackboneError(f"--backbone {text!r}: unknown option {key!r} (known: layers, size)")
    return HFSpec(path=path, layers=layers, size=size, text=text)


def resolve_model_dir(path: str) -> str:
    """A local directory as given, or the cached snapshot of a model id; never a download."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise BackboneError(f"hf:{path}: is a file; hf: takes a model directory (weights files go to --backbone-weights)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError:
            raise BackboneError(f"hf:{path}: no such directory, and huggingface_hub is missing: {INSTALL_HINT}") from None
        try:
            return snapshot_download(path, local_files_only=True)
        except LocalEntryNotFoundError:
            from huggingface_hub import constants

            raise BackboneError(
                f"hf:{path}: no such directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                f"pyfast never downloads: fetch it once with `hf download {path}` or pass a local directory"
            ) from None
    raise BackboneError(f"hf:{path}: no such model directory")


# ------------------------------------------------------------------ building the encoder


def read_config(model_dir: str):
    """(family, encoder config, model_type) of the model in `model_dir`."""
    transformers = _transformers()
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise BackboneError(f"hf:{model_dir}: no config.json: not a Hugging Face model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as error:  # an unknown model_type, a broken file: one line
        text = str(error).strip().splitlines()
        raise BackboneError(f"hf:{model_dir}: cannot read config.json: {text[0] if text else type(error).__name__}") from None
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise BackboneError(
            f"hf:{model_dir}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    if family.nested_config:
        config = config.vision_config
    return family, config, model_type


def build_encoder(family: Family, config) -> nn.Module:
    """The encoder with freshly initialized weights (the caller loads real ones)."""
    transformers = _transformers()
    cls = getattr(transformers, family.model_class, None)
    if cls is None:
        raise BackboneError(
            f"transformers {transformers.__version__} has no {family.model_class}: upgrade it ({INSTALL_HINT})"
        )
    if family.model_class == "ViTModel":
        return cls(config, add_pooling_layer=False)  # the pooler is a classification head
    return cls(config)


def _sizes(size) -> list:
    """The side lengths named by a processor `size`/`crop_size` entry (dict or int)."""
    if isinstance(size, int):
        return [size]
    if isinstance(size, dict):
        return [int(size[k]) for k in ("height", "longest_edge", "shortest_edge") if isinstance(size.get(k), int)]
    return []


def processor_settings(family: Family, config, processor: Optional[dict], size: Optional[int]) -> dict:
    """Normalisation and input size from a preprocessor_config.json dict (or None: the defaults)."""
    proc = processor or {}
    scale = 255.0 * float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 255.0
    if proc.get("do_normalize", True):
        mean = tuple(float(v) for v in proc.get("image_mean", family.mean))
        std = tuple(float(v) for v in proc.get("image_std", family.std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise BackboneError(f"image_mean/image_std must hold 3 values (std > 0), got {mean} / {std}")
    config_size = int(config.image_size) if isinstance(config.image_size, int) else int(config.image_size[0])
    patch = int(config.patch_size) if isinstance(config.patch_size, int) else int(config.patch_size[0])
    if family.kind == "sam":
        proposed = _sizes(proc.get("pad_size")) or _sizes(proc.get("size"))
        if proposed and proposed[0] != config_size:
            raise BackboneError(
                f"the image processor pads to {proposed[0]} but the encoder's image_size is {config_size}"
            )
        if size is not None and size != config_size:
            raise BackboneError(f"size={size}: SAM's encoder takes only {config_size}x{config_size} images")
        input_size = config_size
    else:
        crop = _sizes(proc.get("crop_size")) if proc.get("do_center_crop") else []
        input_size = size or (crop or _sizes(proc.get("size")) or [family.default_size or config_size])[0]
        if input_size % patch:
            raise BackboneError(f"input size {input_size} is not a multiple of the patch size {patch}")
    return {"input_size": int(input_size), "patch_size": patch, "pixel_scale": scale, "mean": mean, "std": std,
            "config_size": config_size}


def read_processor(model_dir: str) -> Optional[dict]:
    path = os.path.join(model_dir, PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        raise BackboneError(f"{path}: not readable JSON: {error}") from None
    if not isinstance(value, dict):
        raise BackboneError(f"{path}: expected a JSON object")
    return value


def transformers_key_renamer(model: nn.Module) -> Optional[Callable[[str], str]]:
    """Checkpoint key -> parameter name of `model`, by transformers' own conversion rules.

    transformers 5 renamed the modules of several models (ViT's `encoder.layer.N.attention.attention.query`
    is `layers.N.attention.q_proj` in memory) but saves and loads the older names, converting on the
    way; checkpoints on disk use them. The rules are transformers' (`get_model_conversion_mapping`),
    applied key by key. Tensors it would reshape on load (DINOv2's fused SwiGLU `weights_in`) are
    refused: pyfast loads renamed tensors only.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without conversion rules: checkpoints use the module names
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        renamed, converted_by = rename_source_key(key, renamings, converters)
        if converted_by is not None:
            raise WeightsError(
                f"{key}: transformers reshapes this tensor on load ({converted_by}); pyfast loads renamed tensors only"
            )
        return renamed

    return rename


# Where the transformer blocks live (transformers moves them between versions: ViT's went from
# `encoder.layer` to `layers`); the first path present wins.
BLOCK_PATHS = ("vision_encoder.layers", "layers", "encoder.layer", "encoder.layers", "model.layer")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    for path in BLOCK_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise BackboneError(f"{type(model).__name__}: no transformer blocks at {', '.join(BLOCK_PATHS)}")


# ------------------------------------------------------------------ the backbone module


class HFBackbone(nn.Module):
    """A frozen transformers encoder as a pyfast backbone: (B, 3, S, S) in [0, 1] -> map(s).

    Attributes: `input_size`, `check_input_size(size)`, `preprocess` (for the cache fingerprint;
    also the module's extra state, so a digest of the module covers it), `feature_info` (name -> channels, stride),
    `weights_report` (the LoadReport of the weights, or None), `model` (the transformers encoder).
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        settings: dict,
        layers: tuple = ("last",),
        *,
        processor_source: str = "defaults",
        name: str = "",
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.name = name or type(model).__name__
        config = model.config
        self.patch_size = settings["patch_size"]
        self.input_size = settings["input_size"]
        self._config_size = settings["config_size"]
        self._prefix_tokens = 0 if family.kind == "sam" else 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(settings["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(settings["std"]).view(1, 3, 1, 1), persistent=False)
        self.pixel_scale = float(settings["pixel_scale"])

        blocks = find_blocks(model)
        self._captured: dict = {}
        self._capturing = False  # hooks record only inside forward: a direct call of self.model keeps nothing
        self.outputs = self._resolve_layers(layers, config, len(blocks))  # name -> hidden-state index or "last"
        for name_, index in self.outputs.items():
            if index == "last":
                continue
            if index == 0:
                blocks[0].register_forward_pre_hook(self._capture_input(name_), with_kwargs=True)
            else:
                blocks[index - 1].register_forward_hook(self._capture_output(name_))
        hidden = int(config.hidden_size)
        last_channels = int(getattr(config, "output_channels", hidden)) if family.kind == "sam" else hidden
        self.feature_info = {
            n: {"channels": last_channels if i == "last" else hidden, "stride": self.patch_size}
            for n, i in self.outputs.items()
        }
        self.preprocess = {
            "encoder": "transformers",
            "class": type(model).__name__,
            "model_type": getattr(config, "model_type", ""),
            "input_size": self.input_size,
            "patch_size": self.patch_size,
            "layers": {n: i for n, i in self.outputs.items()},
            "pixel_scale": self.pixel_scale,
            "mean": list(settings["mean"]),
            "std": list(settings["std"]),
            "normalization_from": processor_source,
            "resize": "pyfast letterbox: longest side to the input size, bilinear",
            "pad": "bottom-right, black (0 before normalization)",
        }
        self.weights_report: Optional[LoadReport] = None
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    # -- layers

    def _resolve_layers(self, layers: tuple, config, depth: int) -> dict:
        out: dict = {}
        for item in layers:
            if item == "last":
                name, index = "last", "last"
            elif item == "early":
                if self.family.kind != "sam":
                    raise BackboneError("layers=early is SAM's (the first global-attention block); use a block number")
                globals_ = list(getattr(config, "global_attn_indexes", []) or [])
                if not globals_:
                    raise BackboneError("layers=early: this SAM config has no global-attention blocks")
                name, index = "early", int(globals_[0]) + 1
            elif re.fullmatch(r"-?\d+", item):
                index = int(item)
                if not -depth <= index <= depth:
                    raise BackboneError(
                        f"layers={item}: the encoder has {depth} blocks: use 0 (embeddings) to {depth}, "
                        f"-1 to -{depth}, last" + (" or early" if self.family.kind == "sam" else "")
                    )
                index = index if index >= 0 else depth + 1 + index
                name = f"layer{index}"
            else:
                raise BackboneError(f"layers: unknown item {item!r} (a block number, last" +
                                    (", early)" if self.family.kind == "sam" else ")"))
            if name in out or index in out.values():
                raise BackboneError(f"layers: {item!r} names a map already chosen")
            out[name] = index
        return out

    def _capture_output(self, name: str) -> Callable:
        def hook(module, args, output):
            if self._capturing:
                self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _capture_input(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            if self._capturing:
                self._captured[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    # -- nn.Module

    def train(self, mode: bool = True) -> "HFBackbone":
        return super().train(False)  # frozen: dropout and friends stay off whatever the caller asks

    def get_extra_state(self) -> dict:
        return self.preprocess

    def set_extra_state(self, state) -> None:
        if state != self.preprocess:
            raise BackboneError("this state was saved by a backbone with other preprocessing or layers")

    def check_input_size(self, size: int) -> Optional[str]:
        """Whether the encoder runs on `size` x `size` images: BackboneError if not, else None or a
        note on how (the training job's `--image-size` check)."""
        if self.family.kind == "sam":
            if size != self.input_size:
                raise BackboneError(f"SAM's encoder takes only {self.input_size}x{self.input_size} images "
                                    "(its patch and position embeddings have that size)")
            return None
        if size % self.patch_size:
            raise BackboneError(f"{size} is not a multiple of the patch size {self.patch_size}")
        grid, trained = size // self.patch_size, self._config_size // self.patch_size
        return None if grid == trained else f"position embeddings interpolated from {trained}x{trained} to {grid}x{grid} patches"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the pixel values the model's image processor would produce."""
        return (images * self.pixel_scale - self.mean) / self.std

    def _to_map(self, name: str, value: torch.Tensor, grid: int) -> torch.Tensor:
        if self.family.kind == "sam":
            # hidden states are (B, h, w, C); the neck's output is already (B, C, h, w)
            return value.contiguous() if self.outputs[name] == "last" else value.permute(0, 3, 1, 2).contiguous()
        tokens = value[:, self._prefix_tokens:]
        if tokens.shape[1] != grid * grid:
            raise BackboneError(
                f"{self.name}: {name} has {value.shape[1]} tokens, expected {self._prefix_tokens} + {grid}x{grid}"
            )
        return tokens.reshape(tokens.shape[0], grid, grid, tokens.shape[2]).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def forward(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise BackboneError(f"{self.name}: expected images of shape (B, 3, S, S), got {shape}")
        size = images.shape[-1]
        if images.shape[-2] != size:
            raise BackboneError(f"{self.name}: expected square images, got {tuple(images.shape[-2:])}")
        if self.family.kind == "sam" and size != self.input_size:
            raise BackboneError(
                f"{self.name} takes {self.input_size}x{self.input_size} images (its input_size), got {size}x{size}: "
                f"use --image-size {self.input_size}"
            )
        if size % self.patch_size:
            raise BackboneError(
                f"{self.name}: image size {size} is not a multiple of the patch size {self.patch_size} "
                f"(input_size {self.input_size})"
            )
        kwargs = {}
        if self.family.model_class == "ViTModel" and size != self._config_size:
            kwargs["interpolate_pos_encoding"] = True
        self._captured.clear()
        self._capturing = True
        try:
            output = self.model(pixel_values=self.normalize(images), **kwargs)
            grid = size // self.patch_size
            maps = {
                name: self._to_map(name, output.last_hidden_state if index == "last" else self._captured[name], grid)
                for name, index in self.outputs.items()
            }
        finally:
            self._capturing = False
            self._captured.clear()  # no feature outlives its batch
        return next(iter(maps.values())) if len(maps) == 1 else maps


# ------------------------------------------------------------------ entry points


def wrap_encoder(
    model: nn.Module,
    *,
    layers="last",
    processor: Optional[dict] = None,
    size: Optional[int] = None,
    name: str = "",
) -> HFBackbone:
    """An in-memory transformers encoder (SamVisionModel, ViTModel, Dinov2Model, ...) as a backbone;
    `processor`: a preprocessor_config.json dict (None: the family's defaults)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or family.nested_config:
        raise BackboneError(f"cannot wrap a {type(model).__name__} (model_type {model_type!r}): pass the encoder, "
                            f"one of {', '.join(sorted({f.model_class for f in FAMILIES.values()}))}")
    layers = tuple(layers.split("+")) if isinstance(layers, str) else tuple(layers)
    settings = processor_settings(family, model.config, processor, size)
    return HFBackbone(model, family, settings, layers,
                      processor_source=PREPROCESSOR_FILE if processor else "defaults", name=name)


def load_hf_backbone(
    spec: str,
    *,
    weights=None,
    log: Optional[Callable[[str], None]] = print,
    **weight_options,
) -> HFBackbone:
    """`hf:PATH[,layers=...][,size=N]` -> a frozen HFBackbone with its weights loaded.

    weights: None loads the directory's own weights; a path loads those instead (any file
    `pyfast.load_weights` reads), into the transformers encoder: the directory then needs only
    config.json (and preprocessor_config.json). Every tensor of the encoder must load; the report
    is `backbone.weights_report`. weight_options go to load_weights (prefixes, state_key,
    weights_only, rename).
    """
    for option in ("min_fraction", "strict_shapes"):
        if option in weight_options:
            raise TypeError(f"{option}: a frozen encoder loads completely or not at all")
    parsed = parse_hf_spec(spec)
    model_dir = resolve_model_dir(parsed.path)
    family, config, model_type = read_config(model_dir)
    try:
        processor = read_processor(model_dir)
        settings = processor_settings(family, config, processor, parsed.size)
    except BackboneError as error:
        raise BackboneError(f"hf:{parsed.path}: {error}") from None
    model = build_encoder(family, config)
    report = load_weights(model, model_dir if weights is None else weights, min_fraction=1.0, strict_shapes=True,
                          log=log, **weight_options)
    backbone = HFBackbone(model, family, settings, parsed.layers,
                          processor_source=PREPROCESSOR_FILE if processor else "defaults",
                          name=f"hf:{parsed.path}")
    backbone.weights_report = report
    return backbone
