"""COCO entries that are wrong: what is dropped, what skips its image, what is a warning, and the messages."""

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pyfast.data import CocoSource, SourcePathError, build_sources, parse_data_spec

from .builders import load_all, make_coco_findings_set

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SKIPPED = {
    "conflict_a.png": "conflicting image entries",
    "/etc/hostname": "file_name outside images=",
    "../outside.png": "file_name outside images=",
    "no_bbox.png": "bad annotation",
    "short_bbox.png": "bad annotation",
    "polygon_4.png": "bad annotation",
    "odd_polygon.png": "bad annotation",
    "absurd.png": "boxes out of range",
}
FINDINGS = {
    ("annotation without category_id", "kept.png", None, 102),
    ("annotation of an unknown category", "kept.png", None, 103),
    ("annotation of an unknown image", "instances.json", None, 105),
    ("degenerate polygon part ignored", "degenerate_part.png", 0, 201),
    ("duplicate image entry", "dup_entry.png", None, None),
    ("file listed under several image ids", "kept.png", None, None),
}


@pytest.fixture
def findings_set(tmp_path):
    return make_coco_findings_set(tmp_path / "coco")


def test_one_bad_annotation_costs_that_annotation_not_the_source(findings_set):
    source = CocoSource(*findings_set)
    good, bad = load_all(source)
    assert {file: error.category for file, error in bad.items()} == SKIPPED
    assert sorted(good) == ["degenerate_part.png", "dup_entry.png", "kept.png"]
    files = [source.describe(i) for i in range(len(source))]
    assert files.count("kept.png") == 2 and files.count("dup_entry.png") == 1  # ids 1 and 5; id 3 once
    kept = files.index("kept.png")
    assert source.load(kept).boxes.tolist() == [[2.0, 3.0, 20.0, 15.0]]  # 101 only: 102, 103 dropped
    assert source.annotation_ids(kept).tolist() == [101]
    found = {(f.kind, f.file, f.object, f.annotation) for f in source.index_findings()}
    assert found == FINDINGS
    for finding in source.index_findings():
        assert finding.source == source.name and finding.detail


def test_messages_say_what_is_wrong(findings_set):
    _, bad = load_all(CocoSource(*findings_set))
    assert bad["no_bbox.png"].reason == "annotation 801: bbox is missing"
    assert bad["short_bbox.png"].reason == "annotation 901: bbox has 3 number(s), expected 4 (x, y, width, height)"
    assert bad["polygon_4.png"].reason == (
        "annotation 1001: polygon has 4 numbers; a polygon needs at least 3 points (6 numbers)")
    assert "odd count of numbers (3)" in bad["odd_polygon.png"].reason
    assert "absolute" in bad["/etc/hostname"].reason and "'..'" in bad["../outside.png"].reason
    assert "conflict_a.png" in bad["conflict_a.png"].reason and "conflict_b.png" in bad["conflict_a.png"].reason
    assert "1e+30" in bad["absurd.png"].reason
    for error in bad.values():
        assert "TypeError" not in error.reason and "non-finite" not in error.reason


def test_a_file_name_outside_images_is_never_read(findings_set, monkeypatch):
    ann_file, images_dir = findings_set
    assert (images_dir / "../outside.png").is_file()  # a real image: reading it would load fine
    source = CocoSource(ann_file, images_dir)
    read = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: read.append(path.resolve()) or original(path))
    load_all(source)
    assert read and all(path.is_relative_to(images_dir.resolve()) for path in read)


def test_a_degenerate_polygon_part_is_left_out_and_the_mask_is_the_rest(findings_set):
    source = CocoSource(*findings_set)
    index = [source.describe(i) for i in range(len(source))].index("degenerate_part.png")
    sample = source.load(index)
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[30, 5, 50, 5, 40, 25]], 40, 60))) != 0
    np.testing.assert_array_equal(sample.masks, expected[None])


def test_without_a_categories_array_categories_are_not_checked(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images_dir / "a.png")
    annotation = {"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
                                                 "annotations": [annotation]}))
    source = CocoSource(tmp_path / "a.json", images_dir)
    assert source.load(0).boxes.shape == (1, 4) and source.index_findings() == []


def write_one(tmp_path, annotation=None, **image):
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images_dir / "a.png")
    entry = {"id": 1, "file_name": "a.png", "height": 20, "width": 30, **image}
    base = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}
    annotations = [] if annotation is None else [{**base, **annotation}]
    (tmp_path / "a.json").write_text(json.dumps({"images": [entry], "annotations": annotations,
                                                 "categories": [{"id": 1, "name": "x"}]}))
    return CocoSource(tmp_path / "a.json", images_dir)


