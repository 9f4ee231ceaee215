"""pyfast: fast, hard-to-break training of box and mask refinement heads on frozen backbone features."""

from pyfast._native import native_available
from pyfast.cache import (
    FeatureCache,
    Packed,
    PackedFormatError,
    bytes_key,
    file_key,
    load_packed,
    make_fingerprint,
    pack,
)
from pyfast.capture import ActivationDataset
from pyfast.memory import MemoryMonitor
from pyfast.models.weights import LoadReport, WeightsError, load_weights
from pyfast.ops import BoxLoss, MaskLoss, box_iou, box_loss, mask_iou, mask_loss

__version__ = "0.1.0"

__all__ = [
    "ActivationDataset",
    "BoxLoss",
    "FeatureCache",
    "LoadReport",
    "MaskLoss",
    "MemoryMonitor",
    "Packed",
    "PackedFormatError",
    "WeightsError",
    "__version__",
    "box_iou",
    "box_loss",
    "bytes_key",
    "file_key",
    "load_packed",
    "load_weights",
    "make_fingerprint",
    "mask_iou",
    "mask_loss",
    "native_available",
    "pack",
]
