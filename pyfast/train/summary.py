"""summary.json and the table printed at the end of a run."""

from __future__ import annotations

import json

from pyfast._io import atomic_write_text


def write_summary(path, summary: dict) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(summary: dict) -> str:
    rows = [
        ("status", summary.get("status")),
        ("steps / epochs", f"{summary.get('steps')} / {_fmt(summary.get('epochs'), '.2f')}"),
        ("device / precision", f"{summary.get('device')} / {summary.get('precision')}"),
        ("s/batch cold (epoch 1)", _fmt(summary.get("s_per_batch_cold"))),
        ("s/batch warm (later)", _fmt(summary.get("s_per_batch_warm"))),
        ("cache hit rate (after epoch 1)", _fmt(summary.get("cache_hit_rate"))),
        ("val IoU input boxes", _fmt(summary.get("val_iou_input"))),
        ("val IoU refined boxes", _fmt(summary.get("val_iou_refined"))),
        ("val mask IoU", _fmt(summary.get("val_mask_iou"))),
        ("val box AP input / refined", f"{_fmt(summary.get('val_ap_input'))} / {_fmt(summary.get('val_ap_refined'))}"),
        ("skipped samples", summary.get("skipped_samples")),
        ("non-finite steps", summary.get("nonfinite_steps")),
        ("wall time", f"{_fmt(summary.get('wall_s'), '.1f')} s"),
        ("run directory", summary.get("run_dir")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
