"""`hf:` backbones: tiny real-architecture SAM / HQ-SAM / ViT / DINOv2 models built from configs
(random weights, nothing downloaded), saved the way users get them, loaded through the public paths."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import pyfast  # noqa: E402
from pyfast.cache import make_fingerprint  # noqa: E402
from pyfast.cli.doctor import main as doctor  # noqa: E402
from pyfast.data import Letterbox, Sample  # noqa: E402
from pyfast.models import BackboneError, load_backbone, probe  # noqa: E402
from pyfast.models.hf import wrap_encoder  # noqa: E402

SAM_VISION = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                  image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1])
TOKENS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _randomize(model):
    """Non-trivial values everywhere (HF initializes some tensors to zeros or ones)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (directory, the model as built, the encoder inside it), one of each kind users have."""
    root = tmp_path_factory.mktemp("hf")
    out = {}

    sam = _randomize(transformers.SamVisionModel(transformers.SamVisionConfig(**SAM_VISION)))
    sam.save_pretrained(root / "sam-vision")
    transformers.SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(
        root / "sam-vision")
    out["sam-vision"] = (root / "sam-vision", sam, sam)

    full = _randomize(transformers.SamModel(transformers.SamConfig(vision_config=SAM_VISION)))
    full.save_pretrained(root / "sam-full")
    out["sam-full"] = (root / "sam-full", full, full.vision_encoder)

    hq = _randomize(transformers.SamHQModel(transformers.SamHQConfig(vision_config=SAM_VISION)))
    hq.save_pretrained(root / "sam-hq")
    out["sam-hq"] = (root / "sam-hq", hq, hq.vision_encoder)

    dino = _randomize(transformers.Dinov2Model(transformers.Dinov2Config(**TOKENS, image_size=56, patch_size=14)))
    dino.save_pretrained(root / "dinov2")
    transformers.BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                                      ).save_pretrained(root / "dinov2")
    out["dinov2"] = (root / "dinov2", dino, dino)

    reg = _randomize(transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**TOKENS, image_size=56, patch_size=14, num_register_tokens=4)))
    reg.save_pretrained(root / "dinov2-reg")
    out["dinov2-reg"] = (root / "dinov2-reg", reg, reg)

    dino3 = _randomize(transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**TOKENS, image_size=32, patch_size=16, num_register_tokens=4)))
    dino3.save_pretrained(root / "dinov3")
    out["dinov3"] = (root / "dinov3", dino3, dino3)

    vit = _randomize(transformers.ViTForImageClassification(
        transformers.ViTConfig(**TOKENS, image_size=32, patch_size=8, num_labels=3)))
    vit.save_pretrained(root / "vit")  # then as older repositories ship it: pytorch_model.bin
    torch.save(load_file(root / "vit" / "model.safetensors"), root / "vit" / "pytorch_model.bin")
    (root / "vit" / "model.safetensors").unlink()
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    out["vit"] = (root / "vit", vit, vit.vit)
    return out


def _reference(encoder, pixels, index, prefix_tokens, patch):
    """The HF encoder's own output for one `layers` item, reshaped to (B, C, h, w)."""
    out = encoder(pixel_values=pixels, output_hidden_states=True)
    hidden = out.last_hidden_state if index == "last" else out.hidden_states[index]
    if hidden.dim() == 4:  # SAM: the neck's map already, or (B, h, w, C) hidden states
        return hidden if index == "last" else hidden.permute(0, 3, 1, 2)
    grid = pixels.shape[-1] // patch
    return hidden[:, prefix_tokens:].reshape(hidden.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name, layers, expect", [
    ("sam-vision", "0+early+last", {"layer0": 32, "early": 32, "last": 16}),
    ("sam-full", "-1+last", {"layer2": 32, "last": 16}),
    ("sam-hq", "early+last", {"early": 32, "last": 16}),
    ("dinov2", "1+last", {"layer1": 32, "last": 32}),
    ("dinov2-reg", "0+2", {"layer0": 32, "layer2": 32}),
    ("dinov3", "1+last,size=64", {"layer1": 32, "last": 32}),
    ("vit", "last+1", {"last": 32, "layer1": 32}),
])
def test_feature_maps_equal_the_models_own_hidden_states(models, name, layers, expect):
    folder, _, encoder = models[name]
    backbone = load_backbone(f"hf:{folder},layers={layers}", log=None)
    size = backbone.input_size
    images = torch.rand(2, 3, size, size)
    maps = backbone(images)
    assert list(maps) == list(expect)  # the order asked for
    pixels = backbone.normalize(images)
    with torch.no_grad():
        for key, value in maps.items():
            ref = _reference(encoder, pixels, backbone.outputs[key], backbone._prefix_tokens, backbone.patch_size)
            assert value.shape == (2, expect[key], size // backbone.patch_size, size // backbone.patch_size)
            torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5)
            assert backbone.feature_info[key] == {"channels": expect[key], "stride": backbone.patch_size}
    assert backbone.weights_report.complete and backbone.weights_report.applied


