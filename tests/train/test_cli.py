import json

import yaml

from pyfast import native_available
from pyfast.cli.train import main
from pyfast.train.metrics import read_jsonl

SUMMARY_KEYS = {
    "steps", "epochs", "device", "s_per_batch_cold", "s_per_batch_warm", "cache_hit_rate", "val_iou_input",
    "val_iou_refined", "val_mask_iou", "val_ap_input", "val_ap_refined", "nonfinite_steps", "skipped_samples",
    "backend", "precision", "world_size",
}


def test_tiny_run_end_to_end(tmp_path, tiny_args, tiny_yaml, capsys):
    out = tmp_path / "run"
    assert main(tiny_args + ["--config", tiny_yaml, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "val IoU refined boxes" in table and str(out) in table

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["backend"] == ("native cpu" if native_available("cpu") else summary["backend"])
    assert summary["backend"].startswith(("native", "reference")) and summary["world_size"] == 1
    assert f"{summary['backend']} / 1" in table
    assert summary["steps"] == 2 * summary["steps_per_epoch"] == 10  # 35 train samples / 8 → 5 steps
    assert summary["cache_hit_rate"] == 1.0  # the second epoch (and its validation) reads only the cache
    assert summary["nonfinite_steps"] == 0 and summary["skipped_samples"] == 0
    assert 0.0 < summary["val_iou_input"] <= 1.0
    assert 0.0 <= summary["val_ap_input"] <= 1.0 and 0.0 <= summary["val_ap_refined"] <= 1.0
    assert "val box AP input / refined" in table

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        assert {"step", "loss", "parts", "lr", "s_per_batch", "cache_hit_rate"} <= set(r)
        assert set(r["parts"]) == {"box", "mask", "iou"}
    assert [r["cache_hit_rate"] for r in records[5:]] == [1.0] * 5
    assert len(read_jsonl(out / "val.jsonl")) == 2

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["roi_size"] == 4 and config["batch_size"] == 8
    for name in ("loss.png", "iou.png", "lr.png"):
        assert (out / "plots" / name).stat().st_size > 0
    assert (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "best.pt").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 1\n")
    assert main(["--config", str(bad), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyfast-train: error:") and "learning_rate" in err and "\n" not in err

    assert main(["--data", f"npz:{tmp_path}/missing", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err

    assert main(["--backbone", "nowhere_module_x:f", "--out", str(tmp_path / "c")]) == 2
    assert "cannot import" in capsys.readouterr().err

    assert main(["--resume", str(tmp_path / "never")]) == 2
    assert "config.yaml" in capsys.readouterr().err
