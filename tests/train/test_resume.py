import json
import signal
import sys

from pyfast.cli.train import main
from pyfast.train.metrics import read_jsonl

from processes import interrupt_when


def _losses(run):
    return [(r["step"], r["loss"], r["parts"], r["lr"], r["iou_refined"]) for r in read_jsonl(run / "metrics.jsonl")]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_args, tiny_yaml):
    full, split = tmp_path / "full", tmp_path / "split"
    args = tiny_args + ["--config", tiny_yaml, "--epochs", "3"]
    assert main(args + ["--out", str(full), "--max-steps", "12"]) == 0
    # stop mid-epoch (5 steps an epoch), then continue to the same total
    assert main(args + ["--out", str(split), "--max-steps", "7"]) == 0
    assert json.loads((split / "summary.json").read_text())["steps"] == 7
    assert main(["--out", str(split), "--resume", "--max-steps", "12", "--no-progress"]) == 0
    assert len(_losses(full)) == 12
    assert _losses(split) == _losses(full)
    assert json.loads((split / "summary.json").read_text())["steps"] == 12


def test_sigterm_leaves_a_resumable_run(tmp_path, tiny_args, tiny_yaml):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyfast.cli.train"] + tiny_args + ["--config", tiny_yaml, "--epochs", "400", "--out", str(run)]
    # cwd away from the checkout: `-m` puts the cwd first on sys.path, and the source tree's pyfast/
    # has no built kernels.
    returncode, _, err = interrupt_when(cmd, lambda: len(read_jsonl(run / "metrics.jsonl")) >= 3, signal.SIGTERM,
                                        cwd=tmp_path)
    assert returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted (SIGTERM)"
    steps = summary["steps"]
    assert steps >= 3 and len(read_jsonl(run / "metrics.jsonl")) == steps
    assert (run / "plots" / "loss.png").exists()
    assert main(["--out", str(run), "--resume", "--max-steps", str(steps + 2), "--no-progress"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, steps + 3))
