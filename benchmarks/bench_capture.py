"""pyfast-capture vs the usual capture script: samples/s, MB/s written, bytes on disk, peak memory.

The setting: a ViT-Ti/16 encoder (transformers `ViTModel`, hidden 192, 12 blocks, random weights)
at 112 x 112 (50 tokens), the output of each of the 12 blocks captured, 128 in-memory images in
batches of 32: 461 KB of float32 activations a sample, 59 MB in all (29.5 MB in fp16).

Phase "end_to_end", impls (all run the same forward on the same batches):
    "fused"       pyfast.capture.capture: hooks -> pack to fp16 -> 8 MB shards (fsync off, as torch.save)
    "eager"       the usual script: hooks append float32 clones to lists, torch.cat + torch.save at the end
    "torch_save"  the usual script made bounded: torch.save of each batch's float32 activations
    "forward"     the forward alone (no hooks): what the model costs, the floor of any capture

Phase "store": the same activations, computed once, stored without the forward (what the capture
adds to it, free of the forward's noise): "fused" = pyfast.pack per layer and batch into the shard
writer (fp16 shards), "eager" = torch.save of all of them in float32 at once, "torch_save" = one
torch.save of float32 per batch. GB/s counts the float32 bytes read plus the bytes written.

Extra columns: samples/s and MB/s written (from the timed median), MB on disk, and the peak RSS
above the level after setup, sampled every 2 ms during one run in a fresh process (a warm process
reuses the memory its allocator kept from earlier rounds, which would hide what a run needs); for
fused and eager also with four times the samples, to show which one grows with the data.

    PYFAST_BENCH_THREADS=1 pytest benchmarks/bench_capture.py --benchmark-only

PYFAST_BENCH_THREADS sets torch's intra-op threads for these runs (default: torch's own). On a
shared machine whose cores are busy, OpenMP's barriers make 2 threads several times slower than
one and the timings swing by 2x; one thread gives stable ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import measure

transformers = pytest.importorskip("transformers")

from pyfast.capture import capture  # noqa: E402
from pyfast.capture.data import CaptureItem  # noqa: E402
from pyfast.capture.shards import SampleRecord, ShardWriter  # noqa: E402
from pyfast.cache import pack  # noqa: E402
from pyfast.models.hf import wrap_encoder  # noqa: E402

MB = 1 << 20
SAMPLES, BATCH, SIZE, SHARD_MB = 128, 32, 112, 8
LAYERS = "model.layers.?,model.layers.1?"  # the 12 blocks
CASE = f"vit-ti-{SIZE}px-12x{SAMPLES}"


class Images(Dataset):
    """Random images held in memory: the data pipeline costs nothing here."""

    def __init__(self, n: int, size: int):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

        class Preprocess:
            def __init__(self, size):
                self.size = size

            def fingerprint(self):
                return {"in-memory": self.size}

        self.preprocess = Preprocess(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return CaptureItem(self.images[index], key=f"image-{index}")


def vit_tiny() -> torch.nn.Module:
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                    intermediate_size=768, image_size=SIZE, patch_size=16)
    torch.manual_seed(0)
    return wrap_encoder(transformers.ViTModel(config, add_pooling_layer=False).eval())


class PeakRSS:
    """Peak resident memory above the level at start, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MB


def _blocks(model):
    return [m for name, m in model.named_modules() if name.startswith("model.layers.") and name.count(".") == 2]


def _batches(dataset):
    return DataLoader(dataset, batch_size=BATCH, collate_fn=lambda items: torch.stack([i.image for i in items]))


def _folder_bytes(path) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def fresh_dirs(root: str):
    """fresh() -> a new empty folder under `root` for each call, the previous call's removed."""
    counter = [0]

    def fresh() -> str:
        if counter[0]:
            shutil.rmtree(os.path.join(root, str(counter[0] - 1)), ignore_errors=True)
        path = os.path.join(root, str(counter[0]))
        counter[0] += 1
        os.makedirs(path)
        return path

    return fresh


def make_runner(impl: str, model, dataset, root):
    """fn() -> bytes written; each call writes a fresh output."""
    fresh = fresh_dirs(root)

    def fused():
        out = fresh()
        result = capture(model, dataset, out, layers=[LAYERS], batch_size=BATCH, shard_mb=SHARD_MB, fsync=False,
                         log=None, progress=False)
        return result.bytes

    def hooked(keep):
        handles = [block.register_forward_hook(lambda m, a, o, i=i: keep(i, o[0] if isinstance(o, tuple) else o))
                   for i, block in enumerate(_blocks(model))]
        return handles

    def eager():
        out = fresh()
        acts = {}
        handles = hooked(lambda i, o: acts.setdefault(f"layer{i}", []).append(o.detach().clone()))
        try:
            with torch.no_grad():
                for images in _batches(dataset):
                    model(images)
        finally:
            for h in handles:
                h.remove()
        path = os.path.join(out, "activations.pt")
        torch.save({name: torch.cat(parts) for name, parts in acts.items()}, path)
        return _folder_bytes(path)

    def torch_save():
        out = fresh()
        batch = {}
        handles = hooked(lambda i, o: batch.__setitem__(f"layer{i}", o.detach().clone()))
        try:
            with torch.no_grad():
                for k, images in enumerate(_batches(dataset)):
                    model(images)
                    torch.save(batch, os.path.join(out, f"batch{k:05d}.pt"))
                    batch.clear()
        finally:
            for h in handles:
                h.remove()
        return _folder_bytes(out)

    def forward():
        with torch.no_grad():
            for images in _batches(dataset):
                model(images)
        return 0

    return {"fused": fused, "eager": eager, "torch_save": torch_save, "forward": forward}[impl]


