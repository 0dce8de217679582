"""The cost of Soft Teacher: one training step against a supervised step on the same labeled batch.

    python bench/soft_teacher_step.py                                  # the built-in preset: 8 + 4 images, 128 px
    python bench/soft_teacher_step.py --labeled 2 --unlabeled 8 --steps 3 --threads 1

Supervised step: supervised losses of the student on the labeled batch, backward, SGD step.
Soft Teacher step: the same, plus the unsupervised loss on the unlabeled batch (teacher on the weak view, box
jittering, student on the strong view, BG-T, the regression pass) and the EMA update of the teacher, through
train.py's own functions (every pass updating the BatchNorm statistics, no clipping). Batches are built once in
memory (random images; loading is not timed).

An untrained teacher scores below every threshold and would skip box jittering; to time the step a trained
teacher costs, every detection is kept (thresholds 0) and the teacher keeps `--pseudo-per-image` of them,
17 by default: the paper's count of boxes above 0.5 per COCO image (Sec. 3.3).
Prints the mean time of each step and their ratio; wall-clock, after warm-up steps.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages

import detectors  # noqa: E402
from bench.common import random_batch, time_steps, two_views  # noqa: E402
from engine.config import detector_kwargs, resolve_config  # noqa: E402
from semi.ema import EMATeacher  # noqa: E402
from semi.soft_teacher import SoftTeacher, SoftTeacherConfig  # noqa: E402
from train import iteration_losses, optimizer_step, update_teacher  # noqa: E402

NUM_CLASSES = 8


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labeled", type=int, default=0, help="labeled images per step (default: the preset's)")
    parser.add_argument("--unlabeled", type=int, default=0, help="unlabeled images per step (default: the preset's)")
    parser.add_argument("--size", type=int, default=128, help="image side, pixels")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--pseudo-per-image", type=int, default=17, help="teacher detections kept per image")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)

    cfg = resolve_config({"method": "soft_teacher"})  # the built-in preset: ResNet-18, 64-channel FPN
    n_l, n_u = args.labeled or cfg.labeled_batch, args.unlabeled or cfg.unlabeled_batch
    student = detectors.build_detector("faster_rcnn", num_classes=NUM_CLASSES, **detector_kwargs(cfg))
    student.model.train()
    ema = EMATeacher(student.model)
    teacher = student._replace(model=ema.model)
    method = SoftTeacher(SoftTeacherConfig(initial_score_thr=0.0, rpn_score_thr=0.0, cls_score_thr=0.0,
                                           teacher_detections=args.pseudo_per_image,
                                           teacher_rpn_pre_nms=cfg.rpn_pre_nms_train,
                                           teacher_rpn_post_nms=cfg.rpn_post_nms_test))
    params = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32: every call passes through

    generator = torch.Generator().manual_seed(0)
    labeled = random_batch(n_l, args.size, generator=generator, num_classes=NUM_CLASSES)
    unlabeled = two_views(n_u, args.size, aligned=False, generator=generator, num_classes=NUM_CLASSES)
    iteration = 0

    def step(method_or_none):  # train.py's iteration: losses, optimizer step, the teacher's EMA update
        nonlocal iteration
        out = iteration_losses(student=student, teacher=teacher, method=method_or_none, labeled=labeled,
                               unlabeled=unlabeled, iteration=iteration, norm_stats="all")
        optimizer_step(out.total, optimizer=optimizer, scaler=scaler, params=params, clip_grad_norm=0.0)
        if method_or_none is not None:
            update_teacher(ema, student.model, method_or_none, iteration)
            iteration += 1

    supervised = time_steps(lambda: step(None), steps=args.steps, warmup=args.warmup)
    soft = time_steps(lambda: step(method), steps=args.steps, warmup=args.warmup)
    result = {"labeled": n_l, "unlabeled": n_u, "size": args.size, "threads": torch.get_num_threads(),
              "supervised_s": statistics.mean(supervised), "soft_teacher_s": statistics.mean(soft)}
    result["ratio"] = result["soft_teacher_s"] / result["supervised_s"]
    print(f"Faster R-CNN ({cfg.backbone}, FPN {cfg.fpn_channels}), {n_l} labeled + {n_u} unlabeled images of "
          f"{args.size} px, {result['threads']} threads, {args.steps} steps after {args.warmup} warm-up")
    print(f"  supervised step    {result['supervised_s']:.3f} s  (std {statistics.pstdev(supervised):.3f})")
    print(f"  Soft Teacher step  {result['soft_teacher_s']:.3f} s  (std {statistics.pstdev(soft):.3f})")
    print(f"  ratio              {result['ratio']:.2f}x")
    return result


if __name__ == "__main__":
    main()
