"""Multi-scale and flip testing: merging the passes, undoing the flip, evaluate.py --test-sizes end to end.

Covered: class-wise NMS across passes removes duplicates of one object but keeps other classes and other
objects, sorts by score and keeps the top k; one pass is left as it is; a mirrored batch keeps its padding
at the bottom / right and its boxes map back exactly onto the original image; evaluate.py on a tiny trained
FCOS runs at three scales with flips, writes its own results file, and with the test size alone gives the
single-scale detections and AP.
"""

import json

import pytest
import torch

import evaluate
import train
from bench import multiscale
from data.synthetic import BuiltinSpec, ensure_builtin
from data.transforms import hflip_matrix, scale_matrix
from engine.checkpoint import atomic_save, load_checkpoint
from engine.config import resolve_config
from engine.evaluation import boxes_to_original, hflip_batch, merge_detections
from structures import warp_boxes

SPEC = dict(num_train=24, num_val=6, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)


def dets(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


# --------------------------------------------------------------------------------------------------------
# merge_detections
# --------------------------------------------------------------------------------------------------------


def test_merge_suppresses_duplicates_across_passes_and_keeps_other_classes():
    small = dets([[10, 10, 50, 50], [100, 100, 140, 140]], [0.9, 0.6], [0, 1])
    large = dets([[11, 11, 51, 51],  # the same cat again (IoU 0.9): suppressed by the better-scored one
                  [12, 12, 52, 52],  # the same place, another class: kept
                  [30, 10, 70, 50]],  # a cat overlapping the first by IoU 1/3 < 0.5: another object, kept
                 [0.8, 0.7, 0.65], [0, 1, 0])
    merged = merge_detections([small, large], iou_threshold=0.5, max_detections=100)
    assert merged["boxes"].shape == (4, 4) and merged["scores"].shape == (4,) and merged["labels"].shape == (4,)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.65, 0.6])  # by decreasing score
    assert merged["labels"].tolist() == [0, 1, 0, 1]
    assert merged["boxes"].tolist() == [[10, 10, 50, 50], [12, 12, 52, 52], [30, 10, 70, 50], [100, 100, 140, 140]]
    # A lower threshold also counts the IoU-1/3 cat as a duplicate.
    assert merge_detections([small, large], iou_threshold=0.3, max_detections=100)["scores"].tolist() == \
        pytest.approx([0.9, 0.7, 0.6])


def test_merge_keeps_the_top_k():
    passes = [dets([[10 * i, 0, 10 * i + 8, 8]], [s], [0]) for i, s in enumerate([0.1, 0.5, 0.3, 0.9])]
    merged = merge_detections(passes, iou_threshold=0.5, max_detections=2)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.5])
    assert merged["boxes"].tolist() == [[30, 0, 38, 8], [10, 0, 18, 8]]


def test_one_pass_is_left_as_it_is_and_empty_passes_give_nothing():
    # Two overlapping boxes of one class that the detector's own NMS (e.g. FCOS at 0.6) let through.
    one = dets([[0, 0, 10, 10], [0, 0, 10, 11]], [0.8, 0.7], [2, 2])
    merged = merge_detections([one], iou_threshold=0.5, max_detections=100)
    assert all(torch.equal(merged[key], one[key]) for key in one)
    assert merge_detections([one], iou_threshold=0.5, max_detections=1)["scores"].tolist() == pytest.approx([0.8])
    empty = dets([], [], [])
    merged = merge_detections([empty, empty], iou_threshold=0.5, max_detections=100)
    assert merged["boxes"].shape == (0, 4) and merged["scores"].shape == (0,) and merged["labels"].dtype == torch.int64


# --------------------------------------------------------------------------------------------------------
# hflip_batch
# --------------------------------------------------------------------------------------------------------


def test_a_mirrored_batch_maps_back_exactly():
    # Two originals, 40 x 60 and 30 x 20 (h x w), resized by 1.5 and 2 into a batch padded to 64 x 96.
    orig_sizes = [(40, 60), (30, 20)]
    matrices = torch.stack([scale_matrix(1.5, 1.5), scale_matrix(2.0, 2.0)])  # (2, 3, 3) original -> batch
    image_sizes = torch.tensor([[60, 90], [60, 40]])
    images = torch.zeros(2, 3, 64, 96)
    objects = torch.tensor([[[6.0, 4.0, 22.0, 20.0]], [[2.0, 10.0, 8.0, 24.0]]])  # (2, 1, 4) original pixels
    for i in range(2):  # a bright object where each original's box lands in the batch frame
        x1, y1, x2, y2 = warp_boxes(objects[i], matrices[i])[0].round().long().tolist()
        images[i, :, y1:y2, x1:x2] = 1.0

    flipped, flipped_matrices = hflip_batch(images, image_sizes, matrices)
    assert flipped.shape == images.shape and flipped_matrices.shape == (2, 3, 3)
    assert flipped_matrices.dtype == torch.float64 and torch.equal(matrices, torch.stack(  # input untouched
        [scale_matrix(1.5, 1.5), scale_matrix(2.0, 2.0)]))
    for i, (h, w) in enumerate(image_sizes.tolist()):
        assert flipped[i, :, h:].abs().sum() == 0 and flipped[i, :, :, w:].abs().sum() == 0  # padding stays put
        assert torch.equal(flipped_matrices[i], hflip_matrix(w) @ matrices[i])
        # What a detector finds in the mirrored image (the bright pixels' enclosing box) ...
        ys, xs = torch.nonzero(flipped[i, 0], as_tuple=True)
        found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        # ... lands on the original object, and the original object goes there and back unchanged.
        assert torch.equal(boxes_to_original(found, flipped_matrices[i], orig_sizes[i]), objects[i])
        there = warp_boxes(objects[i], flipped_matrices[i])
        assert torch.equal(boxes_to_original(there, flipped_matrices[i], orig_sizes[i]), objects[i])
    again, _ = hflip_batch(flipped, image_sizes, flipped_matrices)
    assert torch.equal(again, images)  # mirroring twice gives the batch back


