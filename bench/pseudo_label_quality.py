"""How good would a checkpoint's teacher be as a pseudo-labeller? Its boxes' precision and recall per threshold.

    python bench/pseudo_label_quality.py runs/soft_teacher/checkpoint_0000400.pth
    python bench/pseudo_label_quality.py CKPT --thresholds 0.3 0.5 0.7 0.9 --images 200 --iou 0.5
    python bench/pseudo_label_quality.py CKPT --model student       # the student, e.g. to compare with the teacher

Soft Teacher keeps the teacher's detections above a score threshold as pseudo-boxes (`cls_score_thr`, 0.9 in
the paper), and the threshold trades how many objects the student is told about against how many of the boxes
it is told about are wrong. train.py logs the precision and recall of the pseudo-boxes a method actually used
(engine/pseudo_labels.py), at its one threshold and a few images per iteration; this bench shows the whole
trade at once, for one checkpoint. It runs the teacher in eval mode with the detector's own test-time
postprocessing (its lowest score, NMS and best-N cap per image; Soft Teacher's teacher pass keeps more RPN
proposals, its `teacher_rpn_*`) on the first `--images` images of the run's validation set at the run's test
size, and at each threshold keeps the detections scoring at least that much and matches them to the hidden
annotations (`match_pseudo_labels`: class-aware, IoU >= `--iou`, greedily by score). The unlabeled images come
from the same generator (built-in dataset) or the same distribution (COCO, VOC) as the validation images, so
the validation annotations stand in for the unlabeled images' hidden ones.

The table: per threshold, the kept boxes and the annotated objects per image, precision = TP / boxes and
recall = TP / objects over all the images (nan where a denominator is 0: no box kept, no object). Boxes and
annotations are compared in the network's input frame (the validation batch's targets), where the teacher
sees them; crowd regions are not objects, so a box on one counts as a false positive.

Thresholds below the detector's own lowest score (0.05 by default) see no more boxes than that one. A
supervised run's checkpoint has no teacher: its student is scored, the model a method continuing that run
starts its teacher from. So is the student of a checkpoint written before a method's teacher start (Dense
Teacher's `teacher_init`, the end of Soft Teacher's burn-in), when train.py copies the student into the
teacher, as bench/loss_balance.py does.
"""

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import detectors  # noqa: E402
from data.loader import build_val_loader  # noqa: E402
from engine.checkpoint import load_checkpoint, load_model_state  # noqa: E402
from engine.config import Config, build_method, detector_kwargs  # noqa: E402
from engine.pseudo_labels import pseudo_label_quality  # noqa: E402
from evaluate import validation_set  # noqa: E402


def precision_recall_at(thresholds: list[float], detections: list[dict[str, Tensor]],
                        targets: list[dict[str, Tensor]], *, iou: float = 0.5) -> list[dict[str, float]]:
    """The detections kept at each score threshold, scored against the ground truth.

    detections: B dicts {"boxes" (K_i, 4) xyxy, "scores" (K_i,), "labels" int64 (K_i,)}; targets: B dicts
    {"boxes" (N_i, 4) xyxy, "labels" int64 (N_i,)} in the same frame. At threshold t an image keeps its
    detections with score >= t, matched as `engine.pseudo_labels.match_pseudo_labels` does (class-aware, IoU >=
    iou, greedy by score). Returns one dict per threshold, in the given order: {"threshold", "boxes" (kept per
    image), "objects" (per image), "precision" TP / kept, "recall" TP / objects}, counts summed over the B
    images; precision nan without a kept box, recall nan without an object.
    """
    rows = []
    for threshold in thresholds:
        kept = [{key: value[d["scores"] >= threshold] for key, value in d.items()} for d in detections]
        quality = pseudo_label_quality(kept, targets, iou=iou)
        rows.append({"threshold": threshold, "boxes": quality["pseudo_num"], "objects": quality["pseudo_num_gt"],
                     "precision": quality["pseudo_precision"], "recall": quality["pseudo_recall"]})
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    """`precision_recall_at`'s rows as a fixed-width table, one line per threshold."""
    lines = [f"{'threshold':>9} {'boxes/img':>10} {'objects/img':>12} {'precision':>10} {'recall':>8}"]
    for row in rows:
        precision, recall = (f"{row[key]:.3f}" if not math.isnan(row[key]) else "nan"
                             for key in ("precision", "recall"))
        lines.append(f"{row['threshold']:9.2f} {row['boxes']:10.2f} {row['objects']:12.2f} {precision:>10} "
                     f"{recall:>8}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by train.py")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9], metavar="T",
                        help="score thresholds in [0, 1]")
    parser.add_argument("--images", type=int, default=200, help="the first N validation images")
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher",
                        help="which weights to score (a supervised run's checkpoint has only the student)")
    parser.add_argument("--iou", type=float, default=0.5, help="the IoU at which a box matches an object")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if outside := [t for t in args.thresholds if not 0.0 <= t <= 1.0]:
        parser.error(f"--thresholds must lie in [0, 1], got {outside}")
    if args.images < 1:
        parser.error(f"--images must be at least 1, got {args.images}")
    if not 0.0 < args.iou <= 1.0:
        parser.error(f"--iou must lie in (0, 1], got {args.iou}")
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.checkpoint)
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    meta = state["meta"]
    device = torch.device(args.device or cfg.device)

    # The weights to score: the teacher unless asked otherwise, the student where the teacher is not yet one.
    which = args.model
    weights = state["teacher"] if which == "teacher" else state["model"]
    if weights is None:
        print(f"{path}: a {cfg.method} run's checkpoint has no teacher: scoring its student")
        which, weights = "student", state["model"]
    method = build_method(cfg.method, cfg=cfg, detector_name=cfg.detector)  # None for a supervised run
    if which == "teacher" and method is not None and state["iteration"] <= method.teacher_init_iteration:
        # train.py copies the student into the teacher at that iteration, after this checkpoint was written.
        print(f"{path}: iteration {state['iteration']} <= the teacher's start ({method.teacher_init_iteration}): "
              f"scoring the student, from which train.py starts the teacher there")
        which, weights = "student", state["model"]
    detector = detectors.build_detector(cfg.detector, num_classes=meta["num_classes"], **detector_kwargs(cfg))
    load_model_state(detector.model, weights, path=path, what=which)
    detector.model.to(device).eval()

    # The first validation images at the test size, with the checkpoint's label map, as evaluate.py reads them.
    files, val = validation_set(cfg, meta, path=path)
    first = torch.utils.data.Subset(val, range(min(args.images, len(val))))
    loader = build_val_loader(first, batch_size=cfg.labeled_batch, num_workers=cfg.num_workers,
                              size_divisible=cfg.size_divisible)

    detections, targets, skipped = [], [], []
    with torch.no_grad():
        for batch in loader:
            skipped += batch.skipped_ids
            if not batch.image_ids:
                continue
            found = detectors.predict(detector, batch.images.to(device), batch.image_sizes.to(device))
            detections += [{key: value.cpu() for key, value in d.items()} for d in found]  # the batch frame
            targets += batch.targets  # the batch frame too
    rows = precision_recall_at(args.thresholds, detections, targets, iou=args.iou)

    print(f"{path} (iteration {state['iteration']}): {cfg.method} on {cfg.detector}, the {which}'s detections "
          f"on {len(targets)} val images ({files.val_json}), matched at IoU {args.iou:g}"
          + (f"; {len(skipped)} unreadable images left out" if skipped else ""))
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
