"""The report of a load (`LoadReport`) and the error that carries it (`WeightsError`).

A report lists what went where in the model's names (`unexpected` in the checkpoint's), with the
fractions of the model's tensors and elements loaded; `describe()` is the one line a log gets,
`lines()` the block `pyfast-doctor checkpoint` prints, `to_dict()` what summary files store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model. `report` is set when a load was
    attempted (what matched, what did not), so a caller can still print it."""

    def __init__(self, message: str, report: Optional["LoadReport"] = None):
        super().__init__(message)
        self.report = report



def _shape(t) -> tuple:
    return tuple(int(s) for s in t.shape)


def _some(items: list, limit: int) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class LoadReport:
    """What a load did. Key lists use the model's names, except `unexpected` (the checkpoint's)."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)
    tied: list = field(default_factory=list)  # model keys sharing a tensor with a loaded key
    ignored: list = field(default_factory=list)  # non-tensor entries of the state dict, skipped
    source: str = "state dict"
    format: str = ""
    state_key: Optional[str] = None  # where the state dict was found (None: the top level)
    other_state_keys: list = field(default_factory=list)
    config: object = None
    config_key: Optional[str] = None
    prefix: str = ""  # the leading chain stripped from the checkpoint's keys
    added_prefix: str = ""  # the model's shared prefix put in its place (a checkpoint of the inner module)
    model_tensors: int = 0
    model_elements: int = 0
    loaded_elements: int = 0
    checkpoint_tensors: int = 0
    checkpoint_elements: int = 0
    checkpoint_dtypes: dict = field(default_factory=dict)
    min_fraction: float = 0.0
    applied: bool = False  # the matched tensors were copied into the model (False when refused)

    @property
    def tensor_fraction(self) -> float:
        return (len(self.loaded) + len(self.tied)) / self.model_tensors if self.model_tensors else 1.0

    @property
    def element_fraction(self) -> float:
        return self.loaded_elements / self.model_elements if self.model_elements else 1.0

    @property
    def matched_fraction(self) -> float:
        """The smaller of the tensor and element fractions loaded."""
        return min(self.tensor_fraction, self.element_fraction)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def complete(self) -> bool:
        """Every tensor of the model came from the checkpoint (extra checkpoint keys allowed)."""
        return not (self.missing or self.mismatched)

    def describe(self, limit: int = 5) -> str:
        """One line: counts, then examples of what did not fit."""
        where = f" under {self.state_key!r}" if self.state_key else ""
        strip = f", prefix {self.prefix!r} stripped" if self.prefix else ""
        strip += f", prefix {self.added_prefix!r} added" if self.added_prefix else ""
        parts = [
            f"{'loaded' if self.applied else 'matched (not loaded)'} {len(self.loaded) + len(self.tied)} of "
            f"{self.model_tensors} tensors "
            f"({self.tensor_fraction:.0%} of the model's tensors, {self.element_fraction:.0%} of its elements)"
            f"{where}{strip}"
        ]
        if self.missing:
            parts.append(f"missing: {_some(self.missing, limit)}")
        if self.unexpected:
            parts.append(f"unexpected: {_some(self.unexpected, limit)}")
        if self.mismatched:
            parts.append("shape mismatch: " + _some([f"{k} {a} vs model {b}" for k, a, b in self.mismatched], limit))
        return "; ".join(parts)

    def lines(self, limit: int = 5) -> list:
        """The multi-line form `pyfast-doctor checkpoint` prints."""
        out = [
            f"{'loaded ' if self.applied else 'matched'}      {len(self.loaded) + len(self.tied):,} / "
            f"{self.model_tensors:,} tensors "
            f"({self.tensor_fraction:.1%}), {self.loaded_elements:,} / {self.model_elements:,} elements "
            f"({self.element_fraction:.1%})" + (f", {len(self.tied)} of them tied" if self.tied else ""),
            "prefix       " + (f"{self.prefix!r} stripped" if self.prefix else "none stripped")
            + (f", {self.added_prefix!r} added" if self.added_prefix else ""),
            f"missing      {len(self.missing):,}" + (f": {_some(self.missing, limit)}" if self.missing else ""),
            f"unexpected   {len(self.unexpected):,}" + (f": {_some(self.unexpected, limit)}" if self.unexpected else ""),
            f"mismatched   {len(self.mismatched):,}"
            + (": " + _some([f"{k} {a} vs model {b}" for k, a, b in self.mismatched], limit) if self.mismatched else ""),
        ]
        if self.ignored:
            out.append(f"ignored      {len(self.ignored):,} non-tensor entries: {_some(self.ignored, limit)}")
        return out

    def to_dict(self) -> dict:
        """JSON-able summary (counts, fractions, the first few keys of each list)."""
        return {
            "source": self.source,
            "format": self.format,
            "applied": self.applied,
            "state_key": self.state_key,
            "prefix": self.prefix,
            "added_prefix": self.added_prefix,
            "loaded": len(self.loaded) + len(self.tied),
            "model_tensors": self.model_tensors,
            "tensor_fraction": self.tensor_fraction,
            "element_fraction": self.element_fraction,
            "missing": self.missing[:20],
            "unexpected": self.unexpected[:20],
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched[:20]],
            "counts": {
                "missing": len(self.missing),
                "unexpected": len(self.unexpected),
                "mismatched": len(self.mismatched),
            },
        }
