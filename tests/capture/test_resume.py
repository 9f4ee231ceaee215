"""A capture stopped at any point (exception, Ctrl-C, SIGKILL) resumes to exactly the shards of an
uninterrupted one; damaged or missing shards are captured again; one writer per folder."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyfast.capture import ActivationDataset, CaptureError, capture
from pyfast.capture import manifest as mf

from .helpers import Faulty, folder_bytes, hooks_left, resume_setup

HERE = Path(__file__).resolve().parent
# The model's class path is part of its digest: the killed subprocess imports the helpers under the
# module name this process gave them, from the folder that name is relative to.
HELPERS = resume_setup.__module__
HELPERS_ROOT = HERE.parents[HELPERS.count(".") - 1]


def uninterrupted(root):
    model, dataset, options = resume_setup()
    capture(model, dataset, root, **options)
    return folder_bytes(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    files = uninterrupted(root)
    assert len([f for f in files if f.startswith("shards/")]) == 14
    return files


def resume(root):
    model, dataset, options = resume_setup()
    return capture(model, dataset, root, **options)


FAULTY_LAYERS = ["inner.conv1", "inner.act2", "inner"]


@pytest.fixture(scope="module")
def faulty_reference(tmp_path_factory):
    """The uninterrupted capture through the Faulty wrapper (its module names and digest differ)."""
    root = tmp_path_factory.mktemp("faulty-reference")
    model, dataset, options = resume_setup()
    capture(Faulty(model, -1, None), dataset, root, **dict(options, layers=FAULTY_LAYERS))
    return folder_bytes(root)


@pytest.mark.parametrize("failure", [RuntimeError("crash"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("at", [3, 9, 17])  # forward calls (19 in all, the probe first): early, middle, end
def test_a_crash_mid_forward_resumes_to_the_same_shards(tmp_path, faulty_reference, failure, at):
    model, dataset, options = resume_setup()
    faulty = Faulty(model, at, failure)
    options["layers"] = FAULTY_LAYERS
    with pytest.raises(type(failure)):
        capture(faulty, dataset, tmp_path, **options)
    assert hooks_left(faulty) == 0
    faulty.at = -1  # the rerun runs through
    capture(faulty, dataset, tmp_path, **options)
    assert folder_bytes(tmp_path) == faulty_reference


@pytest.mark.parametrize("shard", [0, 6, 13])
def test_a_crash_between_a_shard_file_and_its_record_resumes(tmp_path, reference, monkeypatch, shard):
    real = mf.append_shard_record

    def append(root, entry, **kwargs):
        if entry["shard"] == shard:
            raise OSError("disk full")
        real(root, entry, **kwargs)

    monkeypatch.setattr(mf, "append_shard_record", append)
    with pytest.raises(OSError, match="disk full"):
        resume(tmp_path)
    assert (tmp_path / "shards" / f"shard-{shard:06d}.safetensors").exists()  # written, not recorded
    assert len(mf.read_shard_log(tmp_path)) == shard
    monkeypatch.setattr(mf, "append_shard_record", real)
    result = resume(tmp_path)
    assert result.resumed_shards == shard and result.new_shards == 14 - shard
    assert folder_bytes(tmp_path) == reference
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["totals"]["skipped"] == 2 and manifest["totals"]["samples"] == 68


CHILD = r"""
import importlib, os, signal, sys
sys.path.insert(0, sys.argv[4])
resume_setup = importlib.import_module(sys.argv[5]).resume_setup  # the module name the parent uses
from pyfast.capture import capture

mode, at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted():
    calls[0] += 1
    return calls[0] == at

real_replace, real_write = os.replace, os.write

def replace(src, dst):
    if mode == "before-rename" and dst.endswith(".safetensors") and counted():
        die()  # the shard's temporary file is complete, not yet in place
    real_replace(src, dst)
    if mode == "before-record" and dst.endswith(".safetensors") and counted():
        die()  # the shard is in place, its line not yet in shards.jsonl

