"""Pseudo-label diagnostics: the teacher's pseudo-boxes against the hidden annotations, and drawn.

The "unlabeled" images of the built-in dataset and of COCO do have annotations. They never reach a loss, but
`pseudo_label_quality` scores the pseudo-boxes a method trained on against them (precision and recall at IoU
0.5), and `draw_pseudo_labels` draws one image's pseudo-boxes on the weak view and carried onto the strong view.
train.py logs the first every iteration a method returns pseudo-boxes and draws every `--draw-period`.
"""

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou

from engine.visualize import draw_boxes
from structures import UnlabeledBatch, carry_boxes



def match_pseudo_labels(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *,
                        iou: float = 0.5) -> Tensor:
    """Greedy, class-aware matching of one image's pseudo-boxes to its hidden ground truth.

    In decreasing score order (ties by index), each pseudo-box takes the still unmatched ground-truth box
    of its class with the highest IoU, if that IoU is >= `iou` (the PASCAL / COCO evaluation rule).
    boxes: (K, 4) xyxy, scores: (K,), labels: (K,) int64; gt_boxes: (N, 4) xyxy, gt_labels: (N,) int64, in
    the same frame. Returns bool (K,): which pseudo-boxes are true positives.
    """
    K, N = len(boxes), len(gt_boxes)
    hit = torch.zeros(K, dtype=torch.bool, device=boxes.device)
    if K == 0 or N == 0:
        return hit
    overlaps = box_iou(boxes.double(), gt_boxes.double())  # (K, N)
    overlaps[labels[:, None] != gt_labels[None, :]] = -1.0  # class-aware
    taken = torch.zeros(N, dtype=torch.bool, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # (K,)
    for k in order.tolist():
        candidates = overlaps[k].masked_fill(taken, -1.0)  # (N,)
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            hit[k] = True
            taken[best] = True
    return hit


def pseudo_label_quality(pseudo: Sequence[dict[str, Tensor]], hidden_targets: Sequence[dict[str, Tensor]], *,
                         iou: float = 0.5) -> dict[str, float]:
    """Precision and recall of pseudo-boxes against the hidden annotations of the unlabeled images.

    pseudo: B dicts {"boxes" (K_i, 4), "scores" (K_i,), "labels" (K_i,)}; hidden_targets: B dicts
    {"boxes" (N_i, 4), "labels" (N_i,)}, both xyxy pixels of the same (weak) view. Matching per image as in
    `match_pseudo_labels`; counts summed over the batch. Returns
    {"pseudo_precision": TP / K, "pseudo_recall": TP / N, "pseudo_num": K / B, "pseudo_num_gt": N / B} with K, N
    the batch's totals. Precision is nan when there is no pseudo-box, recall nan when there is no hidden box:
    "undefined", which a 0 would hide (a teacher that proposes nothing is not wrong about anything).
    """
    if len(pseudo) != len(hidden_targets):
        raise ValueError(f"engine/pseudo_labels.py: {len(pseudo)} pseudo-label dicts for {len(hidden_targets)} images")
    true_pos = num_pseudo = num_gt = 0
    for p, t in zip(pseudo, hidden_targets):
        hit = match_pseudo_labels(p["boxes"], p["scores"], p["labels"], t["boxes"], t["labels"], iou=iou)
        true_pos += int(hit.sum())
        num_pseudo += len(p["boxes"])
        num_gt += len(t["boxes"])
    images = max(1, len(pseudo))
    return {"pseudo_precision": true_pos / num_pseudo if num_pseudo else math.nan,
            "pseudo_recall": true_pos / num_gt if num_gt else math.nan,
            "pseudo_num": num_pseudo / images, "pseudo_num_gt": num_gt / images}


def draw_pseudo_labels(unlabeled: UnlabeledBatch, pseudo_boxes: Sequence[dict[str, Tensor]], path: str | Path, *, index: int = 0,
                       class_names: Sequence[str] | None = None, min_size: int = 384) -> Path:
    """One unlabeled image, side by side: the weak view with the teacher's pseudo-boxes, and the strong view
    with the same boxes carried there by the views' matrices. Hidden ground truth in thin white boxes on both.

    unlabeled: an `UnlabeledBatch`; pseudo_boxes: B dicts {"boxes" (K, 4) xyxy pixels of the weak
    view, "scores" (K,), "labels" (K,)}; index: which image of the batch. Writes a PNG; returns its path.
    """
    weak, strong = unlabeled.weak, unlabeled.strong
    p = {key: value.detach().cpu() for key, value in pseudo_boxes[index].items()}
    h_w, w_w = (int(v) for v in weak.image_sizes[index])
    h_s, w_s = (int(v) for v in strong.image_sizes[index])
    carried = carry_boxes(p["boxes"].float(), weak.matrices[index].cpu(), strong.matrices[index].cpu(),
                          dst_size=(h_s, w_s))  # (K, 4) in the strong view

    if class_names is None:
        labels = [p["labels"], weak.targets[index]["labels"].cpu()]
        largest = max([int(x.max()) for x in labels if len(x)], default=0)
        class_names = [str(c) for c in range(largest + 1)]
    panels = []
    for batch, boxes, (h, w) in ((weak, p["boxes"], (h_w, w_w)), (strong, carried, (h_s, w_s))):
        target = batch.targets[index]
        panels.append(draw_boxes(batch.images[index, :, :h, :w].cpu(), class_names=list(class_names),
                                 boxes=boxes, labels=p["labels"], scores=p["scores"], score_threshold=0.0,
                                 gt_boxes=target["boxes"].cpu(), gt_labels=target["labels"].cpu(),
                                 min_size=min_size))
    gap = 8
    canvas = Image.new("RGB", (sum(im.width for im in panels) + gap, max(im.height for im in panels)), (40, 40, 40))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + gap, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
