"""Opening the sources named by `--data` specs, with the start-up table of their sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .coco import CocoSource
from .findings import summarize
from .npz import NpzSource
from .source import Source
from .spec import SourceSpec
from .synthetic import SyntheticSource


class MissingSourceError(Exception):
    """A required source's path does not exist."""

    def __init__(self, spec: SourceSpec, path: str):
        self.spec = spec
        self.path = path
        super().__init__(
            f"{spec.kind} source path {path!r} does not exist "
            f"(add optional=1 to --data {spec.text or spec.label} to skip it when missing)"
        )


@dataclass(frozen=True)
class SourceStatus:
    """One row of the start-up table: a source's label and sample count, or None when it was missing."""

    label: str
    samples: Optional[int]


class SourceList(list):
    """The opened sources (a plain list of Source) plus the start-up table describing every spec."""

    def __init__(self, sources: Sequence[Source], statuses: Sequence[SourceStatus]):
        super().__init__(sources)
        self.statuses = list(statuses)

    @property
    def table(self) -> str:
        return format_source_table(self.statuses)

    @property
    def total_samples(self) -> int:
        return sum(len(source) for source in self)


def format_source_table(statuses: Sequence[SourceStatus]) -> str:
    """`synthetic: 512 | npz (/data/x): 1,204 | coco (/data/val.json): missing, skipped`."""
    if not statuses:
        return "no data sources"
    return " | ".join(
        f"{status.label}: {'missing, skipped' if status.samples is None else f'{status.samples:,}'}"
        for status in statuses
    )


def _missing_path(spec: SourceSpec) -> Optional[str]:
    if spec.kind == "npz" and not Path(spec.path).exists():
        return spec.path
    if spec.kind == "coco":
        for path in (spec.path, spec.images):
            if not Path(path).exists():
                return path
    return None


def open_source(spec: SourceSpec, *, name: Optional[str] = None) -> Source:
    """Open one source; a missing path raises MissingSourceError (whatever `optional` says), a path
    of the wrong kind (a file for npz, a folder for a COCO annotation file) SourcePathError."""
    missing = _missing_path(spec)
    if missing is not None:
        raise MissingSourceError(spec, missing)
    name = name or spec.label
    if spec.kind == "synthetic":
        options = {
            key: value
            for key, value in (("num_samples", spec.num_samples), ("image_size", spec.image_size), ("seed", spec.seed))
            if value is not None
        }
        return SyntheticSource(**options, max_samples=spec.max_samples, name=name)
    if spec.kind == "npz":
        return NpzSource(spec.path, max_samples=spec.max_samples, name=name)
    if spec.kind == "coco":
        return CocoSource(spec.path, spec.images, max_samples=spec.max_samples, name=name)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def build_sources(specs: Sequence[SourceSpec], *, log: Callable[[str], None] = print) -> SourceList:
    """Open every source. An optional missing one is logged (by name) and skipped; a required missing
    one raises MissingSourceError. Logs a warning line per source whose index found problems (COCO
    annotations dropped, duplicate entries), then the start-up table, and returns the sources (a
    list) with `.table` and `.statuses` for callers that print it themselves."""
    sources: List[Source] = []
    statuses: List[SourceStatus] = []
    used_names = set()
    for spec in specs:
        name = spec.label
        suffix = 2
        while name in used_names:  # skip records are keyed by source name: keep names unique
            name = f"{spec.label} #{suffix}"
            suffix += 1
        try:
            source = open_source(spec, name=name)
        except MissingSourceError as error:
            if not spec.optional:
                raise
            log(f"warning: optional {spec.kind} source {error.path!r} is missing, skipped")
            statuses.append(SourceStatus(name, None))
            continue
        used_names.add(name)
        if len(source) == 0:
            log(f"warning: {name} has no samples")
        findings = source.index_findings()
        if findings:
            log(f"warning: {name}: {summarize(findings)} (pyfast-doctor data lists them)")
        sources.append(source)
        statuses.append(SourceStatus(name, len(source)))
    result = SourceList(sources, statuses)
    log(result.table)
    return result
