"""Findings: data that loads but looks wrong, or parts of it that are left out, and their report.

Wrong data has one of three outcomes, from the smallest effect up:

- warning: the sample trains as it is, but something in it looks wrong (a box past the image
  edge, an empty mask, a mask that disagrees with its box, a duplicate entry);
- dropped: one annotation or image entry is left out and the rest of its image trains (a COCO
  annotation of an image or category the file does not define, a malformed entry);
- skipped: the whole sample fails to load (BadSample), is counted against --max-skip-fraction and
  logged to `skipped.jsonl` by `skip.py`. Skipped samples are not findings.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

WARNING = "warning"
DROPPED = "dropped"

# Kinds: short fixed phrases that reports group by.
BOX_PARTLY_OUTSIDE = "box partly outside the image"
BOX_OUTSIDE = "box outside the image"
ZERO_AREA_BOX = "zero-area box"
EMPTY_MASK = "empty mask"
MASK_BOX_MISMATCH = "mask disagrees with its box"
DUPLICATE_CONTENT = "duplicate sample"
DUPLICATE_IMAGE_ENTRY = "duplicate image entry"
FILE_LISTED_TWICE = "file listed under several image ids"
POLYGON_PART_IGNORED = "degenerate polygon part ignored"
UNKNOWN_IMAGE = "annotation of an unknown image"
NO_CATEGORY = "annotation without category_id"
UNKNOWN_CATEGORY = "annotation of an unknown category"
MALFORMED_ENTRY = "malformed entry"

SEVERITY: Dict[str, str] = {
    BOX_PARTLY_OUTSIDE: WARNING,
    BOX_OUTSIDE: WARNING,
    ZERO_AREA_BOX: WARNING,
    EMPTY_MASK: WARNING,
    MASK_BOX_MISMATCH: WARNING,
    DUPLICATE_CONTENT: WARNING,
    DUPLICATE_IMAGE_ENTRY: WARNING,
    FILE_LISTED_TWICE: WARNING,
    POLYGON_PART_IGNORED: WARNING,
    UNKNOWN_IMAGE: DROPPED,
    NO_CATEGORY: DROPPED,
    UNKNOWN_CATEGORY: DROPPED,
    MALFORMED_ENTRY: DROPPED,
}
_SEVERITY_ORDER = (DROPPED, WARNING)


@dataclass(frozen=True)
class Finding:
    """One finding. `file` is the sample's file relative to the source root (for an entry that
    belongs to no sample, the annotation file's name); `object` is the object's position in the
    sample's boxes; `annotation` the id its annotation file gives it (COCO)."""

    kind: str
    source: str
    file: str
    detail: str
    object: Optional[int] = None
    annotation: Optional[int] = None

    def __post_init__(self):
        if self.kind not in SEVERITY:
            raise ValueError(f"unknown finding kind {self.kind!r}")

    @property
    def severity(self) -> str:
        return SEVERITY[self.kind]

    @property
    def where(self) -> str:
        """`a.npz object 1`, `000123.jpg object 0 annotation 17`, `instances.json annotation 9`."""
        parts = [self.file]
        if self.object is not None:
            parts.append(f"object {self.object}")
        if self.annotation is not None:
            parts.append(f"annotation {self.annotation}")
        return " ".join(parts)

    def as_record(self) -> dict:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "source": self.source,
            "file": self.file,
            "object": self.object,
            "annotation": self.annotation,
            "detail": self.detail,
        }

    @classmethod
    def from_record(cls, record: dict) -> "Finding":
        return cls(
            kind=record["kind"],
            source=record["source"],
            file=record["file"],
            detail=record["detail"],
            object=record.get("object"),
            annotation=record.get("annotation"),
        )


def _counts_phrase(counts: Counter, severity: str) -> str:
    kinds = sorted((kind for kind in counts if SEVERITY[kind] == severity), key=lambda k: (-counts[k], k))
    total = sum(counts[kind] for kind in kinds)
    if not total:
        return ""
    noun = {WARNING: "warning", DROPPED: "dropped"}[severity]
    head = f"{total:,} {noun}{'s' if severity == WARNING and total != 1 else ''}"
    return f"{head} ({', '.join(f'{counts[kind]:,} {kind}' for kind in kinds)})"


def summarize(findings: Iterable[Finding]) -> str:
    """One line of counts: `2 dropped (2 annotation of an unknown category); 3 warnings (...)`."""
    return _summary(Counter(finding.kind for finding in findings))


def _summary(counts: Counter) -> str:
    phrases = [_counts_phrase(counts, severity) for severity in _SEVERITY_ORDER]
    return "; ".join(phrase for phrase in phrases if phrase) or "none"


class FindingsReport:
    """Counts findings by kind, keeps the first `examples` of each, and appends every finding to
    `log_path` (`findings.jsonl`, one JSON object per line; truncated when the report starts), so
    that memory stays bounded however many there are."""

    def __init__(self, *, examples: int = 3, log_path=None):
        self.examples = int(examples)
        self.counts: Counter = Counter()
        self._first: Dict[str, List[Finding]] = {}
        self.log_path: Optional[Path] = Path(log_path) if log_path is not None else None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")

    def add(self, findings: Iterable[Finding]) -> None:
        findings = list(findings)
        for finding in findings:
            self.counts[finding.kind] += 1
            first = self._first.setdefault(finding.kind, [])
            if len(first) < self.examples:
                first.append(finding)
        if findings and self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(finding.as_record()) + "\n" for finding in findings)

    def count(self, severity: Optional[str] = None) -> int:
        return sum(n for kind, n in self.counts.items() if severity is None or SEVERITY[kind] == severity)

    def examples_of(self, kind: str) -> List[Finding]:
        return list(self._first.get(kind, []))

    def summary(self) -> str:
        return _summary(self.counts)

    def format(self) -> str:
        """The findings section: a summary line, then each kind (dropped first, then warnings, most
        frequent first) with its count and first few findings."""
        lines = [f"findings: {self.summary()}"]
        for severity in _SEVERITY_ORDER:
            kinds = sorted((k for k in self.counts if SEVERITY[k] == severity), key=lambda k: (-self.counts[k], k))
            for kind in kinds:
                lines.append(f"  {self.counts[kind]:>6,}  {severity}: {kind}")
                for finding in self._first[kind]:
                    lines.append(f"            {finding.source}: {finding.where}: {finding.detail}")
                if self.counts[kind] > len(self._first[kind]):
                    lines.append(f"            ... and {self.counts[kind] - len(self._first[kind]):,} more")
        return "\n".join(lines)
