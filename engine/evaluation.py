"""COCO box evaluation with pycocotools.

    detections in the batch's (resized) frame --inverse(matrix)--> original image pixels
    contiguous labels 0..C-1 --category_ids--> COCO category ids
    -> COCO results list [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] -> COCOeval("bbox")

Metrics are fractions in [0, 1] (printed as percentages). A run with no detections at all scores 0 instead
of crashing pycocotools, whose `loadRes` cannot take an empty list.

Pascal VOC (`voc07=True`): next to COCO's metrics, VOC07's own AP50 (`voc07_metrics`): per class, the
detections by decreasing score are matched to the ground truth at IoU > 0.5, a detection whose best match is
a `difficult` object counts neither way, and the 11-point interpolated precision is averaged; the mean over
the classes that have a non-difficult object is `metrics["AP50_VOC07"]`.

Multi-scale testing (`evaluate_multiscale`, SED paper Tab. 7): the same images at several short sides, and
optionally mirrored; every pass's detections go back to original pixels, `merge_detections` fuses the passes
of an image with class-wise NMS, and the merged detections are scored as above. `predict_multiscale` does
the same for a batch in memory.
"""

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.ops import batched_nms

import detectors
from data.transforms import hflip_matrix
from engine import distributed
from structures import clip_boxes, pad_to_multiple, warp_boxes

