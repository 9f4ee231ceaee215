"""The public ops. Each op module registers its torch.library ops on import."""

from pyfast.ops.box_loss import box_iou, box_loss

__all__ = ["box_iou", "box_loss"]
