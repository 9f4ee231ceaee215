"""Backbones (frozen feature extractors) and the refinement heads trained on their features."""

from pyfast.models.backbone import (
    DEFAULT_BACKBONE,
    BackboneError,
    FeatureMap,
    TinyBackbone,
    feature_maps,
    load_backbone,
    probe,
)
from pyfast.models.heads import BoxHead, MaskHead
from pyfast.models.refiner import Refiner, RefinerOutput
from pyfast.models.roi_align import roi_align

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "BoxHead",
    "FeatureMap",
    "MaskHead",
    "Refiner",
    "RefinerOutput",
    "TinyBackbone",
    "feature_maps",
    "load_backbone",
    "probe",
    "roi_align",
]
