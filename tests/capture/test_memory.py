"""Memory is bounded by one shard, whatever the number of samples: RSS stays flat over a long capture."""

import pytest
import torch
from torch import nn

from pyfast.capture import capture

from .helpers import RandomImages

MB = 2**20


@pytest.fixture
def one_thread():
    """This test measures memory, not speed: one intra-op thread keeps it fast on a busy machine,
    where OpenMP barriers across oversubscribed cores cost ten times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_memory_stays_flat_over_a_long_capture(tmp_path, one_thread):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    # a (32, 32, 32) map: 64 KB a sample in fp16, 1 MB a batch of 16 (2 MB in float32)
    model, dataset = nn.Sequential(nn.Conv2d(3, 32, 1)), RandomImages(3200, size=32)
    rss = []
    result = capture(model, dataset, tmp_path, layers=["0"], batch_size=16, shard_mb=2, fsync=False, log=None,
                     on_shard=lambda entry: rss.append(process.memory_info().rss))
    assert result.shards == 100 and result.bytes > 200 * MB  # 200 batches
    warm = rss[10]  # after the first shards: the buffers, the allocator's pools, torch's caches
    growth = max(rss[10:]) - warm
    # A batch's activations kept by mistake (the classic: a list the hooks append to) would add at
    # least 1 MB a batch, about 180 MB over the 180 batches measured here.
    assert growth < 24 * MB, f"RSS grew by {growth / MB:.1f} MB while {result.bytes / MB:.0f} MB were written"
