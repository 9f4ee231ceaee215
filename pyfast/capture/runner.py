"""`capture(model, dataset, out, layers=...)`: run a data set through a model and store the chosen
layers' activations as shards (the folder and its files: `pyfast.capture`).

One pass in data set order, in fixed batches. A probe forward on two blank images first finds the
captured tensors, their shapes and the pooling of each; that table, the model's digest, the data
set's and the storage settings make up the manifest's identity. Then, per batch: the hooks pool
each output and pack it (`pyfast.pack`, fp16/bf16 with per-tensor statistics) in one piece per
shard the batch falls into, the pieces go into the shard buffer, and each full shard is written and
then recorded in shards.jsonl. A rerun of a stopped capture skips the recorded shards and restarts
in the batch that holds the first sample not yet stored.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pyfast import _io
from pyfast.cache import module_digest
from pyfast.cache.packed import NONFINITE_POLICIES, OVERFLOW_POLICIES
from pyfast.capture import manifest as mf
from pyfast.capture import pooling
from pyfast.capture.data import AlignedBatches, Indexed, collate, data_section
from pyfast.capture.errors import CaptureError
from pyfast.capture.hooks import ActivationHooks
from pyfast.capture.layers import ROOT_PATTERN, resolve_layers, split_patterns
from pyfast.capture.shards import SampleRecord, ShardWriter, shard_problem
from pyfast.capture.table import BatchPacker, dtype_name, probe_layers
from pyfast.data import SkipTracker, images_to_device
from pyfast.ops._checks import check_choice

MB = 1 << 20
DEFAULT_SHARD_MB = 256
PRECISIONS = ("fp32", "bf16", "fp16")
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_TABLE_LINES = 40


@dataclass(frozen=True)
class CaptureOptions:
    """What to capture and how. See `capture` for the meaning of each."""

    layers: tuple
    pool: tuple = ()
    image_size: Optional[int] = None
    batch_size: int = 16
    dtype: torch.dtype = torch.float16
    shard_mb: float = DEFAULT_SHARD_MB
    precision: str = "fp32"
    device: Optional[str] = None
    workers: int = 0
    overflow: str = "error"
    nonfinite: str = "keep"
    max_skip_fraction: float = 0.05
    verify_existing: bool = False
    fsync: bool = True

    def __post_init__(self):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        positive_int("batch_size", self.batch_size)
        if self.image_size is not None:
            positive_int("image_size", self.image_size)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        if isinstance(self.shard_mb, bool) or not isinstance(self.shard_mb, (int, float)) or not self.shard_mb > 0 \
                or not math.isfinite(self.shard_mb):
            raise ValueError(f"shard_mb must be a positive number, got {self.shard_mb!r}")
        if self.dtype not in STORE_DTYPES.values():
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {self.dtype}")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("overflow", self.overflow, OVERFLOW_POLICIES)
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if not 0.0 <= float(self.max_skip_fraction) <= 1.0:
            raise ValueError(f"max_skip_fraction must be between 0 and 1, got {self.max_skip_fraction!r}")


@dataclass
class CaptureResult:
    """What a capture run did (`new_*`: by this run; the others: the whole capture so far)."""

    out: str
    complete: bool
    samples: int
    shards: int
    bytes: int
    skipped: int
    new_samples: int = 0
    new_shards: int = 0
    new_bytes: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    nonfinite: Dict[str, int] = field(default_factory=dict)
    overflow: Dict[str, int] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.new_bytes / MB / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> List[str]:
        rows = [
            ("status", "complete" if self.complete else "incomplete"),
            ("samples", f"{self.samples:,} in {self.shards:,} shards, {self.bytes / MB:,.1f} MB"),
            ("this run", f"{self.new_samples:,} samples, {self.new_shards:,} shards written in {self.seconds:.1f} s "
                         f"({self.samples_per_s:,.1f} samples/s, {self.mb_per_s:,.1f} MB/s)"
                         if self.new_samples or self.new_shards else "nothing left to do"),
        ]
        if self.resumed_shards:
            rows.append(("resumed", f"after {self.resumed_shards:,} shards already done"))
        rows.append(("skipped samples", f"{self.skipped:,}"))
        for label, counts in (("non-finite values", self.nonfinite), ("clipped (overflow)", self.overflow)):
            bad = {k: v for k, v in counts.items() if v}
            if bad:
                rows.append((label, ", ".join(f"{k}: {v:,}" for k, v in bad.items())))
        rows.append(("output", self.out))
        return [f"{label:<20}{value}" for label, value in rows]


# ------------------------------------------------------------------ helpers


def autocast_context(device: torch.device, precision: str):
    """A factory of the forward's autocast context: none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def plan_pieces(first_row: int, rows: int, room: int, capacity: int) -> List[tuple]:
    """Row ranges of a batch, one per shard it falls into: the first fills the current shard's room."""
    pieces, start = [], first_row
    while start < rows:
        stop = min(rows, start + room)
        pieces.append((start, stop))
        start, room = stop, capacity
    return pieces