def test_hq_sam_early_map_is_what_its_mask_decoder_fuses(models):
    folder, _, encoder = models["sam-hq"]
    backbone = load_backbone(f"hf:{folder},layers=early+last", log=None)
    images = torch.rand(1, 3, 64, 64)
    maps = backbone(images)
    with torch.no_grad():
        out = encoder(pixel_values=backbone.normalize(images))
    torch.testing.assert_close(maps["early"], out.intermediate_embeddings[0].permute(0, 3, 1, 2))
    torch.testing.assert_close(maps["last"], out.last_hidden_state)


def test_one_map_by_default_and_probe_sees_it(models):
    backbone = load_backbone(f"hf:{models['sam-full'][0]}", log=None)
    out = backbone(torch.rand(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 16, 8, 8)
    maps = probe(backbone, 64)
    assert list(maps) == ["features"] and (maps["features"].channels, maps["features"].stride) == (16, 8)
    report = backbone.weights_report  # the full SAM directory: the decoder's tensors are left out
    assert report.complete and report.unexpected and all(
        k.startswith(("mask_decoder.", "prompt_encoder.", "shared_image_embedding.")) for k in report.unexpected)


def test_sizes(models):
    sam = load_backbone(f"hf:{models['sam-vision'][0]}", log=None)
    assert sam.input_size == 64
    with pytest.raises(BackboneError, match="takes 64x64 images .* use --image-size 64"):
        sam(torch.rand(1, 3, 128, 128))
    dino = load_backbone(f"hf:{models['dinov2'][0]}", log=None)
    assert dino.input_size == 56  # the processor's crop size
    assert dino(torch.rand(1, 3, 84, 84)).shape == (1, 32, 6, 6)  # any multiple of the patch size
    with pytest.raises(BackboneError, match="not a multiple of the patch size 14"):
        dino(torch.rand(1, 3, 60, 60))
    assert load_backbone(f"hf:{models['dinov2-reg'][0]},size=28", log=None).input_size == 28
    assert load_backbone(f"hf:{models['dinov2-reg'][0]}", log=None).input_size == 224  # documented default
    vit = load_backbone(f"hf:{models['vit'][0]}", log=None)
    assert vit.input_size == 32 and vit(torch.rand(1, 3, 48, 48)).shape == (1, 32, 6, 6)  # interpolated positions


def _processor_pixels(processor, image, **options):
    return processor(images=image, return_tensors="pt", **options)["pixel_values"]


def test_preprocessing_matches_the_image_processor(models):
    rng = np.random.default_rng(0)
    # SAM: the processor resizes the longest side to 64 and pads; pyfast's letterbox does the same
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    sample = Sample(image=image, prompt_boxes=np.zeros((1, 4), np.float32), boxes=np.zeros((1, 4), np.float32),
                    masks=np.zeros((1, 96, 128), bool), key="k", source="s", file="f")
    boxed = Letterbox(64)(sample).image[None].float() / 255  # uint8 (3, S, S); the trainer divides on the device
    folder = models["sam-vision"][0]
    backbone = load_backbone(f"hf:{folder}", log=None)
    ours = backbone.normalize(boxed)
    theirs = _processor_pixels(transformers.AutoImageProcessor.from_pretrained(folder), image)
    torch.testing.assert_close(ours[..., :48, :], theirs[..., :48, :], rtol=0, atol=1e-5)  # the image
    # the pad: SAM's processor pads the normalized image with 0 (the mean colour), pyfast with black
    assert torch.count_nonzero(theirs[..., 48:, :]) == 0
    black = (0 - backbone.mean) / backbone.std
    torch.testing.assert_close(ours[..., 48:, :], black.expand_as(ours[..., 48:, :]))

    # ViT and DINOv2: their processors squash or crop (the letterbox replaces that); the normalization
    # is theirs, compared on one image with their resizing off
    for name in ("vit", "dinov2"):
        folder = models[name][0]
        backbone = load_backbone(f"hf:{folder}", log=None)
        size = backbone.input_size
        square = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        theirs = _processor_pixels(processor, square, do_resize=False, do_center_crop=False)
        ours = backbone.normalize(torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert backbone.preprocess["mean"] == list(processor.image_mean)
        assert backbone.preprocess["normalization_from"] == "preprocessor_config.json"


def test_frozen_eval_no_grad_and_fingerprinted(models):
    folder = models["vit"][0]
    a = load_backbone(f"hf:{folder}", log=None)
    a.train()
    assert not a.training and not a.model.training
    assert not any(p.requires_grad for p in a.parameters())
    assert not a(torch.rand(1, 3, 32, 32)).requires_grad
    b = load_backbone(f"hf:{folder},layers=1", log=None)
    assert a.preprocess != b.preprocess and make_fingerprint(a) != make_fingerprint(b)  # same weights, other map
    assert make_fingerprint(a, a.preprocess) == make_fingerprint(load_backbone(f"hf:{folder}", log=None), a.preprocess)


def test_weights_users_have_load_into_the_encoder(models, tmp_path):
    folder, _, encoder = models["sam-vision"]
    state = encoder.state_dict()
    lightning = tmp_path / "finetune.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"image_size": 64}, "epoch": 1}, lightning)
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, ddp)
    config_only = tmp_path / "config-only"  # the architecture from config.json, the weights from elsewhere
    config_only.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, config_only / name)
    images = torch.rand(1, 3, 64, 64)
    expected = load_backbone(f"hf:{folder}", log=None)(images)
    for path, prefix in ((lightning, "model."), (ddp, "module.")):
        backbone = load_backbone(f"hf:{config_only}", weights=path, log=None)
        assert backbone.weights_report.prefix == prefix and backbone.weights_report.complete
        torch.testing.assert_close(backbone(images), expected, rtol=0, atol=0)
    assert backbone.weights_report.source == str(ddp)

    # ViT's checkpoint keys are transformers' saved names (encoder.layer.N.attention.attention.query),
    # also through a DDP prefix into pyfast.load_weights directly
    vit_folder, vit, _ = models["vit"]
    vit_state = {f"module.{k}": v for k, v in vit.state_dict().items()}
    fresh = transformers.ViTModel(vit.config, add_pooling_layer=False)
    report = pyfast.load_weights(fresh, vit_folder, log=None)
    assert report.complete and report.prefix == "vit." and set(report.unexpected) == {"classifier.weight", "classifier.bias"}
    torch.save(vit_state, tmp_path / "vit-ddp.pt")
    report = pyfast.load_weights(transformers.ViTModel(vit.config, add_pooling_layer=False), tmp_path / "vit-ddp.pt",
                                 log=None)
    assert report.complete and report.prefix == "module.vit."


