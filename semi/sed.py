"""Scale-Equivalent Distillation (SED): Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object
Detection", CVPR 2022, arXiv:2203.12244 (docs/METHODS.md, "Scale-Equivalent Distillation").

SED trains on unlabeled images without pseudo-boxes: it asks two predictions of the same place to agree.

    L = L_sup + (n_u / n_s) * (lambda_s * L_scale + lambda_d * L_distill)                           (Eq. 1)

* L_scale, scale consistency (Sec. 3.1, Eq. 2). The student sees the strong view X and X_hat, X downsampled
  by 2^s. Level f of X and level f' = f - s of X_hat cover the same image with the same grid and the same
  anchors (scaled by 2^s), so cell for cell their predictions should agree:

      KL(sg P^f(X) || P^f'(X_hat)) + KL(sg P^f'(X_hat) || P^f(X)) + ||R^f(X) - R^f'(X_hat)||_2

* L_distill, self-distillation (Sec. 3.2, Eq. 3). The EMA teacher sees the weak view X', pixel-aligned with X,
  and its soft predictions are the targets of the student on X, anchor for anchor:

      KL(sg P^i(X', teacher) || P^i(X, student)) + ||sg R^i(X', teacher) - R^i(X, student)||_2

* Re-weighting (Sec. 3.3, Eq. 5), after the gradient harmonizing mechanism (GHM). Each classification KL is
  divided by how many samples share its gradient-norm bin (`semi.ops.ghm_kl`), so that the rare anchors where
  two predictions disagree are not drowned by the millions of background anchors where they already agree.

* Faster R-CNN (the paper's default) gets the same terms twice: on the RPN, anchor for anchor, and on the
  RoI head, RoI for RoI over one proposal set shared by the two predictions.

What the paper leaves open, decided here (docs/METHODS.md, "Decisions the paper leaves open" of SED):
  - a sigmoid head (RPN objectness, RetinaNet, FCOS) is a set of Bernoulli pairs, one per (anchor, class);
    the RoI head is one (C + 1)-way softmax per RoI. Eq. 5's g is the total-variation distance, in [0, 1].
  - the L2 term is the Euclidean norm of the 4 delta differences of a sample (eps inside the root), averaged
    over samples; for the RoI head, the deltas of the most likely foreground class (`likely_class`).
  - FCOS's quality branch, absent from the paper, gets a Bernoulli KL, averaged without re-weighting.
  - "hard" self-distillation (Table 4) thresholds the teacher's probabilities at 0.5 (`hard_target_logits`).

The file reads top to bottom: configuration -> the views -> the three equations on flat rows of samples ->
one adapter per detector kind -> the method object the training loop calls. Multi-scale testing (Table 7)
is `engine.evaluation.predict_multiscale`.
"""

from dataclasses import dataclass
from typing import NamedTuple

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from detectors import Detector
from detectors.precision import in_float32
from semi.core import UnsupOutput, linear_ramp, zero_loss
from semi.ops import ghm_kl, kl_per_sample
from structures import UnlabeledBatch, pad_to_multiple

# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------

DENSE_DETECTORS = ("retinanet", "fcos")
TWO_STAGE_DETECTORS = ("faster_rcnn",)


