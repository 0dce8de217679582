"""bench/pseudo_label_quality.py: precision and recall of a detector's boxes per score threshold."""

import math

import pytest
import torch

import train
from bench import pseudo_label_quality as bench
from conftest import box_target
from data.coco import CocoDetection
from engine.checkpoint import last_checkpoint
from engine.config import dataset_files, resolve_config

SPEC = dict(num_train=16, num_val=4, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)


def detections(boxes, scores, labels) -> dict:
    """One image's detections {"boxes" (K, 4), "scores" (K,), "labels" (K,)} from plain lists."""
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def three_images() -> tuple[list[dict], list[dict]]:
    """Image 0: two objects, four boxes; image 1: one object, no box; image 2: no object, one box."""
    found = [detections([[0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30], [0, 0, 10, 10]],
                        [0.9, 0.8, 0.4, 0.35], [0, 0, 1, 0]),  # TP, wrong class, TP (below 0.5), duplicate
             detections([], [], []),
             detections([[0, 0, 5, 5]], [0.6], [0])]  # no object to find
    truth = [box_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]), box_target([[5, 5, 15, 15]], [0]),
             box_target([], [])]
    return found, truth


def test_counts_at_each_threshold():
    found, truth = three_images()
    rows = bench.precision_recall_at([0.3, 0.5, 0.9], found, truth, iou=0.5)
    assert [row["threshold"] for row in rows] == [0.3, 0.5, 0.9]
    # 0.3: 5 boxes, 2 TP (the wrong-class box, the duplicate and the box on the empty image are false).
    assert rows[0]["boxes"] == pytest.approx(5 / 3) and rows[0]["objects"] == pytest.approx(1.0)
    assert rows[0]["precision"] == pytest.approx(2 / 5) and rows[0]["recall"] == pytest.approx(2 / 3)
    # 0.5: the class-1 box at 0.4 is gone; the class-0 hit, the wrong class and the empty image's box stay.
    assert rows[1]["boxes"] == pytest.approx(1.0)
    assert rows[1]["precision"] == pytest.approx(1 / 3) and rows[1]["recall"] == pytest.approx(1 / 3)
    # 0.9: a score equal to the threshold is kept.
    assert rows[2]["boxes"] == pytest.approx(1 / 3)
    assert rows[2]["precision"] == 1.0 and rows[2]["recall"] == pytest.approx(1 / 3)
    assert all(row["objects"] == pytest.approx(1.0) for row in rows)


def test_no_box_kept_gives_nan_precision_and_no_object_nan_recall():
    found, truth = three_images()
    (row,) = bench.precision_recall_at([0.95], found, truth)
    assert math.isnan(row["precision"]) and row["recall"] == 0.0 and row["boxes"] == 0.0
    (row,) = bench.precision_recall_at([0.5], found[2:], truth[2:])  # the image without objects alone
    assert row["precision"] == 0.0 and math.isnan(row["recall"])
    assert "nan" in bench.format_table(bench.precision_recall_at([0.95], found, truth)).splitlines()[1]


def test_the_iou_decides_a_loose_box():
    found = [detections([[0, 0, 10, 6]], [0.7], [2])]  # IoU 0.6 with the object
    truth = [box_target([[0, 0, 10, 10]], [2])]
    assert bench.precision_recall_at([0.5], found, truth, iou=0.5)[0]["precision"] == 1.0
    assert bench.precision_recall_at([0.5], found, truth, iou=0.7)[0]["precision"] == 0.0


@pytest.mark.parametrize("flags, named", [(["--thresholds", "0.5", "1.5"], "--thresholds"),
                                          (["--thresholds", "-0.1"], "--thresholds"),
                                          (["--images", "0"], "--images"), (["--iou", "0"], "--iou")])
def test_bad_flags_are_named(flags, named, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pth"
    checkpoint.write_bytes(b"")
    with pytest.raises(SystemExit):
        bench.main([str(checkpoint), *flags])
    assert named in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such.pth"
    with pytest.raises(SystemExit):
        bench.main([str(missing)])
    assert str(missing) in capsys.readouterr().err


def test_a_supervised_checkpoint_scores_its_student(builtin_dir, tmp_path, capsys):
    cfg = resolve_config(dict(method="supervised", detector="fcos", builtin_dir=str(builtin_dir), backbone_pretrain="",
                              builtin_spec=SPEC, output_dir=str(tmp_path), percent=50.0, train_sizes=[64],
                              train_max_size=64, test_size=64, test_max_size=64, fpn_channels=32, head_convs=1,
                              labeled_batch=2, max_iter=1, eval_period=1000, checkpoint_period=1000, threads=1))
    train.train(cfg)
    capsys.readouterr()
    # 2 of the 4 images, one batch: the 64 px test images leave FCOS's P7 1 x 1, which GroupNorm cannot take
    # alone in a batch.
    rows = bench.main([str(last_checkpoint(tmp_path)), "--images", "2", "--thresholds", "0", "0.5"])
    out = capsys.readouterr().out
    assert "has no teacher: scoring its student" in out
    assert "(iteration 1): supervised on fcos, the student's detections on 2 val images" in out
    assert len(out.strip().splitlines()) == 2 + 1 + 2  # the note, the header, the column names, two rows

    # The objects are the first 2 validation images' annotations, crowd regions aside, at every threshold.
    files = dataset_files(cfg)
    val = CocoDetection(files.val_json, files.val_images)
    objects = sum(len(val.record(i).boxes) for i in range(2)) / 2
    assert [row["objects"] for row in rows] == pytest.approx([objects, objects])
    assert rows[0]["boxes"] >= rows[1]["boxes"]