# --------------------------------------------------------------------------------------------------------
# evaluate.py --test-sizes on a tiny trained FCOS
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-iteration supervised FCOS (ResNet-18, 32-channel FPN) on 64 px images, its class bias raised to a
    prior of 0.5 so that the barely trained model gives many overlapping detections to merge."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("tta")
    ensure_builtin(root / "builtin", spec=BuiltinSpec(**SPEC), num_workers=0, verbose=False)
    cfg = resolve_config(dict(
        builtin_dir=str(root / "builtin"), backbone_pretrain="", builtin_spec=SPEC, output_dir=str(root / "run"), percent=50.0,
        train_sizes=[64], train_max_size=64, test_size=64, test_max_size=64, fpn_channels=32, head_convs=1,
        labeled_batch=2, lr=0.01, warmup_iters=1, max_iter=2, eval_period=1000, checkpoint_period=2, log_period=1,
        threads=1, seed=0))
    try:
        train.train(cfg)
    finally:
        torch.set_num_threads(threads)  # train.train sets torch's thread count
    state = load_checkpoint(root / "run" / "last.pth")
    state["model"]["head.cls_logits.bias"].zero_()
    path = root / "run" / "busy.pth"
    atomic_save(state, path)
    return path


def run_evaluate(checkpoint, *flags):
    threads = torch.get_num_threads()
    try:
        return evaluate.main([str(checkpoint), "--threads", "1", *flags])
    finally:
        torch.set_num_threads(threads)


def test_multiscale_with_flips_runs_and_writes_its_own_results(checkpoint, capsys):
    single = run_evaluate(checkpoint)
    single_file = checkpoint.with_name("busy.student.results.json")
    single_results = single_file.read_text()
    capsys.readouterr()

    metrics = run_evaluate(checkpoint, "--test-sizes", "48", "64", "96", "--hflip", "--vis", "2")
    out = capsys.readouterr().out
    assert "short/long side 48/48, 64/64, 96/96, each also mirrored" in out and "IoU 0.5" in out
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AR100"))
    results = json.loads(checkpoint.with_name("busy.student.ms48-64-96-flip.results.json").read_text())
    assert single_file.read_text() == single_results  # the single-scale file is not overwritten
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert len(per_image) == SPEC["num_val"] and max(per_image.values()) <= 100  # FCOS's detections_per_image
    assert len(list(checkpoint.parent.glob("vis/*.student.ms48-64-96-flip.png"))) == 2
    assert single != metrics  # six passes merged are not the single pass


def test_the_test_size_alone_gives_the_single_scale_result(checkpoint, tmp_path):
    single = run_evaluate(checkpoint, "--out", str(tmp_path / "single.json"))
    multi = run_evaluate(checkpoint, "--test-sizes", "64", "--out", str(tmp_path / "multi.json"))
    detections = json.loads((tmp_path / "single.json").read_text())
    assert len(detections) > 6  # the raised class bias: enough detections for the comparison to mean something
    assert json.loads((tmp_path / "multi.json").read_text()) == detections
    assert multi == pytest.approx(single, nan_ok=True)


def test_bench_multiscale_rows_are_evaluate_results(checkpoint, capsys):
    threads = torch.get_num_threads()
    try:
        table = multiscale.main([f"busy={checkpoint}:student", "--sizes", "48", "64", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()[-1]  # the table's row
    single = run_evaluate(checkpoint)["AP"]  # test size 64
    small = run_evaluate(checkpoint, "--test-sizes", "48")["AP"]
    merged = run_evaluate(checkpoint, "--test-sizes", "48", "64")["AP"]
    row = table["busy"]
    assert row["64"] == pytest.approx(single) and row["48"] == pytest.approx(small)
    assert row["merged"] == pytest.approx(merged) and row["gain"] == pytest.approx(merged - single)
    assert printed.split() == ["busy", *(f"{100 * v:.2f}" for v in (small, single, merged, merged - single))]


def test_bench_multiscale_names_bad_entries(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="NAME=CHECKPOINT"):
        multiscale.main([str(checkpoint)])
    with pytest.raises(SystemExit, match="missing.pth .*does not exist"):
        multiscale.main([f"x={tmp_path / 'missing.pth'}"])
    with pytest.raises(SystemExit, match="two or more distinct sizes"):
        multiscale.main([f"x={checkpoint}", "--sizes", "64"])