@dataclass
class SEDConfig:
    """Every setting of SED. Defaults are the paper's COCO settings unless a comment says otherwise."""

    # Eq. 1: L = L_sup + (n_u / n_s) * (lambda_s * L_scale + lambda_d * L_distill).
    num_unlabeled: int = 1  # n_u, unlabeled images per iteration
    num_labeled: int = 1  # n_s, labeled images per iteration
    lambda_scale: float = 1.0
    lambda_distill: float = 1.0
    # Not in the paper, whose student starts from ImageNet weights: supervised only before `burn_in`, then the
    # unsupervised weights ramp linearly to Eq. 1's over `ramp` iterations. 0 and 0: the paper (no burn-in).
    burn_in: int = 0
    ramp: int = 0

    # Sec. 3.1, scale consistency. s is drawn uniformly from {1, ..., S}; S = 1 is best (Table 8).
    scale_consistency: bool = True
    max_scale_exp: int = 1  # S
    downsample: str = "area"  # "area" (average pooling) or "bilinear" (antialiased) for X -> X_hat
    # X is padded to a multiple of 2^s * pad_stride before downsampling. None: the detector's coarsest stride
    # (docs/METHODS.md), so that every level of X and X_hat has an exact size. Every stride-2 layer of our detectors
    # rounds up, so 2^s * 32 already gives each pair identical grids (tests/test_sed.py checks both) at a
    # fraction of the cost on small images: at s = 1, P7's 128 pads a 128 px batch to 256 px, 32 does not.
    pad_stride: int | None = None

    # Sec. 3.2, self-distillation: "soft" (the paper), "hard" (Table 4's hard targets) or "off".
    distill: str = "soft"
    hard_threshold: float = 0.5  # hard targets: teacher probability >= threshold counts as positive

    # Sec. 3.3, re-weighting (Eq. 5) of the classification KL; off: plain mean over samples (Table 4).
    reweight: bool = True
    bins: int = 10  # M
    l2_eps: float = 1e-6  # inside the square root of the L2 term, for a finite gradient at 0

    # Faster R-CNN: which stages get the terms, and the proposal sets of the RoI terms.
    rpn_terms: bool = True
    roi_terms: bool = True
    roi_topk: int = 1000  # proposals per view and image that enter the RoI terms (paper: 1000)
    pre_nms_top_n: int = 2000  # RPN candidates per level before NMS when proposing for the RoI terms

    # Teacher EMA rate (Table 9): "step" drops start -> end at the first LR milestone (None: never drops);
    # "cosine" anneals start -> end over max_iter. start None: Table 9's 0.99 (step) or 0.996 (cosine).
    ema_policy: str = "step"
    ema_start: float | None = None
    ema_end: float = 0.9
    ema_milestone: int | None = None  # the first LR milestone, from the run's LR schedule (engine.config.sed_config)
    max_iter: int | None = None  # the cosine policy's horizon

    # Diagnostics only: the teacher's detections above this score are returned as `pseudo_boxes`.
    diagnostic_score: float = 0.5

    def __post_init__(self):
        if self.max_scale_exp < 1:
            raise ValueError(f"semi/sed.py: SEDConfig.max_scale_exp must be >= 1, got {self.max_scale_exp}")
        if self.downsample not in ("area", "bilinear"):
            raise ValueError(f"semi/sed.py: SEDConfig.downsample must be 'area' or 'bilinear', got {self.downsample!r}")
        if self.distill not in ("soft", "hard", "off"):
            raise ValueError(f"semi/sed.py: SEDConfig.distill must be 'soft', 'hard' or 'off', got {self.distill!r}")
        if self.ema_policy not in ("step", "cosine"):
            raise ValueError(f"semi/sed.py: SEDConfig.ema_policy must be 'step' or 'cosine', got {self.ema_policy!r}")
        if self.bins < 1:
            raise ValueError(f"semi/sed.py: SEDConfig.bins must be >= 1, got {self.bins}")
        if self.burn_in < 0 or self.ramp < 0:
            raise ValueError(f"semi/sed.py: SEDConfig.burn_in and ramp must be >= 0, got {self.burn_in}, {self.ramp}")
        if self.num_labeled < 1 or self.num_unlabeled < 1:
            raise ValueError("semi/sed.py: SEDConfig.num_labeled and num_unlabeled must be >= 1")
        if not self.scale_consistency and self.distill == "off":
            raise ValueError("semi/sed.py: SEDConfig turns off both scale consistency and self-distillation")


# --------------------------------------------------------------------------------------------------------
# The views (Sec. 3.1 and docs/METHODS.md, "Views")
# --------------------------------------------------------------------------------------------------------


class SEDViews(NamedTuple):
    """The three inputs of one iteration, padded alike so that their grids line up.

    X and X' have the same size, a multiple of 2^s * pad_stride; X_hat is X downsampled by 2^s, so level f of
    X (stride t) and level f - s of X_hat (stride t / 2^s in X_hat's pixels, t in X's) coincide cell for cell.
    """

    student: Tensor  # X, float32 (B, 3, H, W) in [0, 1], the strong view
    student_small: Tensor  # X_hat, float32 (B, 3, H / 2^s, W / 2^s)
    teacher: Tensor  # X', float32 (B, 3, H, W), the weak view, pixel-aligned with X
    image_sizes: Tensor  # int64 (B, 2) valid (h, w) of X and X'
    image_sizes_small: Tensor  # int64 (B, 2) valid (h, w) of X_hat, ceil(h / 2^s)
    scale_exp: int  # s


