import os

import pytest
import torch
from torch import nn

from pyfast.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    strip_prefixes,
)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies_halfway(payload, buffer):
        torch.save(payload, buffer)
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)}, serialize=dies_halfway)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind


def test_killed_write_leaves_only_a_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    real_replace = os.replace

    def killed(src, dst):  # the process dies after writing the temporary, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_checkpoint(path)["step"] == 1


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_load_strips_prefixes_and_reports():
    src, dst = _net(), _net()
    state = {"module._orig_mod." + k: v for k, v in src.state_dict().items()}
    report = load_state_dict_checked(dst, state, log=None)
    assert report.clean and report.matched_fraction == 1.0
    assert torch.equal(dst[0].weight, src[0].weight)
    assert strip_prefixes({"_orig_mod.module.a": 1}) == {"a": 1}


def test_load_reports_mismatch_and_refuses_too_little():
    dst = _net()
    state = dict(_net().state_dict())
    state["2.weight"] = torch.zeros(3, 8)  # shape mismatch
    state["extra.bias"] = torch.zeros(1)
    messages = []
    report = load_state_dict_checked(dst, state, min_fraction=0.5, log=messages.append)
    assert report.mismatched == [("2.weight", (3, 8), (2, 8))]
    assert report.unexpected == ["extra.bias"]
    assert "shape mismatch" in messages[0] and "unexpected" in messages[0]
    with pytest.raises(CheckpointError, match="matches too little"):
        load_state_dict_checked(dst, {"nothing": torch.zeros(1)}, log=None)


def test_checksum_covers_tensors_and_plain_values(tmp_path):
    path = tmp_path / "c.pt"
    payload = {"step": 7, "lr": 0.125, "w": torch.arange(6.0), "nested": {"k": [1, 2.5, "x", None]}}
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    assert "checksum" not in loaded and loaded["step"] == 7 and torch.equal(loaded["w"], payload["w"])
    raw = torch.load(path, weights_only=True)  # a plain torch.save file; the checksum is one more key
    assert raw["checksum"].startswith("xxh3_64:")
    for key, value in (("step", 8), ("lr", 0.126), ("w", torch.arange(6.0) + 1), ("nested", {"k": [1, 2.5, "y", None]})):
        torch.save({**raw, key: value}, path)  # the content changed, the stored checksum did not
        with pytest.raises(CheckpointError, match=f"{path}.*damaged"):
            load_checkpoint(path)
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path)
