"""Data sources (synthetic, npz, coco), the robust dataset over them, skip bookkeeping and inspection.

A bad sample never crashes an epoch: `Source.load` raises BadSample, `RobustDataset` turns it into a
SkippedSample record, `collate` sets it aside and `SkipTracker` counts it once, logs it to
`skipped.jsonl`, and aborts the run once too large a fraction of the data is bad. Data that loads
but looks wrong, and COCO entries left out, are Findings (`findings.py`, `inspection.py`), reported
at start-up and by `pyfast-doctor data`.
"""

from .builder import MissingSourceError, SourceList, SourceStatus, build_sources, format_source_table, open_source
from .coco import CocoSource
from .dataset import Batch, RobustDataset, collate
from .findings import Finding, FindingsReport
from .inspection import inspect_sample
from .npz import NpzSource
from .sample import BadSample, Sample, SkippedSample
from .skip import SkipTracker, TooManyBadSamples
from .source import Source, SourcePathError
from .spec import (
    DEFAULT_DATA_SPEC,
    DEFAULT_MAX_SKIP_FRACTION,
    SourceSpec,
    add_data_arguments,
    data_specs_from_args,
    parse_data_spec,
)
from .synthetic import GENERATOR_VERSION, SyntheticSource
from .transforms import Letterbox, LetterboxedSample, images_to_device, letterbox

__all__ = [
    "BadSample",
    "Batch",
    "CocoSource",
    "DEFAULT_DATA_SPEC",
    "DEFAULT_MAX_SKIP_FRACTION",
    "Finding",
    "FindingsReport",
    "GENERATOR_VERSION",
    "Letterbox",
    "LetterboxedSample",
    "MissingSourceError",
    "NpzSource",
    "RobustDataset",
    "Sample",
    "SkipTracker",
    "SkippedSample",
    "Source",
    "SourceList",
    "SourcePathError",
    "SourceSpec",
    "SourceStatus",
    "SyntheticSource",
    "TooManyBadSamples",
    "add_data_arguments",
    "build_sources",
    "collate",
    "data_specs_from_args",
    "format_source_table",
    "inspect_sample",
    "images_to_device",
    "letterbox",
    "open_source",
    "parse_data_spec",
]
