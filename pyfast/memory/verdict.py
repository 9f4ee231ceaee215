"""The leak rule: when a memory series counts as sustained growth.

For each watched series (host memory, the DataLoader workers' memory, CUDA allocated memory, open
file descriptors) the rule looks at the last `window` samples of the current process taken after
`warmup_steps`, and fits a Theil–Sen slope in units per 1000 steps. The series LEAKS when all hold:

1. enough evidence: at least `min_samples` samples spanning at least `min_steps` steps;
2. fast enough to matter: the slope is at least the series' bound;
3. confident: the lower end of the slope's 95% confidence interval is above zero;
4. sustained: in each half of the window the slope is at least half the bound with its
   confidence interval above zero, and the two halves' slopes are within a factor of 2 of each
   other. A one-off step (a buffer allocated once, a cache filled once) makes one half's slope
   far steeper than the other's; growth that levels off (allocator warm-up, caches filling) slows
   down within the window. Neither is a leak; a leak grows at the same pace throughout.

A series that passes 2 and 3 on fewer samples, or fails only 4, is GROWING: it triggers the search
for what grows but no alarm. Samples taken while a search ran are left out, and the stretch after a
search is judged on its own (`judged_pieces`). Everything here is a pure function of the samples
and the searches' step ranges, so a run directory's files give the verdict the live monitor gave.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pyfast.memory.trend import theil_sen

LEAK, GROWING, OK, INSUFFICIENT = "leak", "growing", "ok", "insufficient"

# The watched series: name -> (sample fields in order of preference, unit, bound field of LeakRule).
WATCHED = {
    "host": (("anon_mb", "rss_mb"), "MB", "host_mb"),
    "workers": (("workers_uss_mb", "workers_rss_mb"), "MB", "workers_mb"),
    "cuda": (("cuda_allocated_mb",), "MB", "cuda_mb"),
    "fds": (("fds",), "descriptors", "fds"),
}
# Reported for information (slope only, never an alarm).
INFORMATIVE = ("rss_mb", "uss_mb", "cuda_reserved_mb")


@dataclass(frozen=True)
class LeakRule:
    """Bounds (per 1000 steps) and evidence the leak rule needs; the defaults are documented in the README."""

    host_mb: float = 10.0
    workers_mb: float = 10.0
    cuda_mb: float = 10.0
    fds: float = 5.0
    warmup_steps: int = 200
    window: int = 60
    min_samples: int = 20
    min_steps: int = 200
    confidence: float = 0.95

    def __post_init__(self):
        for name in ("host_mb", "workers_mb", "cuda_mb", "fds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LeakRule.{name} must be a positive number, got {value!r}")
        for name in ("warmup_steps", "min_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"LeakRule.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.min_samples, int) and self.min_samples >= 6):
            raise ValueError(f"LeakRule.min_samples must be an int >= 6 (two halves of 3), got {self.min_samples!r}")
        if not (isinstance(self.window, int) and self.window >= self.min_samples):
            raise ValueError(f"LeakRule.window must be an int >= min_samples ({self.min_samples}), got {self.window!r}")
        if not (0.5 <= self.confidence < 1.0):
            raise ValueError(f"LeakRule.confidence must be in [0.5, 1), got {self.confidence!r}")

    @property
    def suspect_samples(self) -> int:
        """Samples needed before growth can be suspected (and the search for growers starts)."""
        return max(6, self.min_samples // 2)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LeakRule":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def assess(steps: Sequence[float], values: Sequence[float], bound: float, rule: LeakRule,
           *, start_step: Optional[float] = None) -> dict:
    """Applies the leak rule to one series; returns a JSON-ready dict.

    steps, values: the samples of one process (NaN values are missing samples and are dropped).
    start_step: the first step of that process (warm-up counts from it); default the first sample.
    Slopes are in units per 1000 steps.
    """
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.size and start_step is None:
        start_step = float(x[0])
    keep = np.isfinite(y) & np.isfinite(x)
    if start_step is not None:
        keep &= x >= start_step + rule.warmup_steps
    x, y = x[keep][-rule.window:], y[keep][-rule.window:]
    result = {"status": INSUFFICIENT, "bound": bound, "samples": int(x.size),
              "steps": [int(x[0]), int(x[-1])] if x.size else None, "last": float(y[-1]) if y.size else None}
    if x.size < rule.suspect_samples or x[-1] == x[0]:
        return result

    fit = theil_sen(x, y, rule.confidence)
    slope = fit.slope * 1000.0
    span = float(x[-1] - x[0])
    enough = x.size >= rule.min_samples and span >= rule.min_steps
    fast = slope >= bound
    confident = fit.ci_low > 0.0
    halves = half_lows = None
    if confident:  # the halves matter only for growth that is certain (and cost two more fits)
        half = x.size // 2
        half_fits = [theil_sen(x[:half], y[:half], rule.confidence), theil_sen(x[half:], y[half:], rule.confidence)]
        halves = [f.slope * 1000.0 for f in half_fits]
        half_lows = [f.ci_low * 1000.0 for f in half_fits]
    sustained = halves is not None and _sustained(halves, half_lows, bound)
    if fast and confident and sustained and enough:
        status = LEAK
    elif fast and confident:
        status = GROWING
    elif enough:
        status = OK
    else:
        status = INSUFFICIENT
    result.update(
        status=status,
        slope=slope,
        ci=[fit.ci_low * 1000.0, fit.ci_high * 1000.0],
        positive_fraction=fit.positive_fraction,
        half_slopes=halves,  # None when the slope's interval reaches zero
        half_ci_lows=half_lows,
        growth=fit.slope * span,  # rise of the fitted line over the window, in the series' unit
        intercept=fit.intercept,  # the fitted line: value = intercept + slope / 1000 * step
    )
    return result


def _sustained(half_slopes: Sequence[float], half_ci_lows: Sequence[float], bound: float) -> bool:
    return (min(half_slopes) >= bound / 2.0 and min(half_ci_lows) > 0.0
            and min(half_slopes) >= max(half_slopes) / 2.0)


def passes(assessment: dict, bound: float, rule: LeakRule) -> bool:
    """The leak rule of an already fitted series against another bound (what `check` uses: no refit)."""
    if "slope" not in assessment:
        return False
    steps = assessment["steps"]
    return (assessment["samples"] >= rule.min_samples and steps[1] - steps[0] >= rule.min_steps
            and assessment["slope"] >= bound and assessment["ci"][0] > 0.0 and assessment["half_slopes"] is not None
            and _sustained(assessment["half_slopes"], assessment["half_ci_lows"], bound))


# ---------------------------------------------------------------- whole verdicts

def columns_of(samples: Sequence[dict], names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Sample dicts as float64 columns (NaN where a value is missing)."""
    return {name: np.array([np.nan if s.get(name) is None else float(s[name]) for s in samples], dtype=np.float64)
            for name in names}


