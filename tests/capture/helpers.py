"""Tiny models and data sets for the capture tests (also imported by the subprocesses the resume
tests kill, so: no relative imports, nothing from pytest)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import namedtuple
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from pyfast.capture.data import CaptureItem
from pyfast.data import SkippedSample


class Preprocess:
    """What capture() reads from a dataset's preprocess: the image size and a fingerprint."""

    def __init__(self, size: int):
        self.size = size

    def fingerprint(self) -> dict:
        return {"random-images": self.size}


class RandomImages(Dataset):
    """`n` seeded random images of `size`; the indices in `bad` come back as SkippedSample."""

    def __init__(self, n: int, size: int = 16, *, seed: int = 0, bad=(), scale: float = 1.0):
        self.n, self.size, self.seed, self.bad, self.scale = n, size, seed, set(bad), scale
        self.preprocess = Preprocess(size)

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> dict:
        return {"seed": self.seed, "scale": self.scale, "bad": sorted(self.bad)}

    def image(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.rand(3, self.size, self.size, generator=g) * self.scale

    def __getitem__(self, index: int):
        if index in self.bad:
            return SkippedSample(source="random", file=f"img{index}.png", reason="cannot decode", index=index,
                                 category="unreadable")
        return CaptureItem(self.image(index), key=f"random-{self.seed}-{index}", source="random", file=f"img{index}.png")


class ConvNet(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU: the in-place ReLU rewrites conv1's output after its hook."""

    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))

    def reference(self, x) -> dict:
        """The outputs of each module, computed without hooks."""
        c1 = self.conv1(x)
        a1 = torch.relu(c1)
        c2 = self.conv2(a1)
        return {"conv1": c1, "act1": a1, "conv2": c2, "act2": torch.relu(c2), "output": torch.relu(c2)}


class TokenNet(nn.Module):
    """Patch embedding to (B, 1 + T, C) tokens with a CLS token, then an MLP block per layer."""

    def __init__(self, dim: int = 8, patch: int = 4, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            h = h + block(h)
        return h

    def reference(self, x) -> dict:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        out = {}
        for i, block in enumerate(self.blocks):
            out[f"blocks.{i}"] = block(h)
            h = h + out[f"blocks.{i}"]
        out["output"] = h
        return out


@dataclasses.dataclass
class Heads:
    maps: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor  # bool: not stored
    aux: Optional[torch.Tensor] = None  # None: nothing stored


Pair = namedtuple("Pair", ["first", "second"])


class StructuredNet(nn.Module):
    """A module returning a dict, one a tuple with a list inside, one a dataclass, one a namedtuple."""

    class DictOut(nn.Module):
        def forward(self, x):
            return {"features": x * 2, "logits": x.mean((2, 3)), "extra": (x - 1, None), "count": 3}

    class TupleOut(nn.Module):
        def forward(self, x):
            return x + 1, [x * 3, x.argmax(1)]

    class DataclassOut(nn.Module):
        def forward(self, x):
            return Heads(maps=x * 4, pooled=x.amax((2, 3)), mask=x > 0)

    class NamedOut(nn.Module):
        def forward(self, x):
            return Pair(x - 2, x.sum(1))

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dict_out = self.DictOut()
        self.tuple_out = self.TupleOut()
        self.dataclass_out = self.DataclassOut()
        self.named_out = self.NamedOut()

    def forward(self, x):
        x = self.stem(x)
        d = self.dict_out(x)
        t = self.tuple_out(x)
        c = self.dataclass_out(x)
        n = self.named_out(x)
        return {"sum": d["features"] + t[0] + c.maps + n.first}

    def reference(self, x) -> dict:
        s = self.stem(x)
        return {
            "dict_out.features": s * 2, "dict_out.logits": s.mean((2, 3)), "dict_out.extra.0": s - 1,
            "tuple_out.0": s + 1, "tuple_out.1.0": s * 3,
            "dataclass_out.maps": s * 4, "dataclass_out.pooled": s.amax((2, 3)),
            "named_out.first": s - 2, "named_out.second": s.sum(1),
            "output.sum": s * 2 + (s + 1) + s * 4 + (s - 2),
        }


class Faulty(nn.Module):
    """Wraps a model; its forward raises `error` (an exception instance) at call number `at`."""

    def __init__(self, inner: nn.Module, at: int, error: BaseException):
        super().__init__()
        self.inner, self.at, self.error, self.calls = inner, at, error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.inner(x)


def hooks_left(model: nn.Module) -> int:
    """Forward hooks and pre-hooks still registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def folder_bytes(root) -> dict:
    """relative path -> sha256 of every shard file and the shard log."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if rel.startswith("shards") or rel == "shards.jsonl":
                with open(path, "rb") as handle:
                    out[rel] = hashlib.sha256(handle.read()).hexdigest()
    return out


def resume_setup():
    """The model, data set and options the kill/resume tests capture (the same in the subprocess)."""
    model = ConvNet(width=6)
    dataset = RandomImages(70, size=16, bad={5, 33})
    sample_bytes = (6 * 16 * 16 + 6 * 8 * 8 + 6 * 8 * 8) * 2
    # 5 samples a shard, batches of 4: batches straddle shards; 68 good samples: 14 shards, the last partial
    options = dict(layers=["conv1", "act2", "."], batch_size=4, shard_mb=5 * sample_bytes / 2**20,
                   max_skip_fraction=0.5, log=None, fsync=False)
    return model, dataset, options


def interrupted_convnet() -> nn.Module:
    """For `--model`: a ConvNet whose third forward raises KeyboardInterrupt, as Ctrl-C would."""
    return Faulty(ConvNet(), 3, KeyboardInterrupt())


def patient_convnet() -> nn.Module:
    """The same model (the same digest) running through."""
    return Faulty(ConvNet(), -1, KeyboardInterrupt())
