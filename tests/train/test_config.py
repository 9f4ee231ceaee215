"""One source of truth: every TrainConfig field is a flag with its help and default; flags and YAML
files share coercion and validation; the doctor scans what the trainer would train on."""

import pytest

from pyfast.cli.doctor import main as doctor
from pyfast.cli.options import config_layers, flag
from pyfast.cli.train import build_parser
from pyfast.train.config import FAST, FIELDS, ConfigError, TrainConfig, build_config, default_of, load_yaml


def test_every_field_is_a_flag_with_help_and_default():
    parser = build_parser()
    text = parser.format_help()
    for name in FIELDS:
        if name == "fast":
            continue
        option = next(a for a in parser._actions if a.dest == name)
        assert flag(name) in option.option_strings, name
        assert "(default: " in option.help, name
    assert "(default: 16)" in next(a for a in parser._actions if a.dest == "batch_size").help
    fast = next(a for a in parser._actions if a.dest == "fast").help
    for key, value in FAST.items():
        if key != "fast":
            assert f"{flag(key)} {value}" in fast
    assert "--no-iou-head" in text and "--resume" in text


def _layers(argv):
    return config_layers(build_parser().parse_args(argv))


def test_flags_and_yaml_go_through_the_same_coercion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: 3\nfeature_maps: late\nprecision: bf16\niou_head: false\n")
    from_yaml = build_config(load_yaml(path))
    from_flags = build_config(*_layers(["--lr", "1e-3", "--epochs", "3", "--feature-maps", "late", "--precision", "bf16",
                                        "--no-iou-head"]))
    assert from_yaml == from_flags
    assert from_yaml.lr == 1e-3 and from_yaml.feature_maps == ["late"] and from_yaml.iou_head is False
    assert build_config(*_layers(["--workers", "auto", "--max-steps", "none"])).workers is None

    for argv, yaml_text, words in (
        (["--epochs", "0"], "epochs: 0", "must be an integer >= 1"),
        (["--batch-size", "x"], "batch_size: x", "must be an integer >= 1"),
        (["--precision", "fp8"], "precision: fp8", "one of auto, fp32, bf16, fp16"),
        (["--val-fraction", "1"], "val_fraction: 1", "< 1"),
    ):
        with pytest.raises(ConfigError, match=words) as from_flag:
            build_config(*_layers(argv))
        assert str(from_flag.value).startswith(argv[0])
        path.write_text(yaml_text + "\n")
        with pytest.raises(ConfigError, match=words) as from_file:
            load_yaml(path)
        assert "c.yaml" in str(from_file.value)


def test_layers_defaults_fast_config_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 4\nbatch_size: 8\n")
    config = build_config(*_layers(["--fast", "--config", str(path), "--batch-size", "4"]))
    assert config.image_size == FAST["image_size"] and config.fast  # --fast
    assert config.epochs == 4  # the file over --fast
    assert config.batch_size == 4  # the flag over the file
    assert config.lr == default_of("lr")
    with pytest.raises(ConfigError, match="unknown option"):
        build_config({"learning_rate": 1})
    assert TrainConfig(epochs="5").validate().epochs == 5  # programmatic values pass the same checks


def test_data_stays_parsed_as_specs(capsys):
    config = build_config(*_layers(["--data", "synthetic:,num_samples=7", "--data", "npz:/x,optional=1"]))
    assert config.data == ["synthetic:,num_samples=7", "npz:/x,optional=1"]
    assert [s.kind for s in config.data_specs()] == ["synthetic", "npz"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data", "lmdb:/x"])
    assert "unknown source kind 'lmdb'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown source kind"):
        build_config({"data": ["lmdb:/x"]})


def test_doctor_without_data_scans_what_the_trainer_would_train_on(tmp_path, capsys):
    assert doctor(["data", "--fast", "--synthetic-samples", "24"]) == 0
    out = capsys.readouterr().out
    assert "synthetic: 24" in out and "ok: 24" in out
    config = build_config(*_layers(["--fast", "--synthetic-samples", "24"]))
    (spec,) = config.data_specs()
    assert (spec.num_samples, spec.image_size) == (24, FAST["image_size"])
    path = tmp_path / "c.yaml"
    path.write_text("synthetic_samples: 12\nimage_size: 40\nlr: 0.5\n")  # keys for training only are fine
    assert doctor(["data", "--config", str(path)]) == 0
    assert "ok: 12" in capsys.readouterr().out
    assert doctor(["data", "--image-size", "8"]) == 2
    assert "--image-size must be an integer >= 32" in capsys.readouterr().err
