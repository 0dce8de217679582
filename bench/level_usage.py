"""Which pyramid levels get work on a preset: positives per level of FCOS and RetinaNet, RoI level of Faster R-CNN.

    python bench/level_usage.py                          # built-in preset, 200 val images at 96, 128, 160 px
    python bench/level_usage.py --images 500 --sizes 128 --fcos-range-multiplier 0.25

The validation boxes are scaled to each square size and given to the detectors' own target assignment
(`FCOSCriterion.assign`, `RetinaNetCriterion.assign`); no image is read and no network is trained. Faster R-CNN
has no per-level positives of its own: its row counts the level each ground-truth box maps to under the RoI
pooler's rule (FPN paper Eq. 1, k = floor(4 + log2(sqrt(area) / canonical scale)), clamped to P2..P5).
Prints one table row per detector and size.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages

import detectors  # noqa: E402
from engine.config import dataset_files, detector_kwargs, parse_config  # noqa: E402

LEVELS = (2, 3, 4, 5, 6, 7)


def val_boxes(json_path: Path, limit: int) -> list[torch.Tensor]:
    """xyxy float (N_i, 4) boxes of the first `limit` images of a COCO json, crowd boxes left out."""
    data = json.loads(Path(json_path).read_text())
    boxes = defaultdict(list)
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append([x, y, x + w, y + h])
    return [torch.tensor(boxes[image["id"]], dtype=torch.float32).reshape(-1, 4) for image in data["images"][:limit]]


def dense_counts(detector, boxes: list[torch.Tensor], size: int) -> dict[int, int]:
    """Positive locations (FCOS) or anchors (RetinaNet) per level, all images at `size` x `size`."""
    with torch.no_grad():
        outputs = detector.model(torch.zeros(1, 3, size, size))  # only the anchors / strides are read
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64)} for b in boxes]
    assigned = detector.criterion.assign(outputs, targets, torch.tensor([[size, size]] * len(boxes)))
    per_level = torch.split(assigned.matched >= 0, [a.shape[0] for a in outputs.anchors], dim=1)
    first = int(round(math.log2(outputs.strides[0])))
    return {first + i: int(positive.sum()) for i, positive in enumerate(per_level)}


def roi_counts(boxes: list[torch.Tensor], canonical_scale: float) -> dict[int, int]:
    """Ground-truth boxes per RoI pooling level P2..P5 (torchvision's LevelMapper with k0 = 4)."""
    every = torch.cat(boxes)
    side = ((every[:, 2] - every[:, 0]) * (every[:, 3] - every[:, 1])).sqrt()
    level = torch.floor(4 + torch.log2(side / canonical_scale + 1e-6)).clamp(2, 5)
    return {k: int((level == k).sum()) for k in range(2, 6)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["fcos", "retinanet", "faster_rcnn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 160], help="square image sides, px")
    parser.add_argument("--images", type=int, default=200, help="first N validation images")
    args, rest = parser.parse_known_args(argv)  # the rest: train.py flags, e.g. --fcos-range-multiplier 0.25
    torch.set_num_threads(1)

    print(f"{'detector':<12} {'size':>5}  " + "  ".join(f"{'P' + str(k):>6}" for k in LEVELS))
    for name in args.detectors:
        cfg = parse_config(["--detector", name, *rest])
        boxes = val_boxes(dataset_files(cfg).val_json, args.images)
        detector = detectors.build_detector(name, num_classes=1, **detector_kwargs(cfg))
        detector.model.eval()
        for size in args.sizes:
            scaled = [b * (size / cfg.test_size) for b in boxes]  # val images are stored at the test size
            counts = (roi_counts(scaled, cfg.roi_canonical_scale) if name == "faster_rcnn"
                      else dense_counts(detector, scaled, size))
            print(f"{name:<12} {size:>5}  " + "  ".join(f"{counts[k]:>6}" if k in counts else f"{'-':>6}"
                                                        for k in LEVELS))


if __name__ == "__main__":
    main()