def _current_workers(columns: Dict[str, np.ndarray]) -> slice:
    """The trailing samples taken with the same set of workers (a new set starts from scratch)."""
    keys, workers = columns["workers_key"], columns["workers"]
    if not keys.size or not np.isfinite(keys[-1]) or not workers[-1] > 0:
        return slice(0, 0)
    broken = np.flatnonzero((keys != keys[-1]) | ~(workers > 0))
    return slice(int(broken[-1]) + 1 if broken.size else 0, None)


def assess_columns(columns: Dict[str, np.ndarray], rule: LeakRule, start_step: float,
                   informative: bool = True) -> Dict[str, dict]:
    """Assessments of the watched series that have data (and, with `informative`, the slopes of
    INFORMATIVE) for one process's samples given as columns (see `columns_of`)."""
    out: Dict[str, dict] = {}
    steps = columns["step"]
    for name, (candidates, unit, bound_field) in WATCHED.items():
        rows = _current_workers(columns) if name == "workers" else slice(None)
        field = next((f for f in candidates if np.isfinite(columns[f][rows]).any()), None)
        if field is None:
            continue
        result = assess(steps[rows], columns[field][rows], getattr(rule, bound_field), rule, start_step=start_step)
        out[name] = {"field": field, "unit": unit, **result}
    if informative:
        for field in INFORMATIVE:
            if np.isfinite(columns[field]).any():
                result = assess(steps, columns[field], math.inf, rule, start_step=start_step)
                out[field] = {"field": field, "unit": "MB", **{k: v for k, v in result.items() if k != "bound"}}
    return out


