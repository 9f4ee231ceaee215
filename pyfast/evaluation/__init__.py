"""Evaluation metrics of refined boxes and masks, independent of how the model was trained."""

from pyfast.evaluation.box_ap import coco_box_ap

__all__ = ["coco_box_ap"]