def _totals(entries: List[dict], names: List[str]) -> dict:
    totals = {"samples": 0, "shards": len(entries), "bytes": 0, "nonfinite": dict.fromkeys(names, 0),
              "overflow": dict.fromkeys(names, 0), "absmax": dict.fromkeys(names, 0.0)}
    for entry in entries:
        totals["samples"] += entry["samples"]
        totals["bytes"] += entry["bytes"]
        for name, stats in entry["stats"].items():
            totals["nonfinite"][name] += stats["nonfinite"]
            totals["overflow"][name] += stats["overflow"]
            totals["absmax"][name] = max(totals["absmax"][name], stats["absmax"])
    return totals


def _check_empty_folder(out: str) -> None:
    names = [n for n in os.listdir(out) if n != mf.LOCK_FILE]
    if names:
        raise CaptureError(
            f"--out {out}: the folder holds other files ({', '.join(sorted(names)[:3])}...) and no capture "
            f"manifest; give a new or empty folder"
        )


# ------------------------------------------------------------------ the capture


def capture(
    model: nn.Module,
    dataset,
    out,
    *,
    layers: Sequence[str],
    log: Optional[Callable[[str], None]] = print,
    progress: Optional[bool] = None,
    on_shard: Optional[Callable[[dict], None]] = None,
    model_info: Optional[dict] = None,
    data_info: Optional[dict] = None,
    **options,
) -> CaptureResult:
    """Captures the outputs of the modules `layers` names while `dataset` runs through `model`,
    into the folder `out`; returns what was done. A rerun with the same arguments continues a
    stopped capture; one whose model, layers, data or storage differ is refused (CaptureError).

    dataset: map-style; items are SkippedSample records or have `image` ((3, S, S) float in [0, 1])
        and `key` (see pyfast.capture.data; `images_dataset` builds one from --data sources).
    layers: fnmatch patterns over `model.named_modules()` names ('.': the model's own output).
    options (CaptureOptions):
        pool: [PATTERN=]KIND[:DIMS] specs (pyfast.capture.pooling); default: nothing pooled.
        image_size: the side S of the probe images (default: the dataset's preprocess size).
        batch_size (16), dtype (torch.float16 or torch.bfloat16), shard_mb (256: data bytes a shard),
        precision ("fp32", or "bf16"/"fp16" autocast), device (default: the model's; the model is
        moved there), workers (DataLoader workers, 0), max_skip_fraction (0.05: TooManyBadSamples past it).
        overflow: "error" (default; values beyond the dtype's range stop the capture) or "saturate"
            (stored as +-max and counted). nonfinite: "keep" (default: NaN/inf stored as they are and
            counted per layer and shard) or "error".
        verify_existing: on resume, check the checksum of every shard already written (not just its
            size); a damaged one is captured again with the ones after it.
        fsync: flush each shard to disk before recording it (default True).
    log: one line per message (None: quiet). progress: a tqdm bar (default: when stderr is a terminal).
    on_shard(entry): called after each shard is recorded. model_info / data_info: extra JSON
    descriptions for the manifest (the CLI puts the model spec, weights path and --data specs there).
    """
    opts = CaptureOptions(layers=tuple(split_patterns(layers)), **options)
    say = log or (lambda message: None)
    out = os.fspath(out)
    device = model_device(model) if opts.device is None else torch.device(opts.device)
    if device != model_device(model):
        model.to(device)
    image_size = opts.image_size or getattr(getattr(dataset, "preprocess", None), "size", None)
    if not image_size:
        raise CaptureError("image_size is needed: the dataset's preprocess does not say which image size it makes")
    autocast = autocast_context(device, opts.precision)
    was_training = model.training
    model.eval()
    try:
        return _capture(model, dataset, out, opts, device, int(image_size), autocast, say, progress, on_shard,
                        model_info or {}, data_info or {})
    finally:
        model.train(was_training)


