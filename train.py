"""Train a detector on labeled images, and with a semi-supervised method on unlabeled images too.

    python train.py                                      # supervised FCOS, built-in dataset, 10% of its labels
    python train.py --method soft_teacher --percent 10   # Soft Teacher on Faster R-CNN, the paper's detector
    python train.py --method dense_teacher --max-iter 300 --output-dir runs/try
    python train.py --data-root /data/coco --method sed --backbone-weights resnet50.pth
    python train.py --output-dir runs/try --resume       # continue where the last checkpoint left off
    python train.py --method dense_teacher --amp bf16 --tensorboard   # mixed precision; TensorBoard event files

Every setting is a flag (engine/config.py); `python train.py --help` lists them. The file reads top to
bottom: config -> data -> model -> optimizer -> resume (engine/checkpoint.py) -> the loop -> the final evaluation.

One iteration (ARCHITECTURE.md, "The training loop and the method interface"):

    sup    = supervised losses of the student on a labeled batch
    unsup  = method.unsupervised_loss(student, teacher, unlabeled batch)       (skipped for --method supervised)
    total  = sum of weight * term over the "sup_*" and "unsup_*" terms          (semi.core: the one place)
    optimizer_step(total): backward, clip, SGD step; then scheduler.step()
    update_teacher(...): the teacher <- EMA of the student                      (a visible call, below)

Several GPUs or machines (README, "Distributed training"): `torchrun --nproc_per_node 8 train.py ...` runs this
file once per GPU. Each process (rank) takes 1 / N of every global batch; the loss computation runs inside one
DistributedDataParallel forward, so that backward averages the gradients and every rank takes the same step
(engine/distributed.py). Rank 0 alone prints, logs, evaluates the gathered detections and writes files.
"""

import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import detectors
from data.coco import CocoDetection, load_unlabeled
from data.loader import build_train_loaders, build_val_loader
from data.splits import make_split, split_from_file, with_extra_unlabeled
from data.transforms import build_eval_transform, build_labeled_transform, build_unlabeled_transform
from detectors.precision import mixed_precision
from engine import distributed
from engine.checkpoint import (capture_rng_state, checkpoint_name, last_checkpoint, restore_run_rng, resume_run,
                               save_checkpoint, seed_everything)
from engine.config import (Config, DatasetFiles, build_method, check_dataset_files, dataset_files, detector_kwargs,
                           parse_config)
from engine.evaluation import evaluate, load_coco
from engine.logger import MetricsLog, format_losses, progress_bar
from engine.pretrain import PretrainSpec, ensure_pretrained_backbone
from engine.pseudo_labels import draw_pseudo_labels, pseudo_label_quality
from engine.results import format_reference, table_references
from engine.run_dir import claim_run_dir
from semi.core import Method, frozen_norm_statistics, prefix, weighted_total
from semi.ema import EMATeacher
from structures import Batch, UnlabeledBatch


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


class TrainingSets(NamedTuple):
    """A run's training data (`training_sets`)."""

    files: DatasetFiles  # the dataset's json and image folders (engine.config.dataset_files)
    labeled: CocoDetection
    unlabeled: CocoDetection | None  # None for supervised runs
    categories: list[dict]  # [{"id", "name"}] in label order: the label map every other set must use


