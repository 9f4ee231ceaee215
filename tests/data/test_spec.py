import argparse

import pytest

from pyfast.data import SourceSpec, add_data_arguments, data_specs_from_args, parse_data_spec


def test_parses_every_kind_and_option():
    assert parse_data_spec("synthetic:,num_samples=64") == SourceSpec(
        kind="synthetic", num_samples=64, text="synthetic:,num_samples=64"
    )
    spec = parse_data_spec("synthetic:shapes,num_samples=8,image_size=64,seed=3,max_samples=4,optional=1")
    assert (spec.path, spec.num_samples, spec.image_size, spec.seed, spec.max_samples, spec.optional) == (
        "shapes", 8, 64, 3, 4, True)
    assert spec.label == "synthetic (shapes)"
    npz = parse_data_spec("npz:/data/x,optional=1,max_samples=10")
    assert (npz.kind, npz.path, npz.optional, npz.max_samples) == ("npz", "/data/x", True, 10)
    assert npz.label == "npz (/data/x)"
    coco = parse_data_spec("coco:/d/val.json,images=/d/val2017")
    assert (coco.path, coco.images, coco.optional) == ("/d/val.json", "/d/val2017", False)


@pytest.mark.parametrize(
    "text, named",
    [
        ("lmdb:/x", "'lmdb'"),
        ("npz:/x,shuffle=1", "'shuffle'"),
        ("npz:/x,images=/y", "'images'"),  # a coco option on an npz source
        ("coco:/a.json,num_samples=3,images=/i", "'num_samples'"),
        ("npz:/x,max_samples=zero", "max_samples"),
        ("npz:/x,max_samples=0", "max_samples"),
        ("npz:/x,optional=maybe", "optional"),
        ("npz:/x,optional", "'optional'"),
        ("synthetic:,image_size=8", "image_size"),
        ("npz:", "PATH"),
        ("coco:/a.json", "images=DIR"),
        ("npz", "KIND:PATH"),
        ("npz:/x,seed=1,seed=2", "'seed'"),
    ],
)
def test_rejects_bad_specs_naming_the_culprit(text, named):
    with pytest.raises(ValueError, match=None) as error:
        parse_data_spec(text)
    assert named in str(error.value)


def test_shared_arguments_repeat_and_default():
    parser = add_data_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "synthetic:,num_samples=4", "--data", "npz:/x,optional=1", "--max-skip-fraction", "0.1"])
    assert [spec.kind for spec in args.data] == ["synthetic", "npz"]
    assert args.max_skip_fraction == 0.1
    defaults = parser.parse_args([])
    assert defaults.max_skip_fraction == 0.05
    assert [spec.kind for spec in data_specs_from_args(defaults)] == ["synthetic"]


def test_shared_arguments_report_bad_values(capsys):
    parser = add_data_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "lmdb:/x"])
    assert "unknown source kind 'lmdb'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-skip-fraction", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err
