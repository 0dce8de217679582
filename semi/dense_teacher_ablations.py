"""Dense Teacher's ablations and diagnostics, apart from the method's own path in semi/dense_teacher.py.

Region strategies (Table 1 of Zhou et al., ECCV 2022, arXiv:2207.02541; docs/METHODS.md, "Dense Teacher"):
"topk" is Eq. 3-4 (the method itself, with `semi.ops.frs_qfl`); "all" puts every row in the region (fg = the
sum of all S_i); "positive" takes the rows the detector's own label assignment makes positive for the
teacher's detections above `pseudo_box_score` (Unbiased Teacher's pseudo-box region), still with dense
targets, so that only the region differs from "topk".

Hard negatives (Table 5, footnote 5): the rows of the region that the detector's label assignment of the
HIDDEN ground truth calls background. "select" (the paper's method) keeps them in the region; "suppress"
moves them out of it (target 0, no box / quality term); "ignore" drops them from every term. In both ablations
the region becomes region AND assigned foreground, and fg is summed over that. This ablation reads the
unlabeled images' annotations, as the paper's did; the method itself never does.

Diagnostics (off unless `report_pseudo_boxes` / `region_diagnostics` ask for them; neither changes a loss):
the teacher's detections above `pseudo_box_score` (which train.py scores against the hidden annotations and
draws), and how the learning region overlaps the rows the hidden ground truth's assignment makes positive.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from detectors import Detector
from detectors.dense import DenseOutput
from detectors.losses import quality_focal_loss
from detectors.precision import in_float32
from semi.core import zero_loss
from semi.ops import QFL_BETA, frs_topk_mask

# --------------------------------------------------------------------------------------------------------
# The region ablations (Table 1, Table 5)
# --------------------------------------------------------------------------------------------------------


class Region(NamedTuple):
    """The learning region over R rows (Eq. 4)."""

    selected: Tensor  # (R,) bool: rows whose target is the teacher's scores, and that get the box / quality terms
    ignored: Tensor  # (R,) bool: rows left out of every term (only the "ignore" ablation of Table 5)
    fg: Tensor  # () sum over the selected rows of S_i = max_c sigmoid(teacher logit), no gradient


@in_float32
def region_qfl(student_logits: Tensor, teacher_logits: Tensor, *, region: Region) -> Tensor:
    """Eq. 2 on a given region: sum over the rows not ignored of QFL(p_s, y), divided by region.fg.

    student_logits, teacher_logits: (R, C) float32/float64 class logits of the same rows; y = sigmoid(teacher)
    on the selected rows and 0 on the others (Eq. 4). Returns a () scalar, differentiable w.r.t. the student
    only; 0 (in the graph) when fg = 0. With the plain top-k region and nothing ignored this is the loss of
    `semi.ops.frs_qfl`, which the method uses in that case.
    """
    targets = torch.where(region.selected[:, None], torch.sigmoid(teacher_logits.detach()), 0.0)  # (R, C)
    per_element = quality_focal_loss(student_logits, targets, beta=QFL_BETA)  # (R, C)
    total = per_element[~region.ignored].sum()
    return total / region.fg if bool(region.fg > 0) else zero_loss(per_element)


def assigned_foreground(detector: Detector, outputs: DenseOutput, boxes: list[dict], *, image_sizes: Tensor,
                        valid: Tensor) -> Tensor:
    """The rows the detector's own label assignment makes positive for the given boxes.

    boxes: B dicts {"boxes" (N_i, 4) xyxy, "labels" int64 (N_i,)} in the batch's frame (pseudo-boxes or the
    hidden ground truth). valid: bool (B, N), the rows inside the images' valid regions. Returns bool (R,) over
    the valid rows.
    """
    targets = [{"boxes": b["boxes"].detach(), "labels": b["labels"]} for b in boxes]
    matched = detector.criterion.assign(outputs, targets, image_sizes).matched  # (B, N), >= 0 where positive
    return (matched >= 0)[valid]  # (B, N) -> (R,)


@in_float32
def ablation_region(teacher_logits: Tensor, *, cfg, predicted_positive: Tensor | None,
                    gt_foreground: Tensor | None) -> Region:
    """The learning region of the ablations (the module docstring); cfg: the method's DenseTeacherConfig (its region,
    ratio and hard_negatives).

    teacher_logits: (R, C). predicted_positive: bool (R,), the rows assigned to the teacher's detections
    (needed for region "positive"). gt_foreground: bool (R,), the rows assigned to the hidden ground truth
    (needed for hard_negatives "ignore" / "suppress").
    """
    scores = torch.sigmoid(teacher_logits.detach().amax(dim=1))  # (R,) S_i of Eq. 3
    if cfg.region == "topk":
        selected = frs_topk_mask(teacher_logits, ratio=cfg.ratio).mask
    elif cfg.region == "all":
        selected = torch.ones_like(scores, dtype=torch.bool)
    else:
        selected = predicted_positive
    ignored = torch.zeros_like(selected)
    if cfg.hard_negatives != "select":
        hard_negative = selected & ~gt_foreground  # footnote 5: the region minus the assigned foreground
        selected = selected & gt_foreground
        if cfg.hard_negatives == "ignore":
            ignored = hard_negative
    return Region(selected=selected, ignored=ignored, fg=scores[selected].sum())


def ablation_loss(*, student: Detector, teacher: Detector, teacher_out: DenseOutput, student_logits: Tensor,
                  teacher_logits: Tensor, hidden_targets: list[dict], image_sizes: Tensor, valid: Tensor,
                  cfg) -> tuple[Region, Tensor]:
    """The learning region of cfg's ablation and Eq. 2's classification term on it.

    teacher_out: the teacher's raw outputs on the weak view; student_logits, teacher_logits: (R, C) over the valid
    rows (`valid` bool (B, N)); hidden_targets: B dicts {"boxes", "labels"}, the unlabeled images' annotations
    (read only by the hard-negative ablations). Returns (Region, loss_cls ()).
    """
    predicted_positive = gt_foreground = None
    if cfg.region == "positive":
        detections = teacher_detections(teacher, teacher_out, image_sizes, score=cfg.pseudo_box_score)
        predicted_positive = assigned_foreground(student, teacher_out, detections, image_sizes=image_sizes,
                                                 valid=valid)
    if cfg.hard_negatives != "select":
        gt_foreground = assigned_foreground(student, teacher_out, hidden_targets, image_sizes=image_sizes,
                                            valid=valid)
    region = ablation_region(teacher_logits, cfg=cfg, predicted_positive=predicted_positive,
                             gt_foreground=gt_foreground)
    return region, region_qfl(student_logits, teacher_logits, region=region)


# --------------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_detections(teacher: Detector, teacher_out: DenseOutput, image_sizes: Tensor, *,
                       score: float) -> list[dict[str, Tensor]]:
    """The teacher's postprocessed detections above `score`: B dicts {"boxes" (K, 4) xyxy in the weak view,
    "scores" (K,), "labels" (K,)}."""
    return [{key: value[d["scores"] > score] for key, value in d.items()}
            for d in teacher.postprocessor(teacher_out, image_sizes)]


def region_gt_overlap(selected: Tensor, gt_foreground: Tensor) -> dict[str, float]:
    """How the learning region (bool (R,)) meets the rows the hidden ground truth's assignment makes positive
    (bool (R,)): the share of the region's rows that are foreground, and the share of the foreground it covers."""
    rows = int(selected.sum())
    hits = int((selected & gt_foreground).sum())
    return {"region_gt_precision": hits / max(1, rows),
            "region_gt_recall": hits / max(1, int(gt_foreground.sum()))}
