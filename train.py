"""Train a detector on labeled images, and with a semi-supervised method on unlabeled images too.

    python train.py                                      # supervised FCOS, built-in dataset, 10% of its labels
    python train.py --method soft_teacher --percent 10   # Soft Teacher on Faster R-CNN, the paper's detector
    python train.py --method dense_teacher --max-iter 300 --output-dir runs/try
    python train.py --data-root /data/coco --method sed --backbone-weights resnet50.pth
    python train.py --output-dir runs/try --resume       # continue where the last checkpoint left off

Every setting is a flag (engine/config.py); `python train.py --help` lists them. The file reads top to
bottom: config -> data -> model -> optimizer -> resume -> the loop -> the final evaluation.

One iteration (ARCHITECTURE.md, "The training loop and the method interface"):

    sup    = supervised losses of the student on a labeled batch
    unsup  = method.unsupervised_loss(student, teacher, unlabeled batch)       (skipped for --method supervised)
    total  = sum of weight * term over the "sup_*" and "unsup_*" terms          (semi.core: the one place)
    total.backward(); clip; optimizer.step(); scheduler.step()
    teacher <- EMA of the student                                              (a visible call, below)
"""

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import detectors
import semi
from data.coco import CocoDetection, load_unlabeled
from data.loader import Batch, UnlabeledBatch, build_train_loaders, build_val_loader
from data.splits import make_split, split_from_file
from data.transforms import build_eval_transform, build_labeled_transform, build_unlabeled_transform
from engine.checkpoint import (check_compatible, checkpoint_name, last_checkpoint, load_checkpoint, load_model_state,
                               restore_rng_state, save_checkpoint)
from engine.config import Config, dataset_files, detector_kwargs, parse_config
from engine.evaluation import evaluate, load_coco
from engine.logger import MetricsLog, format_losses, progress_bar
from semi.core import draw_pseudo_labels, prefix, pseudo_label_quality, weighted_total
from semi.ema import EMATeacher


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_factor(iteration: int, *, cfg: Config) -> float:
    """The learning rate of `iteration` divided by cfg.lr: linear warm-up, then step decay or cosine."""
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * iteration / cfg.max_iter))
    else:
        factor = cfg.gamma ** sum(iteration >= m for m in cfg.milestone_iters())
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def both_views(pair: UnlabeledBatch) -> Batch:
    """A labeled batch of 2B images: the weak views, then the strong ones (Dense Teacher's supervised loss).

    Both views share their geometry (aligned), so they have the same size, boxes and matrices.
    """
    weak, strong = pair.weak, pair.strong
    return Batch(images=torch.cat([weak.images, strong.images]),  # (2B, 3, H, W)
                 image_sizes=torch.cat([weak.image_sizes, strong.image_sizes]),  # (2B, 2)
                 targets=weak.targets + strong.targets,
                 matrices=torch.cat([weak.matrices, strong.matrices]),  # (2B, 3, 3)
                 image_ids=weak.image_ids + strong.image_ids,
                 orig_sizes=weak.orig_sizes + strong.orig_sizes)


def check_finite(total: torch.Tensor, losses: dict[str, torch.Tensor], iteration: int) -> None:
    """Stop the run on a non-finite loss, naming the iteration and every term, so that the culprit shows."""
    if not torch.isfinite(total):
        terms = ", ".join(f"{key}={value.item():.4g}" for key, value in losses.items())
        raise FloatingPointError(f"non-finite total loss {total.item()} at iteration {iteration}; terms: {terms}")


