"""What the three methods share: loss bookkeeping, the unsupervised weight's ramp, boxes moved between views,
and pseudo-label diagnostics.

Loss bookkeeping (METHODS.md, "Loss"): a detector's criterion and a method's `unsupervised_loss` return
unweighted terms with the same key names ("loss_cls", "loss_box", ...). The training loop prefixes them
(`sup_` / `unsup_`) and `weighted_total` is the one place where the weights are applied:

    losses = prefix(sup, "sup_") | prefix(unsup.losses, "unsup_")
    total = weighted_total(losses, weights)         # sum_k weights[k] * losses[k]

BatchNorm statistics: a detector trained from scratch keeps trainable BatchNorm, whose running statistics are
what the teacher and the evaluation normalise with. `frozen_norm_statistics` keeps them those of the labeled
weak view, the images a detector is tested on, while the student also sees strong views and X_hat.

Diagnostics: the "unlabeled" images of the built-in dataset and of COCO do have annotations. They never
reach a loss, but `pseudo_label_quality` scores the teacher's pseudo-boxes against them (precision and
recall at IoU 0.5), and `draw_pseudo_labels` draws one image's pseudo-boxes on the weak view and carried
onto the strong view.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import box_iou

from structures import carry_boxes


@dataclass
class UnsupOutput:
    """What `method.unsupervised_loss(...)` returns (ARCHITECTURE.md, "The method interface").

    losses: unweighted scalar terms, keys without prefix ("loss_cls", ...); the same keys every iteration,
        finite even when there is no pseudo-label (then 0, connected to the graph).
    pseudo_boxes: B dicts {"boxes" float32 (K_i, 4) xyxy pixels of the WEAK view, "scores" (K_i,),
        "labels" int64 (K_i,)}: the pseudo-labels the method trained on, for diagnostics; None if the
        method has no hard pseudo-labels.
    stats: plain floats worth logging (number of pseudo-boxes, ...).
    """

    losses: dict[str, Tensor]
    pseudo_boxes: list[dict[str, Tensor]] | None = None
    stats: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# Loss bookkeeping
# ------------------------------------------------------------------------------------------------------------


def prefix(losses: dict[str, Tensor], p: str) -> dict[str, Tensor]:
    """{"loss_cls": x} -> {p + "loss_cls": x}."""
    return {p + key: value for key, value in losses.items()}


def weighted_total(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k weights[k] * losses[k]: the one place where loss weights are applied.

    losses: prefixed scalar terms. A `sup_` term without a weight weighs 1; an `unsup_` term (or any
    other key) without a weight is an error, since a silently unweighted unsupervised term would change
    the method. Terms of weight 0 are left out (so that a term nobody trains on cannot poison the total).
    Returns a scalar Tensor, connected to the graph of every term with a non-zero weight.
    """
    if not losses:
        raise ValueError("semi/core.py: weighted_total got no loss terms")
    total = None
    for key, value in losses.items():
        if key in weights:
            weight = float(weights[key])
        elif key.startswith("sup_"):
            weight = 1.0
        else:
            raise KeyError(f"semi/core.py: no weight for loss term {key!r}; weights given for {sorted(weights)}")
        if weight == 0.0:
            continue
        term = weight * value
        total = term if total is None else total + term
    return total if total is not None else zero_loss(next(iter(losses.values())))


def linear_ramp(iteration: int, *, start: int, length: int) -> float:
    """The unsupervised weight's factor: 0 during burn-in (t < start), then a linear ramp from 0 to 1 over
    `length` iterations, then 1. length = 0 is a step at `start`.

    Dense Teacher (COCO): start 5000, length 5000. Soft Teacher: start 0, length 0 (no burn-in).
    """
    if iteration < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (iteration - start) / length)


def zero_loss(like: Tensor) -> Tensor:
    """A scalar 0 connected to `like`'s graph (zero gradient), for a term with nothing to learn from.

    Summing an empty slice gives an exact 0 even when `like` holds inf or NaN (`like.sum() * 0` would not),
    and keeps the term in the loss dict so that every iteration (and every rank) has the same keys.
    """
    return like.reshape(-1)[:0].sum()


@contextmanager
def frozen_norm_statistics(model: nn.Module, *, enabled: bool = True):
    """Within the block, BatchNorm layers of `model` normalise by batch statistics as usual (in train mode) but
    leave their running statistics (mean, variance, batch count) as they were.

    The papers fine-tune an ImageNet backbone with frozen BatchNorm, so their unsupervised forward passes leave
    the normalisation alone. From scratch, every forward pass of the student in train mode moves the running
    statistics by momentum 0.1; the strong views and SED's downsampled X_hat would then make up most of them,
    and the teacher (an EMA of the student's buffers too) and the evaluation, both in eval mode, would
    normalise clean images by the statistics of other images. Momentum 0 makes each update
    `1 * running + 0 * batch`, exactly the old value; the buffers are not written over afterwards, because
    the backward of batch norm reads the very tensors the forward was given. enabled=False: a no-op.
    """
    if not enabled:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)  # an int64 counter that no backward reads


# ------------------------------------------------------------------------------------------------------------
# Pseudo-label diagnostics
# ------------------------------------------------------------------------------------------------------------


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
        raise ValueError(f"semi/core.py: {len(pseudo)} pseudo-label dicts for {len(hidden_targets)} images")
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


def draw_pseudo_labels(unlabeled, pseudo_boxes: Sequence[dict[str, Tensor]], path: str | Path, *, index: int = 0,
                       class_names: Sequence[str] | None = None, min_size: int = 384) -> Path:
    """One unlabeled image, side by side: the weak view with the teacher's pseudo-boxes, and the strong view
    with the same boxes carried there by the views' matrices. Hidden ground truth in thin white boxes on both.

    unlabeled: a `data.loader.UnlabeledBatch`; pseudo_boxes: B dicts {"boxes" (K, 4) xyxy pixels of the weak
    view, "scores" (K,), "labels" (K,)}; index: which image of the batch. Writes a PNG; returns its path.
    """
    from engine.visualize import draw_boxes  # drawing lives in engine/; imported here only for diagnostics

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
