"""engine/evaluation.py on a hand-built COCO set: known APs, frames and category ids mapped back."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine import evaluation
from engine.evaluation import boxes_to_original, coco_metrics, load_coco

CATEGORY_IDS = [3, 7, 9]  # contiguous labels 0, 1, 2 <-> these COCO ids
CLASS_NAMES = ["cat", "dog", "bird"]
IMAGES = {10: (100, 200), 20: (80, 50)}  # image id -> (h, w)
GT = [  # (image id, category id, [x, y, w, h])
    (10, 3, [10.0, 10.0, 40.0, 30.0]),
    (10, 7, [100.0, 20.0, 60.0, 60.0]),
    (20, 9, [5.0, 5.0, 20.0, 30.0]),
]


@pytest.fixture
def gt_json(tmp_path):
    coco = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, (h, w) in IMAGES.items()],
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASS_NAMES)],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, (i, c, b) in enumerate(GT)],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    return path


def view_matrix(image_id: int) -> torch.Tensor:
    """Original -> view: image 10 halved, image 20 doubled and flipped horizontally."""
    h, w = IMAGES[image_id]
    if image_id == 10:
        return torch.tensor([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1]], dtype=torch.float64)
    return torch.tensor([[-2.0, 0, 2.0 * w], [0, 2.0, 0], [0, 0, 1]], dtype=torch.float64)


def gt_in_view(image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image's ground truth as (boxes (K, 4) xyxy in the view frame, labels (K,))."""
    matrix = view_matrix(image_id)
    boxes, labels = [], []
    for i, c, (x, y, w, h) in GT:
        if i == image_id:
            corners = torch.tensor([[x, y, 1], [x + w, y + h, 1]], dtype=torch.float64) @ matrix.T  # (2, 3)
            boxes.append(torch.cat([corners[:, :2].amin(0), corners[:, :2].amax(0)]))
            labels.append(CATEGORY_IDS.index(c))
    return torch.stack(boxes).float(), torch.tensor(labels)


def fake_batch(image_ids):
    """A Batch whose pixels hold the image id, so that the fake `predict` knows which image it sees."""
    images = torch.tensor(image_ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 32, 32)
    return SimpleNamespace(images=images, image_sizes=torch.full((len(image_ids), 2), 32),
                           matrices=torch.stack([view_matrix(i) for i in image_ids]),
                           image_ids=list(image_ids), orig_sizes=[IMAGES[i] for i in image_ids], skipped_ids=[])


def run(monkeypatch, gt_json, detect, loader=None):
    """evaluation.evaluate over two one-image batches with `detect(image_id) -> detections dict`."""
    loader = loader or [fake_batch([10]), fake_batch([20])]
    monkeypatch.setattr(evaluation.detectors, "predict",
                        lambda detector, images, sizes: [detect(int(image[0, 0, 0])) for image in images])
    detector = SimpleNamespace(model=nn.Linear(1, 1))
    detector.model.train()
    result = evaluation.evaluate(detector, loader, coco_gt=load_coco(gt_json), category_ids=CATEGORY_IDS,
                                 class_names=CLASS_NAMES)
    assert detector.model.training  # put back into its previous mode
    return result


def perfect(image_id):
    boxes, labels = gt_in_view(image_id)
    return {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels}


def test_boxes_map_back_through_the_inverse_matrix():
    boxes, _ = gt_in_view(20)  # doubled and flipped
    back = boxes_to_original(boxes, view_matrix(20), IMAGES[20])
    assert torch.allclose(back, torch.tensor([[5.0, 5.0, 25.0, 35.0]]), atol=1e-5)
    # Boxes that leave the original image are clipped to it.
    outside = boxes_to_original(torch.tensor([[-10.0, -10.0, 500.0, 500.0]]), view_matrix(10), IMAGES[10])
    assert torch.equal(outside, torch.tensor([[0.0, 0.0, 200.0, 100.0]]))


def test_perfect_detections_score_one_and_map_category_ids_back(monkeypatch, gt_json, tmp_path):
    result = run(monkeypatch, gt_json, perfect)
    assert result.metrics["AP"] == pytest.approx(1.0) and result.metrics["AP50"] == pytest.approx(1.0)
    assert math.isnan(result.metrics["APl"])  # no large objects: undefined, not 0
    assert result.per_class == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0})
    assert result.num_images == 2

    written = json.loads(result.write_results_json(tmp_path / "out" / "results.json").read_text())
    got = sorted((d["image_id"], d["category_id"], d["bbox"]) for d in written)
    assert [(i, c) for i, c, _ in got] == sorted((i, c) for i, c, _ in GT)
    for (_, _, box), (_, _, expected) in zip(got, sorted(GT)):
        assert box == pytest.approx(expected, abs=1e-3)
    assert "per-class AP" in result.table() and "100.00" in result.table()


def test_no_detections_score_zero_without_crashing(monkeypatch, gt_json):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    result = run(monkeypatch, gt_json, lambda image_id: empty)
    assert result.results == [] and result.metrics["AP"] == 0.0 and result.per_class["dog"] == 0.0
    assert "0.00" in result.table()


def test_a_wrong_class_costs_that_class_only(monkeypatch, gt_json):
    def dog_called_bird(image_id):
        detections = perfect(image_id)
        detections["labels"] = torch.where(detections["labels"] == 1, 2, detections["labels"])
        return detections

    result = run(monkeypatch, gt_json, dog_called_bird)
    assert result.per_class["cat"] == pytest.approx(1.0)
    assert result.per_class["dog"] == 0.0
    assert 0.0 < result.metrics["AP"] < 1.0


def test_coco_metrics_restricts_to_the_evaluated_images(gt_json):
    # Only image 20 was evaluated: its one perfect box is all that counts.
    results = [{"image_id": 20, "category_id": 9, "bbox": [5.0, 5.0, 20.0, 30.0], "score": 0.9}]
    metrics, per_class = coco_metrics(load_coco(gt_json), results, image_ids=[20],
                                      class_names=dict(zip(CATEGORY_IDS, CLASS_NAMES)))
    assert metrics["AP"] == pytest.approx(1.0)
    assert per_class["bird"] == pytest.approx(1.0) and math.isnan(per_class["cat"])


def test_an_unreadable_image_is_left_out_of_the_scoring(monkeypatch, gt_json):
    unreadable = SimpleNamespace(image_ids=[], skipped_ids=[20])  # a batch of unreadable images only (collate)
    result = run(monkeypatch, gt_json, perfect, loader=[fake_batch([10]), unreadable])
    assert result.num_images == 1 and result.skipped_ids == [20]
    assert {r["image_id"] for r in result.results} == {10}
    assert result.metrics["AP"] == pytest.approx(1.0)  # image 20's objects are not counted as missed
    assert result.counts() == "1 images scored; 1 unreadable images left out of the scoring (image ids 20)"
