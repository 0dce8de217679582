"""Soft Teacher on Faster R-CNN + FPN: Xu et al., "End-to-End Semi-Supervised Object Detection with Soft Teacher",
ICCV 2021, arXiv:2106.09018 (docs/METHODS.md, "Soft Teacher").

One unsupervised step, as `SoftTeacher.unsupervised_loss` runs it:

    teacher on the weak view        RPN -> RoI head -> NMS; keep boxes with score > 0.5       (Sec. 3.3)
    box jittering                   10 jittered copies of each kept box, refined by the teacher's RoI head;
                                    uncertainty = normalised std of the refined copies        (Eq. 7-9)
    carry to the strong view        M = T_strong @ inverse(T_weak) on the box corners, clip   ("Views")
    student on the strong view
      RPN                           pseudo-boxes with score > 0.9 as ground truth
      RoI classification            the student's proposals sampled against boxes > 0.9; each background
                                    RoI weighted by the teacher's background probability      (Eq. 4-5, BG-T)
      RoI regression                a fresh sampling against the boxes of uncertainty < 0.02  (Eq. 10)

The teacher is an EMA of the student, m = min(0.999, 1 - 1 / (t + 1)) over its parameters
(`soft_teacher_momentum` below); all four unsupervised terms weigh alpha = 4 (Eq. 1). Defaults are the authors'
COCO settings (docs/METHODS.md, "Defaults and their sources" of Soft Teacher).

Where this file follows the authors' code rather than the paper's text (docs/METHODS.md, "Decisions the paper
leaves open" of Soft Teacher):
- Eq. 4 divides the foreground terms by N_fg and the background ones by sum_j r_j (Eq. 5). We take one
  weighted mean, sum_k w_k CE_k / max(sum_k w_k, 1) with w = 1 for foreground RoIs and w = r (the teacher's
  background probability) for background ones.
- Eq. 9 normalises by 0.5 * (h + w) of the box; we divide each coordinate's std by the matching side (w for
  x, h for y) of the mean refined box.
- Eq. 10 divides by the number of foreground RoIs; the Faster R-CNN criterion divides every box loss by the
  number of sampled RoIs (torchvision, mmdetection), and so do we.

No pseudo-box is no error: the regression terms are exactly 0 and the classification terms only see
background (weighted by the teacher), all finite, with the same keys every iteration.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from detectors import Detector
from detectors.faster_rcnn import FasterRCNNPostprocessor, SampledRoIs, roi_class_probs
from semi.core import UnsupOutput, linear_ramp
from semi.ops import jitter_boxes, refine_stats
from structures import Batch, UnlabeledBatch, carry_boxes

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")  # the same names as the supervised terms


@dataclass
class SoftTeacherConfig:
    """Every hyperparameter of Soft Teacher, with the authors' COCO defaults (docs/METHODS.md; paper Tables 6-10).

    The labeled : unlabeled ratio (1:4 on COCO) is the loaders' `labeled_batch` / `unlabeled_batch` in
    engine/config.py, not a field here.
    """

    # ---- loss weights (Eq. 1) ----------------------------------------------------------------------------
    unsup_weight: float = 4.0  # alpha, on all four unsupervised terms (the authors' `unsup_weight`)
    burn_in: int = 0  # supervised-only iterations first (Soft Teacher has none)
    ramp: int = 0  # then the unsupervised weight grows linearly from 0 over this many iterations
    # ---- pseudo-boxes (Sec. 3.1-3.3) ---------------------------------------------------------------------
    initial_score_thr: float = 0.5  # teacher detections kept as candidates (`pseudo_label_initial_score_thr`)
    min_pseudo_box_size: float = 0.0  # candidates narrower or lower than this (pixels) are dropped
    rpn_score_thr: float = 0.9  # pseudo-boxes for the student's RPN (`rpn_pseudo_threshold`)
    cls_score_thr: float = 0.9  # pseudo-boxes for RoI classification (`cls_pseudo_threshold`, Table 8)
    reg_uncertainty_thr: float = 0.02  # pseudo-boxes for RoI regression: uncertainty below this (Table 9)
    # ---- box jittering (Sec. 3.3) ------------------------------------------------------------------------
    box_jittering: bool = True  # False: regress on the classification pseudo-boxes (Table 6, second row)
    jitter_times: int = 10  # N_jitter (Table 10)
    jitter_scale: float = 0.06  # offsets ~ N(0, 1) * jitter_scale * (w, h, w, h)
    # ---- soft teacher (Sec. 3.2) -------------------------------------------------------------------------
    soft_background: bool = True  # BG-T weights on background RoIs; False: unit weights (Table 7, "w/o weight")
    # ---- the teacher's test settings ---------------------------------------------------------------------
    teacher_rpn_pre_nms: int = 2000  # candidates per level before the RPN's NMS
    teacher_rpn_post_nms: int = 1000  # proposals per image after it
    teacher_score_thr: float = 0.05  # RoI-head postprocessing: score threshold,
    teacher_nms_thr: float = 0.5  # per-class NMS IoU,
    teacher_detections: int = 100  # detections per image
    # ---- teacher EMA (`soft_teacher_momentum`) ----------------------------------------------------------
    ema_max_momentum: float = 0.999  # m = min(ema_max_momentum, 1 - 1 / (t + 1))
    ema_include_buffers: bool = False  # "over parameters": the teacher copies the student's BN statistics

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"semi/soft_teacher.py: SoftTeacherConfig.{message}")

        check(self.unsup_weight >= 0, f"unsup_weight must be >= 0, got {self.unsup_weight}")
        check(self.burn_in >= 0 and self.ramp >= 0, f"burn_in and ramp must be >= 0, got {self.burn_in}, {self.ramp}")
        for name in ("initial_score_thr", "rpn_score_thr", "cls_score_thr", "teacher_score_thr", "teacher_nms_thr"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        check(self.jitter_times >= 2, f"jitter_times must be >= 2 (a std needs two copies), got {self.jitter_times}")
        check(self.jitter_scale >= 0, f"jitter_scale must be >= 0, got {self.jitter_scale}")
        check(self.reg_uncertainty_thr >= 0, f"reg_uncertainty_thr must be >= 0, got {self.reg_uncertainty_thr}")
        check(0.0 <= self.ema_max_momentum <= 1.0, f"ema_max_momentum must be in [0, 1], got {self.ema_max_momentum}")
        check(min(self.teacher_rpn_pre_nms, self.teacher_rpn_post_nms, self.teacher_detections) >= 1,
              "teacher_rpn_pre_nms, teacher_rpn_post_nms and teacher_detections must be >= 1")


class TeacherOutput(NamedTuple):
    """The teacher's view of an unlabeled batch of B weak images (no gradient)."""

    features: list[Tensor]  # FPN maps P2..P6 of the weak view, each (B, F, H_l, W_l), reused for BG-T
    pseudo_boxes: list[dict[str, Tensor]]  # B dicts {"boxes" (K_i, 4) xyxy weak view, "scores" (K_i,),
    #                                        "labels" int64 (K_i,), "uncertainty" (K_i,)}, scores > initial thr


