import torch

from pyfast.models import Refiner
from pyfast.models.refiner import flatten_boxes
from pyfast.train.objective import LossWeights, mask_targets, refiner_loss


def test_mask_targets_crop_the_window():
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 8:16] = True  # left half of the window [8, 24) x [8, 24)
    t = mask_targets(masks, torch.tensor([[0, 8.0, 8.0, 24.0, 24.0]]), 8)
    assert t.dtype == torch.bool and t.shape == (1, 8, 8)
    assert t[0, :, :4].all() and not t[0, :, 4:].any()


def test_loss_parts_follow_the_weights_and_the_iou_head():
    torch.manual_seed(0)
    boxes, index = flatten_boxes([torch.tensor([[4.0, 4.0, 20.0, 24.0], [10.0, 2.0, 30.0, 12.0]])])
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:24, 4:20] = True
    masks[1, 2:12, 10:30] = True
    feats = torch.randn(1, 8, 8, 8)
    out = Refiner(8, 4, roi_size=4)(feats, boxes, index)
    total, parts = refiner_loss(out, boxes, masks, 32, LossWeights(box=2.0, mask=0.5, iou=0.25))
    assert set(parts) == {"box", "mask", "iou"} and all(not p.requires_grad for p in parts.values())
    torch.testing.assert_close(total.detach(), 2.0 * parts["box"] + 0.5 * parts["mask"] + 0.25 * parts["iou"])
    no_iou = Refiner(8, 4, roi_size=4, iou_head=False)(feats, boxes, index)
    assert set(refiner_loss(no_iou, boxes, masks, 32)[1]) == {"box", "mask"}
