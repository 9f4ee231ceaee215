"""Fingerprints follow what produced the features; keys follow the sample, not its location."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pyfast.cache import bytes_key, file_key, make_fingerprint
from pyfast.cache.keys import entry_name


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_fingerprint_tracks_module_and_params():
    a = make_fingerprint(net(), {"size": 224, "mean": (0.5, 0.5, 0.5)}, dtype=torch.float16)
    assert a == make_fingerprint(net(), {"size": 224, "mean": [0.5, 0.5, 0.5]}, dtype=torch.float16)
    assert a != make_fingerprint(net(seed=1), {"size": 224, "mean": (0.5, 0.5, 0.5)}, dtype=torch.float16)
    assert a != make_fingerprint(net(), {"size": 256, "mean": (0.5, 0.5, 0.5)}, dtype=torch.float16)
    assert a != make_fingerprint(net(), {"size": 224, "mean": (0.5, 0.5, 0.5)}, dtype=torch.bfloat16)
    changed_buffer = net()
    changed_buffer[1].running_mean += 1  # buffers shape features too
    assert a != make_fingerprint(changed_buffer, {"size": 224, "mean": (0.5, 0.5, 0.5)}, dtype=torch.float16)


def test_fingerprint_tracks_class():
    class Other(torch.nn.Sequential):
        pass

    torch.manual_seed(0)
    other = Other(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert make_fingerprint(other) != make_fingerprint(net())


def test_fingerprint_refuses_unhashable_params():
    with pytest.raises(TypeError, match=r"params\['fn'\]"):
        make_fingerprint(params={"fn": object()})
    with pytest.raises(ValueError, match="given twice"):
        make_fingerprint(params={"size": 1}, size=2)


def test_file_key_survives_moving_the_folder_and_follows_the_content(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    f = root / "sub" / "img.png"
    f.write_bytes(b"abc")
    key = file_key(f, root)
    assert key.startswith("sub/img.png|")
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)  # copy2 keeps mtimes, like a move
    assert file_key(moved / "sub" / "img.png", moved) == key
    f.write_bytes(b"abcd")
    assert file_key(f, root) != key
    content = file_key(f, root, content=True)
    os.utime(f, ns=(1, 1))  # a copy that reset mtimes does not change a content key
    assert file_key(f, root, content=True) == content
    with pytest.raises(ValueError, match="not under root"):
        file_key(f, root / "sub" / "nope")


def test_bytes_key_and_entry_names():
    assert bytes_key(b"xyz") == bytes_key(bytearray(b"xyz")) != bytes_key(b"xy")
    name = entry_name("a/b/../c.jpg|size=3")
    assert len(name) == 32 and "/" not in name
    with pytest.raises(TypeError, match="key"):
        entry_name("")
