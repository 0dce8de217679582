"""Images per second of the full training step of every method, and how the step grows with image and batch size.

    python bench/throughput.py --quick --threads 1           # a fast run: 1 warm-up + 2 timed steps per row
    python bench/throughput.py                               # 2 + 5 steps per row
    python bench/throughput.py --amp bf16                    # the same under mixed precision
    python bench/throughput.py --scaling-method dense_teacher --sizes 96 128 192 256 --batches 2 4 8

One step is what train.py runs per iteration, through its own functions (`iteration_losses`, `optimizer_step`,
`update_teacher`): the supervised loss on the labeled batch and the method's unsupervised loss on the unlabeled
one (teacher on the weak view, student on the strong view), backward, gradient clipping, SGD step, and the
teacher's EMA update.
The model and batch sizes are the built-in preset's (ResNet-18, 64-channel FPN, 8 labeled + 4 unlabeled images
of 128 px), each method on its paper's detector, the supervised baseline on both detectors.

Batches are built once in memory (random images with 1-5 random boxes; no disk, loading is not timed); the
step is timed at an iteration past every burn-in, so that the unsupervised loss runs. An untrained teacher
scores below Soft Teacher's thresholds and would skip box jittering, so, as in bench/soft_teacher_step.py,
Soft Teacher keeps its teacher's 17 best detections per image whatever their score (the paper's count of boxes
above 0.5 per COCO image): the cost of a trained teacher. "img/s" counts the distinct images of a step,
labeled + unlabeled (Dense Teacher's labeled images are seen in both views). Times are wall-clock.
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
from bench.common import random_batch, two_views  # noqa: E402
from detectors.precision import mixed_precision  # noqa: E402
from engine.config import PAPER_DETECTOR, build_method, detector_kwargs, resolve_config  # noqa: E402
from semi.ema import EMATeacher  # noqa: E402
from train import iteration_losses, labeled_views, optimizer_step, update_teacher  # noqa: E402

NUM_CLASSES = 6  # the built-in dataset's
RUNS = [("supervised", "fcos"), ("supervised", "faster_rcnn"), ("soft_teacher", "faster_rcnn"),
        ("dense_teacher", "fcos"), ("sed", "faster_rcnn")]
TRAINED_SOFT_TEACHER = {"initial_score_thr": 0.0, "rpn_score_thr": 0.0, "cls_score_thr": 0.0,
                        "teacher_detections": 17}


def time_training_step(method_name: str, detector_name: str, *, size: int, labeled: int, unlabeled: int, amp: str,
                       steps: int, warmup: int) -> dict:
    """Mean times of the step's parts over `steps` timed steps after `warmup` untimed ones, in seconds."""
    overrides = {"method": method_name, "detector": detector_name, "labeled_batch": labeled,
                 "unlabeled_batch": unlabeled if method_name != "supervised" else 0, "amp": amp}
    if method_name == "soft_teacher":
        overrides["method_args"] = TRAINED_SOFT_TEACHER
    cfg = resolve_config(overrides)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    method = build_method(cfg.method, cfg=cfg, detector_name=cfg.detector)
    student = detectors.build_detector(cfg.detector, num_classes=NUM_CLASSES, **detector_kwargs(cfg))
    student.model.train()
    ema = EMATeacher(student.model) if method is not None else None
    teacher = student._replace(model=ema.model) if ema is not None else None
    params = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    autocast = mixed_precision("cpu", cfg.amp)
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.amp == "fp16")

    two_view_labeled = method is not None and "strong" in method.labeled_views
    batch = (two_views(labeled, size, aligned=True, generator=generator, num_classes=NUM_CLASSES) if two_view_labeled
             else random_batch(labeled, size, generator=generator, num_classes=NUM_CLASSES))
    labeled_batch, labeled_strong = labeled_views(batch)
    unlabeled_batch = (two_views(unlabeled, size, aligned=method.unlabeled_aligned, generator=generator,
                                 num_classes=NUM_CLASSES)
                       if method is not None else None)
    iteration = cfg.max_iter - 1  # past every burn-in and ramp: the unsupervised loss runs at full weight

    parts = {"forward": [], "backward": [], "ema": []}
    pseudo = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with autocast:  # as train.py: the forward passes under --amp
            out = iteration_losses(student=student, teacher=teacher, method=method, labeled=labeled_batch,
                                   labeled_strong=labeled_strong, unlabeled=unlabeled_batch, iteration=iteration,
                                   norm_stats=cfg.norm_stats)
        forward = time.perf_counter()
        optimizer_step(out.total, optimizer=optimizer, scaler=scaler, params=params, clip_grad_norm=cfg.clip_grad_norm)
        backward = time.perf_counter()
        if method is not None:
            update_teacher(ema, student.model, method, iteration)
        end = time.perf_counter()
        if step >= warmup:
            parts["forward"].append(forward - start)
            parts["backward"].append(backward - forward)
            parts["ema"].append(end - backward)
            if out.pseudo_boxes is not None:
                pseudo.append(sum(len(p["boxes"]) for p in out.pseudo_boxes) / len(out.pseudo_boxes))
    totals = [sum(values) for values in zip(*parts.values())]
    images = labeled + (unlabeled if method is not None else 0)
    return {"method": method_name, "detector": detector_name, "size": size, "labeled": labeled,
            "unlabeled": unlabeled if method is not None else 0, "images": images,
            "step": statistics.mean(totals), "std": statistics.stdev(totals) if len(totals) > 1 else 0.0,
            **{name: statistics.mean(values) for name, values in parts.items()},
            "img_s": images / statistics.mean(totals), "pseudo": statistics.mean(pseudo) if pseudo else None}


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    header = ("method", "detector", "px", "batch", "step s", "forward", "backward", "EMA", "img/s", "pseudo/img")
    lines = [(r["method"], r["detector"], str(r["size"]), f"{r['labeled']}+{r['unlabeled']}",
              f"{r['step']:.3f} +- {r['std']:.3f}", f"{r['forward']:.3f}", f"{r['backward']:.3f}",
              f"{r['ema']:.4f}", f"{r['img_s']:.1f}", "-" if r["pseudo"] is None else f"{r['pseudo']:.1f}")
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for line in lines:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--size", type=int, default=128, help="image side of the method table (the preset's 128)")
    parser.add_argument("--labeled", type=int, default=8, help="labeled images per step (the preset's 8)")
    parser.add_argument("--unlabeled", type=int, default=4, help="unlabeled images per step (the preset's 4)")
    parser.add_argument("--scaling-method", default="soft_teacher", choices=sorted(PAPER_DETECTOR),
                        help="the method of the image-size and batch-size tables (on its paper detector)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[96, 128, 192, 256],
                        help="image sides (none: no image-size table)")
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 4, 8],
                        help="labeled images per step, each with half as many unlabeled (the preset's ratio); "
                             "none: no batch-size table")
    parser.add_argument("--amp", default="", choices=["", "bf16", "fp16"], help="mixed precision, as train.py")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    torch.set_num_threads(args.threads or os.cpu_count())
    timing = dict(amp=args.amp, steps=args.steps, warmup=args.warmup)
    print(f"built-in preset (ResNet-18, FPN 64), {torch.get_num_threads()} threads, amp {args.amp or 'off'}, "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)

    methods = [time_training_step(m, d, size=args.size, labeled=args.labeled, unlabeled=args.unlabeled, **timing)
               for m, d in RUNS]
    print_table("every method, the preset's batch and image size", methods)
    scaling, detector = args.scaling_method, PAPER_DETECTOR[args.scaling_method]
    sizes = [time_training_step(scaling, detector, size=s, labeled=args.labeled, unlabeled=args.unlabeled, **timing)
             for s in args.sizes]
    print_table(f"{scaling}: image size", sizes)
    batches = [time_training_step(scaling, detector, size=args.size, labeled=b, unlabeled=max(1, b // 2), **timing)
               for b in args.batches]
    print_table(f"{scaling}: batch size", batches)
    return {"methods": methods, "sizes": sizes, "batches": batches}


if __name__ == "__main__":
    main()
