"""pyfast.load_weights on the files users have: Lightning, DDP, compiled, EMA, safetensors, shards."""

import argparse
import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pyfast
from pyfast.cli.doctor import main as doctor
from pyfast.models.weights import WeightsError, apply_state_dict, load_weights, read_weights, strip_prefixes


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 2)


def _fresh(width=8):
    """A Net whose every tensor differs from any other Net's (so a load is visible)."""
    net = Net(width)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape))
    return net


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_lightning_checkpoint_with_model_prefix_and_hparams(tmp_path):
    src = _fresh()
    path = tmp_path / "epoch=3.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}],
            "hyper_parameters": {"lr": 1e-3, "width": 8},
        },
        path,
    )
    dst = _fresh()
    report = pyfast.load_weights(dst, path, log=None)
    assert _equal(dst, src)
    assert report.applied and report.complete and report.clean and report.matched_fraction == 1.0
    assert report.state_key == "state_dict" and report.prefix == "model."
    assert report.config_key == "hyper_parameters" and report.config == {"lr": 1e-3, "width": 8}
    assert report.format == "torch pickle (weights_only)"
    assert report.model_tensors == len(src.state_dict()) == len(report.loaded)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.model."])
def test_ddp_and_compile_prefixes(tmp_path, prefix):
    src = _fresh()
    path = tmp_path / "weights.pth"
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
    dst = _fresh()
    report = load_weights(dst, path, log=None)
    assert _equal(dst, src) and report.prefix == prefix and report.state_key is None


def test_a_submodule_named_like_a_prefix_is_not_over_stripped(tmp_path):
    # the model's own keys start with "model." (a wrapper); the checkpoint adds DDP's "module."
    src, dst = nn.Sequential(), nn.Sequential()
    src.model, dst.model = _fresh(), _fresh()
    path = tmp_path / "w.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    report = load_weights(dst, path, log=None)
    assert report.prefix == "module." and _equal(dst, src)


def test_safetensors_single_and_sharded(tmp_path):
    src = _fresh()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors", metadata={"format": "pt"})
    dst = _fresh()
    assert load_weights(dst, tmp_path / "w.safetensors", log=None).format == "safetensors" and _equal(dst, src)

    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"width": 8}))
    dst = _fresh()
    report = load_weights(dst, folder, log=None)  # a model directory
    assert _equal(dst, src) and report.config == {"width": 8} and "2 shards" in report.format

    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="shard model-00002-of-00002.safetensors is missing") as error:
        load_weights(_fresh(), folder / "model.safetensors.index.json", log=None)
    _one_line(error)


def test_sharded_bin_directory(tmp_path):
    src = _fresh()
    state = src.state_dict()
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if i < 2 else 2}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dst = _fresh()
    load_weights(dst, tmp_path, log=None)
    assert _equal(dst, src)


def test_ema_is_reported_and_selectable(tmp_path):
    raw, ema = _fresh(), _fresh()
    path = tmp_path / "train.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "step": 10}, path)
    dst = _fresh()
    report = load_weights(dst, path, log=None)
    assert _equal(dst, raw) and report.state_key == "model" and report.other_state_keys == ["ema"]
    load_weights(dst, path, state_key="ema", log=None)
    assert _equal(dst, ema)


def test_nested_dicts_of_tensors_are_flattened(tmp_path):
    src = _fresh()
    state = src.state_dict()
    nested = {"conv": {"weight": state["conv.weight"], "bias": state["conv.bias"]}}
    nested.update({k: v for k, v in state.items() if not k.startswith("conv.")})
    torch.save({"checkpoint": 1, "net": nested}, tmp_path / "n.pt")
    dst = _fresh()
    assert load_weights(dst, tmp_path / "n.pt", log=None).state_key == "net" and _equal(dst, src)


