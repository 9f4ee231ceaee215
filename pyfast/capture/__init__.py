"""Activation capture: run a data set through a trained model and store chosen layers' outputs.

    from pyfast.capture import capture, images_dataset
    result = capture(model, images_dataset(sources, 224), "runs/capture",
                     layers=["encoder.layer.*.mlp"], pool=["mean"])
    dataset = pyfast.ActivationDataset("runs/capture")       # reading it back

`pyfast-capture` (pyfast.cli.capture) is the command line over `capture`. Pieces: `layers`
(patterns -> modules), `hooks` (ActivationHooks, the context manager), `outputs` (flattening any
output to named tensors), `pooling`, `table` (the probe forward's layer table, the per-batch
packer), `shards` (writing and verified reading), `manifest` (bookkeeping and resume identity),
`data` (images from --data sources, batching), `runner` (the loop), `dataset` (ActivationDataset).

The output folder
-----------------

    OUT/
      manifest.json            what was captured and from what; status running | complete
      shards.jsonl             one line per completed shard (appended after its file is in place)
      shards/shard-000000.safetensors, shard-000001.safetensors, ...
      skipped.jsonl            bad samples, one JSON object a line (source, file, reason), as pyfast-train writes them
      .lock                    held while a capture writes the folder

A shard is a safetensors file with one tensor per captured layer, shaped (samples, *per-sample
shape), all in the capture's dtype (F16 or BF16), `safetensors.safe_open` and `pyfast.load_packed`
both read it. Every shard holds `samples_per_shard` samples except the last; the samples are the
data set's good samples in order. Shard metadata: `pyfast.capture` (format version), `pyfast.run`
(the capture's id), `pyfast.shard` (its number), `pyfast.first` (its first sample's number in the
capture), `pyfast.stats` (JSON, layer -> [non-finite count, overflow count, max |x| of the finite
values]) and `checksum` (`xxh3_64:<hex>` over the data bytes and the tensor table, as the feature
cache computes it).

manifest.json (JSON object, format "pyfast.capture", version 1):

    status          "running" while a capture writes, "complete" after its last shard
    run             the capture's id: a hash of the four identity sections below
    model           class, digest (sha256 over class, parameter and buffer names and bytes); spec,
                    weights and weights_report when captured from the command line
    layers          patterns, pool (as given), modules (matched, "." the model itself),
                    tensors: [{name, module, output_shape, output_dtype, pool ("none", "mean:2,3"),
                    shape (per sample, stored)}] in storage order, ignored (name -> what: outputs that
                    are not floating-point tensors), not_run (matched modules that did not run)
    data            sources: [{label, kind, samples, items (digest of the sample list)}], samples
                    (the data set's size, bad samples included), preprocess (the letterbox), specs
    storage         dtype, shard_mb, samples_per_shard, sample_bytes, precision (autocast: fp32,
                    bf16, fp16), image_size
    policies        overflow ("error" | "saturate"), nonfinite ("keep" | "error")
    totals          when complete: samples, shards, bytes, skipped, and per layer nonfinite,
                    overflow (values clipped) and absmax

shards.jsonl, one object a line: shard, file (relative to OUT), bytes, checksum, first, samples,
indices (each sample's index in the data set), keys (content-based sample keys), sources, files,
stats (layer -> {nonfinite, overflow, absmax}).

Resuming: a rerun with the same model, layers, data and storage settings keeps every shard
recorded in shards.jsonl whose file has the recorded size (`verify_existing` / `--verify` also
checks checksums), and captures the rest, restarting in the batch that holds the first sample not
yet stored; the shards come out byte-identical to an uninterrupted run's. A rerun whose identity
differs is refused, naming what changed. Killing a capture at any point leaves a folder a rerun
continues: shards are written atomically, a shard counts only once its line is in shards.jsonl, a
line cut short is dropped, and temporary files of a dead writer are removed.
"""

from pyfast.capture.dataset import ActivationDataset
from pyfast.capture.data import CaptureImages, images_dataset
from pyfast.capture.errors import CaptureError, ShardCorruptError
from pyfast.capture.hooks import ActivationHooks
from pyfast.capture.layers import resolve_layers
from pyfast.capture.pooling import PoolSpec, parse_pool_spec
from pyfast.capture.runner import CaptureOptions, CaptureResult, capture

__all__ = [
    "ActivationDataset",
    "ActivationHooks",
    "CaptureError",
    "CaptureImages",
    "CaptureOptions",
    "CaptureResult",
    "PoolSpec",
    "ShardCorruptError",
    "capture",
    "images_dataset",
    "parse_pool_spec",
    "resolve_layers",
]