def training_sets(cfg: Config, method, *, out_dir: Path) -> TrainingSets:
    """The labeled and unlabeled training sets of a run, with its augmentations.

    The labeled share of the training images (percent / fold, or a split file) and the rest as unlabeled images
    (or extra ones, e.g. COCO's unlabeled2017). Labeled images take the weak view, or both views for a method
    whose supervised loss takes the strong view too (Dense Teacher); unlabeled ones take a weak view for the
    teacher and a strong one for the student, pixel-aligned for Dense Teacher and SED.
    """
    with distributed.main_first():  # rank 0 generates the built-in dataset and writes the split; the others read
        files = dataset_files(cfg)
        check_dataset_files(cfg, files)  # a path that is not there: an error naming its flag
        split_dir = cfg.split_dir or (files.root / "splits" if cfg.dataset == "builtin" else out_dir / "splits")
        if cfg.split_file:
            split = split_from_file(files.train_json, split_file=cfg.split_file, out_dir=split_dir,
                                    percent=cfg.percent, fold=cfg.fold)
        else:
            split = make_split(files.train_json, percent=cfg.percent, fold=cfg.fold, out_dir=split_dir)

    sizes = dict(short_sides=cfg.train_sizes, max_size=cfg.train_max_size)
    two_view_labeled = method is not None and "strong" in method.labeled_views
    labeled_transform = (build_unlabeled_transform(**sizes, aligned=True) if two_view_labeled
                         else build_labeled_transform(**sizes))
    # The split files are made from the user's train JSON: messages name that file (source).
    labeled = CocoDetection(split.labeled_json, files.train_images, transform=labeled_transform, seed=cfg.seed,
                            source=files.train_json)
    categories = [{"id": i, "name": n} for i, n in zip(labeled.label_to_category_id, labeled.class_names)]
    if method is None:
        return TrainingSets(files, labeled, None, categories)
    unlabeled_json, unlabeled_images = ((files.unlabeled_json, files.unlabeled_images) if files.unlabeled_json
                                        else (split.unlabeled_json, files.train_images))
    if files.unlabeled_json and cfg.percent < 100 and files.unlabeled_images == files.train_images:
        # Extra unlabeled images beside the training images (the built-in dataset's): the split's unlabeled part
        # and the extra ones together.
        with distributed.main_first():
            unlabeled_json = with_extra_unlabeled(split.unlabeled_json, files.unlabeled_json, out_dir=split_dir)
    # Messages name the user's file: the training JSON that the split's unlabeled part was made from.
    source = files.train_json if unlabeled_json == split.unlabeled_json else None
    unlabeled = load_unlabeled(unlabeled_json, unlabeled_images, categories=categories, seed=cfg.seed, source=source,
                               transform=build_unlabeled_transform(**sizes, aligned=method.unlabeled_aligned))
    if len(unlabeled) == 0:
        raise ValueError(f"{unlabeled_json}: no unlabeled images (percent {cfg.percent:g}); method "
                         f"{cfg.method!r} needs some: lower --percent or give --unlabeled-json")
    return TrainingSets(files, labeled, unlabeled, categories)


def check_images(datasets: dict[str, CocoDetection | None], *, skip_missing: bool, verbose: bool) -> None:
    """Every image file's header, before the first iteration (CocoDetection.check_images): a missing file
    stops the run now rather than when it is first drawn, hours in, unless --skip-missing leaves it out.
    Unreadable files are counted and skipped. datasets: {"labeled": ..., "unlabeled": ..., "val": ...}."""
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        found = dataset.check_images(skip_missing=skip_missing)
        if verbose:
            unreadable = "unreadable, skipped" if dataset.substitute else "unreadable, left out"
            problems = [f"{n} {kind}" for n, kind in ((found.missing, "missing, left out"),
                                                      (found.unreadable, unreadable)) if n]
            print(f"checked the {found.checked} {name} image files in {found.seconds:.1f} s"
                  + (f": {', '.join(problems)}" if problems else ""), flush=True)
        if len(dataset) == 0:
            raise ValueError(f"{dataset.source}: none of the {name} images is left once the missing files are "
                             f"left out")


def labeled_views(batch: Batch | UnlabeledBatch) -> tuple[Batch, Batch | None]:
    """A labeled batch as `iteration_losses` takes it: (weak, strong) when it holds both views (Dense Teacher's
    supervised loss), else (batch, None)."""
    if isinstance(batch, UnlabeledBatch):
        return batch.weak, batch.strong
    return batch, None


def check_finite(total: torch.Tensor, losses: dict[str, torch.Tensor], iteration: int) -> None:
    """Stop the run on a non-finite loss, naming the iteration and every term, so that the culprit shows.

    iteration: the loop's index, from 0; the message counts from 1, as the log's "it N" lines do."""
    if not torch.isfinite(total):
        terms = ", ".join(f"{key}={value.item():.4g}" for key, value in losses.items())
        raise FloatingPointError(f"non-finite total loss {total.item()} in iteration {iteration + 1} (counted from 1, "
                                 f"as the log's 'it N'); terms: {terms}")


class IterationLosses(NamedTuple):
    """What the forward passes of one iteration give (`iteration_losses`)."""

    total: Tensor  # () the weighted sum of the terms: what backward runs on
    losses: dict[str, Tensor]  # unweighted () terms, "sup_*" and "unsup_*"
    weights: dict[str, float]  # the weight of each term
    stats: dict[str, float]  # the method's statistics
    pseudo_boxes: list[dict] | None  # the method's pseudo-labels in the weak view, for diagnostics


