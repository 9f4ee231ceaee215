"""The Lightning callback and example: a module that keeps its validation outputs is caught (and
stopped), a clean one trains and logs its memory, and a missing Lightning is a clear error."""

import csv
import gc
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from pyfast.cli.doctor import main as doctor
from pyfast.memory import LeakRule
from pyfast.memory.probes import trim_heap

# Lightning is imported by the tests that need it, not at collection: its half-million objects would
# slow every other census of the session.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_refiner.py"
RULE = LeakRule(host_mb=50.0, warmup_steps=10, window=30, min_samples=15, min_steps=40)


class Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, index):
        return torch.rand(8)


def keeps_validation_outputs():
    """A LightningModule that appends every validation_step output to a list nothing clears."""
    import lightning.pytorch as pl

    class KeepsValidationOutputs(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)
            self.val_outputs = []

        def training_step(self, batch, batch_idx):
            return self.layer(batch).square().mean()

        def validation_step(self, batch, batch_idx):
            out = {"pred": self.layer(batch), "features": torch.rand(256, 1024)}  # 1 MB per validation step
            self.val_outputs.append(out)
            return out

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return KeepsValidationOutputs()


def trainer(tmp_path, callback, max_steps, **options):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[callback], default_root_dir=tmp_path,
        logger=pl.loggers.CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **options)


def test_kept_validation_outputs_are_found_and_stop_the_fit(tmp_path, capsys):
    gc.collect()
    trim_heap()
    from pyfast.memory import MemoryMonitorCallback

    callback = MemoryMonitorCallback(every=2, max_growth=100.0, rule=RULE, investigate_steps=10)
    loader = torch.utils.data.DataLoader(Batches(), batch_size=4)
    fit = trainer(tmp_path, callback, max_steps=400, val_check_interval=2, limit_val_batches=1)
    fit.fit(keeps_validation_outputs(), loader, loader)

    assert callback.stopped_because is not None and "over the bound of 100" in callback.stopped_because
    assert fit.global_step < 400  # stopped cleanly, long before max_steps
    verdict = callback.verdict
    assert verdict["leak"] and "host" in verdict["leaking"]
    top = verdict["growers"]["held_by"][0]
    assert top["holder"].endswith("KeepsValidationOutputs.val_outputs") and top["len_delta"] == 5
    assert "dict" in top["new"] and any(kind["type"] == "torch.Tensor" for kind in top["retains"])

    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(r["memory/rss_mb"]) for r in rows if r.get("memory/rss_mb")]
    assert len(logged) >= 20 and logged[-1] > logged[0]
    assert any(r.get("memory/host_mb_per_1000_steps") for r in rows)  # the slope, logged at the end
    assert (tmp_path / "memory.png").stat().st_size > 0

    capsys.readouterr()
    assert doctor(["memory", str(tmp_path)]) == 1
    assert "KeepsValidationOutputs.val_outputs" in capsys.readouterr().out


def test_state_goes_into_checkpoints():
    from pyfast.memory import MemoryMonitorCallback

    first = MemoryMonitorCallback(every=5)
    for step in range(1, 31):
        first.monitor.step(step)
    state = first.state_dict()
    json.dumps(state, allow_nan=False)
    second = MemoryMonitorCallback(every=5)
    second.load_state_dict(state)
    assert second.monitor.samples == first.monitor.samples
    with pytest.raises(ValueError, match="max_growth"):
        MemoryMonitorCallback(max_growth=0)


def test_example_trains_a_refiner_with_the_fused_losses_and_the_callback(tmp_path):
    spec = importlib.util.spec_from_file_location("lightning_refiner", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--max-steps", "80", "--train-samples", "320", "--every", "5", "--out", str(tmp_path)])
    assert results["val/iou_refined"] > results["val/iou_input"] + 0.02  # the head learned to refine
    assert results["val/mask_iou"] > 0.5
    assert not results["memory"]["leak"]
    samples = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == list(range(5, 81, 5))
    assert json.loads((tmp_path / "memory.json").read_text())["verdict"]["samples"] == 16


def test_a_missing_lightning_is_a_clear_import_error(monkeypatch):
    for name in list(sys.modules):
        if name == "pyfast.memory.lightning" or name.split(".")[0] in ("lightning", "pytorch_lightning"):
            monkeypatch.delitem(sys.modules, name)
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ImportError, match=r'pip install "pyfast\[lightning\]"'):
        importlib.import_module("pyfast.memory.lightning")
    import pyfast.memory

    with pytest.raises(ImportError, match="needs Lightning"):
        pyfast.memory.MemoryMonitorCallback  # noqa: B018
