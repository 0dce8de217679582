"""VOC07 AP50 (engine/evaluation.py): hand-built cases with answers worked out by hand."""

import json
import math

import numpy as np
import pytest

from engine.evaluation import Evaluation, load_coco, voc07_average_precision, voc07_metrics

NAMES = {1: "aeroplane", 2: "bicycle"}


def _gt(tmp_path, objects):
    """A COCO file of 4 images of 100 x 100; objects: (image_id, category_id, [x, y, w, h], difficult)."""
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, 5)],
            "categories": [{"id": c, "name": n} for c, n in NAMES.items()],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3],
                             "iscrowd": int(d), "difficult": int(d)} for k, (i, c, box, d) in enumerate(objects)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    return load_coco(path)


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def test_perfect_detections_score_one(tmp_path):
    objects = [(1, 1, [10, 10, 30, 20], False), (2, 1, [0, 0, 100, 100], False), (3, 2, [5, 50, 40, 40], False),
               (3, 1, [60, 60, 10, 10], True)]  # a difficult object nobody found costs nothing
    gt = _gt(tmp_path, objects)
    results = [_det(i, c, box, 0.9 - 0.1 * k) for k, (i, c, box, d) in enumerate(objects) if not d]
    mean, per_class = voc07_metrics(gt, results, image_ids=[1, 2, 3, 4], class_names=NAMES)
    assert mean == 1.0 and per_class == {"aeroplane": 1.0, "bicycle": 1.0}


def test_worked_eleven_point_case(tmp_path):
    # One class, 4 objects in 4 images. Detections by decreasing score: TP, FP (wrong place), TP, FP (a second
    # detection of image 1's object), TP; the object of image 4 is never found.
    # recall    .25  .25  .50  .50  .75
    # precision 1    1/2  2/3  1/2  3/5
    # 11 points: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6, .7 -> 3/5; t = .8, .9, 1 -> 0
    # AP = (3 * 1 + 3 * 2/3 + 2 * 3/5) / 11 = 6.2 / 11
    gt = _gt(tmp_path, [(i, 1, [10, 10, 40, 40], False) for i in range(1, 5)])
    results = [_det(1, 1, [10, 10, 40, 40], 0.9), _det(2, 1, [60, 60, 30, 30], 0.8), _det(2, 1, [12, 10, 40, 40], 0.7),
               _det(1, 1, [11, 11, 40, 40], 0.6), _det(3, 1, [10, 12, 40, 38], 0.5)]
    mean, per_class = voc07_metrics(gt, results, image_ids=[1, 2, 3, 4], class_names={1: "aeroplane"})
    assert per_class["aeroplane"] == pytest.approx(6.2 / 11, abs=1e-12)
    assert mean == pytest.approx(6.2 / 11, abs=1e-12)
    # The same curve given directly.
    recall = np.array([0.25, 0.25, 0.5, 0.5, 0.75])
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    assert voc07_average_precision(recall, precision) == pytest.approx(6.2 / 11, abs=1e-12)


def test_difficult_objects_are_neither_missed_nor_matched(tmp_path):
    gt = _gt(tmp_path, [(1, 1, [10, 10, 40, 40], False), (2, 1, [10, 10, 40, 40], True)])
    # The top detection hits the difficult object: ignored, so the next one (a true positive) keeps
    # precision 1; without the rule it would be a true positive and recall would exceed 1.
    results = [_det(2, 1, [10, 10, 40, 40], 0.9), _det(1, 1, [10, 10, 40, 40], 0.8)]
    _, per_class = voc07_metrics(gt, results, image_ids=[1, 2], class_names={1: "aeroplane"})
    assert per_class["aeroplane"] == 1.0
    # A false positive ranked above the true positive: precision 1/2 at recall 1 on every point.
    results.append(_det(1, 1, [60, 60, 10, 10], 0.95))
    _, per_class = voc07_metrics(gt, results, image_ids=[1, 2], class_names={1: "aeroplane"})
    assert per_class["aeroplane"] == pytest.approx(0.5)


def test_iou_threshold_is_strict_and_class_without_objects_is_left_out(tmp_path):
    gt = _gt(tmp_path, [(1, 1, [0, 0, 20, 10], False)])
    # IoU exactly 0.5: [0, 0, 10, 10] against [0, 0, 20, 10] -> 100 / 200; the devkit needs > 0.5.
    mean, per_class = voc07_metrics(gt, [_det(1, 1, [0, 0, 10, 10], 0.9)], image_ids=[1], class_names=NAMES)
    assert per_class["aeroplane"] == 0.0
    assert math.isnan(per_class["bicycle"]) and mean == 0.0
    _, per_class = voc07_metrics(gt, [_det(1, 1, [0, 0, 10.5, 10], 0.9)], image_ids=[1], class_names=NAMES)
    assert per_class["aeroplane"] == 1.0


def test_only_the_evaluated_images_count(tmp_path):
    gt = _gt(tmp_path, [(1, 1, [10, 10, 40, 40], False), (2, 1, [10, 10, 40, 40], False)])
    results = [_det(1, 1, [10, 10, 40, 40], 0.9)]
    assert voc07_metrics(gt, results, image_ids=[1, 2], class_names={1: "a"})[0] == pytest.approx(6 / 11)
    assert voc07_metrics(gt, results, image_ids=[1], class_names={1: "a"})[0] == 1.0


def test_table_shows_both_metrics():
    evaluation = Evaluation(metrics={"AP": 0.5, "AP50": 0.7, "AP75": 0.4, "APs": math.nan, "APm": 0.1, "APl": 0.2,
                                     "AR1": 0.1, "AR10": 0.2, "AR100": 0.3, "ARs": 0.0, "ARm": 0.1, "ARl": 0.2,
                                     "AP50_VOC07": 0.6789},
                            per_class={"aeroplane": 0.5, "bicycle": math.nan}, results=[],
                            per_class_voc07={"aeroplane": 0.75, "bicycle": math.nan})
    table = evaluation.table()
    assert "VOC07 AP50 (11-point, difficult ignored): 67.89" in table
    assert "aeroplane  50.00  75.00" in table