def test_the_wrong_config_is_refused_and_loads_nothing(tmp_path):
    path = tmp_path / "other-config.pt"
    torch.save(_fresh(width=16).state_dict(), path)
    dst = _fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsError) as error:
        load_weights(dst, path, log=None)
    text = _one_line(error)
    assert str(path) in text and "another shape" in text and "(16, 3, 3, 3) vs model (8, 3, 3, 3)" in text
    assert error.value.report is not None and not error.value.report.applied
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing touched

    # asked to skip mismatches: the rest loads, mismatched tensors keep their values, a warning says so
    messages = []
    report = load_weights(dst, path, strict_shapes=False, min_fraction=0.0, log=messages.append)
    assert {k for k, _, _ in report.mismatched} == {"conv.weight", "conv.bias", "norm.weight", "norm.bias",
                                                   "norm.running_mean", "norm.running_var", "head.weight"}
    assert report.loaded == ["norm.num_batches_tracked", "head.bias"]
    assert torch.equal(dst.conv.weight, before["conv.weight"])
    assert len(messages) == 1 and "partial load" in messages[0] and "shape mismatch" in messages[0]


def test_a_checkpoint_that_matches_nothing_is_refused(tmp_path):
    # what strict=False does with it: loads nothing and says nothing
    other = {f"encoder.{k}": v for k, v in _fresh().state_dict().items()}
    result = _fresh().load_state_dict(other, strict=False)
    assert len(result.unexpected_keys) == len(other) and "conv.weight" in result.missing_keys

    path = tmp_path / "foreign.pt"
    torch.save(other, path)
    dst = _fresh()
    with pytest.raises(WeightsError) as error:
        load_weights(dst, path, min_fraction=0.0, log=None)
    text = _one_line(error)
    assert str(path) in text and "nothing matched" in text
    assert "'encoder.conv.weight'" in text and "'conv.weight'" in text  # both key styles shown
    # the prefix the message points at fixes it
    report = load_weights(dst, path, prefixes=["encoder"], log=None)
    assert report.prefix == "encoder." and report.complete


def test_too_little_is_refused_counting_tensors_and_elements(tmp_path):
    src = _fresh()
    path = tmp_path / "partial.pt"
    small = {k: v for k, v in src.state_dict().items() if not k.endswith("weight")}  # biases and BN stats only
    torch.save(small, path)
    with pytest.raises(WeightsError, match=r"matches too little.*need 50%") as error:
        load_weights(_fresh(), path, min_fraction=0.5, log=None)  # 6 of 9 tensors, but few elements
    report = error.value.report
    assert report.tensor_fraction == 6 / 9 and report.element_fraction == 35 / 275
    _one_line(error)

    messages = []
    dst = _fresh()
    report = load_weights(dst, path, min_fraction=0.1, log=messages.append)
    assert report.applied and sorted(report.missing) == ["conv.weight", "head.weight", "norm.weight"]
    assert torch.equal(dst.head.bias, src.head.bias) and messages and "missing: " in messages[0]


def test_tied_parameters_count_as_loaded():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    src, dst = Tied(), Tied()
    report = apply_state_dict(dst, {"embed.weight": src.embed.weight.detach()}, log=None)
    assert report.tied == ["out.weight"] and report.complete and report.matched_fraction == 1.0
    assert torch.equal(dst.out.weight, src.embed.weight)


def test_ambiguous_prefixes_are_an_error_and_a_given_prefix_wins_a_tie(tmp_path):
    a, b = _fresh(), _fresh()
    both = {**{f"model.{k}": v for k, v in a.state_dict().items()}, **{f"ema.{k}": v for k, v in b.state_dict().items()}}
    dst = _fresh()
    report = apply_state_dict(dst, both, log=None)
    assert report.prefix == "model." and _equal(dst, a) and len(report.unexpected) == len(b.state_dict())
    report = apply_state_dict(dst, both, prefixes=["ema."], log=None)
    assert report.prefix == "ema." and _equal(dst, b)
    with pytest.raises(WeightsError, match="ambiguous"):
        apply_state_dict(dst, {**{f"x.{k}": v for k, v in a.state_dict().items()},
                               **{f"y.{k}": v for k, v in b.state_dict().items()}}, prefixes=["x.", "y."], log=None)


def test_no_state_dict_lists_the_top_level_keys(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "optimizer": {"param_groups": []}, "notes": "hello"}, path)
    with pytest.raises(WeightsError, match="no state dict found") as error:
        load_weights(_fresh(), path, log=None)
    text = _one_line(error)
    assert "epoch (3)" in text and "optimizer (dict of 1)" in text and str(path) in text