class SoftTeacher:
    """The method object of the training loop (ARCHITECTURE.md, "The training loop and the method interface")."""

    labeled_views = ("weak",)  # the supervised loss is taken on one view of each labeled image
    unlabeled_aligned = False  # the strong view has its own resize, flip and affine op

    def __init__(self, cfg: SoftTeacherConfig | None = None):
        self.cfg = cfg = cfg if cfg is not None else SoftTeacherConfig()
        self.teacher_postprocessor = FasterRCNNPostprocessor(score_thresh=cfg.teacher_score_thr,
                                                             nms_thresh=cfg.teacher_nms_thr,
                                                             detections_per_image=cfg.teacher_detections)

    # ---- schedules ---------------------------------------------------------------------------------------

    @property
    def teacher_init_iteration(self) -> int:
        """The teacher starts as a copy of the student (after burn-in, if there is one)."""
        return self.cfg.burn_in

    @property
    def ema_include_buffers(self) -> bool:
        return self.cfg.ema_include_buffers

    def ema_momentum(self, iteration: int) -> float:
        """m = min(0.999, 1 - 1 / (t + 1)), t counted from the teacher's initialisation."""
        return soft_teacher_momentum(max(0, iteration - self.cfg.burn_in), self.cfg.ema_max_momentum)

    def loss_weights(self, iteration: int) -> dict[str, float]:
        """alpha of Eq. 1 on every unsupervised term, times the burn-in ramp (0 during burn-in)."""
        weight = self.cfg.unsup_weight * linear_ramp(iteration, start=self.cfg.burn_in, length=self.cfg.ramp)
        return {f"unsup_{key}": weight for key in LOSS_KEYS}

    # ---- the algorithm -----------------------------------------------------------------------------------

    def unsupervised_loss(self, *, student: Detector, teacher: Detector, unlabeled: UnlabeledBatch,
                          iteration: int) -> UnsupOutput:
        """Soft Teacher's unsupervised loss on a batch of B unlabeled images.

        student: the Faster R-CNN in training mode; teacher: its EMA copy in eval mode (no gradient flows
        into it). unlabeled.weak: the teacher's view; unlabeled.strong: the student's, with its own geometry.
        Returns UnsupOutput(losses {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"} unweighted scalars,
        pseudo_boxes = the classification pseudo-boxes (score > cls_score_thr) in the weak view's frame,
        stats = pseudo-box counts per image, mean uncertainty, mean BG-T weight).
        """
        cfg = self.cfg
        weak, strong = unlabeled.weak, unlabeled.strong
        if teacher.model.training:
            raise RuntimeError("semi/soft_teacher.py: the teacher must be in eval mode (semi.ema.EMATeacher does that)")

        # 1. Pseudo-boxes from the teacher on the weak view, with their regression uncertainty (Eq. 7-9).
        with torch.no_grad():
            teacher_out = self.teacher_predict(teacher, weak)
        pseudo_weak = teacher_out.pseudo_boxes

        # 2. Carry them into the strong view: M = T_strong @ inverse(T_weak), then clip (docs/METHODS.md, "Views").
        pseudo_strong = carry_pseudo_boxes(pseudo_weak, src=weak, dst=strong)

        # 3. Three sets of pseudo ground truth, by score (Sec. 3.2, Table 8) and by uncertainty (Sec. 3.3).
        rpn_targets = [select(p, p["scores"] > cfg.rpn_score_thr) for p in pseudo_strong]
        cls_targets = [select(p, p["scores"] > cfg.cls_score_thr) for p in pseudo_strong]
        reg_targets = ([select(p, p["uncertainty"] < cfg.reg_uncertainty_thr) for p in pseudo_strong]
                       if cfg.box_jittering else cls_targets)

        # 4. The student on the strong view.
        model, criterion = student.model, student.criterion
        features = model.features(strong.images)  # P2..P6, each (B, F, H_l, W_l)
        rpn_out = model.rpn(features)
        proposals = model.propose(rpn_out, strong.image_sizes)  # B x (P_i, 4), the student's training counts

        # RPN: pseudo-boxes > 0.9 as ground truth, the supervised RPN loss (objectness and boxes).
        losses = criterion.rpn_losses(rpn_out, rpn_targets)

        # RoI classification with BG-T (Eq. 4-5): sample as in supervised training against boxes > 0.9.
        sampled = criterion.sample_rois(proposals, cls_targets)  # B x (S_i, ...), labels C = background
        roi_out = model.roi_head(features, sampled.boxes, strong.image_sizes)  # (S, C + 1), (S, C, 4)
        if cfg.soft_background:
            weights = background_weights(teacher.model, teacher_out.features, sampled, src=strong, dst=weak)  # (S,)
        else:
            weights = torch.cat(sampled.weights)  # (S,) ones
        # loss_cls = sum_k w_k CE_k / max(sum_k w_k, 1), w = 1 for foreground RoIs (Eq. 4-5, authors' form).
        losses["loss_cls"] = criterion.roi_losses(roi_out, sampled, cls_weights=weights)["loss_cls"]

        # RoI regression (Eq. 10): a fresh assignment to the reliable boxes; only this pass's box loss counts.
        sampled_reg = criterion.sample_rois(proposals, reg_targets)
        roi_out_reg = model.roi_head(features, sampled_reg.boxes, strong.image_sizes)
        losses["loss_box"] = criterion.roi_losses(roi_out_reg, sampled_reg)["loss_box"]

        losses = {key: losses[key] for key in LOSS_KEYS}
        num_classes = roi_out.class_logits.shape[1] - 1
        stats = self.statistics(pseudo_weak, rpn_targets, cls_targets, reg_targets, sampled, weights,
                                num_classes=num_classes)
        pseudo_boxes = [select(p, p["scores"] > cfg.cls_score_thr) for p in pseudo_weak]
        return UnsupOutput(losses=losses, pseudo_boxes=pseudo_boxes, stats=stats)

    @torch.no_grad()
    def teacher_predict(self, teacher: Detector, weak: Batch) -> TeacherOutput:
        """The teacher's detections on the weak view with the test settings, scores > initial_score_thr,
        each with its box uncertainty (Eq. 7-9; zeros when box jittering is off)."""
        cfg = self.cfg
        model = teacher.model
        features = model.features(weak.images)
        rpn_out = model.rpn(features)
        proposals = model.propose(rpn_out, weak.image_sizes, pre_nms_top_n=cfg.teacher_rpn_pre_nms,
                                  post_nms_top_n=cfg.teacher_rpn_post_nms)  # B x (P_i, 4)
        roi_out = model.roi_head(features, proposals, weak.image_sizes)
        detections = self.teacher_postprocessor(roi_out, proposals, weak.image_sizes)  # B dicts, by score
        pseudo = []
        for d in detections:
            w, h = d["boxes"][:, 2] - d["boxes"][:, 0], d["boxes"][:, 3] - d["boxes"][:, 1]
            keep = (d["scores"] > cfg.initial_score_thr) & (w >= cfg.min_pseudo_box_size) & (
                h >= cfg.min_pseudo_box_size)
            pseudo.append(select(d, keep))
        if cfg.box_jittering:
            uncertainty = box_uncertainty(model, features, pseudo, weak.image_sizes, times=cfg.jitter_times,
                                          scale=cfg.jitter_scale)
        else:
            uncertainty = [p["scores"].new_zeros(len(p["scores"])) for p in pseudo]
        pseudo = [p | {"uncertainty": u} for p, u in zip(pseudo, uncertainty)]
        return TeacherOutput(features=features, pseudo_boxes=pseudo)

    @staticmethod
    def statistics(pseudo_weak, rpn_targets, cls_targets, reg_targets, sampled: SampledRoIs, weights: Tensor, *,
                   num_classes: int) -> dict[str, float]:
        """Plain floats for the log: pseudo-boxes per image of each set, their mean uncertainty, the share
        of foreground RoIs and the mean weight of the background ones."""
        B = max(1, len(pseudo_weak))
        stats = {f"pseudo_per_image_{name}": sum(len(t["boxes"]) for t in targets) / B
                 for name, targets in (("initial", pseudo_weak), ("rpn", rpn_targets), ("cls", cls_targets),
                                       ("reg", reg_targets))}
        uncertainty = torch.cat([p["uncertainty"] for p in pseudo_weak])
        if uncertainty.numel():
            stats["pseudo_uncertainty_mean"] = float(uncertainty.mean())
        labels = torch.cat(sampled.labels)  # (S,)
        background = labels == num_classes
        stats["roi_foreground_fraction"] = float((~background).sum()) / max(1, labels.numel())
        if background.any():
            stats["roi_background_weight_mean"] = float(weights[background].mean())
        return stats


