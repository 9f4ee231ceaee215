"""CPU kernels alone, one thread: ns per box (box loss, every mode) and per element (mask loss).

    python benchmarks/kernel_ns.py [LABEL]

Calls the native kernels directly through their argument structs, so neither Python nor the
allocator is in the numbers; best of 15 batches. Compare two builds by running this alternately
with each tree on PYTHONPATH, in fresh processes.
"""

import sys
import time

import torch

from pyfast import _native

torch.set_num_threads(1)
C = _native._C
BOXES = 65_536


def best_ns(fn, per_item: int, reps: int = 10, rounds: int = 15) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best / per_item * 1e9


def box_rows() -> list[str]:
    g = torch.Generator().manual_seed(0)
    xy, wh = torch.rand(BOXES, 2, generator=g) * 512, torch.rand(BOXES, 2, generator=g) * 128 + 1
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(BOXES, 4, generator=g) * 8
    out, grad = torch.empty(()), torch.ones(())
    grad_pred, grad_target = torch.empty_like(pred), torch.empty_like(pred)
    common = dict(n=BOXES, dtype=_native.DTYPES[pred.dtype], pred=pred, target=target, weight_kind="none",
                  weight=None, reduction="mean", avg_factor=0.0)  # fmt: skip
    rows = []
    for mode in ["giou", "diou", "ciou", "iou"]:
        options = dict(mode=mode, box_format="xyxy", l1_weight=1.0, iou_weight=1.0, eps=1e-7)
        fwd = C.BoxLossForward(options=options, output="loss", out=out, grad_pred=None, grad_target=None, **common)
        fused = C.BoxLossForward(options=options, output="loss", out=out, grad_pred=grad_pred, grad_target=None,
                                 **common)  # fmt: skip
        bwd = C.BoxLossBackward(options=options, grad_out=grad, grad_pred=grad_pred, grad_target=None,
                                grad_weight=None, **common)  # fmt: skip
        bwd2 = C.BoxLossBackward(options=options, grad_out=grad, grad_pred=grad_pred, grad_target=grad_target,
                                 grad_weight=None, **common)  # fmt: skip
        rows.append(f"box {mode}: forward {best_ns(lambda: C.box_loss_forward_cpu(fwd, threads=1), BOXES):.2f}"
                    f" backward {best_ns(lambda: C.box_loss_backward_cpu(bwd, threads=1), BOXES):.2f}"
                    f" backward+target {best_ns(lambda: C.box_loss_backward_cpu(bwd2, threads=1), BOXES):.2f}"
                    f" forward+gradient {best_ns(lambda: C.box_loss_forward_cpu(fused, threads=1), BOXES):.2f}"
                    " ns/box")  # fmt: skip
    return rows


def mask_rows() -> list[str]:
    # Through the public op (its forward is one kernel call plus a scalar; the backward also
    # allocates the gradient): 16 masks of 256x256, bce + dice.
    import pyfast

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 256, 256, generator=g) * 3
    binary = (torch.rand(16, 256, 256, generator=g) > 0.5).to(torch.uint8)
    leaf = logits.clone().requires_grad_()
    rows = []
    for name, targets in [("uint8", binary), ("float32", binary.float())]:
        with torch.no_grad():
            forward = best_ns(lambda: pyfast.mask_loss(logits, targets), logits.numel())
        full = best_ns(lambda: pyfast.mask_loss(leaf, targets).backward(), logits.numel())
        rows.append(f"mask {name} targets: forward {forward:.3f} backward {full - forward:.3f} ns/element")
    return rows


if __name__ == "__main__":
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    for row in box_rows() + mask_rows():
        print(label, row)
