"""The interface every data source implements."""

from __future__ import annotations

import abc
from typing import Callable, List, Optional

import numpy as np

from .findings import Finding
from .sample import Sample

# `load(index, skip_image=fn)`: called with the sample's cache key before the image is decoded;
# True means "its features are cached: return the targets only".
SkipImage = Optional[Callable[[str], bool]]


class SourcePathError(ValueError):
    """A source's path exists but is the wrong kind of thing: a file where a folder of samples is
    expected, or a folder where an annotation file is expected. A ValueError, so every command line
    reports it as one line; `optional=1` does not skip it (the path is there, just wrong)."""


class Source(abc.ABC):
    """An indexed collection of samples.

    `load(i)` returns a validated Sample or raises BadSample; it never returns partial data. Sources
    are pickled into DataLoader workers, so after construction they hold only numpy arrays and
    scalars, and `load` is a pure function of the index and the files on disk.

    Sources whose `loads_without_image` is True also accept `load(i, skip_image=fn)`: they compute
    the sample's cache key without decoding the image, call `fn(key)`, and when it returns True
    return the sample with `image=None` (boxes, masks and `image_size` only) without decoding the
    image. That is how a sample whose features are cached is served without its image. A source
    without it is loaded whole, and the caller drops the image after a cache hit.
    """

    kind: str = ""
    loads_without_image: bool = False

    def __init__(self, name: str):
        self.name = name

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int) -> Sample: ...

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """The sample's file relative to the source root (or e.g. `synthetic[i]`)."""

    def annotation_ids(self, index: int) -> Optional[np.ndarray]:
        """The ids its annotation file gives the sample's objects, in `boxes` order, for reports that
        point into that file; None for sources without such ids (npz, synthetic)."""
        return None

    def index_findings(self) -> List[Finding]:
        """What indexing found wrong without loading any sample (annotations dropped, duplicate
        entries): reported at start-up and by `pyfast-doctor data`. Empty for most sources."""
        return []

    def _check_index(self, index: int) -> int:
        # An out-of-range index is a caller bug, not a bad sample: IndexError, never BadSample.
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} with {len(self)} samples")
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, samples={len(self)})"


def limit_count(count: int, max_samples: int | None) -> int:
    if max_samples is None:
        return count
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    return min(count, max_samples)
