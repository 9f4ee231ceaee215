import numpy as np
import pytest

from pyfast.data import BadSample, CocoSource, NpzSource, Sample, SyntheticSource, inspect_sample
from pyfast.data.inspection import (
    EDGE_TOLERANCE_PX,
    MASK_BOX_MIN_IOU,
    MASK_BOX_SLACK_PX,
    inspect_objects,
    mask_boxes,
)
from pyfast.data.validate import MAX_BOX_IMAGE_SIZES, check_box_range

from .builders import COCO_GOOD, NPZ_FINDINGS, NPZ_FINDINGS_BAD, load_all, make_npz_findings_set

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def sample_of(boxes, masks):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    height, width = masks.shape[1:]
    return Sample(image=np.zeros((height, width, 3), np.uint8), prompt_boxes=boxes, boxes=boxes, masks=masks,
                  key="k", source="s", file="f.npz")


def kinds(findings):
    return {(finding.kind, finding.object) for finding in findings}


def test_each_planted_warning_is_found_on_its_object_and_nothing_else(tmp_path):
    source = NpzSource(make_npz_findings_set(tmp_path / "npz"))
    good, bad = load_all(source)
    assert {file: error.category for file, error in bad.items()} == NPZ_FINDINGS_BAD
    expected = {file: {kind for kind in found if kind[1] is not None} for file, found in NPZ_FINDINGS.items()}
    found = {file: kinds(inspect_sample(sample)) for file, sample in good.items()}
    assert found == {"clean.npz": set(), **expected}
    for finding in inspect_sample(good["mismatch.npz"]):
        assert finding.file == "mismatch.npz" and "IoU 0.00" in finding.detail and "[14, 2, 30, 20]" in finding.detail


def test_clean_data_has_no_findings(coco_set):
    synthetic = SyntheticSource(num_samples=60, image_size=64, seed=3)
    for i in range(len(synthetic)):
        assert inspect_sample(synthetic.load(i)) == [], synthetic.describe(i)
    ann_file, images_dir, _ = coco_set
    coco = CocoSource(ann_file, images_dir)
    good, _ = load_all(coco)
    assert sorted(good) == sorted(COCO_GOOD)
    for file, sample in good.items():  # polygons and RLEs rasterized by pycocotools agree with their bboxes
        assert inspect_sample(sample) == [], file


def test_mask_boxes_match_a_per_mask_reference():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 13, 17)) < rng.random((40, 1, 1)) ** 4
    masks[:5] = False  # empty
    masks[5, 12, 16] = True  # one pixel in the corner
    boxes, nonempty = mask_boxes(masks)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        assert nonempty[k] == bool(len(xs))
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        np.testing.assert_array_equal(boxes[k], np.asarray(expected, dtype=np.float64))
    empty_boxes, empty_nonempty = mask_boxes(np.zeros((0, 5, 6), bool))
    assert empty_boxes.shape == (0, 4) and empty_nonempty.shape == (0,)