# The order of COCOeval.stats.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class Evaluation:
    """The outcome of one COCO evaluation.

    metrics:   METRIC_NAMES -> float in [0, 1]; nan where the ground truth has nothing to measure (e.g. APs
               without small objects)
    per_class: class name -> AP in [0, 1] (IoU 0.50:0.95, all areas, 100 detections); nan without ground truth
    results:   the COCO results list, boxes in original image pixels
    num_images, seconds: how many images were scored and how long prediction took (for throughput)
    skipped_ids: images of the loader that could not be read: left out of the scoring, not in num_images
    """

    metrics: dict[str, float]
    per_class: dict[str, float]
    results: list[dict] = field(repr=False)
    num_images: int = 0
    seconds: float = 0.0
    per_class_voc07: dict[str, float] = field(default_factory=dict)  # class name -> VOC07 AP50 (voc07=True)
    skipped_ids: list[int] = field(default_factory=list)

    def counts(self) -> str:
        """'N images scored', and which unreadable images were left out, if any."""
        text = f"{self.num_images} images scored"
        if self.skipped_ids:
            shown = self.skipped_ids[:10] + (["..."] if len(self.skipped_ids) > 10 else [])
            text += (f"; {len(self.skipped_ids)} unreadable images left out of the scoring (image ids "
                     f"{', '.join(map(str, shown))})")
        return text

    def table(self) -> str:
        """The metrics and the per-class AP as a fixed-width text table, values in percent."""
        def row(names, values):
            head = " ".join(f"{name:>7}" for name in names)
            body = " ".join(f"{100 * value:7.2f}" if not math.isnan(value) else f"{'-':>7}" for value in values)
            return f"{head}\n{body}"

        lines = [row(METRIC_NAMES[:6], [self.metrics[k] for k in METRIC_NAMES[:6]]),
                 row(METRIC_NAMES[6:], [self.metrics[k] for k in METRIC_NAMES[6:]])]

        def cell(value: float) -> str:
            return f"{100 * value:6.2f}" if not math.isnan(value) else f"{'-':>6}"

        if "AP50_VOC07" in self.metrics:
            lines.append(f"VOC07 AP50 (11-point, difficult ignored): {cell(self.metrics['AP50_VOC07']).strip()}")
        if self.per_class:
            width = max(len(name) for name in self.per_class)
            voc = self.per_class_voc07
            lines.append("per-class AP:")
            if voc:
                lines.append(f"  {'':<{width}} {'COCO':>6} {'VOC07':>6}")
            lines += [f"  {name:<{width}} {cell(ap)}" + (f" {cell(voc.get(name, math.nan))}" if voc else "")
                      for name, ap in self.per_class.items()]
        return "\n".join(lines)

    def write_results_json(self, path: str | Path) -> Path:
        """Write the detections as a COCO results JSON file (the format of the COCO test server)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path


# --------------------------------------------------------------------------------------------------------
# Detections -> COCO results
# --------------------------------------------------------------------------------------------------------


def boxes_to_original(boxes: Tensor, matrix: Tensor, orig_size: tuple[int, int]) -> Tensor:
    """Map boxes from a view back to the original image.

    boxes: float (K, 4) xyxy pixels in the view; matrix: float64 (3, 3), original (x, y, 1) -> view;
    orig_size: (h, w) of the original image. Returns float32 (K, 4) xyxy in original pixels, clipped to it.
    The 4 corners go through inverse(matrix) and the enclosing box is kept, which is exact for the
    resize / flip of a test view.
    """
    inverse = torch.linalg.inv(matrix.double())  # (3, 3) view -> original
    return clip_boxes(warp_boxes(boxes.float(), inverse), orig_size)  # (K, 4)


def to_coco_results(detections: list[dict], *, matrices: Tensor, orig_sizes: list[tuple[int, int]],
                    image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """One batch of detections as COCO result entries.

    detections: B dicts {"boxes" (K, 4) xyxy in the batch frame, "scores" (K,), "labels" (K,) int64 in 0..C-1};
    matrices: float64 (B, 3, 3) original -> batch frame; category_ids[label] is the COCO id of a label.
    Returns [{"image_id": int, "category_id": int, "bbox": [x, y, w, h] original pixels, "score": float}].
    """
    results = []
    for det, matrix, orig_size, image_id in zip(detections, matrices, orig_sizes, image_ids):
        boxes = boxes_to_original(det["boxes"].detach().cpu(), matrix.cpu(), orig_size)  # (K, 4)
        results += coco_entries(boxes, det["scores"], det["labels"], image_id=image_id, category_ids=category_ids)
    return results


def coco_entries(boxes: Tensor, scores: Tensor, labels: Tensor, *, image_id: int,
                 category_ids: list[int]) -> list[dict]:
    """One image's detections, already in original pixels, as COCO result entries.

    boxes: float (K, 4) xyxy original pixels; scores (K,); labels int64 (K,) in 0..C-1.
    Returns [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], rounded for the JSON file.
    """
    boxes = boxes.detach().cpu().float()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    return [{"image_id": int(image_id), "category_id": int(category_ids[label]),
             "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
            for box, score, label in zip(xywh, scores.tolist(), labels.tolist())]


# --------------------------------------------------------------------------------------------------------
# Multi-scale and flip testing: passes -> one set of detections per image
# --------------------------------------------------------------------------------------------------------


def hflip_batch(images: Tensor, image_sizes: Tensor, matrices: Tensor) -> tuple[Tensor, Tensor]:
    """The batch mirrored left-right, image by image.

    images: float (B, 3, H, W) zero-padded at the bottom / right; image_sizes: int (B, 2) (h, w) of the valid
    regions; matrices: float64 (B, 3, 3) original -> batch frame.
    Returns (images (B, 3, H, W), matrices (B, 3, 3)): each valid region is mirrored within itself, so the
    padding stays at the bottom / right and image_sizes still hold, and each matrix gains the mirror,
    hflip_matrix(w_i) @ matrices[i], so that `boxes_to_original` undoes it like any other view.
    """
    flipped, flipped_matrices = images.clone(), matrices.clone()
    for i, (h, w) in enumerate(image_sizes.tolist()):
        flipped[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
        flipped_matrices[i] = hflip_matrix(w).to(matrices) @ matrices[i]
    return flipped, flipped_matrices


def merge_detections(passes: list[dict[str, Tensor]], *, iou_threshold: float, max_detections: int,
                     nms_single_pass: bool = False) -> dict[str, Tensor]:
    """Fuse the detections of one image from several test passes (scales, flips).

    passes: P dicts {"boxes" float (K_p, 4) xyxy, "scores" (K_p,), "labels" int64 (K_p,)}, every pass in the
    same frame (the original image's pixels).
    Returns {"boxes" (D, 4), "scores" (D,), "labels" (D,)}, D <= max_detections, by decreasing score: the
    union of the passes after class-wise NMS at `iou_threshold`, so that an object found at several scales
    keeps its best-scored box, and boxes of different classes never suppress each other.
    A single pass has nothing to merge: it keeps its own detector's NMS and is only cut to max_detections,
    so one pass at the test size gives exactly the single-scale detections (nms_single_pass=True runs the
    merge's NMS on it all the same, so that one pass and a duplicated pass give the same set).
    """
    boxes = torch.cat([p["boxes"].float() for p in passes])  # (sum K_p, 4)
    scores = torch.cat([p["scores"].float() for p in passes])  # (sum K_p,)
    labels = torch.cat([p["labels"] for p in passes])  # (sum K_p,)
    if len(passes) > 1 or nms_single_pass:
        keep = batched_nms(boxes, scores, labels, iou_threshold)  # indices by decreasing score
    else:
        keep = scores.argsort(descending=True, stable=True)
    keep = keep[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


@torch.no_grad()
def predict_multiscale(detector, images: Tensor, image_sizes: Tensor, *, scales: tuple[float, ...] = (0.5, 1.0, 1.5),
                       nms_threshold: float = 0.5, max_detections: int = 100,
                       size_divisible: int = 32) -> list[dict[str, Tensor]]:
    """Detections of a batch resized by each scale, merged per image by class-wise NMS (SED paper, Table 7).

    The in-memory counterpart of `evaluate_multiscale`, for a batch at hand. images: float32 (B, 3, H, W) in
    [0, 1]; image_sizes: int64 (B, 2) valid (h, w). Each pass's boxes are scaled back to the batch's pixels and
    clipped to the image; boxes left without area are dropped (NMS needs an area); `merge_detections` fuses the
    passes, NMS included for a single scale. Returns B dicts {"boxes" (K, 4) xyxy in the batch's pixels,
    "scores" (K,), "labels" (K,) int64}, K <= max_detections, by decreasing score.
    """
    H, W = images.shape[-2:]
    passes = [[] for _ in range(images.shape[0])]  # per image: its detections of every scale
    for scale in scales:
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        resized = F.interpolate(images, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
        resized = pad_to_multiple(resized, size_divisible)
        sizes = torch.round(image_sizes.double() * scale).clamp(min=1).to(image_sizes.dtype)  # (B, 2)
        back = torch.tensor([W / size[1], H / size[0]] * 2, dtype=images.dtype, device=images.device)  # (4,)
        for i, d in enumerate(detectors.predict(detector, resized, sizes)):
            boxes = clip_boxes(d["boxes"] * back, image_sizes[i])  # (K, 4) in the batch's pixels
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            passes[i].append({"boxes": boxes[nonempty], "scores": d["scores"][nonempty],
                              "labels": d["labels"][nonempty]})
    return [merge_detections(image_passes, iou_threshold=nms_threshold, max_detections=max_detections,
                             nms_single_pass=True) for image_passes in passes]


# --------------------------------------------------------------------------------------------------------
# COCOeval
# --------------------------------------------------------------------------------------------------------


def load_coco(json_path: str | Path, *, verbose: bool = False) -> COCO:
    """pycocotools' COCO index of a ground-truth file, without its prints unless verbose."""
    with _quiet(not verbose):
        return COCO(str(json_path))


def coco_metrics(coco_gt: COCO, results: list[dict], *, image_ids: list[int], class_names: dict[int, str],
                 verbose: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """COCOeval("bbox") of `results` over `image_ids`.

    class_names: COCO category id -> name, in the order the per-class table lists them.
    Returns (metrics: METRIC_NAMES -> float in [0, 1] or nan, per_class: name -> AP in [0, 1] or nan).
    No results at all: every metric is 0 (pycocotools cannot load an empty list).
    """
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}, {name: 0.0 for name in class_names.values()}
    with _quiet(not verbose):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: (float(v) if v >= 0 else math.nan) for name, v in zip(METRIC_NAMES, evaluator.stats)}

    # precision: (T iou thresholds, R recall points, K categories, A area ranges, M max-dets); -1 = undefined.
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        if category_id not in class_names:
            continue
        p = precision[:, :, k, 0, -1]  # (T, R): all areas, 100 detections
        per_class[class_names[category_id]] = float(np.mean(p[p > -1])) if (p > -1).any() else math.nan
    per_class = {name: per_class.get(name, math.nan) for name in class_names.values()}
    return metrics, per_class


# --------------------------------------------------------------------------------------------------------
# Pascal VOC07 AP50
# --------------------------------------------------------------------------------------------------------

VOC07_IOU = 0.5  # a detection matches when IoU > 0.5 (strictly, as the devkit compares)
VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)  # the 11 recall points, built as the devkit builds them