def iteration_losses(*, student, teacher, method, labeled: Batch, unlabeled: UnlabeledBatch | None,
                     iteration: int, labeled_strong: Batch | None = None,
                     norm_stats: str = "labeled") -> IterationLosses:
    """Every forward pass of the student in one iteration: the supervised loss on the labeled batch and the
    method's unsupervised loss on the unlabeled one, weighted once. Under DDP this whole function runs inside
    one forward of the wrapped student (`distributed.loss_runner`).

    labeled_strong: the strong view of the labeled batch, pixel-aligned with `labeled` (Dense Teacher's
    supervised loss takes both views); each term is then the mean of the two views' terms, which is the term
    of the two batches together, as both views have the same boxes. norm_stats "labeled": the BatchNorm running
    statistics follow the labeled (weak) batch only (`semi.core.frozen_norm_statistics`); "all": every pass.
    """
    keep_stats = functools.partial(frozen_norm_statistics, student.model, enabled=norm_stats == "labeled")
    # Supervised loss on the labeled batch (its terms keep their names, prefixed "sup_").
    sup = detectors.supervised_losses(student, labeled.images, labeled.image_sizes, labeled.targets)
    if labeled_strong is not None:
        with keep_stats():
            strong = detectors.supervised_losses(student, labeled_strong.images, labeled_strong.image_sizes,
                                                 labeled_strong.targets)
        sup = {key: (value + strong[key]) / 2 for key, value in sup.items()}
    losses = prefix(sup, "sup_")
    weights = {key: 1.0 for key in losses}
    stats, pseudo_boxes = {}, None

    # Unsupervised loss on the unlabeled batch, skipped while every weight is 0 (burn-in).
    if method is not None:
        unsup_weights = method.loss_weights(iteration)
        if any(w > 0 for w in unsup_weights.values()):
            with keep_stats():
                unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled,
                                                 iteration=iteration)
            losses |= prefix(unsup.losses, "unsup_")
            weights |= unsup_weights
            stats |= unsup.stats
            pseudo_boxes = unsup.pseudo_boxes

    total = weighted_total(losses, weights)  # the one place weights are applied
    return IterationLosses(total=total, losses=losses, weights=weights, stats=stats, pseudo_boxes=pseudo_boxes)


def optimizer_step(total: Tensor, *, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[Tensor], clip_grad_norm: float) -> dict[str, float]:
    """One step of the optimizer on the weighted total: backward (the loss scaled under float16), the gradients
    clipped to `clip_grad_norm` (0: not clipped), the step, the loss scale updated.

    Returns {"grad_norm": the norm before clipping} when clipping, and {"loss_scale"} under float16."""
    stats = {}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()  # under DDP the gradients are averaged over the ranks here
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
    scaler.step(optimizer)  # float16: skipped when a gradient overflowed, and the scale is lowered
    scaler.update()
    if scaler.is_enabled():
        stats["loss_scale"] = scaler.get_scale()
    return stats


def update_teacher(ema: EMATeacher, student_model: torch.nn.Module, method: Method, iteration: int) -> float | None:
    """The teacher follows the student: theta_t <- m * theta_t + (1 - m) * theta_s, m the method's momentum
    after step `iteration` (docs/METHODS.md, "The teacher"), over the parameters, and the BatchNorm buffers
    too where the method says so. Returns m; None: no update this iteration."""
    momentum = method.ema_momentum(iteration)
    if momentum is not None:
        ema.update(student_model, momentum=momentum, include_buffers=method.ema_include_buffers)
    return momentum


def train(cfg: Config) -> dict:
    """Run the training `cfg` describes. Returns the final evaluation {"student": metrics, "teacher": metrics}
    (no "teacher" for supervised runs), metrics as in engine.evaluation.METRIC_NAMES.

    The output folder belongs to this run while it trains (engine/run_dir.py): rank 0 locks it, and a folder
    holding an earlier run needs --resume or --overwrite. Under torchrun every rank runs this function
    (engine/distributed.py); each returns the same metrics."""
    distributed.init(cfg.device)  # joins torchrun's process group, if launched by it
    if not distributed.is_main():
        return run_training(cfg)
    with claim_run_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite):
        return run_training(cfg)


