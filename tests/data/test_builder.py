import pytest

from pyfast.data import (
    CocoSource,
    MissingSourceError,
    NpzSource,
    SyntheticSource,
    build_sources,
    format_source_table,
    parse_data_spec,
)
from pyfast.data.builder import SourceStatus


def specs(*texts):
    return [parse_data_spec(text) for text in texts]


def test_opens_every_kind_and_logs_the_table(npz_set, coco_set):
    root, _ = npz_set
    ann_file, images_dir, _ = coco_set
    lines = []
    sources = build_sources(
        specs("synthetic:,num_samples=1500,image_size=32", f"npz:{root}", f"coco:{ann_file},images={images_dir},max_samples=4"),
        log=lines.append,
    )
    assert [type(s) for s in sources] == [SyntheticSource, NpzSource, CocoSource]
    assert [len(s) for s in sources] == [1500, 24, 4]
    expected = f"synthetic: 1,500 | npz ({root}): 24 | coco ({ann_file}): 4"
    assert sources.table == expected and lines == [expected]
    assert sources.total_samples == 1528


def test_optional_missing_source_warns_and_is_skipped(tmp_path):
    lines = []
    missing = tmp_path / "nope"
    sources = build_sources(specs("synthetic:,num_samples=3", f"npz:{missing},optional=1"), log=lines.append)
    assert len(sources) == 1
    assert any("warning" in line and str(missing) in line for line in lines)
    assert lines[-1] == f"synthetic: 3 | npz ({missing}): missing, skipped"


def test_required_missing_source_raises_naming_the_path_and_the_option(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(MissingSourceError) as error:
        build_sources(specs(f"coco:{missing},images={tmp_path}"), log=lambda line: None)
    assert str(missing) in str(error.value) and "optional=1" in str(error.value)
    with pytest.raises(MissingSourceError, match="images_gone"):
        (tmp_path / "a.json").write_text("{}")
        build_sources(specs(f"coco:{tmp_path / 'a.json'},images={tmp_path / 'images_gone'}"), log=lambda line: None)


def test_duplicate_labels_get_distinct_source_names():
    sources = build_sources(specs("synthetic:,num_samples=2", "synthetic:,num_samples=2,seed=1"), log=lambda line: None)
    assert [s.name for s in sources] == ["synthetic", "synthetic #2"]


def test_table_formatting():
    assert format_source_table([SourceStatus("synthetic", 512), SourceStatus("npz (/data/x)", 1204),
                                SourceStatus("coco (/data/val.json)", None)]) == (
        "synthetic: 512 | npz (/data/x): 1,204 | coco (/data/val.json): missing, skipped")


def test_index_findings_are_one_warning_line_before_the_table(tmp_path):
    from .builders import make_coco_findings_set

    ann_file, images_dir = make_coco_findings_set(tmp_path / "coco")
    lines = []
    build_sources(specs(f"coco:{ann_file},images={images_dir}", "synthetic:,num_samples=2"), log=lines.append)
    assert lines == [
        f"warning: coco ({ann_file}): 3 dropped (1 annotation of an unknown category, 1 annotation of an unknown "
        "image, 1 annotation without category_id); 3 warnings (1 degenerate polygon part ignored, 1 duplicate image "
        "entry, 1 file listed under several image ids) (pyfast-doctor data lists them)",
        f"coco ({ann_file}): 12 | synthetic: 2",
    ]
