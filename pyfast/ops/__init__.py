"""The public ops. Each op module registers its torch.library ops on import."""

from pyfast.ops.box_loss import BoxLoss, box_iou, box_loss
from pyfast.ops.mask_loss import MaskLoss, mask_iou, mask_loss

__all__ = ["BoxLoss", "MaskLoss", "box_iou", "box_loss", "mask_iou", "mask_loss"]