def _threads():
    value = os.environ.get("PYFAST_BENCH_THREADS")
    if value:
        torch.set_num_threads(int(value))


def peak_memory_run(impl: str, root: str, samples: int) -> dict:
    """One run in this (fresh) process: peak RSS above the level after setup, time, bytes."""
    _threads()
    model, dataset = vit_tiny(), Images(samples, SIZE)
    fn = make_runner(impl, model, dataset, root)
    with PeakRSS() as rss:
        started = time.perf_counter()
        written = fn()
        seconds = time.perf_counter() - started
    return {"peak_mb": rss.growth_mb, "seconds": seconds, "bytes": written}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    _threads()
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def fresh_peak_mb(impl: str, tmp_path, samples: int) -> float:
    child = subprocess.run([sys.executable, __file__, impl, str(tmp_path / "fresh"), str(samples)],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("impl", ["fused", "eager", "torch_save", "forward"])
def test_capture(benchmark, tmp_path, threads, impl):
    model, dataset = vit_tiny(), Images(SAMPLES, SIZE)
    fn = make_runner(impl, model, dataset, str(tmp_path))
    timed = measure(benchmark, op="capture", case=CASE, phase="end_to_end", impl=impl, fn=fn,
                    device=torch.device("cpu"), rounds=5)
    written = fn()
    extra = {
        "threads": threads,
        "samples/s": round(SAMPLES / timed.seconds, 1),
        "MB/s written": round(written / MB / timed.seconds, 1),
        "MB on disk": round(written / MB, 1),
        "peak RSS +MB": round(fresh_peak_mb(impl, tmp_path, SAMPLES), 1),
    }
    if impl in ("fused", "eager"):  # does the memory grow with the data? four times the samples
        extra["peak RSS +MB, 4x samples"] = round(fresh_peak_mb(impl, tmp_path, 4 * SAMPLES), 1)
    timed.extra.update(extra)
    benchmark.extra_info.update(extra)


def activations_of(model, dataset) -> dict:
    """name -> (SAMPLES, 50, 192) float32: the 12 blocks' outputs, computed once."""
    acts = {}
    handles = [block.register_forward_hook(
        lambda m, a, o, i=i: acts.setdefault(f"layer{i}", []).append((o[0] if isinstance(o, tuple) else o).clone()))
        for i, block in enumerate(_blocks(model))]
    try:
        with torch.no_grad():
            for images in _batches(dataset):
                model(images)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in acts.items()}


def make_storer(impl: str, acts: dict, root: str):
    names = list(acts)
    fresh = fresh_dirs(root)

    def fused():
        out = fresh()
        per_sample = sum(t[0].numel() for t in acts.values()) * 2
        writer = ShardWriter(out, [(n, tuple(acts[n].shape[1:])) for n in names], dtype=torch.float16,
                             capacity=SHARD_MB * MB // per_sample, run_id="bench", next_shard=0, first_sample=0,
                             max_rows=SAMPLES, fsync=False)
        written = 0
        for start in range(0, SAMPLES, BATCH):
            stop = min(SAMPLES, start + BATCH)
            room = writer.room
            for a, b in ((start, min(stop, start + room)), (min(stop, start + room), stop)):
                if a == b:
                    continue
                packed = {n: pack({n: acts[n][a:b]}) for n in names}
                entry = writer.add({n: packed[n].unpack()[n] for n in names}, {n: packed[n].stats[n] for n in names},
                                   [SampleRecord(i, f"image-{i}") for i in range(a, b)])
                written += entry["bytes"] if entry else 0
        entry = writer.write()
        return written + (entry["bytes"] if entry else 0)

    def eager():
        path = os.path.join(fresh(), "activations.pt")
        torch.save(acts, path)
        return os.path.getsize(path)

    def torch_save():
        out = fresh()
        for start in range(0, SAMPLES, BATCH):
            torch.save({n: t[start:start + BATCH].clone() for n, t in acts.items()}, os.path.join(out, f"{start}.pt"))
        return _folder_bytes(out)

    return {"fused": fused, "eager": eager, "torch_save": torch_save}[impl]


@pytest.mark.parametrize("impl", ["fused", "eager", "torch_save"])
def test_store(benchmark, tmp_path, threads, impl):
    acts = activations_of(vit_tiny(), Images(SAMPLES, SIZE))
    fp32_bytes = sum(t.numel() * 4 for t in acts.values())
    fn = make_storer(impl, acts, str(tmp_path))
    written = fn()
    timed = measure(benchmark, op="capture", case=CASE, phase="store", impl=impl, fn=fn, device=torch.device("cpu"),
                    bytes_moved=fp32_bytes + written, rounds=7)
    extra = {"MB/s written": round(written / MB / timed.seconds, 1), "MB on disk": round(written / MB, 1),
             "fp32 MB/s stored": round(fp32_bytes / MB / timed.seconds, 1)}
    timed.extra.update(extra)
    benchmark.extra_info.update(extra)


if __name__ == "__main__":  # the fresh process of one memory measurement: IMPL FOLDER SAMPLES
    os.makedirs(sys.argv[2], exist_ok=True)
    print(json.dumps(peak_memory_run(sys.argv[1], tempfile.mkdtemp(dir=sys.argv[2]), int(sys.argv[3]))))