def test_a_checkpoint_from_another_config_is_refused(models, tmp_path):
    folder = models["sam-vision"][0]
    other = transformers.SamVisionModel(transformers.SamVisionConfig(**{**SAM_VISION, "hidden_size": 48}))
    wrong = tmp_path / "wrong-config.pt"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(pyfast.WeightsError, match=r"another shape .* vision_encoder\.pos_embed") as error:
        load_backbone(f"hf:{folder}", weights=wrong, log=None)
    assert str(wrong) in str(error.value) and "\n" not in str(error.value)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"backbone.conv1.weight": torch.zeros(4, 3, 3, 3)}, unrelated)
    with pytest.raises(pyfast.WeightsError, match="nothing matched"):
        load_backbone(f"hf:{folder}", weights=unrelated, log=None)
    with pytest.raises(TypeError, match="loads completely"):
        load_backbone(f"hf:{folder}", weights=unrelated, min_fraction=0.5, log=None)


def test_sharded_save_pretrained_directory(models, tmp_path):
    _, sam, _ = models["sam-vision"]
    sam.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    backbone = load_backbone(f"hf:{tmp_path / 'sharded'}", log=None)
    assert "shards" in backbone.weights_report.format
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(backbone(images), load_backbone(f"hf:{models['sam-vision'][0]}", log=None)(images))


