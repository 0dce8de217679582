"""Dense Teacher on FCOS and RetinaNet: Zhou et al., "Dense Teacher: Dense Pseudo-Labels for Semi-supervised Object
Detection", ECCV 2022, arXiv:2207.02541 (docs/METHODS.md, "Dense Teacher").

Dense Teacher replaces pseudo-boxes by the teacher's raw dense predictions: no NMS, no score threshold, no
label assignment. For every location of every pyramid level of the unlabeled images:

* Dense pseudo-label (Sec. 3.3). The teacher sees the weak view; its post-sigmoid class scores at a location
  are the targets of the student, which sees the strong view of the same pixels (colour, blur, grayscale and
  erasing only, so both maps line up location for location).

* Learning region (Eq. 3-4). Each row (location x anchor) is ranked by its feature richness score (FRS),
  S_i = max_c p^t_ic, over ALL unlabeled images of the batch together; the top k = int(R * ratio) rows (ratio
  1%) keep the teacher's scores as targets, every other row gets the target 0: it is suppressed, not ignored.

* Classification (Eq. 2), Quality Focal Loss over every element (row, class), `semi.ops.frs_qfl`:

      QFL(p_s, y) = BCE(p_s, y) * |y - p_s|^2,   y = p_t in the region, 0 outside,   summed and divided by
      fg = sum over the region of S_i.

* Regression and quality on the region only (Sec. 3.3 "IoU loss on this branch"): GIoU loss between the
  student's and the teacher's box at the same location (FCOS: decoded from the (l, t, r, b) distances), and
  BCE(sigmoid(s_q), sigmoid(t_q)) on FCOS's quality branch; both averaged over the region's rows.

* Schedule (docs/METHODS.md, "Burn-in and ramp"). Supervised only during a burn-in (5k), then the unsupervised
  weights ramp linearly to their full value (4 / 1 / 1 for cls / box / quality) over 5k more; the teacher is
  copied from the student at 3k and follows it by EMA (0.9996, the whole state; `DenseTeacherEMA`). The labeled
  images take the supervised loss on both their weak and their strong view.

What the paper leaves open, decided here (docs/METHODS.md, "Decisions the paper leaves open" of Dense Teacher):
  - Padding. Locations whose centre lies in the zero padding of the batch (outside the image's valid region)
    are not rows at all: they are neither ranked, nor pushed to 0, nor counted in R. Both views of a
    pixel-aligned pair have the same valid region.
  - RetinaNet (Table 6): rows are anchors (A per location). The regression term compares the student's and
    the teacher's deltas (dx, dy, dw, dh) of the same anchor with the L1 loss RetinaNet trains with
    (`anchor_box_loss="l1"`, summed over the 4 deltas, averaged over rows); `"giou"` decodes both against the
    anchor and applies the paper's IoU loss instead. RetinaNet has no quality branch.
  - The GIoU term is an unweighted mean over the region; the authors' code weights it by the teacher's quality
    output.
  - fg = 0 (an empty region, e.g. k rounds to 0): the classification term is 0, still in the graph.

The other regions of Table 1, the hard-negative strategies of Table 5 and the diagnostics against the hidden
annotations sit apart, in semi/dense_teacher_ablations.py (docs/METHODS.md, "Ablations and diagnostics").

The file reads top to bottom: configuration -> the teacher's EMA schedule -> rows of a dense output -> the
regression and quality terms -> the method object the training loop calls.
"""

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectors import Detector
from detectors.box_ops import BoxCoder, LinearBoxCoder, giou_loss
from detectors.dense import DenseOutput
from detectors.losses import l1_loss
from detectors.precision import in_float32
from detectors.retinanet import BOX_WEIGHTS as RETINANET_BOX_WEIGHTS
import semi.dense_teacher_ablations as ablations
from semi.core import UnsupOutput, linear_ramp
from semi.ops import frs_qfl
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
    """Every setting of Dense Teacher. Defaults: the authors' COCO-Standard 10% settings (docs/METHODS.md,
    "Defaults and their sources" of Dense Teacher).

    The schedule lengths are plain fields in iterations; `scaled(fraction)` shortens all three at once for a
    shorter run (e.g. the built-in dataset's preset).
    """

    # Eq. 3-4 and the ablations of Table 1, 5 and 7a (semi/dense_teacher_ablations.py has the exact readings).
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

    # Diagnostics, off unless asked for (semi/dense_teacher_ablations.py): the teacher's detections above
    # pseudo_box_score (train.py scores them against the hidden annotations and draws them), and how the region
    # overlaps the label assignment of the hidden ground truth. Neither changes the loss.
    report_pseudo_boxes: bool = False
    region_diagnostics: bool = False

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
# The teacher's EMA schedule
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseTeacherEMA:
    """Dense Teacher: the teacher is copied from the student at `start_iter` (the end of burn-in), then
    follows it with a constant momentum over the whole state (buffers too).

    `schedule(t)` is None for t < start_iter (no update), `momentum` from then on.
    """

    start_iter: int
    momentum: float = 0.9996

    def __call__(self, iteration: int) -> float | None:
        return None if iteration < self.start_iter else self.momentum


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
# The regression and quality terms (the classification term, Eq. 2, is `semi.ops.frs_qfl`)
# --------------------------------------------------------------------------------------------------------


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
# The method object (ARCHITECTURE.md, "The training loop and the method interface")
# --------------------------------------------------------------------------------------------------------


