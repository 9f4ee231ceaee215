"""The training job on a CUDA device: pinned batches, the feature path's host syncs, a whole run.
These run only where a GPU is present."""

import warnings

import pytest
import torch

from pyfast.train import build_config, prepare, train
from pyfast.train.state import StepTimes
from pyfast.train.step import train_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(tmp_path, tiny_config, **more):
    config = build_config(tiny_config, {"out": str(tmp_path / "run"), "device": "cuda", **more})
    return prepare(config, log=lambda *a: None)


def _syncs(fn):
    """How many synchronizing CUDA operations `fn` makes (torch's sync debug mode)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing" in str(w.message) for w in caught)


@cuda
def test_a_run_on_cuda_trains_from_the_cache(tmp_path, tiny_config):
    run = _run(tmp_path, tiny_config)
    assert run.data.pin_memory and run.precision in ("bf16", "fp16")
    summary = train(run, progress_bar=False)
    assert summary["device"].startswith("cuda") and summary["cache_hit_rate"] == 1.0
    assert summary["backend"] in ("native cuda", "reference (no native cuda kernels in this build)")
    assert summary["nonfinite_steps"] == 0 and summary["val_iou_refined"] > 0


@cuda
def test_batches_are_pinned_and_a_warm_step_syncs_once(tmp_path, tiny_config):
    run = _run(tmp_path, tiny_config, epochs=1, workers=0)
    train(run, progress_bar=False)  # epoch 1 fills the cache
    batch = next(iter(run.data.loader(run.data.epoch_batches(1)[:1])))
    assert batch.images is None and batch.cache_hits == len(batch)
    for t in (batch.boxes, batch.prompt_boxes, batch.masks, batch.box_sample, *batch.cached.values()):
        assert t.is_pinned()
    torch.cuda.synchronize()
    assert _syncs(lambda: train_step(run, [batch], 1, StepTimes())) == 1


@cuda
def test_a_cold_batch_with_a_cache_reads_back_once(tmp_path, tiny_config):
    run = _run(tmp_path, tiny_config, epochs=1, workers=0)
    batch = next(iter(run.data.loader(run.data.epoch_batches(0)[:1])))
    assert batch.cache_misses == len(batch)
    torch.cuda.synchronize()
    # the provider's one read of the packed features, then the step's one read
    assert _syncs(lambda: train_step(run, [batch], 0, StepTimes())) <= 2
    assert run.features.cache.stats.puts == len(batch)
