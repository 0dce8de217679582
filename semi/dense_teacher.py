"""Dense Teacher, paper 002 (Zhou et al., ECCV 2022).

Dense Teacher replaces pseudo-boxes by the teacher's raw dense predictions: no NMS, no score threshold, no
label assignment. For every location of every pyramid level of the unlabeled images:

* Dense pseudo-label (Sec. 3.3). The teacher sees the weak view; its post-sigmoid class scores at a location
  are the targets of the student, which sees the strong view of the same pixels (colour, blur, grayscale and
  erasing only, so both maps line up location for location).

* Learning region (Eq. 3-4). S_i = max_c p^t_ic ranks the rows (locations x anchors) of ALL unlabeled images
  of the batch together; the top k = int(R * ratio) rows (ratio 1%) keep the teacher's scores as targets,
  every other row gets the target 0: it is suppressed, not ignored.

* Classification (Eq. 2), Quality Focal Loss over every element (row, class):

      QFL(p_s, y) = BCE(p_s, y) * |y - p_s|^2,   y = p_t in the region, 0 outside,   summed and divided by
      fg = sum over the region of S_i.

* Regression and quality on the region only (Sec. 3.3 "IoU loss on this branch"): GIoU loss between the
  student's and the teacher's box at the same location (FCOS: decoded from the (l, t, r, b) distances), and
  BCE(sigmoid(s_q), sigmoid(t_q)) on FCOS's quality branch; both averaged over the region's rows.

* Schedule (METHODS.md). Supervised only during a burn-in (5k), then the unsupervised weights ramp linearly
  to their full value (4 / 1 / 1 for cls / box / quality) over 5k more; the teacher is copied from the student
  at 3k and follows it by EMA (0.9996, the whole state). The labeled images take the supervised loss on both
  their weak and their strong view.

What the paper leaves open, decided here:
  - Padding. Locations whose centre lies in the zero padding of the batch (outside the image's valid region)
    are not rows at all: they are neither ranked, nor pushed to 0, nor counted in R. Both views of a
    pixel-aligned pair have the same valid region.
  - RetinaNet (Table 6): rows are anchors (A per location). The regression term compares the student's and
    the teacher's deltas (dx, dy, dw, dh) of the same anchor with the L1 loss RetinaNet trains with
    (`anchor_box_loss="l1"`, summed over the 4 deltas, averaged over rows); `"giou"` decodes both against the
    anchor and applies the paper's IoU loss instead. RetinaNet has no quality branch.
  - The GIoU term is an unweighted mean over the region (METHODS.md); the authors' code weights it by the
    teacher's quality output.
  - Region strategies (Table 1): "topk" is Eq. 3-4; "all" puts every row in the region (fg = sum of all
    S_i); "positive" takes the rows the detector's own label assignment makes positive for the teacher's
    detections above `pseudo_box_score` (the pseudo-box region of Unbiased Teacher), still with dense
    targets, so that only the region differs from "topk".
  - Hard negatives (Table 5, footnote 5): the rows of the region that the detector's label assignment of the
    HIDDEN ground truth calls background. "select" (the paper's method) keeps them in the region; "suppress"
    moves them out of it (target 0, no box / quality term); "ignore" drops them from every term. In both
    ablations the region becomes region AND assigned foreground, and fg is summed over that. This ablation
    reads the unlabeled images' annotations, as the paper's did; nothing else in the method does.
  - fg = 0 (an empty region, e.g. k rounds to 0): the classification term is 0, still in the graph.

The file reads top to bottom: configuration -> rows of a dense output -> the three terms -> the region
ablations -> the method object the training loop calls.
"""

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectors import Detector
from detectors.box_ops import BoxCoder, LinearBoxCoder, giou_loss
from detectors.dense import DenseOutput
from detectors.losses import l1_loss, quality_focal_loss
from detectors.precision import in_float32
from detectors.retinanet import BOX_WEIGHTS as RETINANET_BOX_WEIGHTS
from semi.core import UnsupOutput, linear_ramp, zero_loss
from semi.ema import DenseTeacherEMA
from semi.ops import QFL_BETA, frs_qfl, frs_topk_mask
from structures import UnlabeledBatch

