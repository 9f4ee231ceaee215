"""Building a run: everything is checked before the run directory is written; the checkpoint is
assembled from the stateful objects; a run says what ran."""

import sys

import torch

import pyfast.train.metrics
from pyfast.cli.train import main
from pyfast.train import build_config, prepare, train
from pyfast.train.metrics import MetricsLog
from pyfast.train.setup import Run


def test_a_failed_start_leaves_no_run_directory(tmp_path, monkeypatch, tiny_args, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(tiny_args + ["--backbone", "no_such_module_q:f"]) == 2
    assert main(tiny_args + ["--val-fraction", "0.99"]) == 2  # no sample left for training
    assert main(tiny_args + ["--feature-maps", "nope"]) == 2
    assert not (tmp_path / "runs").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("pyfast-train: error:") for line in err)


def test_a_failed_resume_leaves_config_yaml_as_it_was(tmp_path, tiny_args, tiny_yaml, capsys):
    run = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(run), "--max-steps", "3"]) == 0
    before = (run / "config.yaml").read_bytes()
    metrics = (run / "metrics.jsonl").read_bytes()
    assert main(["--resume", str(run), "--hidden", "16", "--no-progress"]) == 2  # refused: not an exact continuation
    assert "--hidden" in capsys.readouterr().err
    assert main(["--resume", str(run), "--device", "cuda:99", "--no-progress"]) == 2  # allowed, but not here
    assert "cuda:99" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == before and (run / "metrics.jsonl").read_bytes() == metrics


def test_checkpoint_is_every_stateful_object_and_restores_them(tmp_path, tiny_config):
    run = prepare(build_config(tiny_config, {"out": str(tmp_path / "a"), "max_steps": 3}), log=lambda *a: None)
    train(run, progress_bar=False)
    payload = run.checkpoint()
    assert set(run.stateful()) <= set(payload)
    assert payload["progress"] == {"step": 3, "epoch": 0, "micro": 3}
    assert payload["stats"]["cold"]["micro_batches"] == 3 and len(payload["stats"]["segments"]) == 1
    other = prepare(build_config(tiny_config, {"out": str(tmp_path / "b")}), log=lambda *a: None)
    other.restore(payload)
    for name, obj in other.stateful().items():
        a, b = obj.state_dict(), run.stateful()[name].state_dict()
        if name == "model":
            assert all(torch.equal(a[k], b[k]) for k in a)
        elif name in ("progress", "stats", "guard"):
            assert a == b, name
    assert isinstance(other, Run) and other.progress.step == 3


def test_tensorboard_missing_is_said_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setattr(pyfast.train.metrics, "_told", set())
    said = []
    for name in ("a", "b"):
        MetricsLog(tmp_path / f"{name}.jsonl", tensorboard_dir=tmp_path / "tb", log=said.append).close()
    assert len(said) == 1 and "TensorBoard is not installed" in said[0]
