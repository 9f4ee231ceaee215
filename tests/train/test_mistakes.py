"""Every mistake a user can make with pyfast-train gets one line (`pyfast-train: error: ...`) and
the right exit code, never a traceback; nothing is silently wrong."""

import json
import os
import re
import signal
import sys

import pytest

from pyfast.cli.train import main
from pyfast.train.metrics import read_jsonl

from processes import interrupt_when


def one_line_error(capsys, code_expected, code):
    err = capsys.readouterr().err.strip()
    assert code == code_expected, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyfast-train: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------- bad inputs


def test_npz_spec_that_is_a_file(tmp_path, tiny_args, capsys):
    file = tmp_path / "frames.npz"
    file.write_bytes(b"not a folder")
    line = one_line_error(capsys, 2, main(tiny_args + ["--data", f"npz:{file}", "--out", str(tmp_path / "run")]))
    assert str(file) in line
    assert not (tmp_path / "run").exists()


def test_any_error_of_the_data_layer_is_one_line(tmp_path, tiny_args, capsys, monkeypatch):
    import pyfast.train.setup

    def broken(*args, **kwargs):
        raise RuntimeError("index file\nis damaged")

    monkeypatch.setattr(pyfast.train.setup, "build_sources", broken)
    line = one_line_error(capsys, 2, main(tiny_args + ["--out", str(tmp_path / "run")]))
    assert "RuntimeError: index file is damaged" in line


def test_config_that_is_a_folder_or_not_utf8(tmp_path, capsys):
    line = one_line_error(capsys, 2, main(["--config", str(tmp_path), "--out", str(tmp_path / "a")]))
    assert str(tmp_path) in line and "folder" in line
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("epochs: 2\n# réglages\n".encode("latin-1"))
    line = one_line_error(capsys, 2, main(["--config", str(bad), "--out", str(tmp_path / "b")]))
    assert "latin1.yaml" in line and "UTF-8" in line


def test_device_forms(tmp_path, capsys):
    line = one_line_error(capsys, 2, main(["--device", "tpu", "--out", str(tmp_path / "a")]))
    assert "auto, cpu, cuda or cuda:N" in line and "xla" not in line


def test_help_shows_defaults_and_what_fast_sets(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--epochs", "12"), ("--batch-size", "16"), ("--lr", "0.01"), ("--image-size", "the backbone's input size, else 128"),
                          ("--precision", "auto"), ("--device", "auto")):
        assert flag in text and f"(default: {default})" in text, flag
    assert "--image-size 96" in text and "--synthetic-samples 640" in text and "--epochs 10" in text


def test_infinite_lr_is_refused(tmp_path, capsys):
    line = one_line_error(capsys, 2, main(["--lr", "inf", "--out", str(tmp_path / "a")]))
    assert "--lr must be a finite number" in line


# ---------------------------------------------------------------------------- unwritable places