SERIES_FIELDS = ("step", "workers", "workers_key") + tuple(
    f for candidates, _, _ in WATCHED.values() for f in candidates) + INFORMATIVE


def assess_segment(samples: Sequence[dict], rule: LeakRule, start_step: Optional[float] = None) -> Dict[str, dict]:
    """assess_columns of one process's samples (dicts); start_step defaults to the first sample's."""
    if not samples:
        return {}
    start = float(samples[0]["step"]) if start_step is None else float(start_step)
    return assess_columns(columns_of(samples, SERIES_FIELDS), rule, start)


def segments(samples: Sequence[dict]) -> List[List[dict]]:
    """Samples split by process (a resumed run starts a new segment: its memory is not comparable)."""
    groups: Dict[int, List[dict]] = {}
    for sample in samples:
        groups.setdefault(int(sample.get("segment", 0)), []).append(sample)
    return [groups[k] for k in sorted(groups)]


def judged_pieces(samples: Sequence[dict], investigations: Sequence[dict] = ()) -> List[Tuple[List[dict], float]]:
    """Stretches of samples judged apart, each with the step its warm-up counts from.

    One per process, cut where a search for growers ran: samples taken during a search are left
    out (its census and tracemalloc's tables are memory the run does not own), and the stretch
    after it is judged on its own (the search leaves a step behind: freed memory that the
    allocator keeps). Warm-up counts from the process's first sample only.
    """
    pieces: List[Tuple[List[dict], float]] = []
    for part in segments(samples):
        segment = int(part[0].get("segment", 0))
        windows = [inv["steps"] for inv in investigations if int(inv.get("segment", 0)) == segment]
        groups: Dict[int, List[dict]] = {}
        for sample in part:
            step = sample["step"]
            if any(begin < step <= end for begin, end in windows):
                continue
            groups.setdefault(sum(begin < step for begin, _ in windows), []).append(sample)
        pieces.extend((groups[k], float(part[0]["step"])) for k in sorted(groups))
    return pieces


def overall_status(assessments: Dict[str, dict]) -> str:
    watched = [assessments[name]["status"] for name in WATCHED if name in assessments]
    for status in (LEAK, GROWING, OK):
        if status in watched:
            return status
    return INSUFFICIENT


def build_verdict(samples: Sequence[dict], rule: LeakRule, investigations: Sequence[dict] = (),
                  notes: Sequence[str] = ()) -> dict:
    """The verdict of a run: JSON-ready, and the same whether computed live or from memory.jsonl.

    The latest stretch (`judged_pieces`) with enough samples after warm-up is judged: earlier
    processes, before a resume, are not comparable with the latest; with none, the latest stretch.
    """
    pieces = judged_pieces(samples, investigations)
    chosen, start = pieces[-1] if pieces else ([], 0.0)
    assessments = assess_segment(chosen, rule, start) if chosen else {}
    for candidate, candidate_start in reversed(pieces[:-1]):
        if overall_status(assessments) != INSUFFICIENT:
            break
        candidate_assessments = assess_segment(candidate, rule, candidate_start)
        if overall_status(candidate_assessments) != INSUFFICIENT:
            chosen, assessments = candidate, candidate_assessments
    status = overall_status(assessments)
    leaking = [name for name in WATCHED if assessments.get(name, {}).get("status") == LEAK]
    growers = _growers_for(leaking, investigations)
    return {
        "leak": status == LEAK,
        "status": status,
        "leaking": leaking,
        "segment": int(chosen[0].get("segment", 0)) if chosen else None,
        "judged_steps": [int(chosen[0]["step"]), int(chosen[-1]["step"])] if chosen else None,
        "samples": len(samples),
        "last_step": int(samples[-1]["step"]) if samples else None,
        "series": assessments,
        "growers": growers,
        "investigations": len(investigations),
        "rule": rule.as_dict(),
        "notes": list(notes),
    }


def _growers_for(leaking: Sequence[str], investigations: Sequence[dict]) -> Optional[dict]:
    """The latest search for growers that concerns a leaking series (host growth explains CUDA too)."""
    if not leaking:
        return None
    relevant = [inv for inv in investigations if inv.get("trigger") in leaking] or \
               [inv for inv in investigations if inv.get("trigger") in ("host", "cuda") and
                set(leaking) & {"host", "cuda"}]
    return relevant[-1] if relevant else None