DETECTORS = ("fcos", "retinanet")
REGIONS = ("topk", "all", "positive")
HARD_NEGATIVES = ("select", "ignore", "suppress")
ANCHOR_BOX_LOSSES = ("l1", "giou")

# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass
class DenseTeacherConfig:
    """Every setting of Dense Teacher. Defaults: the authors' COCO-Standard 10% settings (METHODS.md).

    The schedule lengths are plain fields in iterations; `scaled(fraction)` shortens all three at once for a
    shorter run (e.g. the built-in dataset's preset).
    """

    # Eq. 3-4 and the ablations of Table 1, 5 and 7a (see the module docstring for the exact readings).
    ratio: float = 0.01  # k: the share of all rows of the batch in the learning region
    region: str = "topk"  # "topk" (Eq. 3-4), "all" or "positive" (Table 1)
    hard_negatives: str = "select"  # "select", "ignore" or "suppress" (Table 5)
    pseudo_box_score: float = 0.5  # teacher detections above it: the "positive" region and the diagnostics

    # Regression on RetinaNet's anchors (Table 6): "l1" between deltas, or "giou" between decoded boxes.
    anchor_box_loss: str = "l1"

    # Unsupervised loss weights (authors' code: logits 4, deltas 1, quality 1; Table 7b's w_u is the first).
    weight_cls: float = 4.0
    weight_box: float = 1.0
    weight_quality: float = 1.0

    # Schedule, in iterations: supervised only before `burn_in`, then a linear ramp of the unsupervised
    # weights over `ramp` iterations; the teacher is copied from the student at `teacher_init` and follows
    # it with `ema_momentum` from then on.
    burn_in: int = 5000
    ramp: int = 5000
    teacher_init: int = 3000
    ema_momentum: float = 0.9996

    # Diagnostics: the teacher's detections above pseudo_box_score, and how the region overlaps the label
    # assignment of the hidden ground truth. Neither changes the loss.
    report_pseudo_boxes: bool = True
    region_diagnostics: bool = True

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"semi/dense_teacher.py: DenseTeacherConfig.{message}")

        check(0.0 <= self.ratio <= 1.0, f"ratio must lie in [0, 1], got {self.ratio}")
        check(self.region in REGIONS, f"region must be one of {REGIONS}, got {self.region!r}")
        check(self.hard_negatives in HARD_NEGATIVES,
              f"hard_negatives must be one of {HARD_NEGATIVES}, got {self.hard_negatives!r}")
        check(self.anchor_box_loss in ANCHOR_BOX_LOSSES,
              f"anchor_box_loss must be one of {ANCHOR_BOX_LOSSES}, got {self.anchor_box_loss!r}")
        check(self.burn_in >= 0 and self.ramp >= 0 and self.teacher_init >= 0,
              f"burn_in, ramp and teacher_init must be >= 0, got {self.burn_in}, {self.ramp}, {self.teacher_init}")
        check(0.0 <= self.ema_momentum <= 1.0, f"ema_momentum must lie in [0, 1], got {self.ema_momentum}")
        check(min(self.weight_cls, self.weight_box, self.weight_quality) >= 0, "weights must be >= 0")

    def scaled(self, fraction: float) -> "DenseTeacherConfig":
        """A copy with burn_in, ramp and teacher_init multiplied by `fraction` (rounded), e.g. 1/20 for a run
        of 9k iterations instead of COCO's 180k. The EMA momentum is left to the caller: its horizon
        1 / (1 - m) should shrink with the run too (0.9996 averages over ~2.5k iterations)."""
        if fraction <= 0:
            raise ValueError(f"semi/dense_teacher.py: DenseTeacherConfig.scaled needs fraction > 0, got {fraction}")
        return replace(self, burn_in=round(self.burn_in * fraction), ramp=round(self.ramp * fraction),
                       teacher_init=round(self.teacher_init * fraction))


# --------------------------------------------------------------------------------------------------------
# Rows: a dense output flattened over levels and images, padding removed
# --------------------------------------------------------------------------------------------------------