def train(cfg: Config) -> dict:
    """Run the training `cfg` describes. Returns the final evaluation {"student": metrics, "teacher": metrics}
    (no "teacher" for supervised runs), metrics as in engine.evaluation.METRIC_NAMES."""
    # ---- setup -----------------------------------------------------------------------------------------------
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"config:\n{cfg}", flush=True)
    cfg.save(out_dir / "config.json")
    torch.set_num_threads(cfg.threads or os.cpu_count())
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)

    # A method owns its unsupervised loss, its loss weights (burn-in included) and its teacher's EMA rate.
    method = semi.build_method(cfg.method, cfg=cfg, detector_name=cfg.detector)  # None for "supervised"

    # ---- data ------------------------------------------------------------------------------------------------
    # The labeled share of the training images (percent / fold, or a split file); the rest is unlabeled.
    files = dataset_files(cfg)
    split_dir = cfg.split_dir or (files.root / "splits" if cfg.dataset == "builtin" else out_dir / "splits")
    if cfg.split_file:
        split = split_from_file(files.train_json, split_file=cfg.split_file, out_dir=split_dir, percent=cfg.percent,
                                fold=cfg.fold)
    else:
        split = make_split(files.train_json, percent=cfg.percent, fold=cfg.fold, out_dir=split_dir)

    sizes = dict(short_sides=cfg.train_sizes, max_size=cfg.train_max_size)
    two_view_labeled = method is not None and "strong" in method.labeled_views
    labeled_transform = (build_unlabeled_transform(**sizes, aligned=True) if two_view_labeled
                         else build_labeled_transform(**sizes))
    labeled = CocoDetection(split.labeled_json, files.train_images, transform=labeled_transform, seed=cfg.seed)
    categories = [{"id": i, "name": n} for i, n in zip(labeled.label_to_category_id, labeled.class_names)]
    unlabeled = None
    if method is not None:
        # The split's unlabeled part (or extra images, e.g. COCO's unlabeled2017). Weak view for the teacher,
        # strong view for the student; pixel-aligned for Dense Teacher and SED.
        unlabeled_json, unlabeled_images = ((files.unlabeled_json, files.unlabeled_images) if files.unlabeled_json
                                            else (split.unlabeled_json, files.train_images))
        unlabeled = load_unlabeled(unlabeled_json, unlabeled_images, categories=categories, seed=cfg.seed,
                                   transform=build_unlabeled_transform(**sizes, aligned=method.unlabeled_aligned))
        if len(unlabeled) == 0:
            raise ValueError(f"{unlabeled_json}: no unlabeled images (percent {cfg.percent:g}); method "
                             f"{cfg.method!r} needs some: lower --percent or give --unlabeled-json")
    val = CocoDetection(files.val_json, files.val_images, categories=categories,
                        transform=build_eval_transform(cfg.test_size, cfg.test_max_size))
    val_loader = build_val_loader(val, batch_size=cfg.labeled_batch, num_workers=cfg.num_workers,
                                  size_divisible=cfg.size_divisible)
    coco_gt = load_coco(files.val_json)
    print(f"data: {len(labeled)} labeled, {len(unlabeled) if unlabeled else 0} unlabeled, {len(val)} val images; "
          f"{labeled.num_classes} classes", flush=True)

    # ---- model -----------------------------------------------------------------------------------------------
    student = detectors.build_detector(cfg.detector, num_classes=labeled.num_classes, **detector_kwargs(cfg))
    student.model.to(device).train()
    # The teacher: a copy of the student, updated only by EMA, always in eval mode and without gradients.
    ema = EMATeacher(student.model) if method is not None else None
    teacher = student._replace(model=ema.model) if ema is not None else None
    meta = {"detector": cfg.detector, "num_classes": labeled.num_classes, "class_names": labeled.class_names,
            "category_ids": labeled.label_to_category_id}

    # ---- optimizer: SGD with linear warm-up, then step decay or cosine ---------------------------------------
    params = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, cfg=cfg))

    # ---- resume ----------------------------------------------------------------------------------------------
    start_iter = 0
    log = MetricsLog(out_dir / "metrics.jsonl")
    resume_from = last_checkpoint(out_dir) if cfg.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_compatible(state, path=resume_from, detector=cfg.detector, num_classes=labeled.num_classes)
        load_model_state(student.model, state["model"], path=resume_from)
        if ema is not None and state["teacher"] is not None:
            load_model_state(ema.model, state["teacher"], path=resume_from, what="teacher")
        elif ema is not None:  # a supervised checkpoint continued by a method: the teacher starts as the student
            ema.copy_from(student.model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_iter = state["iteration"]
        changed = sorted(k for k, v in state["config"].items() if k != "resume" and getattr(cfg, k, v) != v)
        if changed:
            print(f"note: these settings differ from the checkpoint's: {changed}", flush=True)
        log.drop_after(start_iter)  # lines a crashed run wrote after its last checkpoint
        print(f"resumed from {resume_from} at iteration {start_iter}", flush=True)
    elif cfg.resume:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch", flush=True)

    # The loaders skip the batches already consumed; every augmentation is seeded by its position in the
    # sample stream, so a resumed run sees the images and views an uninterrupted one would.
    loaders = build_train_loaders(labeled, unlabeled, labeled_batch=cfg.labeled_batch,
                                  unlabeled_batch=cfg.unlabeled_batch if method is not None else 0, seed=cfg.seed,
                                  num_workers=cfg.num_workers, size_divisible=cfg.size_divisible,
                                  start_batch=start_iter)
    if resume_from is not None:
        restore_rng_state(state["rng"])  # the methods' own draws (jitter, sampling) continue in step too

    def run_evaluation(iteration: int, *, max_images: int | None) -> dict:
        models = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
        results = {}
        for name, detector in models.items():
            result = evaluate(detector, val_loader, coco_gt=coco_gt, category_ids=labeled.label_to_category_id,
                              class_names=labeled.class_names, max_images=max_images)
            print(f"\n[{name} @ {iteration}] {result.num_images} images\n{result.table()}", flush=True)
            log.write({"iteration": iteration, "eval": name, **result.metrics,
                       **{f"AP/{k}": v for k, v in result.per_class.items()}})
            results[name] = result.metrics
        return results

    # ---- the loop --------------------------------------------------------------------------------------------
    bar = progress_bar(start=start_iter, total=cfg.max_iter)
    timer = time.perf_counter()
    results = {}
    for iteration in range(start_iter, cfg.max_iter):
        labeled_batch = next(loaders.labeled).to(device)
        if two_view_labeled:
            labeled_batch = both_views(labeled_batch)
        unlabeled_batch = next(loaders.unlabeled).to(device) if method is not None else None
        data_time = time.perf_counter() - timer

        if method is not None and iteration == method.teacher_init_iteration:
            ema.copy_from(student.model)  # e.g. Dense Teacher: the teacher starts as the burnt-in student

        # Supervised loss on the labeled batch (its terms keep their names, prefixed "sup_").
        sup = detectors.supervised_losses(student, labeled_batch.images, labeled_batch.image_sizes,
                                          labeled_batch.targets)
        losses = prefix(sup, "sup_")
        weights = {key: 1.0 for key in losses}
        stats = {}

        # Unsupervised loss on the unlabeled batch, skipped while every weight is 0 (burn-in).
        if method is not None:
            unsup_weights = method.loss_weights(iteration)
            if any(w > 0 for w in unsup_weights.values()):
                unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch,
                                                 iteration=iteration)
                losses |= prefix(unsup.losses, "unsup_")
                weights |= unsup_weights
                stats |= unsup.stats
                if unsup.pseudo_boxes is not None:  # diagnostics against the hidden ground truth
                    stats |= pseudo_label_quality(unsup.pseudo_boxes, unlabeled_batch.weak.targets)
                    if cfg.draw_period > 0 and (iteration + 1) % cfg.draw_period == 0:
                        # The teacher's pseudo-boxes on the weak view, carried onto the strong view (PNG).
                        draw_pseudo_labels(unlabeled_batch, unsup.pseudo_boxes,
                                           out_dir / "pseudo_labels" / f"{iteration + 1:07d}.png",
                                           class_names=labeled.class_names)

        total = weighted_total(losses, weights)  # the one place weights are applied
        check_finite(total, losses, iteration)

        lr = optimizer.param_groups[0]["lr"]  # this iteration's
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.clip_grad_norm > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm))
        optimizer.step()
        scheduler.step()

        # The teacher follows the student: theta_t <- m * theta_t + (1 - m) * theta_s (METHODS.md, "Teacher").
        if method is not None:
            momentum = method.ema_momentum(iteration)
            if momentum is not None:
                # Soft Teacher averages the parameters only; Dense Teacher and SED the whole state (BN too).
                ema.update(student.model, momentum=momentum,
                           include_buffers=getattr(method, "ema_include_buffers", True))
                stats["ema_momentum"] = momentum

        # ---- logging, evaluation, checkpoints (each keyed by the number of iterations done) ----
        done = iteration + 1
        iter_time = time.perf_counter() - timer
        timer = time.perf_counter()
        bar.update(1)
        if done % cfg.log_period == 0 or done == cfg.max_iter or done == 1:
            bar.set_postfix_str(f"loss {total.item():.3f} lr {lr:.2g}")
            log.write({"iteration": done, "lr": lr, "loss": total, **losses,
                       **{f"w_{key}": w for key, w in weights.items()}, **stats,
                       "time": iter_time, "data_time": data_time})
            if not sys.stderr.isatty():
                print(f"it {done}/{cfg.max_iter} lr {lr:.3g} loss {total.item():.3f} | {format_losses(losses)}",
                      flush=True)
        if done % cfg.eval_period == 0 or done == cfg.max_iter:
            final = done == cfg.max_iter
            results = run_evaluation(done, max_images=None if final or cfg.eval_max_images <= 0
                                     else cfg.eval_max_images)
        if done % cfg.checkpoint_period == 0 or done == cfg.max_iter:
            save_checkpoint(out_dir / checkpoint_name(done), iteration=done, config=cfg.to_dict(), meta=meta,
                                   model=student.model, teacher=ema.model if ema is not None else None,
                                   optimizer=optimizer, scheduler=scheduler, keep=cfg.keep_checkpoints)
        timer = time.perf_counter()  # evaluating and saving are not part of the next iteration's time
    bar.close()
    log.close()

    if last_checkpoint(out_dir) is not None:
        print(f"\ndone. Evaluate the final model with:\n  python evaluate.py {out_dir / 'last.pth'}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(argv, description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    main()