def write(fd, data):
    if mode == "mid-record" and os.readlink(f"/proc/self/fd/{fd}").endswith("shards.jsonl") and counted():
        real_write(fd, data[: len(data) // 2])
        die()  # half a line
    return real_write(fd, data)

os.replace, os.write = replace, write
model, dataset, options = resume_setup()
if mode == "mid-forward":
    model.conv2.register_forward_hook(lambda module, args, output: die() if counted() else None)
capture(model, dataset, out, **options)
print("finished without being killed")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("mode", ["before-rename", "before-record", "mid-record", "mid-forward"])
def test_a_capture_killed_with_sigkill_resumes_to_the_same_shards(tmp_path, reference, mode):
    at = random.Random(mode).randint(2, 13)  # a random-looking point, the same on every run
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), mode, str(at), str(out), str(HELPERS_ROOT), HELPERS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout, proc.stderr)
    log = (out / "shards.jsonl").read_bytes() if (out / "shards.jsonl").exists() else b""
    temporaries = [n for n in os.listdir(out / "shards") if n.endswith(".tmp")]
    if mode == "before-rename":
        assert temporaries and log.count(b"\n") == at - 1
    if mode == "before-record":
        assert (out / "shards" / f"shard-{at - 1:06d}.safetensors").exists() and log.count(b"\n") == at - 1
    if mode == "mid-record":
        assert not log.endswith(b"\n") and log.count(b"\n") == at - 1
    result = resume(out)
    assert result.complete and result.samples == 68
    assert not [n for n in os.listdir(out / "shards") if n.endswith(".tmp")]
    assert folder_bytes(out) == reference


def test_a_missing_or_resized_shard_is_captured_again(tmp_path, reference):
    uninterrupted(tmp_path)
    (tmp_path / "shards" / "shard-000009.safetensors").unlink()
    with open(tmp_path / "shards" / "shard-000004.safetensors", "ab") as handle:
        handle.write(b"junk")
    messages = []
    model, dataset, options = resume_setup()
    result = capture(model, dataset, tmp_path, **dict(options, log=messages.append))
    assert result.resumed_shards == 4 and result.new_shards == 10
    assert any("shard-000004.safetensors has" in m and "capturing shard 4 and the 9 after it again" in m
               for m in messages)
    assert folder_bytes(tmp_path) == reference


def test_verify_finds_a_damaged_shard_a_size_check_misses(tmp_path, reference):
    uninterrupted(tmp_path)
    path = tmp_path / "shards" / "shard-000011.safetensors"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))
    assert resume(tmp_path).new_shards == 0  # complete, and the size is right
    model, dataset, options = resume_setup()
    result = capture(model, dataset, tmp_path, **dict(options, verify_existing=True))
    assert result.resumed_shards == 11 and result.new_shards == 3
    assert folder_bytes(tmp_path) == reference
    assert len(ActivationDataset(tmp_path)) == 68


def test_a_resume_may_change_the_batch_size(tmp_path, reference):
    model, dataset, options = resume_setup()
    with pytest.raises(KeyboardInterrupt):
        capture(Faulty(model, 8, KeyboardInterrupt()), dataset, tmp_path, **dict(options, layers=["inner.conv1"]))
    capture(Faulty(model, -1, None), dataset, tmp_path, **dict(options, layers=["inner.conv1"], batch_size=7))
    stored = ActivationDataset(tmp_path)
    keys = [stored[i]["__key__"] for i in range(len(stored))]
    assert keys == [f"random-0-{i}" for i in range(70) if i not in (5, 33)]
    images = torch.stack([dataset[int(k.rsplit("-", 1)[1])].image for k in keys])
    with torch.no_grad():
        direct = model.conv1(images)
    torch.testing.assert_close(torch.stack([stored[i]["inner.conv1"] for i in range(68)]).float(),
                               direct.half().float(), rtol=1e-3, atol=1e-3)


def test_one_writer_per_folder(tmp_path):
    model, dataset, options = resume_setup()
    tmp_path.mkdir(exist_ok=True)
    with mf.FolderLock(tmp_path):
        with pytest.raises(CaptureError, match="another capture is writing to this folder"):
            capture(model, dataset, tmp_path, **options)