def _new_manifest(model, dataset, opts, table, ignored, not_run, module_names, capacity, sample_bytes, image_size,
                  model_info, data_info) -> dict:
    import pyfast

    cls = type(model)
    manifest = {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "status": mf.STATUS_RUNNING,
        "created_by": f"pyfast {pyfast.__version__}",
        "model": {"class": f"{cls.__module__}.{cls.__qualname__}", "digest": module_digest(model), **model_info},
        "layers": {
            "patterns": list(opts.layers),
            "pool": [spec if isinstance(spec, str) else spec.text for spec in opts.pool],
            "modules": [name or ROOT_PATTERN for name in module_names],
            "tensors": [t.as_dict() for t in table],
            "ignored": ignored,
            "not_run": [name or ROOT_PATTERN for name in not_run],
        },
        "data": {**data_section(dataset), **data_info},
        "storage": {
            "dtype": dtype_name(opts.dtype),
            "shard_mb": opts.shard_mb,
            "samples_per_shard": capacity,
            "sample_bytes": sample_bytes,
            "precision": opts.precision,
            "image_size": image_size,
        },
        "policies": {"overflow": opts.overflow, "nonfinite": opts.nonfinite},
    }
    manifest["run"] = mf.run_id(manifest)
    return manifest


def _log_table(say, table, ignored, not_run, capacity, sample_bytes, opts) -> None:
    say(f"capture: {len(table)} tensors, {sample_bytes:,} bytes a sample in {dtype_name(opts.dtype)}, "
        f"{capacity:,} samples a shard ({opts.shard_mb:g} MB)")
    width = max(len(t.name) for t in table[:_TABLE_LINES])
    for t in table[:_TABLE_LINES]:
        pooled = f" -> {pooling.describe(t.pool_kind, t.pool_dims)} -> {t.shape}" if t.pool_kind != "none" else ""
        say(f"  {t.name:<{width}}  {t.output_shape} {t.source_dtype}{pooled}")
    if len(table) > _TABLE_LINES:
        say(f"  ... and {len(table) - _TABLE_LINES} more (all in manifest.json)")
    if ignored:
        say("not stored (not floating-point tensors): " + ", ".join(f"{k} ({v})" for k, v in ignored.items()))
    if not_run:
        say("warning: selected modules that did not run in the forward: " + ", ".join(n or ROOT_PATTERN for n in not_run))
    if sample_bytes > opts.shard_mb * MB:
        say(f"warning: one sample ({sample_bytes / MB:.1f} MB) is larger than --shard-mb {opts.shard_mb:g}: one sample a shard")


