"""Training-step time and evaluation throughput of the detectors on the built-in preset.

    python bench/train_speed.py                         # FCOS, the built-in preset (batch 8, 128 px, ResNet-18)
    python bench/train_speed.py --detectors fcos retinanet faster_rcnn --steps 20

One training step is what train.py does for `--method supervised`: load a labeled batch, supervised losses,
backward, clip, SGD step. Evaluation is `engine.evaluation.evaluate` (prediction + COCOeval) over val images.
Prints a table; times are wall-clock on this machine, after a few warm-up steps.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages

import detectors  # noqa: E402
from data.coco import CocoDetection  # noqa: E402
from data.loader import build_train_loader, build_val_loader  # noqa: E402
from data.transforms import build_eval_transform, build_labeled_transform  # noqa: E402
from engine.config import dataset_files, detector_kwargs, resolve_config  # noqa: E402
from engine.evaluation import evaluate, load_coco  # noqa: E402


def time_training(cfg, train_set, *, steps: int, warmup: int) -> dict:
    detector = detectors.build_detector(cfg.detector, num_classes=train_set.num_classes, **detector_kwargs(cfg))
    detector.model.train()
    params = [p for p in detector.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr * 0.1, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = build_train_loader(train_set, batch_size=cfg.labeled_batch, seed=cfg.seed, num_workers=cfg.num_workers,
                                size_divisible=cfg.size_divisible)
    step_times, data_times = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        batch = next(loader)
        loaded = time.perf_counter()
        losses = detectors.supervised_losses(detector, batch.images, batch.image_sizes, batch.targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        optimizer.step()
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            data_times.append(loaded - start)
    return {"detector": detector, "step": statistics.mean(step_times), "median": statistics.median(step_times),
            "step_std": statistics.stdev(step_times) if len(step_times) > 1 else 0.0,
            "data": statistics.mean(data_times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", nargs="+", default=["fcos"], choices=detectors.DETECTORS)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per detector")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--eval-images", type=int, default=64, help="val images for the throughput (0: all)")
    parser.add_argument("--batch", type=int, default=0, help="labeled batch (default: the preset's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)

    rows = []
    for name in args.detectors:
        overrides = {"detector": name} | ({"labeled_batch": args.batch} if args.batch else {})
        cfg = resolve_config(overrides)
        files = dataset_files(cfg)
        train_set = CocoDetection(files.train_json, files.train_images,
                                  transform=build_labeled_transform(short_sides=cfg.train_sizes,
                                                                    max_size=cfg.train_max_size))
        val_set = CocoDetection(files.val_json, files.val_images,
                                transform=build_eval_transform(cfg.test_size, cfg.test_max_size))
        timing = time_training(cfg, train_set, steps=args.steps, warmup=args.warmup)

        val_loader = build_val_loader(val_set, batch_size=cfg.labeled_batch, size_divisible=cfg.size_divisible)
        start = time.perf_counter()
        result = evaluate(timing["detector"], val_loader, coco_gt=load_coco(files.val_json),
                          category_ids=val_set.label_to_category_id, class_names=val_set.class_names,
                          max_images=args.eval_images or None)
        eval_total = time.perf_counter() - start
        rows.append((name, cfg.backbone, cfg.labeled_batch, f"{min(cfg.train_sizes)}-{max(cfg.train_sizes)}",
                     f"{timing['step']:.3f} +- {timing['step_std']:.3f}", f"{timing['median']:.3f}",
                     f"{timing['data']:.3f}",
                     f"{cfg.labeled_batch / timing['step']:.1f}", f"{result.num_images / result.seconds:.1f}",
                     f"{result.num_images / eval_total:.1f}"))

    header = ("detector", "backbone", "batch", "train px", "step s", "median s", "data s", "train img/s",
              "predict img/s", "eval img/s")
    widths = [max(len(h), *(len(r[i]) if isinstance(r[i], str) else len(str(r[i])) for r in rows))
              for i, h in enumerate(header)]
    print(f"\nbuilt-in preset, {torch.get_num_threads()} threads, {args.steps} timed steps "
          f"(eval: prediction only, and prediction + COCOeval)")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
