"""Which pyramid levels get work on a preset: positives per level of FCOS and RetinaNet, RoI level of Faster R-CNN.

    python bench/level_usage.py                          # built-in preset, 200 val images at 96, 128, 160 px
    python bench/level_usage.py --images 500 --sizes 128 --fcos-range-multiplier 0.25

The validation annotations (as `data.coco.CocoDetection` validates them, crowd boxes included) are scaled so
that each image's short side is the given size, and given to the detectors' own target assignment
(`FCOSCriterion.assign`, `RetinaNetCriterion.assign`); no image is read and no network is trained. Faster R-CNN
has no per-level positives of its own: its row counts the level each ground-truth box maps to under its RoI
pooler's rule (FPN paper Eq. 1, torchvision's LevelMapper with the model's canonical scale, P2..P5).
Prints one table row per detector and size.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from torchvision.ops.poolers import LevelMapper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages

import detectors  # noqa: E402
from data.coco import CocoDetection  # noqa: E402
from detectors.faster_rcnn import ROI_LEVELS  # noqa: E402
from engine.config import dataset_files, detector_kwargs, parse_config  # noqa: E402

LEVELS = (2, 3, 4, 5, 6, 7)


def scaled_targets(dataset: CocoDetection, limit: int, size: int) -> tuple[list[dict], torch.Tensor]:
    """Targets of the first `limit` images with the short side resized to `size` (the eval transform's rule):
    B dicts {"boxes" (N_i, 4) xyxy, "labels" int64 (N_i,), "crowd" (M_i, 4)}, and int (B, 2) (h, w) sizes."""
    targets, sizes = [], []
    for index in range(min(limit, len(dataset))):
        record = dataset.record(index)
        scale = size / min(record.height, record.width)
        targets.append({"boxes": torch.from_numpy(record.boxes) * scale, "labels": torch.from_numpy(record.labels),
                        "crowd": torch.from_numpy(record.crowd) * scale})
        sizes.append((round(record.height * scale), round(record.width * scale)))
    return targets, torch.tensor(sizes)


def dense_counts(detector, targets: list[dict], image_sizes: torch.Tensor, divisible: int) -> dict[int, int]:
    """Positive locations (FCOS) or anchors (RetinaNet) per level, every image on one padded canvas."""
    height, width = (math.ceil(int(side) / divisible) * divisible for side in image_sizes.amax(dim=0))
    with torch.no_grad():
        outputs = detector.model(torch.zeros(1, 3, height, width))  # only the anchors / strides are read
    assigned = detector.criterion.assign(outputs, targets, image_sizes)  # matched: (B, N), >= 0 positive
    per_level = torch.split(assigned.matched >= 0, [a.shape[0] for a in outputs.anchors], dim=1)
    first = int(round(math.log2(outputs.strides[0])))
    return {first + i: int(positive.sum()) for i, positive in enumerate(per_level)}


def roi_counts(detector, targets: list[dict]) -> dict[int, int]:
    """Ground-truth boxes per RoI pooling level P2..P5, by the model's own pooler settings."""
    pool = detector.model.roi_pool
    mapper = LevelMapper(2, 1 + ROI_LEVELS, canonical_scale=pool.canonical_scale,
                         canonical_level=pool.canonical_level)
    level = 2 + mapper([t["boxes"] for t in targets])  # (sum N_i, ) levels
    return {k: int((level == k).sum()) for k in range(2, 2 + ROI_LEVELS)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["fcos", "retinanet", "faster_rcnn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 160], help="short image sides, px")
    parser.add_argument("--images", type=int, default=200, help="first N validation images")
    args, rest = parser.parse_known_args(argv)  # the rest: train.py flags, e.g. --fcos-range-multiplier 0.25
    torch.set_num_threads(1)

    print(f"{'detector':<12} {'size':>5}  " + "  ".join(f"{'P' + str(k):>6}" for k in LEVELS))
    for name in args.detectors:
        cfg = parse_config(["--detector", name, *rest])
        files = dataset_files(cfg)
        val_set = CocoDetection(files.val_json, files.val_images)
        detector = detectors.build_detector(name, num_classes=val_set.num_classes, **detector_kwargs(cfg))
        detector.model.eval()
        for size in args.sizes:
            targets, image_sizes = scaled_targets(val_set, args.images, size)
            counts = (roi_counts(detector, targets) if name == "faster_rcnn"
                      else dense_counts(detector, targets, image_sizes, cfg.size_divisible))
            print(f"{name:<12} {size:>5}  " + "  ".join(f"{counts[k]:>6}" if k in counts else f"{'-':>6}"
                                                        for k in LEVELS))


if __name__ == "__main__":
    main()