def run_training(cfg: Config) -> dict:
    """The body of `train`, in a run folder already claimed."""
    # ---- setup -----------------------------------------------------------------------------------------------
    started = time.perf_counter()  # evaluations log the seconds since (their "elapsed"): time to accuracy
    device = distributed.init(cfg.device)  # this rank's device (`train` has joined the process group)
    main, world = distributed.is_main(), distributed.world_size()
    batch = cfg.per_process_batch(world)  # images per rank and iteration: the global batches / world
    out_dir = Path(cfg.output_dir)
    if cfg.backbone_pretrain and not cfg.backbone_weights:  # generated pretraining, cached after the first run
        with distributed.main_first():
            cfg.backbone_weights = str(ensure_pretrained_backbone(PretrainSpec(arch=cfg.backbone), threads=cfg.threads,
                                                                  verbose=main))
    if main:  # rank 0 alone prints and writes files
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"config:\n{cfg}", flush=True)
        cfg.save(out_dir / "config.json")
        if distributed.is_distributed():
            print(f"distributed: {world} process(es) on {distributed.backend()}, each {batch.labeled} labeled + "
                  f"{batch.unlabeled} unlabeled images per iteration (global batch {cfg.labeled_batch} + "
                  f"{batch.unlabeled * world})", flush=True)
    torch.set_num_threads(cfg.threads or max(1, os.cpu_count() // distributed.local_world_size()))  # cores shared
    seed_everything(cfg.seed)

    # A method owns its unsupervised loss, its loss weights (burn-in included) and its teacher's EMA rate.
    method = build_method(cfg.method, cfg=cfg, detector_name=cfg.detector)  # None for "supervised"

    # ---- data ------------------------------------------------------------------------------------------------
    files, labeled, unlabeled, categories = training_sets(cfg, method, out_dir=out_dir)
    val = CocoDetection(files.val_json, files.val_images, categories=categories, substitute=False,
                        transform=build_eval_transform(cfg.test_size, cfg.test_max_size))
    check_images({"labeled": labeled, "unlabeled": unlabeled, "val": val}, skip_missing=cfg.skip_missing,
                 verbose=main)
    val_loader = build_val_loader(val, batch_size=batch.labeled, num_workers=cfg.num_workers, rank=distributed.rank(),
                                  world_size=world, size_divisible=cfg.size_divisible)  # this rank's share
    coco_gt = load_coco(files.val_json)
    if main:
        print(f"data: {len(labeled)} labeled, {len(unlabeled) if unlabeled else 0} unlabeled, {len(val)} val images; "
              f"{labeled.num_classes} classes", flush=True)

    # ---- model -----------------------------------------------------------------------------------------------
    student = detectors.build_detector(cfg.detector, num_classes=labeled.num_classes, **detector_kwargs(cfg))
    student.model.to(device).train()
    # Under torchrun (DDP, one rank or more): SyncBatchNorm on CUDA, and `run_losses(f)` calls f inside one
    # forward of the wrapped student, so that backward averages the gradients over the ranks; its constructor
    # gives every rank rank 0's weights. Without torchrun: the model as it is, and run_losses(f) is f().
    student = student._replace(model=distributed.sync_batchnorm(student.model, device=device))
    run_losses = distributed.loss_runner(student.model, device=device)
    # The teacher: a copy of the student, updated only by EMA, always in eval mode and without gradients.
    ema = EMATeacher(student.model) if method is not None else None
    teacher = student._replace(model=ema.model) if ema is not None else None
    meta = {"detector": cfg.detector, "num_classes": labeled.num_classes, "class_names": labeled.class_names,
            "category_ids": labeled.label_to_category_id}

    # ---- optimizer: SGD with linear warm-up, then step decay or cosine ---------------------------------------
    params = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, cfg=cfg))
    # --amp: the forward passes under autocast; losses, fused ops and postprocessing stay in float32
    # (detectors/precision.py). float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    autocast = mixed_precision(device.type, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # disabled: every call passes through
    if world > 1:  # the methods' own draws (box jitter, RoI sampling, SED's scale) differ between ranks
        seed_everything(distributed.rank_seed(cfg.seed))

    # ---- resume ----------------------------------------------------------------------------------------------
    log = MetricsLog(out_dir / "metrics.jsonl", tensorboard=cfg.tensorboard) if main else None
    # Rank 0 picks the checkpoint and every rank loads it (a run directory all ranks can read).
    resume_from = distributed.broadcast(last_checkpoint(out_dir) if cfg.resume and main else None)
    resumed = None
    if resume_from is not None:
        resumed = resume_run(resume_from, cfg=cfg, model=student.model, ema=ema, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, num_classes=labeled.num_classes)
        if main:
            if resumed.changed:
                print(f"note: these settings differ from the checkpoint's: {resumed.changed}", flush=True)
            log.drop_after(resumed.iteration)  # lines a crashed run wrote after its last checkpoint
            print(f"resumed from {resume_from} at iteration {resumed.iteration}", flush=True)
    elif cfg.resume and main:
        log.drop_after(0)  # an earlier run's records, when it stopped before its first checkpoint
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch", flush=True)
    start_iter = resumed.iteration if resumed is not None else 0

    # The loaders skip the batches already consumed; every augmentation is seeded by its position in the
    # sample stream, so a resumed run sees the images and views an uninterrupted one would.
    # Rank r takes draws r, r + N, r + 2N, ... of each sample stream: the N ranks' batches of an iteration
    # hold the very images (and views) of one process's global batch.
    loaders = build_train_loaders(labeled, unlabeled, labeled_batch=batch.labeled, unlabeled_batch=batch.unlabeled,
                                  seed=cfg.seed, rank=distributed.rank(), world_size=world,
                                  num_workers=cfg.num_workers, size_divisible=cfg.size_divisible,
                                  start_batch=start_iter, pin_memory=device.type == "cuda")
    if resumed is not None:  # the methods' own draws (jitter, sampling) continue in step too, rank by rank
        restore_run_rng(resumed, rank=distributed.rank(), world_size=world,
                        fallback_seed=distributed.rank_seed(cfg.seed + start_iter))

    def run_evaluation(iteration: int, *, max_images: int | None) -> dict:
        models = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
        results = {}
        for name, detector in models.items():
            result = evaluate(detector, val_loader, coco_gt=coco_gt, category_ids=labeled.label_to_category_id,
                              class_names=labeled.class_names, max_images=max_images,
                              voc07=cfg.dataset == "voc")  # Pascal VOC: VOC07 AP50 too
            if main:
                print(f"\n[{name} @ {iteration}] {result.counts()}\n{result.table()}", flush=True)
                log.write({"iteration": iteration, "eval": name, "elapsed": round(time.perf_counter() - started, 1),
                           **result.metrics,
                           **{f"AP/{k}": v for k, v in result.per_class.items()}})
            results[name] = result.metrics
        return results

    # ---- the loop --------------------------------------------------------------------------------------------
    bar = progress_bar(start=start_iter, total=cfg.max_iter) if main else None
    timer = time.perf_counter()
    results = {}
    for iteration in range(start_iter, cfg.max_iter):
        # Pinned (CUDA): the host does not wait. Dense Teacher's labeled batch holds a weak and a strong view.
        labeled_batch, labeled_strong = labeled_views(next(loaders.labeled).to(device, non_blocking=True))
        unlabeled_batch = next(loaders.unlabeled).to(device, non_blocking=True) if method is not None else None
        data_time = time.perf_counter() - timer

        if method is not None and iteration == method.teacher_init_iteration:
            ema.copy_from(student.model)  # e.g. Dense Teacher: the teacher starts as the burnt-in student

        # The supervised and the unsupervised losses (their terms prefixed "sup_" / "unsup_"), weighted.
        with autocast:
            total, losses, weights, stats, pseudo_boxes = run_losses(functools.partial(
                iteration_losses, student=student, teacher=teacher, method=method, labeled=labeled_batch,
                labeled_strong=labeled_strong, unlabeled=unlabeled_batch, iteration=iteration,
                norm_stats=cfg.norm_stats))
        if pseudo_boxes is not None:  # diagnostics against the hidden ground truth
            stats |= pseudo_label_quality(pseudo_boxes, unlabeled_batch.weak.targets)
            if main and cfg.draw_period > 0 and (iteration + 1) % cfg.draw_period == 0:
                # The teacher's pseudo-boxes on the weak view, carried onto the strong view (PNG).
                draw_pseudo_labels(unlabeled_batch, pseudo_boxes,
                                   out_dir / "pseudo_labels" / f"{iteration + 1:07d}.png",
                                   class_names=labeled.class_names)
        check_finite(total, losses, iteration)

        lr = optimizer.param_groups[0]["lr"]  # this iteration's
        stats |= optimizer_step(total, optimizer=optimizer, scaler=scaler, params=params,
                                clip_grad_norm=cfg.clip_grad_norm)
        scheduler.step()
        # BatchNorm without sync (CPU) saw only its rank's images: one running mean / var for all, before the EMA.
        distributed.average_buffers(student.model)

        # The teacher follows the student by EMA (Soft Teacher over the parameters; the others the whole state).
        if method is not None:
            momentum = update_teacher(ema, student.model, method, iteration)
            if momentum is not None:
                stats["ema_momentum"] = momentum

        # ---- logging, evaluation, checkpoints (each keyed by the number of iterations done) ----
        done = iteration + 1
        iter_time = time.perf_counter() - timer
        timer = time.perf_counter()
        if main:
            bar.update(1)
        if done % cfg.log_period == 0 or done == cfg.max_iter or done == 1:
            # The global batch's values: means over the ranks, as floats (every rank takes part).
            logged = distributed.mean_over_ranks({"loss": total, **losses})
            logged_stats = distributed.mean_over_ranks(stats)
            if main:
                bar.set_postfix_str(f"loss {logged['loss']:.3f} lr {lr:.2g}")
                log.write({"iteration": done, "lr": lr, **logged, **{f"w_{key}": w for key, w in weights.items()},
                           **logged_stats, "time": iter_time, "data_time": data_time})
                if not sys.stderr.isatty():
                    terms = format_losses({key: logged[key] for key in losses})
                    print(f"it {done}/{cfg.max_iter} lr {lr:.3g} loss {logged['loss']:.3f} | {terms}", flush=True)
        if done % cfg.eval_period == 0 or done == cfg.max_iter:
            final = done == cfg.max_iter
            results = run_evaluation(done, max_images=None if final or cfg.eval_max_images <= 0
                                     else cfg.eval_max_images)
        if done % cfg.checkpoint_period == 0 or done == cfg.max_iter:
            # Every rank's generators: a resumed run of as many ranks draws what this one would have drawn.
            rng_per_rank = distributed.gather(capture_rng_state()) if world > 1 else None
            if main:
                save_checkpoint(out_dir / checkpoint_name(done), iteration=done, config=cfg.to_dict(), meta=meta,
                                model=student.model, teacher=ema.model if ema is not None else None,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler, keep=cfg.keep_checkpoints,
                                extra={"rng_per_rank": rng_per_rank} if rng_per_rank else None)
        timer = time.perf_counter()  # evaluating and saving are not part of the next iteration's time

    if main:
        bar.close()
        log.close()
        if results:
            print(compare_with_table(cfg, results), flush=True)
        if last_checkpoint(out_dir) is not None:
            print(f"\ndone. Evaluate the final model with:\n  python evaluate.py {out_dir / 'last.pth'}", flush=True)
    return results


