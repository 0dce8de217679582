"""The statistics of a dataset that matter to the methods, next to COCO's.

    python bench/dataset_stats.py                       # the built-in dataset of the preset
    python bench/dataset_stats.py --builtin-spec seed=1 # another drawing of it

Prints, for the training and validation sets:
  * objects per image (mean, and the share of images without any);
  * object size relative to the image, sqrt(box area / image area): quartiles, and the shares under COCO's
    small / medium / large bounds carried over to this scale (32 and 96 px on a 640 x 480 image, i.e. 5.8% and
    17.3% of sqrt(image area));
  * positive locations per image for FCOS and anchors per image for RetinaNet, as counts and as a fraction of
    all locations or anchors, from the detectors' own target assignment at the test size (no image is read,
    no network trained; `bench/level_usage.py` gives the same per pyramid level).
COCO's figures beside them are quoted from the COCO detection challenge's own description (objects per image
from train2017's counts); its positive fractions are not measured here, as COCO is not on this machine.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detectors  # noqa: E402
from bench.level_usage import dense_counts, scaled_targets  # noqa: E402
from data.coco import CocoDetection  # noqa: E402
from engine.config import dataset_files, detector_kwargs, parse_config  # noqa: E402

# COCO 2017: 860,001 train instances over 118,287 images; 41% / 34% / 24% small / medium / large objects.
COCO = {"objects_per_image": 7.3, "small": 0.41, "medium": 0.34, "large": 0.24}
SMALL, LARGE = 32 / math.sqrt(640 * 480), 96 / math.sqrt(640 * 480)


def box_statistics(dataset: CocoDetection) -> dict:
    counts, relative = [], []
    for index in range(len(dataset)):
        record = dataset.record(index)
        counts.append(len(record.boxes))
        if len(record.boxes):
            wh = record.boxes[:, 2:] - record.boxes[:, :2]
            relative.extend(np.sqrt(wh[:, 0] * wh[:, 1] / (record.width * record.height)).tolist())
    relative = np.array(relative)
    return {"images": len(counts), "objects_per_image": float(np.mean(counts)),
            "empty": float(np.mean(np.array(counts) == 0)),
            "quartiles": np.percentile(relative, [25, 50, 75]).tolist() if len(relative) else [math.nan] * 3,
            "small": float(np.mean(relative < SMALL)), "large": float(np.mean(relative >= LARGE)),
            "medium": float(np.mean((relative >= SMALL) & (relative < LARGE)))}


def positive_fraction(name: str, cfg, dataset: CocoDetection, images: int) -> tuple[float, float]:
    """(positives per image, positives / all locations) of detector `name` at the test size."""
    detector = detectors.build_detector(name, num_classes=dataset.num_classes,
                                        **(detector_kwargs(cfg) | {"backbone_weights": None}))
    detector.model.eval()
    targets, sizes = scaled_targets(dataset, images, cfg.test_size)
    total_positive, total_locations = 0, 0
    for target, size in zip(targets, sizes):  # one image at a time: no padding in the denominator
        counts = dense_counts(detector, [target], size[None], cfg.size_divisible)
        total_positive += sum(counts.values())
        height, width = (math.ceil(int(s) / cfg.size_divisible) * cfg.size_divisible for s in size)
        with torch.no_grad():
            outputs = detector.model(torch.zeros(1, 3, height, width))
        total_locations += sum(a.shape[0] for a in outputs.anchors)
    count = len(targets)
    return total_positive / count, total_positive / max(total_locations, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="validation images for the positive fractions")
    args, rest = parser.parse_known_args(argv)  # the rest: train.py flags, e.g. --builtin-spec seed=1
    torch.set_num_threads(1)
    cfg = parse_config(rest)
    files = dataset_files(cfg)
    sets = {"train": CocoDetection(files.train_json, files.train_images), "val": CocoDetection(files.val_json,
                                                                                               files.val_images)}
    print(f"| statistic | {' | '.join(sets)} | COCO |")
    print("| --- | " + " | ".join("---" for _ in sets) + " | --- |")
    stats = {name: box_statistics(dataset) for name, dataset in sets.items()}
    print(f"| images | {' | '.join(str(s['images']) for s in stats.values())} | 118,287 / 5,000 |")
    objects = " | ".join(f"{s['objects_per_image']:.2f}" for s in stats.values())
    print(f"| objects per image | {objects} | {COCO['objects_per_image']} |")
    empty = " | ".join(f"{100 * s['empty']:.1f}%" for s in stats.values())
    print(f"| images without objects | {empty} | about 1% |")
    print(f"| sqrt(box / image area), quartiles | "
          + " | ".join("/".join(f"{q:.3f}" for q in s["quartiles"]) for s in stats.values()) + " | - |")
    for key in ("small", "medium", "large"):
        print(f"| {key} (COCO's bounds, relative) | " + " | ".join(f"{100 * s[key]:.0f}%" for s in stats.values())
              + f" | {100 * COCO[key]:.0f}% |")
    for name in ("fcos", "retinanet"):
        per_image, fraction = positive_fraction(name, parse_config(["--detector", name, *rest]), sets["val"],
                                                args.images)
        unit = "locations" if name == "fcos" else "anchors"
        print(f"| {name} positive {unit} per image (val, {cfg.test_size} px) | - | {per_image:.1f} "
              f"({100 * fraction:.2f}% of all) | not measured |")


if __name__ == "__main__":
    main()