class DenseRows(NamedTuple):
    """A dense detector's raw outputs at the R valid rows (location x anchor) of all B images, concatenated
    image by image, each image's rows finest level first (the order of `torch.cat(outputs.cls_logits, 1)`)."""

    logits: Tensor  # (R, C) class logits
    box_reg: Tensor  # (R, 4) FCOS: (l, t, r, b) / stride; RetinaNet: deltas (dx, dy, dw, dh)
    quality: Tensor | None  # (R,) FCOS quality logits; None for RetinaNet
    anchors: Tensor  # (R, 4) xyxy pixels, the anchor (FCOS: the stride-sized square) of each row


def valid_rows(anchors: list[Tensor], image_sizes: Tensor) -> Tensor:
    """Which rows of each image lie in its valid (unpadded) region.

    anchors: per level (H_l*W_l*A, 4) xyxy pixels, the same for every image; image_sizes: int (B, 2) (h, w).
    Returns bool (B, N), N = sum over levels of H_l*W_l*A: True where the anchor's centre (FCOS: the location)
    has x < w and y < h, the rule of FCOS's target assignment.
    """
    anchors = torch.cat(anchors)  # (N, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (N, 2) (x, y)
    sizes = image_sizes.to(device=anchors.device, dtype=anchors.dtype)  # (B, 2) (h, w)
    return (centres[None, :, 0] < sizes[:, 1, None]) & (centres[None, :, 1] < sizes[:, 0, None])  # (B, N)


def flatten_rows(outputs: DenseOutput, valid: Tensor) -> DenseRows:
    """DenseOutput of B images -> DenseRows of the rows where `valid` (B, N) bool is True (R = valid.sum())."""
    logits = torch.cat(outputs.cls_logits, dim=1)  # per level (B, N_l, C) -> (B, N, C)
    box_reg = torch.cat(outputs.box_reg, dim=1)  # (B, N, 4)
    anchors = torch.cat(outputs.anchors)  # (N, 4)
    if valid.shape != logits.shape[:2]:
        raise ValueError(f"semi/dense_teacher.py: a validity mask of shape {tuple(valid.shape)} for outputs of "
                         f"{tuple(logits.shape[:2])} (images, rows)")
    quality = None
    if outputs.quality is not None:
        quality = torch.cat(outputs.quality, dim=1).squeeze(-1)[valid]  # (B, N, 1) -> (B, N) -> (R,)
    return DenseRows(logits=logits[valid],  # (B, N, C) -> (R, C)
                     box_reg=box_reg[valid],  # (B, N, 4) -> (R, 4)
                     quality=quality,
                     anchors=anchors.expand(valid.shape[0], -1, -1)[valid])  # (N, 4) -> (B, N, 4) -> (R, 4)


# --------------------------------------------------------------------------------------------------------
# The three terms
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


@in_float32
def box_consistency(student_box: Tensor, teacher_box: Tensor, *, anchors: Tensor,
                    coder: BoxCoder | LinearBoxCoder, loss: str) -> Tensor:
    """The regression term on the region's rows: mean over rows of the loss between the student's and the
    teacher's box of the same anchor.

    student_box, teacher_box: (P, 4) box regression outputs (FCOS distances / stride, RetinaNet deltas).
    anchors: (P, 4) xyxy pixels. coder: decodes them to xyxy boxes. loss: "giou" (1 - GIoU of the decoded
    boxes) or "l1" (|student - teacher| summed over the 4 outputs). Returns a () scalar, 0 when P = 0.
    """
    teacher_box = teacher_box.detach()
    num_rows = max(1, student_box.shape[0])
    if loss == "giou":
        return giou_loss(coder.decode(student_box, anchors), coder.decode(teacher_box, anchors),
                         reduction="sum") / num_rows
    return l1_loss(student_box, teacher_box, reduction="sum") / num_rows


@in_float32
def quality_consistency(student_quality: Tensor, teacher_quality: Tensor) -> Tensor:
    """BCE(sigmoid(s_q), sigmoid(t_q)) averaged over the region's rows: (P,) logits each -> () scalar, 0 if P = 0."""
    targets = torch.sigmoid(teacher_quality.detach())
    total = F.binary_cross_entropy_with_logits(student_quality, targets, reduction="sum")
    return total / max(1, student_quality.shape[0])


# --------------------------------------------------------------------------------------------------------
# The region ablations (Table 1, Table 5): the paper's region is `frs_qfl`'s, inside the method below
# --------------------------------------------------------------------------------------------------------


