"""Plots drawn once, at the end of a run (or on interruption), from metrics.jsonl and val.jsonl.

Figures are built with matplotlib's object API (`Figure` + Agg canvas), never pyplot: nothing is
registered globally, so nothing accumulates however many runs one process makes.
"""

from __future__ import annotations

import io
from pathlib import Path

from pyfast._io import atomic_write

from pyfast.train.metrics import read_jsonl


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> None:
    """PNG bytes rendered in memory, then one atomic write: no half-drawn file after a crash."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, [buffer.getbuffer()], fsync=False)


def _number(value):
    return value if isinstance(value, (int, float)) else float("nan")


def write_plots(run_dir) -> list[Path]:
    run_dir = Path(run_dir)
    train = read_jsonl(run_dir / "metrics.jsonl")
    val = read_jsonl(run_dir / "val.jsonl")
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        steps = [r["step"] for r in train]
        fig, ax = _figure()
        ax.plot(steps, [_number(r.get("loss")) for r in train], label="total", color="black")
        for part in sorted({p for r in train for p in (r.get("parts") or {})}):
            ax.plot(steps, [_number((r.get("parts") or {}).get(part)) for r in train], label=part, alpha=0.8)
        ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
        ax.legend()
        fig.tight_layout()
        _save(fig, out / "loss.png")
        written.append(out / "loss.png")

        fig, ax = _figure()
        ax.plot(steps, [_number(r.get("lr")) for r in train])
        ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
        fig.tight_layout()
        _save(fig, out / "lr.png")
        written.append(out / "lr.png")

    if train or val:
        fig, ax = _figure()
        if train:
            ax.plot(steps, [_number(r.get("iou_input")) for r in train], label="train input", alpha=0.4)
            ax.plot(steps, [_number(r.get("iou_refined")) for r in train], label="train refined", alpha=0.4)
        if val:
            vs = [r["step"] for r in val]
            ax.plot(vs, [_number(r.get("val_iou_input")) for r in val], "o--", label="val input")
            ax.plot(vs, [_number(r.get("val_iou_refined")) for r in val], "o-", label="val refined")
            ax.plot(vs, [_number(r.get("val_mask_iou")) for r in val], "s-", label="val mask IoU")
        ax.set(xlabel="optimizer step", ylabel="IoU with ground truth", title="IoU before / after refinement")
        ax.legend()
        fig.tight_layout()
        _save(fig, out / "iou.png")
        written.append(out / "iou.png")
    return written