def _capture(model, dataset, out, opts: CaptureOptions, device, image_size, autocast, say, progress, on_shard,
             model_info, data_info) -> CaptureResult:
    pool_specs = pooling.parse_pool_specs(opts.pool)
    module_names = resolve_layers(model, opts.layers)  # an unknown pattern fails here, before any forward
    table, ignored, not_run = probe_layers(model, opts.layers, image_size, device, autocast, pool_specs)
    names = [t.name for t in table]
    sample_bytes = sum(t.elements for t in table) * torch.finfo(opts.dtype).bits // 8
    capacity = max(1, int(opts.shard_mb * MB) // max(1, sample_bytes))
    manifest = _new_manifest(model, dataset, opts, table, ignored, not_run, module_names, capacity, sample_bytes,
                             image_size, model_info, data_info)
    _log_table(say, table, ignored, not_run, capacity, sample_bytes, opts)

    os.makedirs(out, exist_ok=True)
    with mf.FolderLock(out):
        existing = mf.read_manifest(out)
        if existing is None:
            _check_empty_folder(out)
            entries: List[dict] = []
        else:
            changes = mf.describe_changes(existing, manifest)
            if changes:
                raise CaptureError(
                    f"--out {out} holds a capture of something else: " + "; ".join(changes)
                    + ". Give another --out, or delete the folder to start over"
                )
            # we hold the lock: any temporary left in the folder is a dead writer's
            _io.remove_stale_temporaries(out, older_than_s=0)
            mf.drop_partial_line(os.path.join(out, mf.SHARD_LOG_FILE))
            mf.drop_partial_line(os.path.join(out, mf.SKIPPED_FILE))
            entries = mf.read_shard_log(out)
            entries = mf.keep_valid_prefix(
                out, entries, lambda e: shard_problem(out, e, verify=opts.verify_existing), say)
            done = existing.get("status") == mf.STATUS_COMPLETE and existing.get("totals", {}).get("shards") == len(entries)
            if done:
                totals = existing["totals"]
                say(f"{out}: already complete ({totals['samples']:,} samples in {totals['shards']:,} shards); nothing to do")
                return CaptureResult(out, True, totals["samples"], totals["shards"], totals["bytes"], totals["skipped"],
                                     resumed_shards=len(entries), nonfinite=totals["nonfinite"],
                                     overflow=totals["overflow"])
        mf.write_manifest(out, manifest)
        return _run_batches(model, dataset, out, opts, device, autocast, say, progress, on_shard, manifest, table,
                            names, capacity, entries)


def _run_batches(model, dataset, out, opts, device, autocast, say, progress, on_shard, manifest, table, names,
                 capacity, entries) -> CaptureResult:
    total = len(dataset)
    start = entries[-1]["indices"][-1] + 1 if entries else 0
    done_samples = sum(e["samples"] for e in entries)
    resumed = len(entries)
    if entries:
        say(f"resuming: {resumed:,} shards ({done_samples:,} samples) already stored; continuing from sample {start:,}")
    tracker = SkipTracker(total, max_fraction=opts.max_skip_fraction, log_path=os.path.join(out, mf.SKIPPED_FILE),
                          resume=True)
    writer = ShardWriter(out, [(t.name, t.shape) for t in table], dtype=opts.dtype, capacity=capacity,
                         run_id=manifest["run"], next_shard=len(entries), first_sample=done_samples,
                         max_rows=max(1, total - start), fsync=opts.fsync, pin_memory=device.type == "cuda")
    packer = BatchPacker(table, opts.dtype, opts.overflow, opts.nonfinite)
    loader = DataLoader(Indexed(dataset), batch_sampler=AlignedBatches(total, opts.batch_size, start),
                        collate_fn=collate, num_workers=opts.workers, pin_memory=device.type == "cuda")
    new = {"samples": 0, "shards": 0, "bytes": 0}

    def finish(entry: Optional[dict]) -> None:
        if entry is None:
            return
        mf.append_shard_record(out, entry, fsync=opts.fsync)
        entries.append(entry)
        new["shards"] += 1
        new["bytes"] += entry["bytes"]
        if on_shard is not None:
            on_shard(entry)

    show = progress if progress is not None else sys.stderr.isatty()
    started = time.perf_counter()
    with ActivationHooks(model, opts.layers, transform=packer) as hooks, torch.no_grad(), \
            tqdm(total=max(0, total - start), unit="sample", disable=not show, file=sys.stderr) as bar:
        for batch in loader:
            tracker.record(batch.skipped)  # counted once each, logged, TooManyBadSamples past the bound
            first_row = sum(1 for index in batch.indices if index < start)  # stored by an earlier run
            if first_row == len(batch):
                continue
            pieces = plan_pieces(first_row, len(batch), writer.room, capacity)
            packer.begin(len(batch), pieces, batch.keys)
            with autocast():
                model(images_to_device(batch.images, device))
            captured = hooks.take()
            missing = [name for name in names if name not in captured]
            if missing:
                raise CaptureError(f"{', '.join(missing[:3])}: no output in the batch of samples "
                                   f"{', '.join(batch.keys[:3])}...; the model skipped these layers for this input")
            for piece, (a, b) in enumerate(pieces):
                tensors, stats = {}, {}
                for name in names:
                    packed = captured[name][piece]
                    tensors[name] = packed.unpack()[name]
                    stats[name] = packed.stats[name]
                samples = [SampleRecord(batch.indices[r], batch.keys[r], batch.sources[r], batch.files[r])
                           for r in range(a, b)]
                finish(writer.add(tensors, stats, samples))
            del captured, tensors, stats  # the batch's packed buffers: nothing outlives the batch
            new["samples"] += len(batch) - first_row
            bar.update(len(batch) - first_row)
        finish(writer.write())
    seconds = time.perf_counter() - started

    totals = _totals(entries, names)
    totals["skipped"] = tracker.count
    manifest = dict(manifest, status=mf.STATUS_COMPLETE, totals=totals)
    mf.write_manifest(out, manifest)
    if tracker.count:
        say(f"skipped {tracker.count:,} bad samples (listed in {os.path.join(out, mf.SKIPPED_FILE)})")
    bad = {k: v for k, v in totals["nonfinite"].items() if v}
    if bad:
        say("warning: non-finite values were stored (--nonfinite keep), per layer: "
            + ", ".join(f"{k} {v:,}" for k, v in bad.items()) + "; shards.jsonl has the counts per shard")
    return CaptureResult(
        out=out, complete=True, samples=totals["samples"], shards=totals["shards"], bytes=totals["bytes"],
        skipped=tracker.count, new_samples=new["samples"], new_shards=new["shards"], new_bytes=new["bytes"],
        resumed_shards=resumed, seconds=seconds, nonfinite=totals["nonfinite"], overflow=totals["overflow"],
    )
