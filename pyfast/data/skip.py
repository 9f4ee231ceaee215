"""Main-process bookkeeping of skipped samples: record each once, log it, abort past the bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

from .sample import SkippedSample

_FIRST_FILES_SHOWN = 5


class TooManyBadSamples(RuntimeError):
    """More than the allowed fraction of the data failed to load."""


def exceeds_bound(count: int, total: int, max_fraction: float) -> bool:
    return count > max_fraction * total


class SkipTracker:
    """Counts bad samples once each (by source and global index, across epochs and workers) and
    appends each to `log_path` (`skipped.jsonl`: one JSON object per line with source, file, reason).

    `record` raises TooManyBadSamples as soon as count > max_fraction * total_samples. With
    `resume=True`, the records already in `log_path` are counted again without rewriting them, so a
    resumed run keeps its count.
    """

    def __init__(
        self,
        total_samples: int,
        *,
        max_fraction: float = 0.05,
        log_path=None,
        resume: bool = False,
    ):
        if int(total_samples) != total_samples or total_samples < 0:
            raise ValueError(f"total_samples must be a non-negative int, got {total_samples!r}")
        if not 0.0 <= float(max_fraction) <= 1.0:
            raise ValueError(f"max_fraction must be between 0 and 1, got {max_fraction!r}")
        self.total_samples = int(total_samples)
        self.max_fraction = float(max_fraction)
        self.log_path: Optional[Path] = Path(log_path) if log_path is not None else None
        self._seen: Set[Tuple[str, int]] = set()
        self._first: List[SkippedSample] = []
        if resume and self.log_path is not None and self.log_path.exists():
            self._reload()

    def _reload(self) -> None:
        with open(self.log_path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    record = SkippedSample(
                        source=entry["source"],
                        file=entry["file"],
                        reason=entry["reason"],
                        index=int(entry["index"]),
                        category=entry.get("category", ""),
                    )
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{self.log_path}:{number}: not a skipped-sample record ({error})") from None
                self._remember(record)

    def _remember(self, record: SkippedSample) -> bool:
        identity = (record.source, int(record.index))
        if identity in self._seen:
            return False
        self._seen.add(identity)
        if len(self._first) < _FIRST_FILES_SHOWN:
            self._first.append(record)
        return True

    @property
    def count(self) -> int:
        return len(self._seen)

    @property
    def fraction(self) -> float:
        return self.count / self.total_samples if self.total_samples else 0.0

    def record(self, skipped: Iterable[SkippedSample]) -> int:
        """Record a batch's skipped samples; returns how many were new. Raises TooManyBadSamples."""
        new = [record for record in skipped if self._remember(record)]
        if new and self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as handle:
                for record in new:
                    handle.write(json.dumps(record.as_record()) + "\n")
                handle.flush()
        if new and exceeds_bound(self.count, self.total_samples, self.max_fraction):
            raise TooManyBadSamples(self.abort_message())
        return len(new)

    def abort_message(self) -> str:
        first = "; ".join(f"{r.source}: {r.file} ({r.reason})" for r in self._first)
        where = f" (all listed in {self.log_path})" if self.log_path is not None else ""
        return (
            f"{self.count} of {self.total_samples} samples ({self.fraction:.2%}) failed to load, more than the "
            f"allowed {self.max_fraction:.2%} (--max-skip-fraction {self.max_fraction:g}). "
            f"First bad samples{where}: {first}"
        )