# --------------------------------------------------------------------------------------------------------
# The steps, as functions of tensors
# --------------------------------------------------------------------------------------------------------


def select(boxes: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """The rows `keep` (bool (K,)) of every per-box tensor of a dict {"boxes" (K, 4), "scores" (K,), ...}."""
    return {key: value[keep] for key, value in boxes.items()}


@torch.no_grad()
def box_uncertainty(model, features: list[Tensor], pseudo: list[dict[str, Tensor]], image_sizes: Tensor, *,
                    times: int, scale: float, generator: torch.Generator | None = None) -> list[Tensor]:
    """The localisation uncertainty of every pseudo-box by box jittering (Sec. 3.3, Eq. 7-9).

    Each box b is jittered `times` times, b + N(0, 1) * scale * (w, h, w, h) (Eq. 7's jitter); the teacher's
    RoI head refines every copy (Eq. 7's refine, the deltas of the box's own class); the uncertainty is the
    mean over the 4 coordinates of the std of the refined copies divided by the matching side of their mean
    box (Eq. 8-9, with the normalisation of docs/METHODS.md, "Decisions the paper leaves open"). One jitter draw
    and one RoI-head call for the whole batch.

    model: a Faster R-CNN (anything with `roi_head(features, boxes, image_sizes) -> RoIOutput` and a
    `roi_box_coder`); features: its FPN maps of the B images; pseudo: B dicts {"boxes" (K_i, 4) xyxy,
    "labels" int64 (K_i,)}; image_sizes int64 (B, 2). Returns B tensors (K_i,) (dtype of the boxes).
    """
    counts = [len(p["boxes"]) for p in pseudo]
    boxes = torch.cat([p["boxes"] for p in pseudo])  # (N, 4), N = sum_i K_i
    labels = torch.cat([p["labels"] for p in pseudo])  # (N,)
    if boxes.shape[0] == 0:
        return [boxes.new_zeros(0) for _ in pseudo]
    jittered = jitter_boxes(boxes, times=times, scale=scale, generator=generator)  # (T, N, 4)
    # The RoI head takes boxes image by image: (T, N, 4) -> B x (T, K_i, 4) -> B x (T*K_i, 4), copy-major.
    per_image = [j.reshape(-1, 4) for j in jittered.split(counts, dim=1)]
    roi_out = model.roi_head(features, per_image, image_sizes)  # box_deltas (sum_i T*K_i, C, 4)
    C = roi_out.box_deltas.shape[1]
    # Back to copy-major over the batch: B x (T*K_i, C, 4) -> B x (T, K_i, C, 4) -> (T, N, C, 4).
    deltas = torch.cat([d.reshape(times, k, C, 4)
                        for d, k in zip(roi_out.box_deltas.split([times * k for k in counts]), counts)], dim=1)
    coder = model.roi_box_coder
    stats = refine_stats(deltas.to(jittered.dtype), jittered, labels, weights=coder.weights,
                         bbox_clip=coder.bbox_xform_clip)  # mean boxes (N, 4), uncertainty (N,)
    return list(stats.uncertainty.split(counts))


def carry_pseudo_boxes(pseudo: list[dict[str, Tensor]], *, src: Batch, dst: Batch) -> list[dict[str, Tensor]]:
    """Pseudo-boxes of every image from view `src` to view `dst` of the same images (docs/METHODS.md, "Views").

    pseudo: B dicts {"boxes" (K_i, 4) xyxy in src, per-box extras (K_i, ...)}. Returns B dicts with the
    boxes carried by T_dst @ inverse(T_src) and clipped to dst's image; boxes left with no area (pushed out
    of the image) are dropped with their extras.
    """
    carried = []
    for i, p in enumerate(pseudo):
        boxes = carry_boxes(p["boxes"], src.matrices[i], dst.matrices[i], dst_size=dst.image_sizes[i])  # (K_i, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        carried.append(select(p | {"boxes": boxes}, keep))
    return carried


@torch.no_grad()
def background_weights(teacher_model, teacher_features: list[Tensor], sampled: SampledRoIs, *, src: Batch,
                       dst: Batch) -> Tensor:
    """BG-T (Sec. 3.2, Eq. 4-5): the weight of each sampled RoI in the student's classification loss.

    The student's RoIs (strong view `src`) are carried into the teacher's frame (weak view `dst`) and scored by
    the teacher's RoI head on its own features; a background RoI weighs the teacher's background probability
    r (the reliability that it really is background), a foreground RoI weighs 1.
    teacher_features: the teacher's FPN maps of `dst`. Returns float (S,), S = sum_i S_i, in sampled order.
    """
    teacher_rois = [carry_boxes(boxes, src.matrices[i], dst.matrices[i], dst_size=dst.image_sizes[i])
                    for i, boxes in enumerate(sampled.boxes)]  # B x (S_i, 4) in the weak view
    probs = roi_class_probs(teacher_model.roi_head(teacher_features, teacher_rois, dst.image_sizes))  # (S, C + 1)
    background_prob = probs[:, -1]  # (S,), background is the last class
    labels = torch.cat(sampled.labels)  # (S,) in 0..C
    is_background = labels == probs.shape[1] - 1
    return torch.where(is_background, background_prob, torch.ones_like(background_prob))


# --------------------------------------------------------------------------------------------------------
# The teacher's EMA schedule
# --------------------------------------------------------------------------------------------------------


def soft_teacher_momentum(iteration: int, max_momentum: float = 0.999) -> float:
    """Soft Teacher: m = min(max_momentum, 1 - 1 / (t + 1)).

    m = 0 at t = 0 (the teacher becomes the student after the first step), 0.5 at t = 1, ... so the
    teacher tracks the young student closely and averages over ~1000 steps from t = 999 on.
    """
    return min(max_momentum, 1.0 - 1.0 / (iteration + 1))


# --------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------


def build_soft_teacher(cfg: SoftTeacherConfig, *, detector_name: str) -> SoftTeacher:
    """Soft Teacher with its settings (`engine.config.soft_teacher_config` maps a run's settings onto them)."""
    if detector_name != "faster_rcnn":
        raise ValueError(f"semi/soft_teacher.py: Soft Teacher needs the two-stage detector 'faster_rcnn' "
                         f"(its RoI head scores and refines boxes), got {detector_name!r}")
    return SoftTeacher(cfg)
