"""FeatureCache: hits across reopen, fingerprint isolation, damage detection, concurrent writers,
crashes between write and rename, and the LRU size bound."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from pyfast.cache import CacheStats, FeatureCache
from pyfast._io import remove_stale_temporaries

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def features(seed=0, shape=(16, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(*shape, generator=g), "logits": torch.randn(5, generator=g)}


def assert_features(got, want):
    assert got is not None and sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t.half())


def temporaries(root):
    return [n for _d, _s, files in os.walk(root) for n in files if n.endswith(".tmp")]


def test_miss_put_hit_and_reopen(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    assert cache.get("img/0.jpg") is None
    written = cache.put("img/0.jpg", features())
    assert_features(cache.get("img/0.jpg"), features())
    reopened = FeatureCache(tmp_path, "fp")
    assert_features(reopened.get("img/0.jpg"), features())
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (1, 1, 0)
    assert cache.stats.bytes_written == written == cache.stats.bytes_read
    assert cache.stats.hit_rate == 0.5 and cache.stats.as_dict()["hit_rate"] == 0.5
    assert "img/0.jpg" in cache and "img/1.jpg" not in cache


def test_fingerprint_change_misses(tmp_path):
    FeatureCache(tmp_path, "backbone-a").put("k", features())
    other = FeatureCache(tmp_path, "backbone-b")
    assert other.get("k") is None and other.stats.misses == 1 and other.stats.corrupt == 0


def test_loads_on_requested_dtype(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    cache.put("k", features())
    out = cache.get("k", dtype=torch.float32, device="cpu")
    assert out["features"].dtype == torch.float32
    assert torch.equal(out["features"], features()["features"].half().float())


def test_bfloat16_storage(tmp_path):
    cache = FeatureCache(tmp_path, "fp", dtype=torch.bfloat16)
    big = {"x": torch.tensor([1e6, -3.0])}
    cache.put("k", big)
    assert torch.equal(cache.get("k")["x"], big["x"].bfloat16())


def test_put_refuses_bad_values_and_stores_nothing(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    with pytest.raises(ValueError, match="'features' \\(1 non-finite\\)"):
        cache.put("k", {"features": torch.tensor([1.0, float("nan")])})
    with pytest.raises(OverflowError, match="'features'"):
        cache.put("k", {"features": torch.tensor([1e6])})
    assert "k" not in cache and cache.stats.puts == 0


def test_put_of_a_ready_packed_stores_it_without_a_second_cast(tmp_path):
    from pyfast.cache import Packed, TensorStats, pack

    cache = FeatureCache(tmp_path, "fp")
    packed = pack(features())
    assert cache.put("a", packed) > 0
    assert_features(cache.get("a"), features())
    bad = Packed(packed.buffer, {"features": (0, (16, 8, 8))}, stats={"features": TensorStats(0, 3, 1e9)})
    with pytest.raises(OverflowError, match="'features'"):
        cache.put("b", bad)
    with pytest.raises(TypeError, match="bfloat16"):
        cache.put("c", pack(features(), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="without statistics"):
        cache.put("d", Packed(packed.buffer, {"features": (0, (16, 8, 8))}))
    assert cache.get("b") is None and cache.stats.puts == 1


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -2])
def test_truncated_entry_is_corrupt_removed_and_a_miss(tmp_path, keep):
    cache = FeatureCache(tmp_path, "fp")
    cache.put("k", features())
    path = cache.path("k")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: keep if keep >= 0 else len(data) + keep])
    assert cache.get("k") is None
    assert (cache.stats.corrupt, cache.stats.misses) == (1, 1)
    assert not os.path.exists(path)


def test_every_single_bit_flip_is_caught_or_harmless(tmp_path):
    """Flip each bit of a small entry in turn: get() returns the exact data or None, never wrong data."""
    cache = FeatureCache(tmp_path, "fp")
    want = {"f": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7}
    cache.put("k", want)
    path = cache.path("k")
    original = open(path, "rb").read()
    caught, harmless = 0, []
    for bit in range(len(original) * 8):
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with open(path, "wb") as f:
            f.write(damaged)
        got = cache.get("k")
        if got is None:
            caught += 1
            assert not os.path.exists(path)
        else:
            assert_features(got, want)
            harmless.append(bit // 8)
    # Only free-form metadata that get() does not use (e.g. "format":"pt", the pack statistics)
    # may change unnoticed; every bit of the length prefix and of the data is caught.
    payload_start = len(original) - 12 * 2
    assert all(8 <= i < payload_start for i in harmless)
    assert cache.stats.corrupt == caught > 0


def test_verify_false_skips_the_checksum_only(tmp_path):
    cache = FeatureCache(tmp_path, "fp", verify=False)
    cache.put("k", features())
    path = cache.path("k")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01  # in the payload: undetectable without the checksum
    open(path, "wb").write(data)
    assert cache.get("k") is not None
    assert FeatureCache(tmp_path, "fp", verify=True).get("k") is None


def _writer(root, worker, keys, rounds):
    cache = FeatureCache(root, "fp")
    for r in range(rounds):
        for key in keys:
            cache.put(key, {"x": torch.full((64, 64), float(worker * 100 + r))})


def _reader(root, keys, rounds, out):
    cache = FeatureCache(root, "fp")
    bad = 0
    for _ in range(rounds):
        for key in keys:
            got = cache.get(key)
            if got is not None and not bool((got["x"] == got["x"].flatten()[0]).all()):
                bad += 1  # a mix of two writers' data
    out.put((bad, cache.stats.corrupt, cache.stats.hits))


def test_concurrent_writers_and_readers_on_the_same_keys(tmp_path):
    ctx = mp.get_context("fork")
    keys = [f"shared/{i}" for i in range(6)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, keys, 15)) for w in range(3)]
    procs += [ctx.Process(target=_reader, args=(str(tmp_path), keys, 40, results)) for _ in range(2)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in range(2)]
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert all(bad == 0 and corrupt == 0 for bad, corrupt, _hits in reports)
    cache = FeatureCache(tmp_path, "fp")
    for key in keys:
        x = cache.get(key)["x"]
        assert bool((x == x.flatten()[0]).all()) and x.flatten()[0].item() % 100 == 14  # some writer's last round
    assert temporaries(tmp_path) == []


def test_failed_rename_leaves_no_entry(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, "fp")

    def broken_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated crash"):
        cache.put("k", features())
    monkeypatch.undo()
    assert cache.get("k") is None and temporaries(tmp_path) == []


def _die_before_rename(root):
    os.replace = lambda src, dst: os._exit(9)  # the process dies after the fsync, before the rename
    FeatureCache(root, "fp").put("k", features())


def test_killed_writer_leaves_only_a_temporary(tmp_path):
    proc = mp.get_context("fork").Process(target=_die_before_rename, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 9
    cache = FeatureCache(tmp_path, "fp")
    assert cache.get("k") is None and cache.stats.corrupt == 0
    assert len(temporaries(tmp_path)) == 1
    assert remove_stale_temporaries(str(tmp_path), older_than_s=0) == 1


def test_lru_eviction_keeps_recently_read_entries(tmp_path):
    probe = FeatureCache(tmp_path / "probe", "fp")
    entry = probe.put("k", features())
    cache = FeatureCache(tmp_path / "c", "fp", max_bytes=int(entry * 4.5))
    for i in range(4):
        cache.put(f"k{i}", features(i))
        os.utime(cache.path(f"k{i}"), ns=(i * 10**9, i * 10**9))  # distinct, ordered clocks
    assert cache.get("k0") is not None  # the oldest entry is read, so it becomes the newest
    cache.put("k4", features(4))  # 5 entries > 4.5: evict down to 90% (4.05 entries) -> drop one
    assert cache.stats.evicted == 1
    assert "k1" not in cache  # least recently used
    assert all(k in cache for k in ("k0", "k2", "k3", "k4"))
    assert cache.disk_usage() <= cache.max_bytes


def _bounded_writer(root, worker, max_bytes):
    cache = FeatureCache(root, "fp", max_bytes=max_bytes)
    for i in range(30):
        cache.put(f"w{worker}/{i}", features(i))
        cache.get(f"w{worker}/{max(0, i - 3)}")


def test_concurrent_eviction_stays_bounded(tmp_path):
    entry = FeatureCache(tmp_path / "probe", "fp").put("k", features())
    max_bytes = entry * 10
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_bounded_writer, args=(str(tmp_path / "c"), w, max_bytes)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = FeatureCache(tmp_path / "c", "fp", max_bytes=max_bytes)
    # Each process rescans after writing 10% of the bound: 3 writers overshoot by at most that each.
    assert cache.disk_usage() <= max_bytes + 3 * (max_bytes // 10 + entry)
    cache.evict()
    assert cache.disk_usage() <= max_bytes


def test_stats_add_up_across_workers():
    a = CacheStats(hits=2, misses=1, bytes_read=10)
    b = CacheStats(hits=1, misses=2, corrupt=1)
    total = a + b
    assert (total.hits, total.misses, total.corrupt, total.bytes_read) == (3, 3, 1, 10)
    assert total.hit_rate == 0.5


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="fingerprint"):
        FeatureCache(tmp_path, "")
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(tmp_path, "fp", max_bytes=0)
    with pytest.raises(TypeError, match="dtype"):
        FeatureCache(tmp_path, "fp", dtype=torch.float32)
    with pytest.raises(TypeError, match="mapping"):
        FeatureCache(tmp_path, "fp").put("k", [torch.ones(1)])


@cuda
def test_get_to_cuda(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    cache.put("k", {"x": torch.randn(10, device="cuda")})
    out = cache.get("k", device="cuda", dtype=torch.float32)
    assert out["x"].device.type == "cuda" and out["x"].dtype == torch.float32
