import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from pycocotools.coco import COCO

from pyfast.data import CocoSource
from pyfast.data.compact import PackedBytes

from .builders import COCO_GOOD, load_all

# pycocotools' compiled decoder trips a numpy 2 deprecation on every call; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def reference_coco(ann_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def test_planted_bad_images_are_skipped_with_reasons(coco_set):
    ann_file, images_dir, expected_bad = coco_set
    good, bad = load_all(CocoSource(ann_file, images_dir))
    assert sorted(good) == sorted(COCO_GOOD)
    assert {file: error.category for file, error in bad.items()} == expected_bad
    assert "truncated" in bad["truncated.jpg"].reason
    assert "30x30" in bad["wrong_size.png"].reason and "40x60" in bad["wrong_size.png"].reason


def test_boxes_and_masks_equal_pycocotools_decoding_and_crowd_is_ignored(coco_set):
    ann_file, images_dir, _ = coco_set
    source = CocoSource(ann_file, images_dir)
    coco = reference_coco(ann_file)
    checked_objects = 0
    for i in range(len(source)):
        if source.describe(i) not in COCO_GOOD:
            continue
        sample = source.load(i)
        annotations = [a for a in coco.imgToAnns[source.image_id(i)] if not a["iscrowd"]]
        expected_masks = np.stack([coco.annToMask(a) != 0 for a in annotations]) if annotations else np.zeros((0, 40, 60), bool)
        expected_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)], np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(sample.masks, expected_masks)
        np.testing.assert_array_equal(sample.boxes, expected_boxes)
        np.testing.assert_array_equal(sample.prompt_boxes, expected_boxes)
        checked_objects += len(annotations)
    assert checked_objects == 6
    polygons = source.load([source.describe(i) for i in range(len(source))].index("polygons.png"))
    assert polygons.boxes.shape == (2, 4)  # the crowd annotation on this image is not an object


def test_grayscale_and_empty_images(coco_set):
    ann_file, images_dir, _ = coco_set
    good, _ = load_all(CocoSource(ann_file, images_dir))
    gray = good["gray.png"].image
    assert gray.shape == (40, 60, 3)
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    empty = good["empty.png"]
    assert empty.boxes.shape == (0, 4) and empty.masks.shape == (0, 40, 60)


def test_index_is_numpy_only(coco_set):
    ann_file, images_dir, _ = coco_set
    source = CocoSource(ann_file, images_dir)
    for name, value in vars(source).items():
        assert not isinstance(value, (list, COCO)), name
    assert isinstance(source._rle_counts, PackedBytes)
    assert isinstance(source._boxes, np.ndarray) and source._boxes.shape == (8, 4)  # 6 good objects, missing.png, negative_width.png


def test_keys_survive_a_move_and_change_with_the_image(tmp_path, coco_set):
    ann_file, images_dir, _ = coco_set
    keys = {file: s.key for file, s in load_all(CocoSource(ann_file, images_dir))[0].items()}
    assert len(set(keys.values())) == len(keys)
    moved = tmp_path / "moved"
    shutil.move(str(ann_file.parent), str(moved))
    source = CocoSource(moved / "instances.json", moved / "images")
    assert {file: s.key for file, s in load_all(source)[0].items()} == keys
    from PIL import Image
    Image.fromarray(np.full((40, 60, 3), 7, np.uint8)).save(moved / "images" / "empty.png")
    changed = {file: s.key for file, s in load_all(source)[0].items()}
    assert changed["empty.png"] != keys["empty.png"]
    assert changed["gray.png"] == keys["gray.png"]


def test_max_samples_takes_the_first_image_ids(coco_set):
    ann_file, images_dir, _ = coco_set
    source = CocoSource(ann_file, images_dir, max_samples=2)
    assert len(source) == 2 and [source.image_id(i) for i in range(2)] == [10, 11]


def test_unreadable_annotation_file_names_it(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="bad.json"):
        CocoSource(bad, tmp_path / "images")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="bad.json"):
        CocoSource(bad, tmp_path / "images")