class DenseTeacher:
    """Dense Teacher: the unsupervised loss, its weights (burn-in and ramp) and the teacher's EMA rate."""

    labeled_views = ("weak", "strong")  # the supervised loss is taken on both views of a labeled image
    unlabeled_aligned = True  # dense targets need the strong view pixel-aligned with the weak one
    ema_include_buffers = True  # the EMA runs over the whole state, BatchNorm statistics included

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
          pseudo_boxes: with cfg.report_pseudo_boxes, B dicts {"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)},
                  the teacher's detections above cfg.pseudo_box_score in the weak view's frame (diagnostics
                  only); None otherwise;
          stats: the region's size and score mass, and with cfg.region_diagnostics its overlap with the
                  hidden ground truth's assignment.
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

        # Eq. 2-4: the learning region, the top k rows by S_i, and the QFL over every row.
        if cfg.region == "topk" and cfg.hard_negatives == "select":
            qfl = frs_qfl(s.logits, t.logits, ratio=cfg.ratio)  # the fused region selection where it is built
            selected, fg, loss_cls = qfl.mask, qfl.fg, qfl.loss
        else:  # Table 1's other regions, Table 5's hard negatives (semi/dense_teacher_ablations.py)
            region, loss_cls = ablations.ablation_loss(
                student=student, teacher=teacher, teacher_out=teacher_out, student_logits=s.logits,
                teacher_logits=t.logits, hidden_targets=weak.targets, image_sizes=image_sizes, valid=valid, cfg=cfg)
            selected, fg = region.selected, region.fg

        # Regression and quality on the region's rows only.
        loss_box = box_consistency(s.box_reg[selected], t.box_reg[selected], anchors=s.anchors[selected],
                                   coder=self.box_coder, loss=self.box_loss)
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        if s.quality is not None:
            losses["loss_quality"] = quality_consistency(s.quality[selected], t.quality[selected])

        # What the region looks like; the diagnostics, only when asked for.
        stats = region_stats(selected, fg, num_rows=s.logits.shape[0], num_images=len(weak))
        pseudo_boxes = None
        if cfg.report_pseudo_boxes:
            pseudo_boxes = ablations.teacher_detections(teacher, teacher_out, image_sizes, score=cfg.pseudo_box_score)
        if cfg.region_diagnostics:
            gt_foreground = ablations.assigned_foreground(student, teacher_out, weak.targets, image_sizes=image_sizes,
                                                          valid=valid)
            stats |= ablations.region_gt_overlap(selected, gt_foreground)
        return UnsupOutput(losses=losses, pseudo_boxes=pseudo_boxes, stats=stats)

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


def region_stats(selected: Tensor, fg: Tensor, *, num_rows: int, num_images: int) -> dict[str, float]:
    """What the learning region looks like: selected bool (R,), fg () the sum of S_i over it -> its rows per
    image, its share of the rows, and the mean score S over it."""
    rows = int(selected.sum())
    return {"region_rows_per_image": rows / max(1, num_images), "region_fraction": rows / max(1, num_rows),
            "region_mean_score": float(fg) / max(1, rows)}


def build_dense_teacher(cfg: DenseTeacherConfig, *, detector_name: str) -> DenseTeacher:
    """Dense Teacher with its settings (`engine.config.dense_teacher_config` maps a run's settings onto them)."""
    return DenseTeacher(cfg, detector_name=detector_name)
