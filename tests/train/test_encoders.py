"""pyfast-train on real encoder architectures with the weights users have: tiny SAM and DINOv2 models
built from configs (random weights, nothing downloaded), saved as `save_pretrained` directories,
Lightning checkpoints and DDP state dicts, trained through `--backbone hf:DIR --backbone-weights`."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from pyfast.cache import FeatureCache  # noqa: E402
from pyfast.cli.train import main  # noqa: E402
from pyfast.data import RobustDataset, collate  # noqa: E402
from pyfast.models import BackboneError, load_backbone  # noqa: E402
from pyfast.models.weights import WeightsError  # noqa: E402
from pyfast.train import CheckpointError, ConfigError, build_config, plan_resume, prepare, train  # noqa: E402
from pyfast.train.features import feature_fingerprint  # noqa: E402
from pyfast.train.metrics import read_jsonl  # noqa: E402

SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1])
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
            patch_size=14)
SAM_TENSORS = 37  # of the tiny SamVisionModel
# 12 samples: 10 to train on (2 steps of 8 and 2), 2 to validate
TINY = ["--data", "synthetic:,num_samples=12,image_size=64", "--batch-size", "8", "--roi-size", "4", "--hidden", "8",
        "--epochs", "1", "--no-progress"]


def _randomize(model, seed):
    """Non-trivial values everywhere (transformers initializes some tensors to zeros or ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model directory (SamModel, its own weights: seed 0) and one set of fine-tuned weights
    (seed 1) in each form users have, plus a DINOv2 directory and checkpoint."""
    root = tmp_path_factory.mktemp("encoders")
    out = {"root": root}
    sam = _randomize(transformers.SamModel(transformers.SamConfig(vision_config=SAM)), seed=0)
    sam.save_pretrained(root / "sam")
    transformers.SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(
        root / "sam")
    out["sam"] = root / "sam"

    tuned = _randomize(transformers.SamModel(transformers.SamConfig(vision_config=SAM)), seed=1)
    tuned.save_pretrained(root / "sam-tuned")  # a save_pretrained directory as weights
    out["directory"] = root / "sam-tuned"
    out["lightning"] = root / "last.ckpt"  # a LightningModule holding the SamModel as self.model
    torch.save({"state_dict": {f"model.{k}": v for k, v in tuned.state_dict().items()},
                "hyper_parameters": {"lr": 1e-4, "freeze_encoder": False}, "epoch": 3, "global_step": 120},
               out["lightning"])
    out["ddp"] = root / "encoder-ddp.pth"  # the image encoder alone, trained under DistributedDataParallel
    torch.save({f"module.{k}": v for k, v in tuned.vision_encoder.state_dict().items()}, out["ddp"])
    out["tuned_encoder"] = tuned.vision_encoder

    dino = _randomize(transformers.Dinov2Model(transformers.Dinov2Config(**DINO)), seed=2)
    dino.save_pretrained(root / "dinov2")
    transformers.BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                                      ).save_pretrained(root / "dinov2")
    out["dinov2"] = root / "dinov2"
    out["dinov2_ckpt"] = root / "dinov2.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in
                               _randomize(transformers.Dinov2Model(dino.config), seed=3).state_dict().items()}},
               out["dinov2_ckpt"])
    return out


def _train(args, capsys):
    code = main(TINY + args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_each_form_of_the_weights_trains_and_the_same_weights_share_one_cache(files, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--backbone", f"hf:{files['sam']}", "--cache-dir", str(cache)]
    yaml_config = tmp_path / "weights.yaml"
    yaml_config.write_text(f"backbone_weights: {files['lightning']}\n")
    runs = {
        "directory": ["--backbone-weights", str(files["directory"])],
        "lightning": ["--config", str(yaml_config)],  # the YAML key
        "ddp": ["--backbone-weights", str(files["ddp"])],
    }
    digests = set()
    for i, (form, args) in enumerate(runs.items()):
        out = tmp_path / form
        printed = _train(common + args + ["--out", str(out)], capsys)
        summary = json.loads((out / "summary.json").read_text())
        backbone = summary["backbone"]
        report = backbone["weights_report"]
        assert summary["status"] == "completed" and summary["steps"] == 2
        assert backbone["weights"] == str(files[form]) and report["source"] == str(files[form])
        assert report["applied"] and report["loaded"] == report["model_tensors"] == SAM_TENSORS
        assert report["counts"]["missing"] == report["counts"]["mismatched"] == 0
        assert f"backbone weights: {files[form]} (" in printed and f"loaded {SAM_TENSORS} of {SAM_TENSORS} tensors" in printed
        assert {"directory": "", "lightning": "model.", "ddp": "module."}[form] == report["prefix"]
        config = yaml.safe_load((out / "config.yaml").read_text())
        assert config["backbone_weights"] == str(files[form]) and config["image_size"] == 64  # SAM's own size
        digests.add(backbone["digest"])
        rates = [r["cache_hit_rate"] for r in read_jsonl(out / "metrics.jsonl")]
        # the first run fills the cache; the same weights in another file find every sample there
        assert rates == ([0.0, 0.0] if i == 0 else [1.0, 1.0]), form
    assert len(digests) == 1  # the identity is the loaded state, not the file it came from
    # the directory's own weights: other features, never served from the fine-tuned weights' cache
    out = tmp_path / "own"
    _train(common + ["--out", str(out)], capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"]["digest"] not in digests and summary["backbone"]["weights"] is None
    assert summary["backbone"]["weights_report"]["source"] == str(files["sam"])
    assert [r["cache_hit_rate"] for r in read_jsonl(out / "metrics.jsonl")] == [0.0, 0.0]
    assert len(list((cache / "v1").iterdir())) == 2  # one folder per fingerprint


def test_the_encoder_weights_are_the_checkpoints(files, tmp_path):
    """What the trainer's backbone computes is the fine-tuned encoder's own output."""
    run = prepare(build_config({"backbone": f"hf:{files['sam']}", "backbone_weights": str(files["ddp"]),
                                "data": ["synthetic:,num_samples=12,image_size=64"], "out": str(tmp_path / "run"),
                                "cache_dir": "off"}), log=lambda line: None)
    images = torch.rand(2, 3, 64, 64)
    backbone = run.features.backbone
    with torch.no_grad():
        expected = files["tuned_encoder"](pixel_values=backbone.normalize(images)).last_hidden_state
    torch.testing.assert_close(backbone(images), expected, rtol=0, atol=0)


def _refused(config, tmp_path):
    """prepare()'s error for `config`; the run directory and the cache must not exist afterwards."""
    out = tmp_path / "refused"
    with pytest.raises((WeightsError, BackboneError, ConfigError)) as error:
        prepare(build_config({"data": ["synthetic:,num_samples=12,image_size=64"], "out": str(out), **config}),
                log=lambda line: None)
    assert not out.exists()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_weights_that_do_not_fit_are_refused_before_the_run_dir(files, tmp_path, capsys):
    other = transformers.SamVisionModel(transformers.SamVisionConfig(**{**SAM, "hidden_size": 48}))
    wrong_config = tmp_path / "vit-l-config.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, wrong_config)
    unrelated = tmp_path / "resnet.safetensors"
    save_file({"backbone.conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(3)}, unrelated)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint at all\n")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(files["sam"] / "config.json", weightless / "config.json")
    cases = [
        (wrong_config, "another shape in the checkpoint (e.g. vision_encoder.pos_embed: checkpoint (1, 8, 8, 48) vs "
                       "model (1, 8, 8, 32)): was it made with another config?"),
        (unrelated, "nothing matched; checkpoint keys look like 'backbone.conv1.weight'"),
        (damaged, "not a torch checkpoint, or a damaged one"),
        (tmp_path / "nowhere.ckpt", "no such file or directory"),
        (weightless, "not a model directory"),
    ]
    sam = f"hf:{files['sam']}"
    for path, expected in cases:
        message = _refused({"backbone": sam, "backbone_weights": str(path)}, tmp_path)
        assert message.startswith(str(path)) and expected in message, message
    # the hint speaks of this command's flags, not of the library's arguments
    assert "--backbone-weights-prefix P or --backbone-weights-key KEY" in _refused(
        {"backbone": sam, "backbone_weights": str(unrelated)}, tmp_path)
    # the command line: exit 2, one line on stderr, nothing written
    out = tmp_path / "cli"
    assert main(["--backbone", sam, "--backbone-weights", str(wrong_config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyfast-train: error: {wrong_config}: ") and err.count("\n") == 1 and not out.exists()
    assert "apply to --backbone-weights" in _refused({"backbone": sam, "backbone_weights_key": "ema"}, tmp_path)


def test_two_encoder_maps_reach_the_heads_and_both_are_cached(files, tmp_path):
    cache = tmp_path / "cache"
    config = build_config({
        "backbone": f"hf:{files['sam']},layers=early+last", "feature_maps": ["early", "last"],
        "data": ["synthetic:,num_samples=12,image_size=64"], "batch_size": 8, "epochs": 2, "roi_size": 4,
        "hidden": 8, "out": str(tmp_path / "run"), "cache_dir": str(cache),
    })
    run = prepare(config, log=lambda line: None)
    assert run.model.channels == (32, 16) and run.cfg.image_size == 64  # early: the ViT's width; last: the neck's
    first_conv = run.model.box_head.trunk[0].weight  # its input channels: early's 32, then last's 16
    before = first_conv.detach().clone()
    summary = train(run, progress_bar=False)
    assert summary["status"] == "completed" and summary["cache_hit_rate"] == 1.0
    assert summary["backbone"]["feature_maps"] == ["early", "last"]
    assert {n: m["channels"] for n, m in summary["backbone"]["maps"].items()} == {"early": 32, "last": 16}
    moved = (first_conv.detach() - before).abs()
    assert moved[:, :32].amax() > 0 and moved[:, 32:].amax() > 0  # both maps' gradients reached the heads

    # what the heads read on a warm batch is each map of the encoder, rounded to the cache's fp16
    batch_indices = run.data.train_indices[:4]
    warm = collate([run.data.dataset[i] for i in batch_indices])
    assert warm.images is None and set(warm.cached) == {"early", "last"}
    served = run.features(warm).maps
    fresh_dataset = RobustDataset(run.data.dataset.sources, preprocess=run.data.dataset.preprocess)
    cold = collate([fresh_dataset[i] for i in batch_indices])
    with torch.no_grad():
        direct = run.features.backbone(cold.images.float() / 255)
    for got, name in zip(served, ("early", "last")):
        torch.testing.assert_close(got, direct[name].half().float(), rtol=0, atol=0)

    # one entry per sample holds every map
    stored = FeatureCache(cache, run.features.cache.fingerprint).get(warm.keys[0])
    assert {name: tuple(t.shape) for name, t in stored.items()} == {"early": (32, 8, 8), "last": (16, 8, 8)}


def test_image_size_comes_from_the_encoder(files, tmp_path):
    sam, dino = f"hf:{files['sam']}", f"hf:{files['dinov2']}"
    assert "SAM's encoder takes only 64x64 images" in _refused({"backbone": sam, "image_size": 32}, tmp_path)
    message = _refused({"backbone": sam, "image_size": 96, "fast": True}, tmp_path)
    assert "--image-size 96 (set by --fast)" in message and "pass --image-size 64" in message
    assert "not a multiple of the patch size 14" in _refused({"backbone": dino, "image_size": 70 + 7}, tmp_path)

    # DINOv2 takes its processor's crop size by default, and any multiple of its patch size when asked
    lines = []
    run = prepare(build_config({"backbone": dino, "backbone_weights": str(files["dinov2_ckpt"]),
                                "data": ["synthetic:,num_samples=12,image_size=64"], "out": str(tmp_path / "56")}),
                  log=lines.append)
    assert run.cfg.image_size == 56 and run.features.layout["features"].size == 4 and not any("made for" in s for s in lines)
    run = prepare(build_config({"backbone": dino, "image_size": 84, "out": str(tmp_path / "84"),
                                "data": ["synthetic:,num_samples=12,image_size=64"]}), log=lines.append)
    assert run.cfg.image_size == 84 and run.features.layout["features"].size == 6
    assert any("made for 56x56: position embeddings interpolated from 4x4 to 6x6 patches" in s for s in lines)


def test_an_encoder_output_that_is_not_a_feature_map_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_encoders.py").write_text(
        "import torch\n"
        "class Pooled(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x.mean(dim=(2, 3))\n"
        "class Tokens(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x.flatten(2).transpose(1, 2)\n"
        "class Broken(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.linear(x, torch.zeros(5, 7))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "Pooled": "backbone output 'features' must be a (B, C, h, w) feature map, got (1, 3) (an embedding per image",
        "Tokens": "got (1, 4096, 3) (tokens? reshape",
        "Broken": "fails on a 64x64 image: RuntimeError: ",
    }
    for name, expected in cases.items():
        message = _refused({"backbone": f"my_encoders:{name}", "image_size": 64}, tmp_path)
        assert message.startswith(f"--backbone my_encoders:{name}") and expected in message, message
    out = tmp_path / "cli"
    assert main(["--backbone", "my_encoders:Pooled", "--out", str(out)]) == 2
    assert "feature map" in capsys.readouterr().err and not out.exists()


def test_preprocessing_and_weights_are_in_the_fingerprint(files, tmp_path):
    def fingerprint(spec, weights=None):
        backbone = load_backbone(spec, weights=weights, log=None)
        return feature_fingerprint(backbone, {"letterbox": 64}, 64, "fp32", torch.float16)

    own = fingerprint(f"hf:{files['sam']}")
    assert own == fingerprint(f"hf:{files['sam']}")
    assert own != fingerprint(f"hf:{files['sam']}", files["ddp"])
    assert fingerprint(f"hf:{files['sam']}", files["ddp"]) == fingerprint(f"hf:{files['sam']}", files["lightning"])
    assert own != fingerprint(f"hf:{files['sam']},layers=early")
    other = tmp_path / "sam-other-mean"  # the same weights, normalized differently
    shutil.copytree(files["sam"], other)
    processor = json.loads((other / "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.5, 0.5, 0.5]
    (other / "preprocessor_config.json").write_text(json.dumps(processor))
    assert own != fingerprint(f"hf:{other}")


def test_a_resumed_run_needs_the_weights_it_was_trained_on(files, tmp_path, capsys):
    weights = tmp_path / "encoder.pth"
    shutil.copy(files["ddp"], weights)
    out = tmp_path / "run"
    _train(["--backbone", f"hf:{files['sam']}", "--backbone-weights", str(weights), "--out", str(out)], capsys)
    config, checkpoint = plan_resume(out, [{"epochs": 2}])
    assert checkpoint["backbone"]["digest"] and prepare(config, resume=checkpoint, log=lambda line: None)
    config_before = (out / "config.yaml").read_text()

    tuned = files["tuned_encoder"]
    torch.save({f"module.{k}": v + 0.01 for k, v in tuned.state_dict().items()}, weights)  # the file was replaced
    config, checkpoint = plan_resume(out, [{"epochs": 2}])
    with pytest.raises(CheckpointError, match="is not the one the run was trained on") as error:
        prepare(config, resume=checkpoint, log=lambda line: None)
    assert str(weights) in str(error.value) and (out / "config.yaml").read_text() == config_before


def test_the_encoder_runs_under_the_runs_autocast(files):
    from pyfast.models import probe
    from pyfast.train.features import FeatureProvider
    from pyfast.train.setup import autocast_for

    cpu = torch.device("cpu")
    backbone = load_backbone(f"hf:{files['dinov2']}", log=None)
    layout = probe(backbone, 56, cpu)
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fp32 = FeatureProvider(backbone, layout, ["features"], None, cpu, autocast_for(cpu, "fp32")).compute(images)
    bf16 = FeatureProvider(backbone, layout, ["features"], None, cpu, autocast_for(cpu, "bf16")).compute(images)
    x = images.float() / 255
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = backbone(x)
    torch.testing.assert_close(bf16["features"], direct, rtol=0, atol=0)  # the provider's autocast is the run's
    assert not bf16["features"].requires_grad and all(not p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    # bf16 changed the numbers (autocast was on), by about bf16's resolution and no more
    difference = (bf16["features"].float() - fp32["features"]).abs()
    assert difference.max() > 0
    torch.testing.assert_close(bf16["features"].float(), fp32["features"], rtol=0.05, atol=0.1)
