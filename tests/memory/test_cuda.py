"""CUDA memory: sampled from the allocator's counters once CUDA is initialised; a leak of CUDA
tensors is flagged as CUDA growth and its holder named. Runs where a GPU is present."""

import gc

import pytest
import torch

from pyfast.memory import LeakRule, MemoryMonitor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KEPT_ON_GPU = []
RULE = LeakRule(cuda_mb=50.0, host_mb=1e6, warmup_steps=10, window=30, min_samples=15, min_steps=40)


def test_cuda_fields_are_sampled_once_cuda_is_initialised():
    torch.cuda.init()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    sample = MemoryMonitor(every=1, rule=RULE, investigate=False).step(1)
    assert sample["cuda_allocated_mb"] >= 64 and sample["cuda_reserved_mb"] >= sample["cuda_allocated_mb"]
    assert sample["cuda_peak_mb"] >= sample["cuda_allocated_mb"]
    del block


def test_kept_cuda_tensors_are_a_cuda_leak_with_their_holder():
    gc.collect()
    torch.cuda.empty_cache()
    monitor = MemoryMonitor(every=2, rule=RULE, investigate_steps=10, log=lambda message: None)
    try:
        for step in range(1, 141):
            x = torch.randn(512, 1024, device="cuda")  # 2 MB
            KEPT_ON_GPU.append(x * 2)
            monitor.step(step)
        verdict = monitor.close()
        assert "cuda" in verdict["leaking"]
        assert verdict["series"]["cuda"]["slope"] > 900  # 1000 MB per 1000 steps
        growers = verdict["growers"]
        assert growers["tensor_bytes_delta"]["cuda"] >= 8 * 2 * 2**20
        top = growers["held_by"][0]
        assert top["holder"].endswith("KEPT_ON_GPU") and top["len_delta"] == 10
    finally:
        KEPT_ON_GPU.clear()
        torch.cuda.empty_cache()
