"""Planted leaks (and a clean warm-up) for the memory tests: each is one step of a loop.

The leaks are big (about 1 MB per step) so that a few dozen steps are unambiguous: the allocators'
own ups and downs (freed memory reused before the heap grows again) reach tens of MB.
"""

from __future__ import annotations

import torch

KEPT_OUTPUTS = []  # the backbone's leak: every output kept in a global list


class KeepingBackbone(torch.nn.Module):
    """A frozen feature extractor that appends every output to a module-level list."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.conv(images)
        KEPT_OUTPUTS.append(features)
        return features


class Head(torch.nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()
        self.proj = torch.nn.Conv2d(channels, 4, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).mean(dim=(2, 3))


def train_step(backbone, head, optimizer, batch: int = 2, size: int = 96) -> None:
    images = torch.rand(batch, 3, size, size)
    loss = head(backbone(images)).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class Validator:
    """Keeps every validation output in a list that is never cleared."""

    def __init__(self):
        self.outputs = []

    def validate(self, head) -> None:
        with torch.no_grad():
            logits = head.proj(torch.rand(8, 16, 96, 96))
        self.outputs.append({"logits": logits, "target": torch.rand(8, 4, 96, 96)})  # 2.4 MB in all


def draw_and_forget(step: int) -> None:
    """A pyplot figure (a curve and an image) per call, never closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots()
    ax.plot(range(50), [step * i for i in range(50)])
    ax.imshow(np.full((160, 160), float(step)))
    ax.set_title(f"step {step}")


class WarmingCache:
    """Grows for its first `fill_steps` steps (a cache filling up), then stays the same size."""

    def __init__(self, fill_steps: int, entry_floats: int = 64 * 1024):
        self.fill_steps = fill_steps
        self.entry_floats = entry_floats
        self.entries = {}

    def step(self, step: int) -> torch.Tensor:
        key = step % self.fill_steps
        if key not in self.entries:
            self.entries[key] = torch.rand(self.entry_floats)
        return self.entries[key]
