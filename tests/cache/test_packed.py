"""Packed's file format: safetensors interop both ways, mmap round trips, atomic saves."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pyfast
from pyfast.cache import PackedFormatError


def sample():
    g = torch.Generator().manual_seed(3)
    return {
        "features": torch.randn(8, 6, 5, generator=g),
        "logits": torch.randn(7, generator=g, dtype=torch.float64),
        "odd/name": torch.randn(3, 3, generator=g).t(),
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saved_file_opens_with_safetensors(tmp_path, dtype):
    tensors = sample()
    packed = pyfast.pack(tensors, dtype=dtype)
    path = tmp_path / "a.safetensors"
    size = packed.save(path, metadata={"source": "unit"})
    assert size == os.path.getsize(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t.to(dtype))
        meta = f.metadata()
    assert meta["source"] == "unit" and meta["pyfast.packed"] == "1"
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 64 == 0  # data aligned for mapped views


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_views_and_stats(tmp_path, mmap):
    tensors = sample()
    packed = pyfast.pack(tensors)
    packed.save(tmp_path / "a.safetensors")
    loaded = pyfast.load_packed(tmp_path / "a.safetensors", mmap=mmap)
    assert loaded.names == list(tensors) and loaded.dtype == torch.float16
    assert loaded.stats == packed.stats
    out = loaded.unpack()
    base, end = loaded.buffer.data_ptr(), loaded.buffer.data_ptr() + loaded.nbytes
    for name, t in tensors.items():
        assert torch.equal(out[name], t.half())
        assert base <= out[name].data_ptr() < end or out[name].numel() == 0  # a view, not a copy
    same = loaded.unpack(device="cpu", dtype=torch.float16)  # nothing changes: still views
    assert same["features"].data_ptr() == out["features"].data_ptr()
    as_float = loaded.unpack(dtype=torch.float32)
    assert as_float["features"].dtype == torch.float32 and torch.equal(as_float["features"], tensors["features"].half().float())


def test_writes_to_mapped_views_do_not_reach_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    pyfast.pack({"x": torch.ones(4)}).save(path)
    before = path.read_bytes()
    pyfast.load_packed(path).unpack()["x"].fill_(7)
    assert path.read_bytes() == before


def test_foreign_safetensors_files(tmp_path):
    path = tmp_path / "foreign.safetensors"
    tensors = {"b": torch.randn(3, 2).half(), "a": torch.randn(5).half()}
    save_file(tensors, str(path))
    loaded = pyfast.load_packed(path)
    assert loaded.stats is None  # not recorded by that writer
    assert all(torch.equal(loaded.unpack()[k], v) for k, v in tensors.items())
    save_file({"w": torch.randn(3)}, str(tmp_path / "f32.safetensors"))
    with pytest.raises(PackedFormatError, match="load_file"):
        pyfast.load_packed(tmp_path / "f32.safetensors")
    save_file({"h": torch.randn(3).half(), "b": torch.randn(3).bfloat16()}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(PackedFormatError, match="one 16-bit dtype"):
        pyfast.load_packed(tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1])
def test_truncated_files_are_refused(tmp_path, cut):
    path = tmp_path / "a.safetensors"
    pyfast.pack(sample()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: cut if cut >= 0 else len(data) + cut])
    with pytest.raises(PackedFormatError):
        pyfast.load_packed(path, mmap=False)


def test_save_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    packed = pyfast.pack(sample())

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        packed.save(path)
    assert list(tmp_path.iterdir()) == []  # no entry, no temporary left behind


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="metadata must map str to str"):
        pyfast.pack({"x": torch.ones(1)}).save(tmp_path / "a.safetensors", metadata={"n": 3})
