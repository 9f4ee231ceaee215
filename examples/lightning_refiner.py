"""A tiny box and mask refinement head trained under Lightning with pyfast's fused losses and its
memory monitor.

    pip install ".[lightning]"
    python examples/lightning_refiner.py --max-steps 300 --out runs/lightning-refiner
    pyfast-doctor memory runs/lightning-refiner

Runs on CPU in seconds. Images are synthetic (a bright rectangle on noise); a frozen convolution
stands in for the backbone; the head refines a noisy input box towards the rectangle
(`pyfast.box_loss`, GIoU + L1) and predicts its mask (`pyfast.mask_loss`, BCE + dice).
`pyfast.memory.MemoryMonitorCallback` samples memory every N optimizer steps, logs it through
the Lightning logger (CSV here: memory/... columns of metrics.csv), writes memory.jsonl,
memory.json and memory.png into the output folder and reports the leak verdict at the end.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

import pyfast
from pyfast.memory import MemoryMonitorCallback

IMAGE = 32  # image side, pixels
GRID = IMAGE // 2  # feature map and mask side


class Rectangles(Dataset):
    """One bright rectangle per image; the input box is the true box with pixel noise."""

    def __init__(self, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        corners = torch.rand(count, 2, generator=g) * (IMAGE * 0.5)
        sizes = 6 + torch.rand(count, 2, generator=g) * (IMAGE * 0.5 - 6)
        self.boxes = torch.cat([corners, corners + sizes], dim=1)  # xyxy, pixels
        self.noisy = self.boxes + torch.randn(count, 4, generator=g) * 2.5
        self.noise = torch.rand(count, 1, IMAGE, IMAGE, generator=g) * 0.3

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int):
        box = self.boxes[index : index + 1]
        image = (self.noise[index] + box_masks(box, IMAGE)).expand(3, IMAGE, IMAGE)
        return image, self.noisy[index], box[0], box_masks(box, GRID)[0]


def box_masks(boxes: torch.Tensor, side: int) -> torch.Tensor:
    """(N, side, side) masks of xyxy pixel boxes drawn on a side x side grid over the image."""
    centers = (torch.arange(side, dtype=boxes.dtype, device=boxes.device) + 0.5) * (IMAGE / side)
    inside_x = (centers >= boxes[:, 0:1]) & (centers <= boxes[:, 2:3])
    inside_y = (centers >= boxes[:, 1:2]) & (centers <= boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


class RefinerHead(torch.nn.Module):
    """Features of the image plus the input box drawn as a channel -> box deltas and mask logits.

    The deltas come from the whole (reduced) map, not a pooled vector: where the edges are matters.
    """

    def __init__(self, channels: int = 16, hidden: int = 32):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels + 1, hidden, 3, padding=1), torch.nn.GroupNorm(8, hidden), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, hidden, 3, padding=1), torch.nn.GroupNorm(8, hidden), torch.nn.ReLU(),
        )
        self.reduce = torch.nn.Conv2d(hidden, 4, 1)
        self.deltas = torch.nn.Linear(4 * GRID * GRID, 4)
        self.mask = torch.nn.Conv2d(hidden, 1, 1)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor):
        drawn = box_masks(boxes.detach(), GRID).unsqueeze(1).to(features)
        x = self.body(torch.cat([features, drawn], dim=1))
        scale = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0).repeat(1, 2)
        refined = boxes + torch.tanh(self.deltas(self.reduce(x).flatten(1))) * 0.5 * scale
        return refined, self.mask(x).squeeze(1)


class RefinerModule(pl.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1).requires_grad_(False)  # frozen
        self.head = RefinerHead()

    def _losses(self, batch):
        images, noisy, boxes, masks = batch
        with torch.no_grad():
            features = F.relu(self.backbone(images))
        refined, mask_logits = self.head(features, noisy)
        box = pyfast.box_loss(refined, boxes, mode="giou", l1_weight=1.0 / IMAGE)
        mask = pyfast.mask_loss(mask_logits, masks, bce_weight=1.0, dice_weight=1.0)
        return box, mask, refined, mask_logits

    def training_step(self, batch, batch_idx):
        box, mask, _, _ = self._losses(batch)
        loss = box + mask
        self.log_dict({"train/loss": loss, "train/box": box, "train/mask": mask}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # Epoch means accumulated by Lightning: nothing per batch is kept.
        _, noisy, boxes, masks = batch
        box, mask, refined, mask_logits = self._losses(batch)
        self.log_dict({
            "val/loss": box + mask,
            "val/iou_input": pyfast.box_iou(noisy, boxes).mean(),
            "val/iou_refined": pyfast.box_iou(refined, boxes).mean(),
            "val/mask_iou": pyfast.mask_iou(mask_logits, masks).mean(),
        })

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.hparams.lr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--val-samples", type=int, default=128)
    parser.add_argument("--every", type=int, default=10, help="memory sample every N optimizer steps")
    parser.add_argument("--max-growth", type=float, default=None,
                        help="stop when memory grows more than this many MB per 1000 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lightning-refiner")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    train = DataLoader(Rectangles(args.train_samples, args.seed), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(Rectangles(args.val_samples, args.seed + 1), batch_size=args.batch_size)
    memory = MemoryMonitorCallback(every=args.every, max_growth=args.max_growth, out_dir=args.out)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.max_steps, logger=CSVLogger(args.out, name="", version=""),
        callbacks=[memory], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=10, default_root_dir=args.out,
    )
    module = RefinerModule(args.lr)
    trainer.fit(module, train, val)
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    results["memory"] = memory.monitor.summary()
    print(f"val IoU input boxes    {results['val/iou_input']:.3f}")
    print(f"val IoU refined boxes  {results['val/iou_refined']:.3f}")
    print(f"val mask IoU           {results['val/mask_iou']:.3f}")
    print(results["memory"]["message"])
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