def test_pickled_objects_need_an_explicit_unsafe_load(tmp_path):
    src = _fresh()
    path = tmp_path / "with-args.pt"
    torch.save({"state_dict": src.state_dict(), "args": argparse.Namespace(lr=0.1, width=8)}, path)
    with pytest.raises(WeightsError) as error:
        load_weights(_fresh(), path, log=None)
    text = _one_line(error)
    assert "argparse.Namespace" in text and "weights_only=False" in text and str(path) in text
    messages = []
    dst = _fresh()
    report = load_weights(dst, path, weights_only=False, log=messages.append)
    assert _equal(dst, src) and report.config == {"lr": 0.1, "width": 8} and report.config_key == "args"
    assert "weights_only=False" in report.format and "may run code" in messages[0]


def test_bad_paths_are_one_line_errors(tmp_path):
    for path, expected in [
        (tmp_path / "missing.pt", "no such file or directory"),
        (tmp_path, "not a model directory"),
    ]:
        with pytest.raises(WeightsError, match=expected) as error:
            load_weights(_fresh(), path, log=None)
        assert str(path) in _one_line(error)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(WeightsError, match="cannot read the checkpoint") as error:
        load_weights(_fresh(), damaged, log=None)
    assert str(damaged) in _one_line(error)
    odd = tmp_path / "weights.xyz"
    odd.write_bytes(b"hello world")
    with pytest.raises(WeightsError, match="unrecognised weights format"):
        read_weights(odd)


def test_content_is_sniffed_when_the_suffix_is_unusual(tmp_path):
    src = _fresh()
    torch.save(src.state_dict(), tmp_path / "weights.model")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "weights.st")
    for name in ("weights.model", "weights.st"):
        dst = _fresh()
        load_weights(dst, tmp_path / name, log=None)
        assert _equal(dst, src)


def test_strip_prefixes_peels_every_leading_chain():
    assert strip_prefixes({"_orig_mod.module.a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert strip_prefixes({"x.y.z": 1}, prefixes=["x", "y."]) == {"z": 1}


# ------------------------------------------------------------------ pyfast-doctor checkpoint


@pytest.fixture
def net_module(monkeypatch):
    module = types.ModuleType("doctor_nets")
    module.make = lambda: _fresh()
    monkeypatch.setitem(sys.modules, "doctor_nets", module)
    return module


def test_doctor_describes_a_file(tmp_path, capsys):
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _fresh().state_dict().items()},
                "hyper_parameters": {"width": 8}, "epoch": 2}, path)
    assert doctor(["checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state dict   under 'state_dict'" in out
    assert 'config       hyper_parameters: {"width": 8}' in out
    assert "tensors      9 tensors, 275 elements (float32 8, int64 1)" in out
    assert "key groups   model. (9)" in out


def test_doctor_checks_a_file_against_a_model(tmp_path, capsys, net_module):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"module." + k: v for k, v in _fresh().state_dict().items()}, good)
    torch.save(_fresh(width=4).state_dict(), bad)
    assert doctor(["checkpoint", str(good), "--model", "doctor_nets:make"]) == 0
    out = capsys.readouterr().out
    assert "loaded       9 / 9 tensors (100.0%)" in out and "prefix       'module.' stripped" in out
    assert "verdict      OK: every tensor of the model loads" in out

    assert doctor(["checkpoint", str(bad), "--model", "doctor_nets:make"]) == 1
    out = capsys.readouterr().out
    assert "matched      2 / 9 tensors" in out and "mismatched   7: conv.weight (4, 3, 3, 3) vs model (8, 3, 3, 3)" in out
    assert "verdict      FAIL: " in out and "another shape" in out

    assert doctor(["checkpoint", str(bad), "--model", "doctor_nets:make", "--allow-shape-mismatch",
                   "--min-fraction", "0"]) == 0
    assert "OK with gaps" in capsys.readouterr().out

    assert doctor(["checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyfast-doctor: error:") and "no such file" in err and "\n" not in err