def assigned_foreground(detector: Detector, outputs: DenseOutput, boxes: list[dict], *, image_sizes: Tensor,
                        valid: Tensor) -> Tensor:
    """The rows the detector's own label assignment makes positive for the given boxes.

    boxes: B dicts {"boxes" (N_i, 4) xyxy, "labels" int64 (N_i,)} in the batch's frame (pseudo-boxes or the
    hidden ground truth). valid: bool (B, N) as `valid_rows`. Returns bool (R,) over the valid rows.
    """
    targets = [{"boxes": b["boxes"].detach(), "labels": b["labels"]} for b in boxes]
    matched = detector.criterion.assign(outputs, targets, image_sizes).matched  # (B, N), >= 0 where positive
    return (matched >= 0)[valid]  # (B, N) -> (R,)


@in_float32
def ablation_region(teacher_logits: Tensor, *, cfg: DenseTeacherConfig, predicted_positive: Tensor | None,
                    gt_foreground: Tensor | None) -> Region:
    """The learning region of the ablations (see the module docstring).

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


# --------------------------------------------------------------------------------------------------------
# The method object (ARCHITECTURE.md, "The training loop and the method interface")
# --------------------------------------------------------------------------------------------------------


class DenseTeacher:
    """Dense Teacher: the unsupervised loss, its weights (burn-in and ramp) and the teacher's EMA rate."""

    labeled_views = ("weak", "strong")  # the supervised loss is taken on both views of a labeled image
    unlabeled_aligned = True  # dense targets need the strong view pixel-aligned with the weak one

    def __init__(self, cfg: DenseTeacherConfig, *, detector_name: str):
        if detector_name not in DETECTORS:
            raise ValueError(f"semi/dense_teacher.py: Dense Teacher trains dense detectors {DETECTORS}, "
                             f"got detector {detector_name!r}")
        self.cfg = cfg
        self.detector_name = detector_name
        self.teacher_init_iteration = cfg.teacher_init
        self._ema = DenseTeacherEMA(start_iter=cfg.teacher_init, momentum=cfg.ema_momentum)
        if detector_name == "fcos":  # GIoU of the boxes decoded from (l, t, r, b) * stride at the same location
            self.box_coder, self.box_loss = LinearBoxCoder(normalize_by_size=True), "giou"
        else:
            self.box_coder, self.box_loss = BoxCoder(RETINANET_BOX_WEIGHTS), cfg.anchor_box_loss

    def unsupervised_loss(self, *, student: Detector, teacher: Detector, unlabeled: UnlabeledBatch,
                          iteration: int) -> UnsupOutput:
        """One iteration's unweighted Dense Teacher terms on an `UnlabeledBatch` of B pixel-aligned pairs.

        The teacher runs on the weak view under no_grad (callers keep it in eval mode); the student on the
        strong view. Returns UnsupOutput with
          losses: "loss_cls" (Eq. 2), "loss_box" (regression on the region) and, for FCOS, "loss_quality",
                  each a () scalar;
          pseudo_boxes: B dicts {"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)}, the teacher's detections
                  above cfg.pseudo_box_score in the weak view's frame (diagnostics only), or None when
                  cfg.report_pseudo_boxes is off;
          stats: the region's size and score mass, and its overlap with the hidden ground truth's assignment.
        """
        cfg = self.cfg
        weak, strong = unlabeled.weak, unlabeled.strong
        if weak.images.shape != strong.images.shape or not torch.equal(weak.image_sizes, strong.image_sizes):
            raise ValueError("semi/dense_teacher.py: the weak and strong views must be pixel-aligned batches of one "
                             f"shape and valid size, got {tuple(weak.images.shape)} and {tuple(strong.images.shape)}")
        image_sizes = weak.image_sizes

        # Dense pseudo-labels: the teacher's raw outputs on the weak view, no postprocessing (Sec. 3.3).
        with torch.no_grad():
            teacher_out = teacher.model(weak.images, image_sizes)
        student_out = student.model(strong.images, image_sizes)
        valid = valid_rows(student_out.anchors, image_sizes)  # (B, N): padding is no part of any image
        t = flatten_rows(teacher_out, valid)  # R rows of all levels of all images
        s = flatten_rows(student_out, valid)

        detections = None
        if cfg.report_pseudo_boxes or cfg.region == "positive":
            with torch.no_grad():
                detections = [{key: value[d["scores"] > cfg.pseudo_box_score] for key, value in d.items()}
                              for d in teacher.postprocessor(teacher_out, image_sizes)]
        gt_foreground = None
        if cfg.region_diagnostics or cfg.hard_negatives != "select":
            gt_foreground = assigned_foreground(student, teacher_out, weak.targets, image_sizes=image_sizes,
                                                valid=valid)

        # Eq. 2-4: the learning region and the QFL over every row.
        if cfg.region == "topk" and cfg.hard_negatives == "select":
            qfl = frs_qfl(s.logits, t.logits, ratio=cfg.ratio)  # the fused region selection where it is built
            region = Region(selected=qfl.mask, ignored=torch.zeros_like(qfl.mask), fg=qfl.fg)
            loss_cls = qfl.loss
        else:
            predicted_positive = None
            if cfg.region == "positive":
                predicted_positive = assigned_foreground(student, teacher_out, detections, image_sizes=image_sizes,
                                                         valid=valid)
            region = ablation_region(t.logits, cfg=cfg, predicted_positive=predicted_positive,
                                     gt_foreground=gt_foreground)
            loss_cls = region_qfl(s.logits, t.logits, region=region)

        # Regression and quality on the region's rows only.
        selected = region.selected
        loss_box = box_consistency(s.box_reg[selected], t.box_reg[selected], anchors=s.anchors[selected],
                                   coder=self.box_coder, loss=self.box_loss)
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        if s.quality is not None:
            losses["loss_quality"] = quality_consistency(s.quality[selected], t.quality[selected])

        stats = region_stats(region, gt_foreground=gt_foreground, num_rows=s.logits.shape[0],
                             num_images=len(weak))
        return UnsupOutput(losses=losses, pseudo_boxes=detections if cfg.report_pseudo_boxes else None, stats=stats)

    def loss_keys(self) -> list[str]:
        """The keys `unsupervised_loss` returns for this detector."""
        return ["loss_cls", "loss_box"] + (["loss_quality"] if self.detector_name == "fcos" else [])

    def loss_weights(self, iteration: int) -> dict[str, float]:
        """Weight of each "unsup_<key>": cfg.weight_* times the burn-in / linear ramp factor in [0, 1]."""
        cfg = self.cfg
        ramp = linear_ramp(iteration, start=cfg.burn_in, length=cfg.ramp)
        weights = {"loss_cls": cfg.weight_cls, "loss_box": cfg.weight_box, "loss_quality": cfg.weight_quality}
        return {f"unsup_{key}": ramp * weights[key] for key in self.loss_keys()}

    def ema_momentum(self, iteration: int) -> float | None:
        """None before cfg.teacher_init (the teacher is not updated), cfg.ema_momentum from then on."""
        return self._ema(iteration)