def test_out_or_cache_dir_under_a_file(tmp_path, tiny_args, capsys):
    """A path under a regular file cannot be created, even by root."""
    file = tmp_path / "file"
    file.write_text("x")
    line = one_line_error(capsys, 2, main(tiny_args + ["--out", str(file / "run")]))
    assert "--out" in line and str(file) in line
    line = one_line_error(capsys, 2, main(tiny_args + ["--out", str(tmp_path / "run"), "--cache-dir", str(file / "c")]))
    assert "--cache-dir" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_folders(tmp_path, tiny_args, tiny_yaml, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = one_line_error(capsys, 2, main(tiny_args + ["--out", str(locked / "run")]))
        assert "not writable" in line
    finally:
        locked.chmod(0o755)
    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    for path in [run, *run.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        line = one_line_error(capsys, 2, main(["--resume", str(run), "--no-progress"]))
        assert "not writable" in line
    finally:
        for path in [run, *run.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_resumed_run_on_a_read_only_file_system(tmp_path, tiny_args, tiny_yaml, capsys, monkeypatch):
    """EROFS makes os.access(W_OK) false even for root; emulate it for the run directory."""
    import pyfast.train.rundir

    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    real = os.access
    monkeypatch.setattr(pyfast.train.rundir.os, "access",
                        lambda path, mode: False if str(path).startswith(str(run)) else real(path, mode))
    line = one_line_error(capsys, 2, main(["--resume", str(run), "--no-progress"]))
    assert "--resume" in line and "not writable" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------------------------ divergence


def test_divergence_on_a_small_set_is_reported_not_a_crash(tmp_path, capsys):
    """lr 1e38: the first step is finite but throws the weights to inf; every step after is non-finite.
    Epochs of 2 steps: validation must report the non-finite boxes, and the guard (3 in a row) must
    still stop the run in the second epoch."""
    run = tmp_path / "run"
    code = main(["--data", "synthetic:,num_samples=20,image_size=32", "--image-size", "32", "--roi-size", "4",
                 "--hidden", "8", "--lr", "1e38", "--epochs", "6", "--max-nonfinite-in-a-row", "3",
                 "--out", str(run), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pyfast-train: error: 3 optimizer steps in a row")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 3 and summary["steps"] == 4 and summary["status"] == "failed: TrainingDiverged"
    (first,) = read_jsonl(run / "val.jsonl")
    assert first["val_nonfinite_boxes"] == first["val_boxes"] > 0
    assert "non-finite" in out and "diverged" in out


def test_a_run_that_ends_diverged_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["--data", "synthetic:,num_samples=20,image_size=32", "--image-size", "32", "--roi-size", "4",
                 "--hidden", "8", "--lr", "1e38", "--epochs", "1", "--out", str(run), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pyfast-train: error: the model diverged")
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert "non-finite boxes" in out


# ----------------------------------------------------------------------------- interruptions


def test_ctrl_c_while_the_run_is_being_built(tmp_path):
    (tmp_path / "slow_backbone.py").write_text(
        "import pathlib, time\n"
        "from pyfast.models import TinyBackbone\n"
        "def make():\n"
        "    pathlib.Path('building').write_text('yes')\n"
        "    time.sleep(60)\n"
        "    return TinyBackbone()\n"
    )
    cmd = [sys.executable, "-m", "pyfast.cli.train", "--backbone", "slow_backbone:make", "--out", str(tmp_path / "run"),
           "--data", "synthetic:,num_samples=20,image_size=32", "--image-size", "32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    returncode, _, err = interrupt_when(cmd, (tmp_path / "building").exists, signal.SIGINT, cwd=tmp_path, env=env)
    assert returncode == 130, err
    assert err.strip().splitlines() == ["pyfast-train: error: interrupted before training started; nothing was written"]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- run directories


def test_an_out_that_holds_a_run_is_refused(tmp_path, tiny_args, tiny_yaml, capsys):
    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    metrics = (run / "metrics.jsonl").read_bytes()
    line = one_line_error(capsys, 2, main(tiny_args + ["--config", tiny_yaml, "--out", str(run)]))
    assert f"--resume {run}" in line and "another --out" in line
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_resume_refuses_what_breaks_exactness_and_allows_the_rest(tmp_path, tiny_args, tiny_yaml, capsys):
    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    config = (run / "config.yaml").read_bytes()
    for flags, named in ((["--batch-size", "4"], "--batch-size 8 -> 4"), (["--image-size", "64"], "--image-size"),
                         (["--accumulate", "2"], "--accumulate"), (["--lr", "0.5"], "--lr"),
                         (["--data", "synthetic:,num_samples=41,image_size=32"], "--data")):
        line = one_line_error(capsys, 2, main(["--resume", str(run), "--no-progress", *flags]))
        assert named in line and "--max-steps" in line, line  # names the setting, says what may change
        assert (run / "config.yaml").read_bytes() == config
    assert main(["--resume", str(run), "--max-steps", "4", "--workers", "0", "--checkpoint-every", "1",
                 "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--epochs 2 -> 3" in out and "schedule" in out
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_refuses_a_data_set_that_changed_on_disk(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "frames"
    data.mkdir()
    rng = np.random.default_rng(0)

    def write(i):
        masks = np.zeros((1, 32, 32), bool)
        masks[0, 4:20, 6:24] = True
        np.savez(data / f"{i}.npz", image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                 boxes=np.array([[6, 4, 24, 20]], np.float32), masks=masks)

    for i in range(12):
        write(i)
    run = tmp_path / "run"
    args = ["--data", f"npz:{data}", "--image-size", "32", "--batch-size", "4", "--roi-size", "4", "--hidden", "8",
            "--no-progress"]
    assert main(args + ["--out", str(run), "--max-steps", "1"]) == 0
    write(12)
    capsys.readouterr()
    line = one_line_error(capsys, 2, main(["--resume", str(run), "--no-progress"]))
    assert "data set changed" in line


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, tiny_args, tiny_yaml, capsys):
    import torch

    from pyfast.train import CheckpointError, load_checkpoint

    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "3"]) == 0
    capsys.readouterr()
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)["optimizer"]["state"]
    target = max((t for s in state.values() for t in s.values() if t.dim()), key=lambda t: t.numel())
    data = bytearray(last.read_bytes())
    start = data.find(target.numpy().tobytes())
    assert start > 0 and target.numel() * 4 >= 400
    for i in range(start, start + 400):
        data[i] ^= 0x5A
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(last)
    line = one_line_error(capsys, 2, main(["--resume", str(run), "--no-progress"]))
    assert str(last) in line and "damaged" in line


# ------------------------------------------------------------------------------ what a run reports


def test_corrupt_cache_entries_are_counted_not_hits(tmp_path, tiny_config, capsys):
    from pyfast.train import build_config, format_table, prepare, train

    run = prepare(build_config(tiny_config, {"out": str(tmp_path / "run")}), log=lambda *a: None)
    damaged = []

    def damage_in_epoch_2(step, loss):
        if step == run.steps_per_epoch + 1 and not damaged:  # epoch 1 filled the cache; damage what epoch 2 reads next
            for index in run.data.val_indices:
                path = run.features.cache.path(run.data.dataset.sources[0].key(index))
                data = bytearray(open(path, "rb").read())
                data[-3] ^= 0xFF
                open(path, "wb").write(bytes(data))
                damaged.append(path)
        return loss

    summary = train(run, loss_hook=damage_in_epoch_2, progress_bar=False)
    assert damaged and summary["cache_corrupt"] == len(damaged)
    lookups = summary["cache_lookups_warm"]
    assert summary["cache_hit_rate"] == pytest.approx((lookups - len(damaged)) / lookups)
    assert re.search(rf"cache entries found corrupt +{len(damaged)}\n", format_table(summary))


def test_wall_time_covers_every_segment_of_a_resumed_run(tmp_path, tiny_args, tiny_yaml, capsys):
    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "3"]) == 0
    first = json.loads((run / "summary.json").read_text())["wall_s"]
    assert main(["--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["wall_segments_s"]) == 2 and summary["wall_segments_s"][0] == pytest.approx(first)
    assert summary["wall_s"] == pytest.approx(sum(summary["wall_segments_s"]))
    assert "whole run: 2 segments" in capsys.readouterr().out


def test_a_non_finite_step_names_its_samples(tmp_path, tiny_config):
    from pyfast.train import build_config, prepare, train

    said = []
    run = prepare(build_config(tiny_config, {"out": str(tmp_path / "run"), "max_steps": 3}), log=said.append)
    train(run, loss_hook=lambda step, loss: loss * float("nan") if step == 2 else loss, progress_bar=False)
    (line,) = [s for s in said if "step 2" in s]
    assert "non-finite" in line and "synthetic: synthetic[" in line
