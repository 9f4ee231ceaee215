"""pyfast-capture end to end: module:callable and hf: models, --weights, --data sources with bad
samples, --list-layers, usage errors, Ctrl-C and rerun."""

import json
import signal
import sys

import numpy as np
import pytest
import torch

import pyfast
from pyfast.cli.capture import main
from pyfast.data import SyntheticSource, images_to_device
from pyfast.models import TinyBackbone

from processes import interrupt_when

from .helpers import folder_bytes

TINY = "pyfast.models.backbone:TinyBackbone"
SYNTHETIC = "synthetic:,num_samples=12,image_size=32"


def synthetic_images(n=12, size=32):
    from pyfast.capture import images_dataset

    dataset = images_dataset([SyntheticSource(num_samples=n, image_size=size, name="synthetic")], size)
    return images_to_device(torch.stack([dataset[i].image for i in range(n)]), "cpu")  # as the capture feeds them


def test_capture_a_module_callable_model_and_read_it_back(tmp_path, capsys):
    out = tmp_path / "cap"
    args = ["--model", TINY, "--layers", "body.0,body.2", "--layers", ".", "--data", SYNTHETIC, "--image-size", "32",
            "--batch-size", "5", "--shard-mb", "0.1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "synthetic: 12" in printed and "status              complete" in printed
    assert "samples             12 in 4 shards" in printed  # 32 KB a sample, 3 a shard and f"pyfast.ActivationDataset('{out}')" in printed
    stored = pyfast.ActivationDataset(out)
    assert list(stored.layers) == ["body.0", "body.2", "output"]
    images = synthetic_images()
    model = TinyBackbone().eval()
    with torch.no_grad():
        expected = torch.cat([model(images[i:i + 5]) for i in range(0, 12, 5)])  # the capture's batches
    assert torch.equal(torch.stack([stored[i]["output"] for i in range(12)]), expected.half())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["spec"] == TINY and manifest["data"]["specs"] == [SYNTHETIC]

    assert main(args) == 0  # the rerun of a complete capture does nothing
    assert "already complete" in capsys.readouterr().out
    assert main(args + ["--layers", "body.4"]) == 1
    assert "holds a capture of something else: layers: added body.4" in capsys.readouterr().err


def test_weights_load_through_the_robust_loader_with_their_report(tmp_path, capsys):
    trained = TinyBackbone(seed=3)
    checkpoint = tmp_path / "last.ckpt"  # as Lightning + DDP save it: under state_dict, keys prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 4}, checkpoint)
    out = tmp_path / "cap"
    assert main(["--model", TINY, "--weights", str(checkpoint), "--layers", ".", "--data", SYNTHETIC,
                 "--image-size", "32", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"weights: {checkpoint}" in printed and "loaded       6 / 6 tensors" in printed
    assert "'module.' stripped" in printed
    with torch.no_grad():
        expected = trained.eval()(synthetic_images())
    stored = pyfast.ActivationDataset(out)
    assert torch.equal(torch.stack([stored[i]["output"] for i in range(12)]), expected.half())
    report = json.loads((out / "manifest.json").read_text())["model"]["weights_report"]
    assert report["loaded"] == 6 and report["prefix"] == "module."

    torch.save({"body.0.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    assert main(["--model", TINY, "--weights", str(tmp_path / "wrong.pt"), "--layers", ".", "--data", SYNTHETIC,
                 "--out", str(tmp_path / "no")]) == 2
    assert "wrong.pt" in capsys.readouterr().err


def test_an_hf_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=56, patch_size=14)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    out = tmp_path / "cap"
    assert main(["--model", f"hf:{tmp_path / 'dinov2'}", "--list-layers", "--image-size", "56"]) == 0
    listing = capsys.readouterr().out
    assert "model.encoder.layer.0.mlp" in listing and "model.last_hidden_state (17, 32) float32" in listing
    assert main(["--model", f"hf:{tmp_path / 'dinov2'}", "--layers", "model.encoder.layer.*.mlp", "--layers", "model",
                 "--pool", "model.encoder.layer.*=mean", "--pool", "model.pooler_output=none",
                 "--data", "synthetic:,num_samples=6,image_size=56", "--image-size", "56", "--batch-size", "4",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "loaded       " in printed  # the directory's own weights, reported
    stored = pyfast.ActivationDataset(out)
    assert {n: tuple(s) for n, s in stored.layers.items()} == {
        "model.encoder.layer.0.mlp": (32,), "model.encoder.layer.1.mlp": (32,),
        "model.last_hidden_state": (17, 32), "model.pooler_output": (32,)}
    backbone = pyfast.models.load_backbone(f"hf:{tmp_path / 'dinov2'}", log=None)
    images = synthetic_images(6, 56)
    with torch.no_grad():
        expected = torch.cat([backbone.model(pixel_values=backbone.normalize(images[i:i + 4])).last_hidden_state
                              for i in (0, 4)])
    assert torch.equal(torch.stack([stored[i]["model.last_hidden_state"] for i in range(6)]), expected.half())


def test_bad_samples_of_a_data_source_are_skipped_and_reported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "npz"
    folder.mkdir()
    for i in range(5):
        np.savez(folder / f"{i}.npz", image=rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
                 boxes=np.zeros((0, 4), np.float32), masks=np.zeros((0, 20, 30), bool))
    (folder / "2.npz").write_bytes(b"not a zip file")
    out = tmp_path / "cap"
    common = ["--model", TINY, "--layers", ".", "--data", f"npz:{folder}", "--image-size", "32", "--no-progress"]
    assert main(common + ["--out", str(out), "--max-skip-fraction", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped samples     1" in printed and "skipped 1 bad samples" in printed
    record = json.loads((out / "skipped.jsonl").read_text())
    assert record["file"] == "2.npz" and record["category"] == "unreadable file"
    assert [pyfast.ActivationDataset(out).sample_info(i)["file"] for i in range(4)] == ["0.npz", "1.npz", "3.npz", "4.npz"]
    assert main(common + ["--out", str(tmp_path / "abort"), "--max-skip-fraction", "0.1"]) == 1
    assert "1 of 5 samples (20.00%) failed to load" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", TINY, "--out", "x"], "--layers is required"),
    (["--model", TINY, "--layers", "."], "--out is required"),
    (["--model", TINY, "--layers", "bdy.*", "--out", "x"], "no module matches 'bdy.*'; close names: body.5"),
    (["--model", "nowhere:thing", "--layers", ".", "--out", "x"], "cannot import backbone module 'nowhere'"),
    (["--model", "model.pt", "--layers", ".", "--out", "x"], "--model must look like module:callable or hf:PATH"),
    (["--model", TINY, "--layers", ".", "--out", "x", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", TINY, "--layers", ".", "--out", "x", "--shard-mb", "0"], "--shard-mb must be a positive number"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_a_bad_pool_spec_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", TINY, "--layers", ".", "--out", "x", "--pool", "median"])
    assert exit_.value.code == 2 and "unknown pooling 'median'" in capsys.readouterr().err


def test_ctrl_c_stops_and_the_same_command_continues(tmp_path, capsys):
    from . import helpers

    out = tmp_path / "cap"
    args = ["--layers", "inner.conv1,.", "--data", "synthetic:,num_samples=20,image_size=32", "--image-size", "32",
            "--batch-size", "4", "--shard-mb", "0.05", "--out", str(out), "--no-progress"]
    assert main(["--model", f"{helpers.__name__}:interrupted_convnet"] + args) == 130
    err = capsys.readouterr().err
    assert "interrupted; the shards written so far are kept: rerun the same command to continue" in err
    done = len((out / "shards.jsonl").read_text().splitlines())
    assert 0 < done < 8
    assert main(["--model", f"{helpers.__name__}:patient_convnet"] + args) == 0
    assert f"resuming: {done} shards" in capsys.readouterr().out
    full = tmp_path / "full"
    assert main(["--model", f"{helpers.__name__}:patient_convnet"] + args[:-3] + ["--out", str(full), "--no-progress"]) == 0
    assert folder_bytes(out) == folder_bytes(full)


def test_sigint_to_the_command_line(tmp_path):
    """A real Ctrl-C (SIGINT) to `python -m pyfast.cli.capture`, then the same command again."""
    out = tmp_path / "cap"
    cmd = [sys.executable, "-m", "pyfast.cli.capture", "--model", TINY, "--layers", "body.0", "--data",
           "synthetic:,num_samples=40,image_size=32", "--image-size", "32", "--batch-size", "2", "--shard-mb", "0.1",
           "--out", str(out), "--no-progress"]
    log = out / "shards.jsonl"
    # cwd away from the checkout, like the other subprocess tests: the installed package is imported
    returncode, _, err = interrupt_when(cmd, lambda: log.exists() and log.read_text().count("\n") >= 2,
                                        signal.SIGINT, cwd=tmp_path)
    assert returncode == 130, err
    assert "rerun the same command to continue" in err
    assert not pyfast.ActivationDataset(out, partial=True).manifest["status"] == "complete"
    assert main(cmd[3:]) == 0
    assert len(pyfast.ActivationDataset(out)) == 40
