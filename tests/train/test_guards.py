import math

import pytest
import torch

from pyfast.train import TrainingDiverged, build_config, prepare, train
from pyfast.train.guards import NonFiniteGuard
from pyfast.train.metrics import read_jsonl
from pyfast.train.summary import summarize


def _run(tmp_path, tiny_config, name, **more):
    return prepare(build_config(tiny_config, {"out": str(tmp_path / name), **more}), log=lambda *a: None)


def test_planted_nan_is_skipped_and_counted(tmp_path, tiny_config):
    def plant(step, loss):
        return loss * float("nan") if step == 3 else loss

    ref = _run(tmp_path, tiny_config, "ref", max_steps=2)
    train(ref, progress_bar=False)
    bad = _run(tmp_path, tiny_config, "bad", max_steps=3)
    summary = train(bad, loss_hook=plant, progress_bar=False)
    assert summary["nonfinite_steps"] == 1
    # the skipped step touched nothing: model, optimizer and scheduler are as after step 2
    for (name, a), b in zip(ref.model.state_dict().items(), bad.model.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = ref.optimizer.state_dict()["state"], bad.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for field in sa[k]:
            assert torch.equal(sa[k][field], sb[k][field])
    assert ref.scheduler.state_dict()["last_epoch"] == bad.scheduler.state_dict()["last_epoch"]
    records = read_jsonl(tmp_path / "bad" / "metrics.jsonl")
    assert [r["skipped_step"] for r in records] == [False, False, True]
    assert records[2]["loss"] == "nan"


def test_many_nonfinite_in_a_row_stop_the_run(tmp_path, tiny_config):
    run = _run(tmp_path, tiny_config, "div", max_nonfinite_in_a_row=3)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        train(run, loss_hook=lambda step, loss: loss * math.inf, progress_bar=False)
    summary = summarize(run, "x")
    assert summary["nonfinite_steps"] == 3 and summary["steps"] == 3
    assert (tmp_path / "div" / "summary.json").exists()


def test_guard_counts_and_resets():
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.update(False, 1) is False
    assert guard.update(True, 2) is True and guard.in_a_row == 0
    guard.update(False, 3)
    with pytest.raises(TrainingDiverged):
        guard.update(False, 4)
    assert guard.total == 3