def compare_with_table(cfg: Config, results: dict) -> str:
    """The final AP next to the results table's rows of the same recipe (engine/results.py)."""
    lines = ["", "final AP (COCO AP50:95, all validation images): " + ", ".join(
        f"{name} {100 * metrics['AP']:.1f}" for name, metrics in results.items())]
    references, not_quoted = table_references(cfg)
    if not references:
        why = next(iter(not_quoted.values()), "docs/RESULTS.md has no results for this method, detector and "
                                               "label fraction")
        lines.append(f"(the results table's baselines are not quoted: {why})")
        return "\n".join(lines)
    lines.append("the results table (docs/RESULTS.md, bench/benchmark.py), the same recipe:")
    names = {"supervised": f"supervised, {cfg.percent:g}% of the labels", "full": "supervised, 100% of the labels",
             "method": f"{cfg.method} (teacher)"}
    for key, reference in references.items():
        lines.append(f"  {names[key]:<36} {format_reference(reference)}")
    for key, why in not_quoted.items():
        if key not in references:
            lines.append(f"  {names[key]:<36} not quoted: {why}")
    if "supervised" in references and cfg.method != "supervised" and "teacher" in results:
        gain = 100 * results["teacher"]["AP"] - references["supervised"].mean
        lines.append(f"  this run's teacher against the supervised baseline: {gain:+.1f} AP")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    try:
        return train(parse_config(argv, description=__doc__.split("\n")[0]))
    finally:
        distributed.cleanup()  # leave torchrun's process group, if joined


if __name__ == "__main__":
    main()
