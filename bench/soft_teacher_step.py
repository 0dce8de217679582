"""The cost of Soft Teacher: one training step against a supervised step on the same labeled batch.

    python bench/soft_teacher_step.py                                  # the built-in preset: 8 + 4 images, 128 px
    python bench/soft_teacher_step.py --labeled 2 --unlabeled 8 --steps 3 --threads 1

Supervised step: supervised losses of the student on the labeled batch, backward, SGD step.
Soft Teacher step: the same, plus the unsupervised loss on the unlabeled batch (teacher on the weak view, box
jittering, student on the strong view, BG-T, the regression pass) and the EMA update of the teacher, as
train.py runs it. Batches are built once in memory (random images; loading is not timed).

An untrained teacher scores below every threshold and would skip box jittering; to time the step a trained
teacher costs, every detection is kept (thresholds 0) and the teacher keeps `--pseudo-per-image` of them,
17 by default: the paper's count of boxes above 0.5 per COCO image (Sec. 3.3).
Prints the mean time of each step and their ratio; wall-clock, after warm-up steps.
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
from structures import Batch, UnlabeledBatch  # noqa: E402
from data.transforms import hflip_matrix, scale_matrix  # noqa: E402
from engine.config import detector_kwargs, resolve_config  # noqa: E402
from semi.core import prefix, weighted_total  # noqa: E402
from semi.ema import EMATeacher  # noqa: E402
from semi.soft_teacher import SoftTeacher, SoftTeacherConfig  # noqa: E402

NUM_CLASSES = 8


def random_batch(batch_size: int, size: int, *, matrices: list[torch.Tensor], generator: torch.Generator,
                 max_boxes: int = 5) -> Batch:
    """B random images of size x size with 1..max_boxes random boxes each (labels 0..NUM_CLASSES-1)."""
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, max_boxes + 1, (), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.7
        wh = 8 + torch.rand(n, 2, generator=generator) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)  # (n, 4) xyxy
        targets.append({"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
                        "crowd": torch.zeros(0, 4)})
    return Batch(images=torch.rand(batch_size, 3, size, size, generator=generator),
                 image_sizes=torch.tensor([[size, size]] * batch_size), targets=targets,
                 matrices=torch.stack(matrices), image_ids=list(range(batch_size)),
                 orig_sizes=[(size, size)] * batch_size)


def time_steps(step, *, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


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

    generator = torch.Generator().manual_seed(0)
    eye = torch.eye(3, dtype=torch.float64)
    labeled = random_batch(n_l, args.size, matrices=[eye] * n_l, generator=generator)
    weak = random_batch(n_u, args.size, matrices=[eye] * n_u, generator=generator)
    strong_matrices = [hflip_matrix(args.size) @ scale_matrix(0.9, 0.9) if i % 2 else scale_matrix(0.9, 0.9)
                       for i in range(n_u)]
    strong = random_batch(n_u, args.size, matrices=strong_matrices, generator=generator)
    unlabeled = UnlabeledBatch(weak=weak, strong=strong)

    def supervised_step():
        losses = prefix(detectors.supervised_losses(student, labeled.images, labeled.image_sizes, labeled.targets),
                        "sup_")
        total = weighted_total(losses, {})
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    iteration = 0

    def soft_teacher_step():
        nonlocal iteration
        losses = prefix(detectors.supervised_losses(student, labeled.images, labeled.image_sizes, labeled.targets),
                        "sup_")
        unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled, iteration=iteration)
        losses |= prefix(unsup.losses, "unsup_")
        total = weighted_total(losses, method.loss_weights(iteration))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        ema.update(student.model, momentum=method.ema_momentum(iteration), include_buffers=method.ema_include_buffers)
        iteration += 1

    supervised = time_steps(supervised_step, steps=args.steps, warmup=args.warmup)
    soft = time_steps(soft_teacher_step, steps=args.steps, warmup=args.warmup)
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
