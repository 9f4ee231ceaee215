import math

import numpy as np
import pytest

from pyfast.evaluation import coco_box_ap

GT = [np.array([[10, 10, 50, 50], [60, 20, 90, 80]], np.float32), np.array([[0, 0, 30, 40]], np.float32)]


def test_perfect_boxes_score_one():
    result = coco_box_ap(GT, [g.copy() for g in GT])
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0) and result["AP75"] == pytest.approx(1.0)


def test_worse_boxes_score_lower_and_better_boxes_higher():
    rng = np.random.default_rng(0)
    jittered = [g + rng.uniform(-6, 6, g.shape).astype(np.float32) for g in GT]
    far = [g + 40 for g in GT]
    jittered_ap = coco_box_ap(GT, jittered)["AP"]
    assert 0.0 < jittered_ap < 1.0
    assert coco_box_ap(GT, far)["AP"] == pytest.approx(0.0)


def test_no_predictions_score_zero_and_no_ground_truth_is_undefined():
    empty = [np.zeros((0, 4), np.float32) for _ in GT]
    assert coco_box_ap(GT, empty)["AP"] == pytest.approx(0.0)
    assert math.isnan(coco_box_ap(empty, empty)["AP"])


def test_scores_rank_detections():
    gt = [np.array([[0, 0, 10, 10]], np.float32)]
    pred = [np.array([[50, 50, 60, 60], [0, 0, 10, 10]], np.float32)]
    good_first = coco_box_ap(gt, pred, scores=[np.array([0.1, 0.9])])["AP"]
    bad_first = coco_box_ap(gt, pred, scores=[np.array([0.9, 0.1])])["AP"]
    assert good_first == pytest.approx(1.0) and bad_first < good_first


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="pred_boxes"):
        coco_box_ap(GT, GT[:1])
    with pytest.raises(ValueError, match=r"pred_boxes\[1\]"):
        coco_box_ap(GT, [GT[0], np.zeros((1, 5))])
    with pytest.raises(ValueError, match=r"scores\[0\]"):
        coco_box_ap(GT, GT, scores=[np.ones(3), np.ones(1)])
