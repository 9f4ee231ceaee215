"""memory.png: the memory series of a run, with the fitted growth of the judged window.

Drawn with matplotlib's object API (Figure + Agg canvas), never pyplot: nothing is registered
globally, and the file is written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Sequence

from pyfast._io import atomic_write

_HOST = (("rss_mb", "RSS"), ("anon_mb", "anonymous RSS"), ("uss_mb", "USS"),
         ("workers_rss_mb", "workers RSS"), ("workers_uss_mb", "workers USS"))
_CUDA = (("cuda_allocated_mb", "allocated"), ("cuda_reserved_mb", "reserved"), ("cuda_peak_mb", "peak"))


def _points(samples: Sequence[dict], field: str):
    pairs = [(s["step"], s[field]) for s in samples if s.get(field) is not None and math.isfinite(s[field])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw(ax, samples, fields, verdict: Optional[dict], fitted: dict) -> bool:
    drawn = False
    for field, label in fields:
        steps, values = _points(samples, field)
        if steps:
            ax.plot(steps, values, label=label, linewidth=1)
            drawn = True
    for name, assessment in fitted.items():
        if assessment.get("slope") is None or assessment["field"] not in dict(fields):
            continue
        first, last = assessment["steps"]
        line = [assessment["intercept"] + assessment["slope"] / 1000.0 * x for x in (first, last)]
        ax.plot([first, last], line, "k--", linewidth=1.5,
                label=f"{name}: {assessment['slope']:+.1f} MB/1000 steps ({assessment['status']})")
    return drawn


def write_memory_plot(samples: Sequence[dict], path, verdict: Optional[dict] = None) -> Optional[Path]:
    """Draws host (and worker) memory, and CUDA memory when measured, against steps; returns the
    path, or None when there are no samples."""
    if not samples:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fitted = (verdict or {}).get("series") or {}
    has_cuda = any(s.get("cuda_allocated_mb") is not None for s in samples)
    fig = Figure(figsize=(8, 6 if has_cuda else 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if has_cuda else 1, 1, sharex=True, squeeze=False)[:, 0]
    _draw(axes[0], samples, _HOST, verdict, fitted)
    axes[0].set(ylabel="MB", title="host memory" + (f" - {verdict['status']}" if verdict else ""))
    if has_cuda:
        _draw(axes[1], samples, _CUDA, verdict, fitted)
        axes[1].set(ylabel="MB", title="CUDA memory")
    for ax in axes:
        starts = [s["step"] for prev, s in zip(samples, samples[1:]) if s.get("segment") != prev.get("segment")]
        for step in starts:
            ax.axvline(step, color="gray", linestyle=":", linewidth=1)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, [buffer.getbuffer()], fsync=False)
    return path
