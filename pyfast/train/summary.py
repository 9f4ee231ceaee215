"""summary.json and the table printed at the end of a run."""

from __future__ import annotations

import json

from pyfast._io import atomic_write_text
from pyfast.train.memory import memory_line


def summarize(run, status: str) -> dict:
    """summary.json's dict: what ran (backend, device, precision, world size), how fast, how well.

    With several ranks the counts and samples/s are totals over the ranks; s/batch and the warm
    step's shares are rank 0's times (the ranks run in lockstep: each micro-batch slot is one batch
    on every rank); `device` is rank 0's."""
    stats, last = run.stats, run.stats.last_val
    warm_cache = stats.warm.cache
    micro_per_epoch = run.data.micro_per_epoch
    return {
        "status": status,
        "steps": run.progress.step,
        "epochs": run.progress.epoch + run.progress.micro / micro_per_epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "backend": run.backend,
        "device": str(run.device),
        "precision": run.precision,
        "world_size": run.world_size,
        "s_per_batch_cold": stats.cold.s_per_batch,
        "s_per_batch_warm": stats.warm.s_per_batch,
        "samples_per_s_cold": stats.cold.samples_per_s,
        "samples_per_s_warm": stats.warm.samples_per_s,
        "cache": run.features.cache is not None,
        "cache_hit_rate": warm_cache.hit_rate,
        "cache_lookups_warm": warm_cache.lookups,
        "backbone_samples": stats.backbone_samples,
        "cache_corrupt": stats.corrupt,
        "val_iou_input": last.get("val_iou_input"),
        "val_iou_refined": last.get("val_iou_refined"),
        "val_mask_iou": last.get("val_mask_iou"),
        "val_ap_input": last.get("val_ap_input"),
        "val_ap_refined": last.get("val_ap_refined"),
        "val_nonfinite_boxes": last.get("val_nonfinite_boxes"),
        "best_val_iou_refined": stats.best_val_iou,
        "nonfinite_steps": run.guard.total,
        "scaler_skipped_steps": stats.scaler_skips,
        "skipped_samples": run.skips.count,
        "warm_step_share": stats.warm_steps.shares(),
        "train_samples": len(run.data.train_indices),
        "val_samples": len(run.data.val_indices),
        "wall_s": sum(stats.segments),
        "wall_segments_s": list(stats.segments),
        "memory": run.memory.summary(),
        "run_dir": str(run.paths.path),
        "backbone": run.backbone_info,
    }


def write_summary(path, summary: dict) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(summary: dict) -> str:
    segments = summary.get("wall_segments_s") or []
    wall = f"{_fmt(summary.get('wall_s'), '.1f')} s"
    if len(segments) > 1:
        wall += f" (whole run: {len(segments)} segments, " + " + ".join(f"{s:.1f}" for s in segments) + ")"
    refined = _fmt(summary.get("val_iou_refined"))
    if summary.get("val_nonfinite_boxes"):
        refined += f" ({summary['val_nonfinite_boxes']} non-finite boxes: diverged)"
    hit_rate = _fmt(summary.get("cache_hit_rate")) if summary.get("cache", True) else "off"
    rows = [
        ("status", summary.get("status")),
        ("steps / epochs", f"{summary.get('steps')} / {_fmt(summary.get('epochs'), '.2f')}"),
        ("device / precision", f"{summary.get('device')} / {summary.get('precision')}"),
        ("ops backend / world size", f"{summary.get('backend')} / {summary.get('world_size')}"),
        ("s/batch cold (epoch 1)", _fmt(summary.get("s_per_batch_cold"))),
        ("s/batch warm (later)", _fmt(summary.get("s_per_batch_warm"))),
        ("samples/s warm, all ranks", _fmt(summary.get("samples_per_s_warm"), ".1f")),
        ("cache hit rate (after epoch 1)", hit_rate),
        ("cache entries found corrupt", summary.get("cache_corrupt")),
        ("val IoU input boxes", _fmt(summary.get("val_iou_input"))),
        ("val IoU refined boxes", refined),
        ("val mask IoU", _fmt(summary.get("val_mask_iou"))),
        ("val box AP input / refined", f"{_fmt(summary.get('val_ap_input'))} / {_fmt(summary.get('val_ap_refined'))}"),
        ("skipped samples", summary.get("skipped_samples")),
        ("non-finite steps", summary.get("nonfinite_steps")),
        ("memory (per 1000 steps)", memory_line(summary.get("memory"))),
        ("wall time", wall),
        ("run directory", summary.get("run_dir")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
