"""capture() against a direct forward, the shard files, the manifest, policies, bad samples, refusals,
and reading back with ActivationDataset."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

import pyfast
from pyfast.capture import ActivationDataset, CaptureError, ShardCorruptError, capture, images_dataset
from pyfast.data import SkippedSample, SyntheticSource, TooManyBadSamples

from .helpers import ConvNet, RandomImages, StructuredNet, TokenNet, hooks_left

MB = 2**20
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(model, dataset, out, **options):
    options.setdefault("log", None)
    options.setdefault("fsync", False)  # fsync is what a disk under load makes slow; the CLI tests keep it
    return capture(model, dataset, out, **options)


def reference_by_batches(model, dataset, batch_size, device="cpu"):
    """model.reference(x) per data set batch [k*B, (k+1)*B), bad samples left out, rows concatenated."""
    rows = {}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        images = [item.image for item in items if not isinstance(item, SkippedSample)]
        if not images:
            continue
        with torch.no_grad():
            for name, value in model.reference(torch.stack(images).to(device)).items():
                rows.setdefault(name, []).append(value.cpu())
    return {name: torch.cat(parts) for name, parts in rows.items()}


def read_all(out, **kwargs):
    dataset = ActivationDataset(out, **kwargs)
    return {name: torch.stack([dataset[i][name] for i in range(len(dataset))]) for name in dataset.layers}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_activations_equal_a_direct_forward_rounded(tmp_path, dtype):
    model = ConvNet()
    dataset = RandomImages(23, bad={4})
    sample_bytes = (8 * 16 * 16 * 2 + 8 * 8 * 8 * 2) * 2  # conv1, act1; conv2, output
    result = run(model, dataset, tmp_path, layers=["conv1,act1", "conv2", "."], batch_size=5, dtype=dtype,
                 shard_mb=3 * sample_bytes / MB)
    assert (result.samples, result.shards, result.skipped) == (22, 8, 1)  # 7 shards of 3, the last of 1
    got = read_all(tmp_path)
    ref = reference_by_batches(model, dataset, 5)
    assert list(got) == ["conv1", "act1", "conv2", "output"]
    for name in got:
        assert got[name].dtype == dtype
        assert torch.equal(got[name], ref[name].to(dtype)), name
    assert got["conv1"].min() < 0  # stored before the in-place ReLU that follows conv1
    assert hooks_left(model) == 0 and model.training  # the hooks are gone, the model's mode is back


def test_precision_autocasts_the_forward(tmp_path):
    model = ConvNet()
    dataset = RandomImages(9)
    run(model, dataset, tmp_path, layers=["conv1", "."], batch_size=4, precision="bf16")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [t["output_dtype"] for t in manifest["layers"]["tensors"]] == ["bfloat16", "bfloat16"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_by_batches(model, dataset, 4)
    got = read_all(tmp_path)
    assert torch.equal(got["conv1"], ref["conv1"].half()) and torch.equal(got["output"], ref["output"].half())


def test_the_model_runs_in_eval_mode(tmp_path):
    model = nn.Sequential(nn.Dropout(0.9))
    model.train()
    run(model, RandomImages(4, size=8), tmp_path, layers=["0"])
    stored = read_all(tmp_path)["0"]
    assert torch.equal(stored, torch.stack([RandomImages(4, size=8)[i].image for i in range(4)]).half())
    assert model.training


@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_capture_on_cuda_equals_the_cuda_forward(tmp_path, precision):
    model = ConvNet().cuda()
    dataset = RandomImages(11, bad={2})
    run(model, dataset, tmp_path, layers=["conv1", "."], pool=["conv1=mean"], batch_size=4, precision=precision,
        workers=2)
    got = read_all(tmp_path)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ref = reference_by_batches(model, dataset, 4, device="cuda")
    # the same kernels on the same batches; the tolerance only allows a reduction order differing by an ulp
    torch.testing.assert_close(got["output"], ref["output"].half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got["conv1"], ref["conv1"].float().mean((2, 3)).half(), rtol=1e-3, atol=1e-3)


def test_pooled_activations_equal_the_reduced_forward(tmp_path):
    model = TokenNet(depth=2)
    dataset = RandomImages(10)
    run(model, dataset, tmp_path, layers=["blocks.?", "."], pool=["mean", "blocks.1=max", "output=cls"],
        batch_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(t["name"], t["shape"], t["pool"]) for t in manifest["layers"]["tensors"]] == [
        ("blocks.0", [8], "mean:1"), ("blocks.1", [8], "max:1"), ("output", [8], "cls:1")]
    got = read_all(tmp_path)
    ref = reference_by_batches(model, dataset, 4)
    assert torch.equal(got["blocks.0"], ref["blocks.0"].float().mean(1).half())
    assert torch.equal(got["blocks.1"], ref["blocks.1"].amax(1).half())
    assert torch.equal(got["output"], ref["output"][:, 0].half())

    maps = tmp_path / "maps"
    run(ConvNet(), dataset, maps, layers=["conv1"], pool=["mean"], batch_size=4)
    ref = reference_by_batches(ConvNet(), dataset, 4)
    assert torch.equal(read_all(maps)["conv1"], ref["conv1"].mean((2, 3)).half())


def test_structured_outputs_are_captured_by_name(tmp_path):
    model = StructuredNet()
    dataset = RandomImages(6, size=8)
    run(model, dataset, tmp_path, layers=["*_out", "."], batch_size=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["layers"]["ignored"] == {"dict_out.count": "int", "tuple_out.1.1": "int64 tensor (2, 8, 8)",
                                             "dataclass_out.mask": "bool tensor (2, 4, 8, 8)"}
    got = read_all(tmp_path)
    ref = reference_by_batches(model, dataset, 3)
    assert list(got) == list(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name].half()), name


def test_shards_are_safetensors_files_of_bounded_size(tmp_path):
    dataset = RandomImages(40)
    shard_mb = 0.01
    run(ConvNet(), dataset, tmp_path, layers=["conv1", "conv2"], batch_size=7, shard_mb=shard_mb)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    per_shard = manifest["storage"]["samples_per_shard"]
    assert per_shard == int(shard_mb * MB) // manifest["storage"]["sample_bytes"] == 2
    entries = [json.loads(line) for line in (tmp_path / "shards.jsonl").read_text().splitlines()]
    assert [e["samples"] for e in entries] == [2] * 20
    assert sorted(os.listdir(tmp_path / "shards")) == [f"shard-{i:06d}.safetensors" for i in range(20)]
    for entry in entries:
        path = tmp_path / entry["file"]
        with safe_open(str(path), framework="pt") as handle:
            assert list(handle.keys()) == ["conv1", "conv2"]
            conv1 = handle.get_tensor("conv1")
            assert conv1.shape == (2, 8, 16, 16) and conv1.dtype == torch.float16
            meta = handle.metadata()
        assert meta["checksum"] == entry["checksum"] and meta["pyfast.run"] == manifest["run"]
        data_bytes = sum(t.numel() * 2 for t in pyfast.load_packed(path).unpack().values())
        assert data_bytes <= shard_mb * MB and path.stat().st_size == entry["bytes"]
        assert pyfast.load_packed(path).stats["conv1"].nonfinite == 0  # the pack statistics travel with the file


def test_manifest_records_what_was_captured(tmp_path):
    dataset = images_dataset([SyntheticSource(num_samples=6, image_size=32, name="synthetic")], 32)
    run(ConvNet(), dataset, tmp_path, layers=["conv*"], batch_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["format"] == "pyfast.capture"
    assert manifest["layers"]["modules"] == ["conv1", "conv2"]
    assert [(t["name"], t["output_shape"], t["output_dtype"]) for t in manifest["layers"]["tensors"]] == [
        ("conv1", [8, 32, 32], "float32"), ("conv2", [8, 16, 16], "float32")]
    assert manifest["data"]["sources"][0]["kind"] == "synthetic" and manifest["data"]["samples"] == 6
    assert manifest["data"]["preprocess"]["transform"] == "letterbox"
    assert manifest["storage"]["dtype"] == "float16" and manifest["totals"]["samples"] == 6
    entry = json.loads((tmp_path / "shards.jsonl").read_text().splitlines()[0])
    assert entry["keys"][:2] == ["synthetic-v2-seed0-size32-0", "synthetic-v2-seed0-size32-1"]
    assert entry["files"][0] == "synthetic[0]" and entry["indices"] == list(range(6))
    assert set(entry["stats"]["conv1"]) == {"nonfinite", "overflow", "absmax"}
    dataset_read = ActivationDataset(tmp_path)
    assert dataset_read[1]["__key__"] == "synthetic-v2-seed0-size32-1"
    assert dataset_read.sample_info(5) == {"key": "synthetic-v2-seed0-size32-5", "source": "synthetic",
                                           "file": "synthetic[5]", "data_index": 5, "shard": 0}


class Scale(nn.Module):
    """Multiplies the image by a constant; NaN for images whose first pixel is below `nan_below`."""

    def __init__(self, factor: float, nan_below: float = -1.0):
        super().__init__()
        self.factor, self.nan_below = factor, nan_below
        self.body = nn.Identity()

    def forward(self, x):
        y = x * self.factor
        y = torch.where(x[:, :1, :1, :1] < self.nan_below, torch.full_like(y, float("nan")), y)
        return self.body(y)


def test_overflow_stops_the_capture_unless_saturation_is_asked(tmp_path):
    dataset = RandomImages(8, size=8)
    with pytest.raises(CaptureError, match=r"beyond the torch.float16 range.*--dtype bf16.*--overflow saturate"):
        run(Scale(1e5), dataset, tmp_path / "error", layers=["body"], batch_size=4)
    run(Scale(1e5), dataset, tmp_path / "saturate", layers=["body"], batch_size=4, overflow="saturate")
    stored = read_all(tmp_path / "saturate")["body"]
    raw = torch.stack([dataset[i].image for i in range(8)]) * 1e5
    assert torch.equal(stored, raw.half().clamp(-65504, 65504))
    manifest = json.loads((tmp_path / "saturate" / "manifest.json").read_text())
    assert manifest["totals"]["overflow"]["body"] == int(raw.half().isinf().sum()) > 0
    run(Scale(1e5), dataset, tmp_path / "bf16", layers=["body"], batch_size=4, dtype=torch.bfloat16)
    assert ActivationDataset(tmp_path / "bf16").stats["body"]["overflow"] == 0


def test_non_finite_values_are_kept_and_counted_or_refused(tmp_path):
    dataset = RandomImages(12, size=8)
    first_pixels = torch.stack([dataset[i].image[0, 0, 0] for i in range(12)])
    model = Scale(1.0, nan_below=0.3)
    nan_samples = int((first_pixels < 0.3).sum())
    assert 0 < nan_samples < 12
    result = run(model, dataset, tmp_path / "keep", layers=["body"], batch_size=5)
    assert result.nonfinite["body"] == nan_samples * 3 * 8 * 8
    stored = read_all(tmp_path / "keep")["body"]
    assert torch.equal(stored.flatten(1).isnan().all(1), first_pixels < 0.3)
    with pytest.raises(CaptureError, match="non-finite.*--nonfinite keep"):
        run(model, dataset, tmp_path / "error", layers=["body"], batch_size=5, nonfinite="error")


def test_bad_samples_are_skipped_reported_and_bounded(tmp_path):
    dataset = RandomImages(20, bad={3, 4, 17})
    result = run(ConvNet(), dataset, tmp_path / "ok", layers=["conv1"], batch_size=4, max_skip_fraction=0.2)
    assert result.skipped == 3 and result.samples == 17
    records = [json.loads(line) for line in (tmp_path / "ok" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["index"], r["file"], r["reason"]) for r in records] == [
        (3, "img3.png", "cannot decode"), (4, "img4.png", "cannot decode"), (17, "img17.png", "cannot decode")]
    indices = [i for line in (tmp_path / "ok" / "shards.jsonl").read_text().splitlines()
               for i in json.loads(line)["indices"]]
    assert indices == [i for i in range(20) if i not in {3, 4, 17}]
    with pytest.raises(TooManyBadSamples, match="3 of 20 samples"):
        run(ConvNet(), dataset, tmp_path / "abort", layers=["conv1"], batch_size=4, max_skip_fraction=0.1)


def test_a_changed_model_layers_data_or_storage_is_refused(tmp_path):
    dataset = RandomImages(10)
    run(ConvNet(), dataset, tmp_path, layers=["conv1"], batch_size=4)
    changed = ConvNet()
    with torch.no_grad():
        changed.conv1.bias[0] += 1e-3
    cases = [
        (changed, dataset, {}, r"model: weights digest \w+ -> \w+"),
        (ConvNet(), dataset, {"layers": ["conv2"]}, "layers: added conv2; removed conv1"),
        (ConvNet(), dataset, {"pool": ["mean"]}, "layers: pooling none -> mean:2,3 for conv1"),
        (ConvNet(), RandomImages(11), {}, "data: 10 -> 11 samples"),
        (ConvNet(), RandomImages(10, seed=1), {}, "data: .*other samples"),
        (ConvNet(), dataset, {"dtype": torch.bfloat16}, "storage: dtype float16 -> bfloat16"),
        (ConvNet(), dataset, {"precision": "bf16"}, "storage: precision fp32 -> bf16"),
    ]
    for model, data, changes, message in cases:
        options = {"layers": ["conv1"], "batch_size": 4, **changes}
        with pytest.raises(CaptureError, match=message):
            run(model, data, tmp_path, **options)
    # how it runs may change: a new batch size or policy finds the capture complete
    assert run(ConvNet(), dataset, tmp_path, layers=["conv1"], batch_size=3, nonfinite="error").new_samples == 0


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CaptureError, match="holds other files"):
        run(ConvNet(), RandomImages(4), tmp_path, layers=["conv1"])


def test_outputs_without_a_batch_dimension_are_refused(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            return x.mean(0)  # no batch dim

    with pytest.raises(CaptureError, match="first dimension is not the batch"):
        run(Odd(), RandomImages(4), tmp_path, layers=["."])


def test_activation_dataset_through_a_dataloader_with_workers(tmp_path):
    dataset = RandomImages(30, bad={7})
    run(ConvNet(), dataset, tmp_path, layers=["conv2", "."], batch_size=4, shard_mb=0.02)
    activations = ActivationDataset(tmp_path, layers=["conv2"])
    assert len(activations) == 29 and list(activations.layers) == ["conv2"]
    direct = torch.stack([activations[i]["conv2"] for i in range(len(activations))])
    loader = DataLoader(activations, batch_size=5, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b["conv2"] for b in batches]), direct)
    assert [k for b in batches for k in b["__key__"]] == [f"random-0-{i}" for i in range(30) if i != 7]
    as_float = ActivationDataset(tmp_path, dtype=torch.float32)
    assert as_float[3]["output"].dtype == torch.float32
    shard0 = activations.shard(0)
    assert torch.equal(shard0["conv2"], direct[: shard0["conv2"].shape[0]])
    with pytest.raises(CaptureError, match="no captured layer matches 'conv3'.*conv2"):
        ActivationDataset(tmp_path, layers=["conv3"])


def _flip_a_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_corrupt_shard_is_an_error_naming_the_file(tmp_path):
    run(ConvNet(), RandomImages(12), tmp_path, layers=["conv1"], batch_size=4, shard_mb=0.02)
    shard = tmp_path / "shards" / "shard-000001.safetensors"
    _flip_a_data_byte(shard)
    activations = ActivationDataset(tmp_path)
    activations[0]  # shard 0 is intact
    per_shard = activations.entries[0]["samples"]
    with pytest.raises(ShardCorruptError, match=r"shard-000001.safetensors: checksum mismatch"):
        activations[per_shard]
    batches = iter(DataLoader(ActivationDataset(tmp_path), batch_size=4, num_workers=2))
    try:
        with pytest.raises(ShardCorruptError, match="shard-000001.safetensors"):  # raised in a worker, re-raised here
            list(batches)
    finally:
        # the traceback keeps the iterator alive, and a garbage-collected one waits 10 s for its workers
        batches._shutdown_workers()
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardCorruptError, match=r"shard-000001.safetensors: .* bytes, the manifest says"):
        ActivationDataset(tmp_path)[per_shard]
    shard.unlink()
    with pytest.raises(ShardCorruptError, match="shard-000001.safetensors: missing"):
        ActivationDataset(tmp_path)[per_shard]


def test_a_shard_of_another_capture_is_detected(tmp_path):
    run(ConvNet(), RandomImages(8), tmp_path / "a", layers=["conv1"], batch_size=4)
    run(ConvNet(seed=1), RandomImages(8), tmp_path / "b", layers=["conv1"], batch_size=4)
    other = (tmp_path / "b" / "shards" / "shard-000000.safetensors").read_bytes()
    (tmp_path / "a" / "shards" / "shard-000000.safetensors").write_bytes(other)
    with pytest.raises(ShardCorruptError, match="another capture"):
        ActivationDataset(tmp_path / "a")[0]


def test_an_incomplete_capture_is_read_only_when_asked(tmp_path):
    dataset = RandomImages(12)

    class Stop(Exception):
        pass

    def stop_after_two(entry):
        if entry["shard"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run(ConvNet(), dataset, tmp_path, layers=["conv1"], batch_size=4, shard_mb=0.02, on_shard=stop_after_two)
    with pytest.raises(CaptureError, match="not complete .*rerun the same"):
        ActivationDataset(tmp_path)
    partial = ActivationDataset(tmp_path, partial=True)
    assert len(partial) == 2 * partial.entries[0]["samples"]