def voc07_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC07's 11-point AP: the mean over t in {0, 0.1, ..., 1} of the highest precision at recall >= t
    (0 where no point reaches t). recall, precision: float (D,), one point per detection by decreasing score."""
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in VOC07_RECALLS]
    return float(np.mean(points))


def voc07_metrics(coco_gt: COCO, results: list[dict], *, image_ids: list[int],
                  class_names: dict[int, str]) -> tuple[float, dict[str, float]]:
    """VOC07 AP50 of `results` (COCO result entries) over `image_ids`, the devkit's rules.

    Ground truth: the annotations of `coco_gt` (bbox [x, y, w, h], 0-based continuous, as data/voc.py writes
    them); an annotation is difficult when its `difficult` flag is set (without the flag, when it is crowd).
    In these coordinates plain IoU equals the devkit's "+1" IoU on its 1-based pixel boxes (data/voc.py).
    Per class, detections by decreasing score (ties in input order): the ground-truth box of the same image
    with the highest IoU is its match if IoU > 0.5; a match to a difficult object is ignored (neither true nor
    false positive), a first match to another object is a true positive, a repeated one a false positive, and
    no match a false positive. recall = TP / (non-difficult objects), precision = TP / (TP + FP), and AP is
    `voc07_average_precision`. class_names: category id -> name.
    Returns (mean AP over the classes with a non-difficult object, name -> AP; nan for the others).
    """
    images = set(image_ids)
    grouped: dict[tuple[int, int], list[tuple[list[float], bool]]] = {}  # (category, image) -> [(xyxy, difficult)]
    for ann in coco_gt.dataset.get("annotations", []):
        if ann["image_id"] in images:
            x, y, w, h = ann["bbox"]
            difficult = bool(ann.get("difficult", ann.get("iscrowd", 0)))
            grouped.setdefault((ann["category_id"], ann["image_id"]), []).append(([x, y, x + w, y + h], difficult))
    truth = {key: (np.array([box for box, _ in objects], dtype=np.float64).reshape(-1, 4),  # (G, 4) xyxy
                   np.array([difficult for _, difficult in objects], dtype=bool))  # (G,)
             for key, objects in grouped.items()}
    by_class: dict[int, list[dict]] = {}
    for r in results:
        if r["image_id"] in images:
            by_class.setdefault(r["category_id"], []).append(r)

    per_class = {}
    for category_id, name in class_names.items():
        num_objects = sum(int((~difficult).sum()) for (c, _), (_, difficult) in truth.items() if c == category_id)
        if num_objects == 0:
            per_class[name] = math.nan
            continue
        detections = by_class.get(category_id, [])
        det_boxes = np.array([r["bbox"] for r in detections], dtype=np.float64).reshape(-1, 4)  # (D, 4) xywh
        det_boxes[:, 2:] += det_boxes[:, :2]  # (D, 4) xyxy
        # Each detection's best ground-truth box of its image (the devkit's argmax over all of them, found or
        # not), one IoU matrix per image: best (D,) index or -1 without ground truth, best_iou (D,).
        best, best_iou = np.full(len(detections), -1), np.zeros(len(detections))
        per_image: dict[int, list[int]] = {}
        for index, r in enumerate(detections):
            per_image.setdefault(r["image_id"], []).append(index)
        for image_id, indices in per_image.items():
            if (category_id, image_id) in truth:
                iou = _iou_matrix(det_boxes[indices], truth[(category_id, image_id)][0])  # (D_i, G)
                best[indices], best_iou[indices] = iou.argmax(axis=1), iou.max(axis=1)
        found = {key: np.zeros(len(difficult), dtype=bool) for key, (_, difficult) in truth.items()
                 if key[0] == category_id}  # objects already matched
        order = np.argsort([-r["score"] for r in detections], kind="stable")
        tp, fp = np.zeros(len(detections)), np.zeros(len(detections))
        for rank, index in enumerate(order):
            key, j = (category_id, detections[index]["image_id"]), best[index]
            if j < 0 or best_iou[index] <= VOC07_IOU:
                fp[rank] = 1
            elif truth[key][1][j]:  # difficult: ignored
                continue
            elif found[key][j]:  # a second detection of the same object
                fp[rank] = 1
            else:
                tp[rank], found[key][j] = 1, True
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / num_objects
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = voc07_average_precision(recall, precision)
    defined = [ap for ap in per_class.values() if not math.isnan(ap)]
    return (float(np.mean(defined)) if defined else math.nan), per_class


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a (N, 4) with every box of b (M, 4), both xyxy: (N, M)."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih  # (N, M)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (N,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (M,)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@torch.no_grad()
def evaluate(detector, loader, *, coco_gt: COCO, category_ids: list[int], class_names: list[str],
             max_images: int | None = None, verbose: bool = False, progress: bool = False,
             voc07: bool = False) -> Evaluation:
    """Run `detectors.predict` over a validation loader and score it with COCOeval (and VOC07 AP50 if voc07).

    detector: a `detectors.Detector` (model, criterion, postprocessor); it runs in eval mode and is put back
    into its previous mode afterwards. loader: yields `structures.Batch` (images float32 (B, 3, H, W) in
    [0, 1], image_sizes, matrices original -> batch frame, image_ids, orig_sizes).
    category_ids[c] / class_names[c]: COCO id and name of contiguous label c.
    max_images: stop after this many images (the metrics cover only them).

    Under torchrun every rank calls this with its share of the images (`build_val_loader(rank=...)`; then
    max_images / N each): rank 0 gathers the detections and scores them, every rank returns the scores, the
    total image count and the slowest rank's seconds; `results` holds all detections on rank 0, and each
    other rank's own share there.
    """
    device = next(detector.model.parameters()).device
    results, image_ids, skipped_ids, seconds = [], [], [], 0.0
    with _eval_mode(detector.model):
        for batch in _progress(loader, enabled=progress):
            skipped_ids += batch.skipped_ids  # unreadable: left out, never replaced by another image
            if not batch.image_ids:
                continue
            start = time.perf_counter()
            detections = detectors.predict(detector, batch.images.to(device), batch.image_sizes.to(device))
            seconds += time.perf_counter() - start
            results += to_coco_results(detections, matrices=batch.matrices, orig_sizes=batch.orig_sizes,
                                       image_ids=batch.image_ids, category_ids=category_ids)
            image_ids += list(batch.image_ids)
            if max_images is not None and len(image_ids) * distributed.world_size() >= max_images:
                break
    return _score(results, image_ids, skipped_ids, seconds, coco_gt=coco_gt, category_ids=category_ids,
                  class_names=class_names, verbose=verbose, voc07=voc07)


@torch.no_grad()
def evaluate_multiscale(detector, loaders: list, *, hflip: bool = False, iou_threshold: float = 0.5,
                        max_detections: int = 100, coco_gt: COCO, category_ids: list[int], class_names: list[str],
                        max_images: int | None = None, verbose: bool = False,
                        progress: bool = False, voc07: bool = False) -> Evaluation:
    """Test-time augmentation: `evaluate` with every image seen at several scales (and mirrored), merged.

    loaders: one validation loader per test scale (each with its own eval transform), over the same images
    in the same order and batch size, so that zipping them gives the views of one batch of images.
    hflip: also run every scale mirrored (`hflip_batch`). Each pass's detections are mapped to original
    pixels through the batch's matrices, then `merge_detections(iou_threshold, max_detections)` fuses the
    2 * S (or S) passes of each image. Other arguments and the result as in `evaluate`; `seconds` covers
    every pass, the flips and the merging.
    """
    device = next(detector.model.parameters()).device
    results, image_ids, skipped_ids, seconds = [], [], [], 0.0
    with _eval_mode(detector.model):
        for batches in _progress(zip(*loaders), total=len(loaders[0]), enabled=progress):
            ids = list(batches[0].image_ids)
            if any(list(batch.image_ids) != ids for batch in batches):
                raise ValueError("evaluate_multiscale: the loaders do not yield the same images in the same order")
            skipped_ids += batches[0].skipped_ids
            if not ids:
                continue
            start = time.perf_counter()
            passes = [[] for _ in ids]  # per image: its detections of every pass, in original pixels
            for batch in batches:
                images, sizes = batch.images.to(device), batch.image_sizes.to(device)
                views = [(images, batch.matrices)]
                if hflip:
                    views.append(hflip_batch(images, batch.image_sizes, batch.matrices))
                for view_images, matrices in views:
                    detections = detectors.predict(detector, view_images, sizes)
                    for i, (det, matrix) in enumerate(zip(detections, matrices)):
                        boxes = boxes_to_original(det["boxes"].cpu(), matrix, batch.orig_sizes[i])  # (K, 4)
                        passes[i].append({"boxes": boxes, "scores": det["scores"].cpu(),
                                          "labels": det["labels"].cpu()})
            merged = [merge_detections(image_passes, iou_threshold=iou_threshold, max_detections=max_detections)
                      for image_passes in passes]
            seconds += time.perf_counter() - start
            for image_id, det in zip(ids, merged):
                results += coco_entries(det["boxes"], det["scores"], det["labels"], image_id=image_id,
                                        category_ids=category_ids)
            image_ids += ids
            if max_images is not None and len(image_ids) * distributed.world_size() >= max_images:
                break
    return _score(results, image_ids, skipped_ids, seconds, coco_gt=coco_gt, category_ids=category_ids,
                  class_names=class_names, verbose=verbose, voc07=voc07)


def _score(results: list[dict], image_ids: list[int], skipped_ids: list[int], seconds: float, *, coco_gt: COCO,
           category_ids: list[int], class_names: list[str], verbose: bool, voc07: bool = False) -> Evaluation:
    """Gather this rank's COCO results on rank 0, score them there over the images scored (skipped ones left
    out; COCO, and VOC07 AP50 if voc07), and give every rank the scores."""
    names = {category_id: name for category_id, name in zip(category_ids, class_names)}
    # [(results, ids, skipped ids, seconds) per rank] on rank 0
    gathered = distributed.gather((results, image_ids, skipped_ids, seconds))
    summary = None
    if gathered is not None:  # rank 0, or the only process
        results = [r for rank_results, _, _, _ in gathered for r in rank_results]
        image_ids = [i for _, rank_ids, _, _ in gathered for i in rank_ids]
        skipped_ids = sorted(i for _, _, rank_skipped, _ in gathered for i in rank_skipped)
        metrics, per_class = coco_metrics(coco_gt, results, image_ids=image_ids, class_names=names, verbose=verbose)
        per_class_voc07 = {}
        if voc07:
            metrics["AP50_VOC07"], per_class_voc07 = voc07_metrics(coco_gt, results, image_ids=image_ids,
                                                                   class_names=names)
        summary = (metrics, per_class, per_class_voc07, len(image_ids), skipped_ids,
                   max(rank[-1] for rank in gathered))
    metrics, per_class, per_class_voc07, num_images, skipped_ids, seconds = distributed.broadcast(summary)
    return Evaluation(metrics=metrics, per_class=per_class, results=results, num_images=num_images, seconds=seconds,
                      skipped_ids=skipped_ids, per_class_voc07=per_class_voc07)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block, then back in its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(batches, *, total: int | None = None, enabled: bool):
    """A tqdm bar over the batches when enabled (tqdm is imported only then)."""
    if not enabled:
        return batches
    from tqdm import tqdm
    return tqdm(batches, total=total, desc="eval", leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Swallow pycocotools' prints to stdout."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