def test_a_cached_model_id_loads_offline(models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--sam-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(models["sam-vision"][0], snapshot)
    (cache / "models--acme--sam-tiny" / "refs").mkdir()
    (cache / "models--acme--sam-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    backbone = load_backbone("hf:acme/sam-tiny", log=None)
    assert backbone.input_size == 64 and backbone.weights_report.complete
    with pytest.raises(BackboneError, match="not in the Hugging Face cache .* never downloads") as error:
        load_backbone("hf:acme/not-here", log=None)
    assert "\n" not in str(error.value)


def test_bad_specs_are_one_line_errors(models, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    sam = models["sam-vision"][0]
    cases = [
        (f"hf:{tmp_path / 'nowhere'}", "no such model directory"),
        (f"hf:{tmp_path / 'empty'}", "no config.json"),
        (f"hf:{tmp_path / 'bert'}", "model_type 'bert' is not supported"),
        (f"hf:{sam},layers=7", "has 2 blocks"),
        (f"hf:{sam},layers=1+1", "already chosen"),
        (f"hf:{sam},layers=early+2", "already chosen"),
        (f"hf:{sam},colour=red", "unknown option 'colour'"),
        (f"hf:{sam},size=128", "takes only 64x64"),
        (f"hf:{models['vit'][0]},layers=early", "layers=early is SAM's"),
        (f"hf:{models['dinov2'][0]},size=60", "not a multiple of the patch size 14"),
    ]
    for spec, expected in cases:
        with pytest.raises(BackboneError, match=expected) as error:
            load_backbone(spec, log=None)
        assert "\n" not in str(error.value), spec
    (tmp_path / "weightless").mkdir()
    shutil.copy(sam / "config.json", tmp_path / "weightless" / "config.json")
    with pytest.raises(pyfast.WeightsError, match="not a model directory: none of model.safetensors"):
        load_backbone(f"hf:{tmp_path / 'weightless'}", log=None)


def test_missing_transformers_is_a_clear_error(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BackboneError, match=r"need the transformers package.*pyfast\[hf\]"):
        load_backbone(f"hf:{models['sam-vision'][0]}", log=None)


def test_wrap_an_in_memory_encoder():
    model = _randomize(transformers.SamVisionModel(transformers.SamVisionConfig(**SAM_VISION)))
    backbone = wrap_encoder(model, layers="early+last")
    assert backbone.input_size == 64 and set(backbone(torch.rand(1, 3, 64, 64))) == {"early", "last"}
    with pytest.raises(BackboneError, match="cannot wrap"):
        wrap_encoder(torch.nn.Linear(2, 2))


def test_doctor_checks_a_lightning_checkpoint_against_an_hf_model(models, tmp_path, capsys):
    folder, _, encoder = models["sam-full"]
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in encoder.state_dict().items()},
                "hyper_parameters": {"lr": 1e-4}}, path)
    assert doctor(["checkpoint", str(path), "--model", f"hf:{folder}"]) == 0
    out = capsys.readouterr().out
    assert "prefix       'model.' stripped, 'vision_encoder.' added" in out and "missing      0" in out
    assert "verdict      OK: every tensor of the model loads" in out


def test_pyfast_train_runs_on_an_hf_backbone(models, tmp_path, capsys):
    from pyfast.cli.train import main as train

    (tmp_path / "tiny.yaml").write_text("roi_size: 4\nhidden: 8\n")
    out = tmp_path / "run"
    code = train(["--backbone", f"hf:{models['sam-vision'][0]}", "--epochs", "1", "--image-size", "64",
                  "--data", "synthetic:,num_samples=16,image_size=64", "--batch-size", "8",
                  "--config", str(tmp_path / "tiny.yaml"), "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