def box_mask_iou_reference(box, mask):
    """float64, one object at a time: IoU of the clipped, grown box and the mask's grown box."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = (float(v) for v in box)
    a = [max(x1, 0) - MASK_BOX_SLACK_PX, max(y1, 0) - MASK_BOX_SLACK_PX,
         min(x2, width) + MASK_BOX_SLACK_PX, min(y2, height) + MASK_BOX_SLACK_PX]
    b = [xs.min() - MASK_BOX_SLACK_PX, ys.min() - MASK_BOX_SLACK_PX, xs.max() + 1 + MASK_BOX_SLACK_PX,
         ys.max() + 1 + MASK_BOX_SLACK_PX]
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_mismatch_flags_follow_the_documented_threshold_on_random_objects():
    rng = np.random.default_rng(1)
    height, width = 30, 40
    boxes, masks = [], []
    for _ in range(300):
        x1, y1 = rng.uniform(-5, width), rng.uniform(-5, height)
        box = [x1, y1, x1 + rng.uniform(0.5, 25), y1 + rng.uniform(0.5, 25)]
        mask = np.zeros((height, width), bool)
        mx, my = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        mask[my : my + int(rng.integers(1, 20)), mx : mx + int(rng.integers(1, 20))] = True
        boxes.append(box)
        masks.append(mask)
    boxes, masks = np.asarray(boxes, np.float32), np.stack(masks)
    flags, _, iou = inspect_objects(boxes, masks)
    checked = 0
    for k in range(len(boxes)):
        x1, y1, x2, y2 = boxes[k].astype(np.float64)
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            assert flags["box outside the image"][k] and not flags["mask disagrees with its box"][k]
            continue
        reference = box_mask_iou_reference(boxes[k], masks[k])
        assert iou[k] == pytest.approx(reference, rel=1e-12, abs=1e-12)
        assert flags["mask disagrees with its box"][k] == (reference < MASK_BOX_MIN_IOU)
        partly = x1 < -EDGE_TOLERANCE_PX or y1 < -EDGE_TOLERANCE_PX or x2 > width + EDGE_TOLERANCE_PX or y2 > height + EDGE_TOLERANCE_PX
        assert flags["box partly outside the image"][k] == partly
        checked += 1
    assert checked > 200 and 0 < flags["mask disagrees with its box"].sum() < checked


@pytest.mark.parametrize(
    "box, mask_box, flagged",
    [
        ((10, 10, 12, 12), (10, 10, 13, 13), False),  # a 2x2 object rasterized a pixel larger: not a mismatch
        ((10, 10, 12, 12), (12, 12, 14, 14), True),  # beside its box
        ((10, 10, 30, 30), (10, 10, 30, 30), False),
        ((10, 10, 30, 30), (20, 10, 40, 30), True),  # shifted by half its width: IoU 1/3
        ((0, 0, 45, 25), (0, 0, 40, 25), False),  # past the edge: compared inside the image
    ],
)
def test_mismatch_cases(box, mask_box, flagged):
    masks = np.zeros((1, 25, 40), bool)
    x1, y1, x2, y2 = mask_box
    masks[0, y1:y2, x1:x2] = True
    findings = kinds(inspect_sample(sample_of([box], masks)))
    assert (("mask disagrees with its box", 0) in findings) == flagged


def test_small_polygons_rasterized_by_pycocotools_agree_with_their_boxes():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(2)
    boxes, masks = [], []
    for _ in range(400):
        x, y = rng.uniform(2, 40, 2)
        w, h = rng.uniform(3, 12, 2)  # thinner slivers rasterize to a few pixels and can be flagged
        angles = np.linspace(0, 2 * np.pi, int(rng.integers(3, 12)), endpoint=False) + rng.uniform(0, np.pi)
        polygon = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], 1)
        mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon.ravel().tolist()], 64, 64))) != 0
        boxes.append([polygon[:, 0].min(), polygon[:, 1].min(), polygon[:, 0].max(), polygon[:, 1].max()])
        masks.append(mask)
    flags, _, _ = inspect_objects(np.asarray(boxes, np.float32), np.stack(masks))
    assert not flags["mask disagrees with its box"].any()


def test_degenerate_boxes_and_empty_samples():
    masks = np.zeros((3, 20, 20), bool)
    masks[2, 5:9, 5:9] = True
    found = kinds(inspect_sample(sample_of([(4, 4, 4, 9), (2, 2, 8, 8), (5, 5, 9, 9)], masks)))
    assert found == {("zero-area box", 0), ("empty mask", 1)}
    assert inspect_sample(sample_of(np.zeros((0, 4)), np.zeros((0, 20, 20), bool))) == []
    edge = kinds(inspect_sample(sample_of([(-EDGE_TOLERANCE_PX, 0, 20 + EDGE_TOLERANCE_PX, 20)], np.ones((1, 20, 20), bool))))
    assert edge == set()  # within the tolerance of the edge


def test_box_range_bound():
    height, width = 10, 20
    limit = np.array([-MAX_BOX_IMAGE_SIZES * width, -MAX_BOX_IMAGE_SIZES * height,
                      (1 + MAX_BOX_IMAGE_SIZES) * width, (1 + MAX_BOX_IMAGE_SIZES) * height], np.float32)
    check_box_range(limit[None], height, width)  # on the bound: kept (and reported as a warning)
    for axis in range(4):
        beyond = limit.copy()
        beyond[axis] += -1 if axis < 2 else 1
        with pytest.raises(BadSample, match="image sizes outside") as error:
            check_box_range(np.stack([limit, beyond]), height, width, "boxes2")
        assert error.value.category == "boxes out of range" and "box 1" in error.value.reason
        assert "boxes2" in error.value.reason