@pytest.mark.parametrize(
    "annotation, message",
    [
        ({"segmentation": {"size": [20, 30], "counts": [10, 5]}}, "counts sum to 15, expected 600"),
        ({"segmentation": {"size": [10, 30], "counts": [300]}}, "RLE size [10, 30] does not match the image 20x30"),
        ({"segmentation": {"counts": [600]}}, "needs both 'counts' and 'size'"),
        ({"segmentation": None}, "segmentation is missing"),
        ({"segmentation": []}, "empty polygon list"),
        ({"segmentation": [[1, 1, "a", 1, 6, 6]]}, "polygon is not an array of numbers"),
        ({"segmentation": [[1, 1, [2], 1, 6, 6]]}, "polygon is not an array of numbers"),
        ({"segmentation": [[1, 1, 6, 1, 1e8, 6]]}, "more than 4 image sizes outside"),
        ({"segmentation": "polygon"}, "segmentation is a string"),
        ({"bbox": "1 1 5 5"}, "bbox is a string, expected [x, y, width, height]"),
        ({"bbox": [1, 1, None, 5]}, "bbox holds None, not a number"),
    ],
)
def test_unusable_segmentations_and_bboxes_skip_the_image_with_a_reason(tmp_path, annotation, message):
    source = write_one(tmp_path, annotation)
    started = time.perf_counter()
    _, bad = load_all(source)
    assert time.perf_counter() - started < 5  # a polygon at 1e8 is refused, not rasterized for a minute
    assert list(bad) == ["a.png"] and bad["a.png"].category == "bad annotation"
    assert bad["a.png"].reason.startswith("annotation 7: ") and message in bad["a.png"].reason


def test_an_image_entry_without_a_file_name_is_named_by_its_id(tmp_path):
    source = write_one(tmp_path, file_name=None)
    _, bad = load_all(source)
    assert list(bad) == ["(image id 1)"] and bad["(image id 1)"].reason == "image entry has no file_name"


def test_malformed_entries_are_dropped_and_reported(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"file_name": "x.png"}, "junk"], "annotations": [3],
                                                 "categories": []}))
    source = CocoSource(tmp_path / "a.json", images_dir)
    assert len(source) == 0
    details = sorted(f.detail for f in source.index_findings())
    assert details == ["annotations[0] is a number; not used", "images[0] has no integer id; not used",
                       "images[1] has no integer id; not used"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{ not json", "is not valid JSON"),
        ("[1, 2]", "holds an array, expected an object"),
        ('{"annotations": []}', "has no 'images' array"),
        ('{"images": [], "annotations": {}}', "'annotations' is an object, expected an array"),
        (b"\xff\xfe{}", "is not valid JSON"),
    ],
)
def test_unreadable_annotation_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="bad.json") as error:
        CocoSource(path, tmp_path / "images")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_paths_of_the_wrong_kind_say_what_is_expected(tmp_path, findings_set):
    ann_file, images_dir = findings_set
    with pytest.raises(SourcePathError, match="is a folder; coco:PATH takes the instances JSON file"):
        CocoSource(ann_file.parent, images_dir)
    with pytest.raises(SourcePathError, match="images= path .* is not a folder"):
        CocoSource(ann_file, ann_file)
    for optional in ("", ",optional=1"):  # optional covers a missing path, not a wrong one
        with pytest.raises(SourcePathError):
            build_sources([parse_data_spec(f"coco:{ann_file.parent},images={images_dir}{optional}")], log=lambda line: None)


def test_index_stays_numpy_and_pickles(findings_set):
    source = CocoSource(*findings_set)
    for name, value in vars(source).items():
        assert not isinstance(value, (list, dict, set, tuple)), name
    clone = pickle.loads(pickle.dumps(source))
    assert [f.as_record() for f in clone.index_findings()] == [f.as_record() for f in source.index_findings()]
    assert {f: e.reason for f, e in load_all(clone)[1].items()} == {f: e.reason for f, e in load_all(source)[1].items()}


def test_max_samples_limits_the_findings_to_the_images_used(findings_set):
    source = CocoSource(*findings_set, max_samples=2)  # ids 1 (kept.png) and 2 (degenerate_part.png)
    kinds = {f.kind for f in source.index_findings()}
    assert kinds == {"annotation without category_id", "annotation of an unknown category",
                     "annotation of an unknown image", "degenerate polygon part ignored"}