def downsample(images: Tensor, factor: int, *, mode: str) -> Tensor:
    """(B, C, H, W) -> (B, C, H / factor, W / factor); H and W must be multiples of `factor`.

    "area" averages each factor x factor block, so pixel (r, c) of the result is exactly the mean of the block
    starting at (factor * r, factor * c); "bilinear" is an antialiased resize of the same geometry.
    """
    if mode == "area":
        return F.avg_pool2d(images, kernel_size=factor)
    H, W = images.shape[-2:]
    return F.interpolate(images, size=(H // factor, W // factor), mode="bilinear", antialias=True,
                         align_corners=False)


def make_views(*, weak: Tensor, strong: Tensor, image_sizes: Tensor, scale_exp: int, pad_stride: int,
               mode: str = "area") -> SEDViews:
    """Build X, X_hat and X' from the collated weak and strong batches (both (B, 3, H, W), pixel-aligned).

    The batch is only padded to the collate's `size_divisible`; X is re-padded to a multiple of
    2^s * pad_stride *before* downsampling, so that X_hat is exactly X / 2^s and level f of X and level f - s
    of X_hat have identical grids (with pad_stride = the coarsest stride, every level of both has an exact size).
    image_sizes: int64 (B, 2) valid (h, w) of both views.
    """
    if weak.shape != strong.shape:
        raise ValueError(f"semi/sed.py: the weak and strong views must be pixel-aligned batches of one shape, "
                         f"got {tuple(weak.shape)} and {tuple(strong.shape)}")
    factor = 2 ** scale_exp
    student = pad_to_multiple(strong, factor * pad_stride)  # (B, 3, H, W)
    teacher = pad_to_multiple(weak, factor * pad_stride)  # (B, 3, H, W)
    return SEDViews(
        student=student,
        student_small=downsample(student, factor, mode=mode),  # (B, 3, H / 2^s, W / 2^s)
        teacher=teacher,
        image_sizes=image_sizes,
        image_sizes_small=torch.div(image_sizes + factor - 1, factor, rounding_mode="floor"),
        scale_exp=scale_exp,
    )


class LevelPair(NamedTuple):
    """Level f of X and its partner level f' = f - s of X_hat (indices into the lists of levels)."""

    level: int
    level_small: int


def pair_levels(num_levels: int, scale_exp: int) -> list[LevelPair]:
    """All pairs (f, f - s) with both levels present, e.g. P3..P7 and s = 1: (P4, P3), ..., (P7, P6)."""
    if scale_exp >= num_levels:
        raise ValueError(f"semi/sed.py: downsampling by 2^{scale_exp} leaves no pair among {num_levels} levels; "
                         f"lower SEDConfig.max_scale_exp")
    return [LevelPair(level=f, level_small=f - scale_exp) for f in range(scale_exp, num_levels)]


def check_pairing(anchors: list[Tensor], anchors_small: list[Tensor], pairs: list[LevelPair], *,
                  scale_exp: int) -> None:
    """Fail loudly unless each pair has the same grid and anchors that match once X_hat's are scaled by 2^s.

    anchors / anchors_small: per level (H_l * W_l * A, 4) xyxy in the pixels of X / X_hat. Anchor centres are
    multiples of the stride, so they match exactly. Anchor sizes match when they double per level, up to the
    generators' whole-pixel sizes and corners (RetinaNet's int(base * 2^(k/3)) octaves, rounded corners): we
    allow half a pixel per rounding on each side, 0.5 * (2^s + 1) px in X, plus 5% of the anchor's side.
    """
    factor = 2 ** scale_exp
    for pair in pairs:
        big, small = anchors[pair.level], anchors_small[pair.level_small]  # (N, 4) each
        if big.shape != small.shape:
            raise ValueError(f"semi/sed.py: level {pair.level} of X has {big.shape[0]} anchors but level "
                             f"{pair.level_small} of X_hat has {small.shape[0]}: the grids do not pair")
        side = (big[:, 2:] - big[:, :2]).amax(dim=1, keepdim=True)  # (N, 1) the longer side
        error = (small * factor - big).abs()  # (N, 4)
        if (error > 0.5 * (factor + 1) + 0.05 * side).any():
            raise ValueError(f"semi/sed.py: anchors of level {pair.level_small} of X_hat, scaled by {factor}, miss "
                             f"those of level {pair.level} of X by up to {error.max().item():.1f} px; "
                             f"SED's level pairing needs anchor sizes that double per level")


# --------------------------------------------------------------------------------------------------------
# The three equations, on flat rows of samples (anchors or RoIs)
# --------------------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """Predictions for N samples: the unit Eq. 2, 3 and 5 sum over. Row i of two `Rows` is the same sample."""

    logits: Tensor  # (N, K) class logits: K Bernoulli elements (sigmoid heads) or one K-way softmax row
    deltas: Tensor  # (N, 4) box regression: (dx, dy, dw, dh) deltas, or FCOS's (l, t, r, b) / stride
    quality: Tensor | None = None  # (N, 1) FCOS quality logits, or None


class Terms(NamedTuple):
    """One equation's terms, each a scalar."""

    cls: Tensor  # the (re-weighted) classification KL
    box: Tensor  # the L2 of the box regression
    quality: Tensor | None = None  # FCOS quality: a Bernoulli KL, plain mean (see `quality_kl`)


def classification_kl(logits: Tensor, target_logits: Tensor, *, mode: str, reweight: bool, bins: int) -> Tensor:
    """KL(sg target || student) over all samples of one loss term -> scalar.

    reweight=True is Eq. 5, L = (1/M) sum_i KL_i / R_idx(g_i), through `semi.ops.ghm_kl` (the fused op when
    built, its plain-PyTorch reference otherwise); g_i, the gradient norm of KL_i with respect to the logits,
    is |p - q| for a Bernoulli element and 0.5 * sum_k |p_k - q_k| for a softmax row. reweight=False is the
    "vanilla" average of Table 4: the plain mean over samples (elements for sigmoid heads, rows for softmax).
    logits, target_logits: (N, K); the target side never receives a gradient (the sg of Eq. 2 and 3).
    """
    target_logits = target_logits.detach()
    if logits.numel() == 0:
        return zero_loss(logits)
    if reweight:
        return ghm_kl(logits, target_logits, mode=mode, bins=bins)
    return kl_per_sample(logits, target_logits, mode=mode).mean()


def box_l2(deltas: Tensor, target_deltas: Tensor, *, eps: float) -> Tensor:
    """||R - R'||_2 per sample, averaged over samples -> scalar. deltas, target_deltas: (N, 4).

    The small eps inside the square root keeps the gradient finite where the two predictions agree exactly.
    Neither side is detached here: Eq. 2 trains both, Eq. 3 detaches the teacher before calling.
    """
    if deltas.numel() == 0:
        return zero_loss(deltas) + zero_loss(target_deltas)
    return ((deltas - target_deltas).pow(2).sum(dim=-1) + eps).sqrt().mean()


def quality_kl(logits: Tensor, target_logits: Tensor) -> Tensor:
    """FCOS quality (centerness / IoU) logits (N, 1): mean Bernoulli KL(sg target || student) -> scalar.

    The paper has no quality branch. We treat it as one more Bernoulli prediction per anchor and regularise it
    like the box branch, a plain mean: Eq. 5's re-weighting targets the foreground/background imbalance of
    classification (Sec. 3.3), and the quality branch carries no background class.
    """
    if logits.numel() == 0:
        return zero_loss(logits)
    return kl_per_sample(logits, target_logits.detach(), mode="sigmoid").mean()


# A hard target is a one-hot distribution; as logits it is +-HARD_LOGIT, one-hot to within exp(-30) ~ 1e-13,
# which keeps the KL finite (a true one-hot would need infinite logits) and lets it run through `ghm_kl`.
HARD_LOGIT = 30.0


def hard_target_logits(target_logits: Tensor, *, mode: str, threshold: float) -> Tensor:
    """Table 4's "hard" self-distillation: the teacher's prediction thresholded into a one-hot target.

    mode "sigmoid", (N, K): element positive iff sigmoid(target) >= threshold.
    mode "softmax", (N, C + 1) with background last: the most likely foreground class if its probability is
    >= threshold, otherwise background. Returns logits of the same shape whose distribution is that target.
    """
    if mode == "sigmoid":
        positive = torch.sigmoid(target_logits) >= threshold
    else:
        probs = torch.softmax(target_logits, dim=-1)  # (N, C + 1)
        fg_prob, fg_class = probs[:, :-1].max(dim=-1)  # (N,), (N,)
        background = probs.shape[-1] - 1
        hard_class = torch.where(fg_prob >= threshold, fg_class, torch.full_like(fg_class, background))
        positive = F.one_hot(hard_class, probs.shape[-1]).bool()  # (N, C + 1)
    return torch.where(positive, HARD_LOGIT, -HARD_LOGIT).to(target_logits.dtype)


@in_float32
def scale_consistency(big: Rows, small: Rows, *, mode: str, cfg: SEDConfig) -> Terms:
    """Eq. 2 for paired samples: `big` from level f of X, `small` from level f - s of X_hat (row i = row i).

    L_scale = KL(sg P(X) || P(X_hat)) + KL(sg P(X_hat) || P(X)) + ||R(X) - R(X_hat)||_2
    Each KL direction is a separate loss term with its own Eq. 5 histogram (the two histograms coincide, as
    g is symmetric). The L2 term has no stop-gradient: both predictions move towards each other.
    """
    kl = dict(mode=mode, reweight=cfg.reweight, bins=cfg.bins)
    cls = (classification_kl(small.logits, big.logits, **kl)  # KL(sg P^f(X) || P^f'(X_hat))
           + classification_kl(big.logits, small.logits, **kl))  # KL(sg P^f'(X_hat) || P^f(X))
    box = box_l2(big.deltas, small.deltas, eps=cfg.l2_eps)  # ||R^f(X) - R^f'(X_hat)||_2
    quality = None
    if big.quality is not None:
        quality = quality_kl(small.quality, big.quality) + quality_kl(big.quality, small.quality)
    return Terms(cls=cls, box=box, quality=quality)


@in_float32
def self_distillation(student: Rows, teacher: Rows, *, mode: str, cfg: SEDConfig) -> Terms:
    """Eq. 3 for aligned samples: `student` on the strong view X, `teacher` on the weak view X' (row i = row i).

    L_distill = KL(sg P(X', teacher) || P(X, student)) + ||sg R(X', teacher) - R(X, student)||_2
    Soft targets, no threshold (the paper); cfg.distill == "hard" swaps in `hard_target_logits` for the
    classification target only (Table 4), the box term keeps the teacher's regression.
    """
    target = teacher.logits
    if cfg.distill == "hard":
        target = hard_target_logits(target, mode=mode, threshold=cfg.hard_threshold)
    cls = classification_kl(student.logits, target, mode=mode, reweight=cfg.reweight, bins=cfg.bins)
    box = box_l2(student.deltas, teacher.deltas.detach(), eps=cfg.l2_eps)
    quality = None
    if student.quality is not None:
        quality = quality_kl(student.quality, teacher.quality)
    return Terms(cls=cls, box=box, quality=quality)


def as_losses(terms: Terms, name: str) -> dict[str, Tensor]:
    """Terms -> {"loss_<name>_cls", "loss_<name>_box"[, "loss_<name>_quality"]}, unweighted."""
    losses = {f"loss_{name}_cls": terms.cls, f"loss_{name}_box": terms.box}
    if terms.quality is not None:
        losses[f"loss_{name}_quality"] = terms.quality
    return losses


# --------------------------------------------------------------------------------------------------------
# Adapters: each detector's raw outputs -> Rows
# --------------------------------------------------------------------------------------------------------


def level_rows(logits: list[Tensor], deltas: list[Tensor], quality: list[Tensor] | None, levels: list[int]) -> Rows:
    """Per-level dense outputs -> Rows over `levels`, ordered by level, then image, then anchor.

    logits: per level (B, H_l*W_l*A, K); deltas: per level (B, H_l*W_l*A, 4); quality: per level
    (B, H_l*W_l*A, 1) or None. Two calls with level lists of equal grids give rows that pair one to one.
    """

    def flatten(per_level: list[Tensor]) -> Tensor:
        joined = torch.cat([per_level[level] for level in levels], dim=1)  # (B, sum_l H_l*W_l*A, K)
        return joined.reshape(-1, joined.shape[-1])  # (B, N, K) -> (B * N, K)

    return Rows(logits=flatten(logits), deltas=flatten(deltas),
                quality=flatten(quality) if quality is not None else None)


def dense_rows(outputs, levels: list[int]) -> Rows:
    """RetinaNet / FCOS `DenseOutput` -> Rows: (anchor, class) Bernoulli logits, box regression, quality."""
    return level_rows(outputs.cls_logits, outputs.box_reg, outputs.quality, levels)


def rpn_rows(rpn_out, levels: list[int]) -> Rows:
    """Faster R-CNN `RPNOutput` -> Rows: one Bernoulli objectness logit and 4 deltas per anchor."""
    return level_rows(rpn_out.objectness, rpn_out.deltas, None, levels)


def roi_rows(roi_out, classes: Tensor) -> Rows:
    """Faster R-CNN `RoIOutput` -> Rows: (C + 1)-way softmax logits and the deltas of one class per RoI.

    roi_out.class_logits (K, C + 1), roi_out.box_deltas (K, C, 4); classes int64 (K,) in 0..C-1.
    """
    index = torch.arange(classes.shape[0], device=classes.device)
    return Rows(logits=roi_out.class_logits, deltas=roi_out.box_deltas[index, classes])  # (K, C, 4) -> (K, 4)


def likely_class(*class_logits: Tensor) -> Tensor:
    """The foreground class the given RoI predictions find most likely together: (K, C + 1) each -> (K,) int64.

    The RoI head regresses one box per class; its L2 terms compare the deltas of this class only, the one
    whose box would be reported. Eq. 2 takes it from both views (the term is symmetric), Eq. 3 from the
    teacher. Background is last and never chosen: every RoI's foreground box is regularised.
    """
    probs = sum(torch.softmax(logits.detach(), dim=-1) for logits in class_logits)  # (K, C + 1)
    return probs[:, :-1].argmax(dim=-1)


class SEDLosses(NamedTuple):
    """What one detector kind's SED pass returns."""

    losses: dict[str, Tensor]  # unweighted scalar terms, "loss_scale_*" (Eq. 2) and "loss_distill_*" (Eq. 3)
    teacher_detections: list[dict]  # B dicts {"boxes", "scores", "labels"} of the teacher on X', diagnostics


def dense_losses(*, student: Detector, teacher: Detector, views: SEDViews, cfg: SEDConfig) -> SEDLosses:
    """RetinaNet and FCOS: Eq. 2 over every anchor of every paired level, Eq. 3 over every anchor."""
    losses = {}
    with torch.no_grad():
        teacher_out = teacher.model(views.teacher, views.image_sizes)  # P(X', teacher), R(X', teacher)
        detections = teacher.postprocessor(teacher_out, views.image_sizes)
    out = student.model(views.student, views.image_sizes)  # P(X), R(X): per level (B, H_l*W_l*A, C)
    num_levels = len(out.cls_logits)

    if cfg.scale_consistency:
        out_small = student.model(views.student_small, views.image_sizes_small)  # P(X_hat), R(X_hat)
        pairs = pair_levels(num_levels, views.scale_exp)
        check_pairing(out.anchors, out_small.anchors, pairs, scale_exp=views.scale_exp)
        big = dense_rows(out, [pair.level for pair in pairs])
        small = dense_rows(out_small, [pair.level_small for pair in pairs])
        losses |= as_losses(scale_consistency(big, small, mode="sigmoid", cfg=cfg), "scale")  # Eq. 2

    if cfg.distill != "off":
        every_level = list(range(num_levels))
        terms = self_distillation(dense_rows(out, every_level), dense_rows(teacher_out, every_level),
                                  mode="sigmoid", cfg=cfg)  # Eq. 3
        losses |= as_losses(terms, "distill")
    return SEDLosses(losses=losses, teacher_detections=detections)


def two_stage_losses(*, student: Detector, teacher: Detector, views: SEDViews, cfg: SEDConfig) -> SEDLosses:
    """Faster R-CNN: Eq. 2 and Eq. 3 on the RPN (per anchor) and on the RoI head (per RoI of a shared set)."""
    losses = {}
    model = student.model
    factor = 2 ** views.scale_exp

    def propose(detector_model, rpn_out, image_sizes):  # the top-k proposals of each image, B x (K_i, 4)
        return detector_model.propose(rpn_out, image_sizes, pre_nms_top_n=cfg.pre_nms_top_n,
                                      post_nms_top_n=cfg.roi_topk)

    with torch.no_grad():  # the teacher on X': its RPN outputs and its top-k proposals
        teacher_features = teacher.model.features(views.teacher)  # P2..P6, each (B, F, H_l, W_l)
        teacher_rpn = teacher.model.rpn(teacher_features)
        teacher_proposals = propose(teacher.model, teacher_rpn, views.image_sizes)
        detections = teacher.postprocessor(teacher.model.roi_head(teacher_features, teacher_proposals,
                                                                  views.image_sizes),
                                           teacher_proposals, views.image_sizes)

    features = model.features(views.student)  # FPN maps of X
    rpn = model.rpn(features)
    proposals = propose(model, rpn, views.image_sizes)
    num_levels = len(rpn.objectness)

    if cfg.scale_consistency:
        features_small = model.features(views.student_small)  # FPN maps of X_hat
        rpn_small = model.rpn(features_small)
        pairs = pair_levels(num_levels, views.scale_exp)
        check_pairing(rpn.anchors, rpn_small.anchors, pairs, scale_exp=views.scale_exp)
        if cfg.rpn_terms:  # Eq. 2 on every anchor of every paired RPN level
            big = rpn_rows(rpn, [pair.level for pair in pairs])
            small = rpn_rows(rpn_small, [pair.level_small for pair in pairs])
            losses |= as_losses(scale_consistency(big, small, mode="sigmoid", cfg=cfg), "scale_rpn")
        if cfg.roi_terms:  # Eq. 2 on one RoI set: X's proposals and X_hat's scaled up by 2^s (Sec. 3.1)
            proposals_small = propose(model, rpn_small, views.image_sizes_small)
            rois = [torch.cat([p, q * factor]) for p, q in zip(proposals, proposals_small)]  # B x (K_i, 4) in X
            roi = model.roi_head(features, rois, views.image_sizes)
            roi_small = model.roi_head(features_small, [r / factor for r in rois], views.image_sizes_small)
            classes = likely_class(roi.class_logits, roi_small.class_logits)
            terms = scale_consistency(roi_rows(roi, classes), roi_rows(roi_small, classes), mode="softmax", cfg=cfg)
            losses |= as_losses(terms, "scale_roi")

    if cfg.distill != "off":
        if cfg.rpn_terms:  # Eq. 3 on every anchor of every RPN level
            every_level = list(range(num_levels))
            terms = self_distillation(rpn_rows(rpn, every_level), rpn_rows(teacher_rpn, every_level),
                                      mode="sigmoid", cfg=cfg)
            losses |= as_losses(terms, "distill_rpn")
        if cfg.roi_terms:  # Eq. 3 on one RoI set: the teacher's proposals and the student's (Sec. 3.2)
            rois = [torch.cat([t, p]) for t, p in zip(teacher_proposals, proposals)]  # B x (K_i, 4)
            roi = model.roi_head(features, rois, views.image_sizes)
            with torch.no_grad():
                roi_teacher = teacher.model.roi_head(teacher_features, rois, views.image_sizes)
            classes = likely_class(roi_teacher.class_logits)
            terms = self_distillation(roi_rows(roi, classes), roi_rows(roi_teacher, classes), mode="softmax", cfg=cfg)
            losses |= as_losses(terms, "distill_roi")
    return SEDLosses(losses=losses, teacher_detections=detections)


# --------------------------------------------------------------------------------------------------------
# The method object (ARCHITECTURE.md, "The training loop and the method interface")
# --------------------------------------------------------------------------------------------------------


class SED:
    """Scale-Equivalent Distillation: the unsupervised loss, its weights (Eq. 1) and the teacher's EMA rate.

    The teacher is an EMA of the student from the first iteration (Eq. 4), also during the optional burn-in (the
    paper has none); the labeled images take their usual supervised loss on the weak view; the strong view is
    pixel-aligned with the weak one.
    """

    labeled_views = ("weak",)
    unlabeled_aligned = True
    teacher_init_iteration = 0
    ema_include_buffers = True  # Eq. 4 averages the whole state, BatchNorm statistics included

    def __init__(self, cfg: SEDConfig, *, detector_name: str):
        if detector_name not in DENSE_DETECTORS + TWO_STAGE_DETECTORS:
            raise ValueError(f"semi/sed.py: SED supports {DENSE_DETECTORS + TWO_STAGE_DETECTORS}, "
                             f"got detector {detector_name!r}")
        self.cfg = cfg
        self.detector_name = detector_name
        self.two_stage = detector_name in TWO_STAGE_DETECTORS
        if self.two_stage and not (cfg.rpn_terms or cfg.roi_terms):
            raise ValueError("semi/sed.py: SEDConfig turns off both the RPN and the RoI terms of Faster R-CNN")

    def unsupervised_loss(self, *, student: Detector, teacher: Detector, unlabeled: UnlabeledBatch,
                          iteration: int) -> UnsupOutput:
        """One iteration's unweighted SED terms on an `UnlabeledBatch` (weak X', strong X; n_u images).

        Returns UnsupOutput(losses, pseudo_boxes, stats). losses: "loss_scale_*" (Eq. 2) and "loss_distill_*"
        (Eq. 3), each a scalar; Faster R-CNN names them "loss_scale_rpn_cls", "loss_scale_roi_box", ...
        pseudo_boxes: the teacher's detections above cfg.diagnostic_score in the weak view's frame, for
        diagnostics only (SED itself never thresholds).
        """
        cfg = self.cfg
        scale_exp = int(torch.randint(1, cfg.max_scale_exp + 1, ()).item())  # s ~ U{1, ..., S}
        views = make_views(weak=unlabeled.weak.images, strong=unlabeled.strong.images,
                           image_sizes=unlabeled.strong.image_sizes, scale_exp=scale_exp,
                           pad_stride=cfg.pad_stride or largest_stride(student.model), mode=cfg.downsample)

        if self.two_stage:
            losses, detections = two_stage_losses(student=student, teacher=teacher, views=views, cfg=cfg)
        else:
            losses, detections = dense_losses(student=student, teacher=teacher, views=views, cfg=cfg)

        pseudo_boxes = [{key: value[d["scores"] > cfg.diagnostic_score] for key, value in d.items()}
                        for d in detections]
        stats = {"scale_exp": float(scale_exp),
                 "teacher_boxes_per_image": sum(len(d["scores"]) for d in pseudo_boxes) / max(1, len(pseudo_boxes))}
        return UnsupOutput(losses=losses, pseudo_boxes=pseudo_boxes, stats=stats)

    def loss_keys(self) -> list[str]:
        """The keys `unsupervised_loss` returns under this configuration, e.g. "loss_scale_cls"."""
        cfg = self.cfg
        names = (["scale"] if cfg.scale_consistency else []) + (["distill"] if cfg.distill != "off" else [])
        if self.two_stage:
            stages = (["rpn"] if cfg.rpn_terms else []) + (["roi"] if cfg.roi_terms else [])
            names = [f"{name}_{stage}" for name in names for stage in stages]
        parts = ["cls", "box"] + (["quality"] if self.detector_name == "fcos" else [])
        return [f"loss_{name}_{part}" for name in names for part in parts]

    def loss_weights(self, iteration: int) -> dict[str, float]:
        """Eq. 1: every scale term weighs (n_u / n_s) * lambda_s, every distillation term (n_u / n_s) * lambda_d,
        times the burn-in / ramp factor in [0, 1] (1 throughout with the paper's burn_in = ramp = 0)."""
        cfg = self.cfg
        ratio = cfg.num_unlabeled / cfg.num_labeled * linear_ramp(iteration, start=cfg.burn_in, length=cfg.ramp)
        return {f"unsup_{key}": ratio * (cfg.lambda_scale if key.startswith("loss_scale") else cfg.lambda_distill)
                for key in self.loss_keys()}

    def ema_momentum(self, iteration: int) -> float:
        """The teacher's EMA rate alpha of Eq. 4 (Table 9): a step at the first LR milestone, or cosine."""
        cfg = self.cfg
        return sed_momentum(iteration, policy=cfg.ema_policy, start=cfg.ema_start, end=cfg.ema_end,
                            milestone=cfg.ema_milestone, max_iter=cfg.max_iter)


def build_sed(cfg: SEDConfig, *, detector_name: str) -> SED:
    """SED with its settings (`engine.config.sed_config` maps a run's settings onto them: Eq. 1's batch sizes,
    Table 9's first LR milestone, the supervised branch's proposal count for the RoI terms)."""
    return SED(cfg, detector_name=detector_name)


def largest_stride(model) -> int:
    """The coarsest stride of a detector's pyramid (P7: 128 for RetinaNet and FCOS, P6: 64 for Faster R-CNN)."""
    return max(model.anchor_generator.strides)


# --------------------------------------------------------------------------------------------------------
# The teacher's EMA schedule (Table 9)
# --------------------------------------------------------------------------------------------------------


def sed_momentum(iteration: int, *, policy: str = "step", milestone: int | None = None, max_iter: int | None = None,
                 start: float | None = None, end: float = 0.9) -> float:
    """SED's EMA rate alpha (paper Table 9).

    policy "step": `start` (default 0.99) before `milestone` (the first LR milestone; None: never drops),
    `end` from it on. policy "cosine": from `start` (default 0.996) at t = 0 to `end` at t = max_iter,
    m = end + (start - end) * (1 + cos(pi * t / max_iter)) / 2.
    """
    if policy == "step":
        start = 0.99 if start is None else start
        return start if milestone is None or iteration < milestone else end
    if policy == "cosine":
        if not max_iter or max_iter <= 0:
            raise ValueError(f"semi/sed.py: sed_momentum(policy='cosine') needs max_iter > 0, got {max_iter}")
        start = 0.996 if start is None else start
        progress = min(max(iteration / max_iter, 0.0), 1.0)
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"semi/sed.py: sed_momentum policy must be 'step' or 'cosine', got {policy!r}")