def region_stats(region: Region, *, gt_foreground: Tensor | None, num_rows: int, num_images: int) -> dict[str, float]:
    """What the region looks like: its rows per image, mean score S over it, and (with the hidden ground truth's
    assignment) the share of its rows that are foreground and the share of the foreground it covers."""
    selected = int(region.selected.sum())
    stats = {"region_rows_per_image": selected / max(1, num_images),
             "region_fraction": selected / max(1, num_rows),
             "region_mean_score": float(region.fg) / max(1, selected)}
    if gt_foreground is not None:
        hits = int((region.selected & gt_foreground).sum())
        stats["region_gt_precision"] = hits / max(1, selected)
        stats["region_gt_recall"] = hits / max(1, int(gt_foreground.sum()))
    return stats


def build_dense_teacher(cfg, *, detector_name: str) -> DenseTeacher:
    """Dense Teacher for a run's `engine.config.Config`: DenseTeacherConfig's defaults updated by
    `cfg.method_args`, by field name (e.g. {"ratio": 0.05, "burn_in": 300})."""
    known = {f.name for f in fields(DenseTeacherConfig)}
    unknown = sorted(set(cfg.method_args) - known)
    if unknown:
        raise ValueError(f"semi/dense_teacher.py: unknown Dense Teacher settings {unknown} in method_args; "
                         f"known: {sorted(known)}")
    return DenseTeacher(DenseTeacherConfig(**cfg.method_args), detector_name=detector_name)
