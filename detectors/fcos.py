"""FCOS: fully convolutional one-stage detection (Tian et al. 2019), the detector of Dense Teacher.

The file reads top to bottom:

    head         FCOSHead: two towers of conv-GroupNorm-ReLU; class logits, (l, t, r, b) distances, quality
    model        FCOS: ResNet-FPN P3..P7 -> head -> DenseOutput (raw outputs, no losses, no boxes)
    targets      FCOSCriterion.assign: each location -> a gt box, background or ignored (batched)
    loss         FCOSCriterion: focal loss, GIoU loss, centerness (or IoU) BCE, each / max(1, num_pos)
    postprocess  FCOSPostprocessor: sqrt(cls * quality), per-level top-k, decode, clip, NMS
    builder      build_fcos(...)
    interop      load_torchvision_state_dict: torchvision's fcos_resnet50_fpn weights into this model

Settings follow torchvision's `fcos_resnet50_fpn`, which differs from the paper in small ways kept here for
weight compatibility: the location of a cell is its top-left corner (x * s, y * s) rather than the cell
centre (s / 2 + x * s, paper Sec. 3.1); P6 and P7 come from P5; there is no learnt per-level scale on the
box distances (a ReLU makes them >= 0, the paper uses exp); the GIoU loss is not weighted by centerness.
The ReLU can die when training from scratch at a high learning rate: once every distance output is negative,
no gradient reaches the box branch again and the GIoU loss stays at 1. `box_activation="exp"` (the paper's
exp(x), with the distances still divided by the stride) has no such dead zone; the built-in preset uses it.

Locations ("anchors"). Each location of level l carries one square anchor of side s_l (its stride) centred
on the location: the square's centre is the point where distances are measured from, and its side
normalises them (box_reg is (l, t, r, b) / s_l).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.anchors import AnchorGenerator
from detectors.backbone import ResNetFPN, build_resnet_fpn, load_renamed_state_dict, torchvision_backbone_key
from detectors.box_ops import (LinearBoxCoder, box_area, crowd_boxes, elementwise_box_iou, giou_loss,
                               pad_per_image)
from detectors.dense import DenseOutput, DensePostprocessor, conv_tower, focal_classification_loss, to_rows

STRIDES = (8, 16, 32, 64, 128)  # P3..P7
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target sentinels of a location.
BACKGROUND = -1  # a negative: trained towards "no object"
IGNORED = -2  # inside a crowd region and not positive: no loss at all


# --------------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------------


class HeadOutput(NamedTuple):
    cls_logits: list[Tensor]  # per level (B, H_l*W_l, C)
    box_reg: list[Tensor]  # per level (B, H_l*W_l, 4), >= 0
    quality: list[Tensor]  # per level (B, H_l*W_l, 1)


class FCOSHead(nn.Module):
    """Shared over levels: a classification tower ending in C logits, and a box tower ending in the 4
    distances and the quality logit (the paper's Fig. 2 with centerness on the regression branch, v2).

    Args:
        in_channels: FPN channels (must be divisible by `norm_groups`).
        num_classes: C.
        num_convs: convs per tower (4 in the paper).
        norm_groups: GroupNorm groups (32 in the paper; a 64-channel FPN works with 32 or 16).
        prior_probability: initial foreground probability of every class logit (RetinaNet paper, Sec. 4.1),
            so that the many negatives do not swamp the focal loss at the first iterations.
        box_activation: "relu" (torchvision) or "exp" (the FCOS paper's exp(s_i x), Sec. 3.2, without the learnt
            s_i since the distances are already divided by the stride; exp keeps a gradient for every output).
            Both give distances / stride >= 0.
    """

    # exp's input is capped so that a distance stays finite: e^10 strides is far beyond any image.
    MAX_LOG_DISTANCE = 10.0

    def __init__(self, in_channels: int, num_classes: int, *, num_convs: int = 4, norm_groups: int = 32,
                 prior_probability: float = 0.01, box_activation: str = "relu"):
        super().__init__()
        if norm_groups and in_channels % norm_groups:
            raise ValueError(f"detectors/fcos.py: {in_channels} head channels are not divisible into "
                             f"{norm_groups} GroupNorm groups")
        if box_activation not in ("relu", "exp"):
            raise ValueError(f"detectors/fcos.py: box_activation must be 'relu' or 'exp', got {box_activation!r}")
        self.num_classes = num_classes
        self.box_activation = box_activation
        self.cls_tower = conv_tower(in_channels, num_convs, norm_groups)
        self.box_tower = conv_tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.box_reg = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.quality = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: list[Tensor]) -> HeadOutput:
        """features: per level (B, F, H_l, W_l) -> HeadOutput of rows (B, H_l*W_l, K), K = C, 4, 1."""
        cls_logits, box_reg, quality = [], [], []
        for x in features:
            cls_features, box_features = self.cls_tower(x), self.box_tower(x)
            cls_logits.append(to_rows(self.cls_logits(cls_features), self.num_classes))  # (B, C, H, W) -> (B, HW, C)
            raw = self.box_reg(box_features)  # (B, 4, H, W)
            distances = (F.relu(raw) if self.box_activation == "relu"
                         else torch.exp(raw.clamp(max=self.MAX_LOG_DISTANCE)))
            box_reg.append(to_rows(distances, 4))  # (B, 4, H, W) -> (B, HW, 4)
            quality.append(to_rows(self.quality(box_features), 1))  # (B, 1, H, W) -> (B, HW, 1)
        return HeadOutput(cls_logits, box_reg, quality)


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


class FCOS(nn.Module):
    """ResNet-FPN (P3..P7) + FCOSHead. Returns raw outputs; see FCOSCriterion and FCOSPostprocessor.

    Args:
        backbone: a ResNetFPN with 5 output levels of strides `strides`.
        num_classes: C.
        head: an FCOSHead (None builds the stock one with `num_convs`, `norm_groups`).
    """

    def __init__(self, backbone: ResNetFPN, *, num_classes: int, head: nn.Module | None = None,
                 strides: tuple[int, ...] = STRIDES, num_convs: int = 4, norm_groups: int = 32,
                 box_activation: str = "relu", pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
        super().__init__()
        if tuple(backbone.strides) != tuple(strides):
            raise ValueError(f"detectors/fcos.py: backbone strides {backbone.strides} != head strides {strides}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.head = head if head is not None else FCOSHead(backbone.out_channels, num_classes, num_convs=num_convs,
                                                           norm_groups=norm_groups, box_activation=box_activation)
        # One square anchor of side = stride per location: its centre is the FCOS point.
        self.anchor_generator = AnchorGenerator(sizes=tuple((s,) for s in strides),
                                                aspect_ratios=((1.0,),) * len(strides), strides=strides)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> DenseOutput:
        """images float (B, 3, H, W) in [0, 1], zero-padded, H and W multiples of 32 (image_sizes int (B, 2)
        is accepted for a uniform detector interface; the network itself does not need it)
        -> DenseOutput with A = 1: cls_logits (B, H_l*W_l, C), box_reg (B, H_l*W_l, 4) distances / stride,
        quality (B, H_l*W_l, 1) logits, anchors (H_l*W_l, 4) per level."""
        features = self.backbone((images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype))
        cls_logits, box_reg, quality = self.head(features)
        shapes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(shapes, dtype=images.dtype, device=images.device)
        return DenseOutput(cls_logits=cls_logits, box_reg=box_reg, quality=quality, anchors=anchors,
                           strides=list(self.anchor_generator.strides), shapes=shapes, num_anchors_per_location=1)


# --------------------------------------------------------------------------------------------------------
# Target assignment and loss
# --------------------------------------------------------------------------------------------------------


class FCOSTargets(NamedTuple):
    """Per location of every image (N = all levels' locations, concatenated finest first)."""

    matched: Tensor  # int64 (B, N): gt index, BACKGROUND or IGNORED
    boxes: Tensor  # (B, N, 4) xyxy matched gt box (zeros unless positive)
    labels: Tensor  # int64 (B, N) class of the matched gt, -1 unless positive


def size_of_interest(strides, range_multiplier: float = 1.0) -> list[tuple[float, float]]:
    """Per level the open interval of max(l, t, r, b) a location of that level may regress.

    torchvision's rule (4 s_l, 8 s_l) is the paper's m_2..m_7 = 0, 64, 128, 256, 512, inf for strides
    8..128 (Sec. 3.2); the first level has no lower bound and the last no upper bound. `range_multiplier`
    scales every bound, for datasets of small objects (e.g. 1/8 spreads 8..96 px objects over P3..P7).
    """
    ranges = [(4.0 * s * range_multiplier, 8.0 * s * range_multiplier) for s in strides]
    ranges[0] = (0.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], math.inf)
    return ranges


class FCOSCriterion:
    """FCOS training losses from raw outputs and ground truth.

    Target assignment (paper Sec. 3.1-3.2, v2 centre sampling), per location and gt box, for all images at once:
      positive candidate if the location lies inside the box, within `center_sampling_radius * stride` of the
      box centre (Chebyshev distance), inside its image's valid (unpadded) region, and max(l, t, r, b) falls in
      its level's size of interest. A location with several candidates takes the smallest box (Sec. 3.1).
      Locations inside a crowd box that are not positive are IGNORED (no loss).
    Losses (each summed and divided by max(1, number of positives in the batch)):
      loss_cls      sigmoid focal loss over every non-ignored location and class (alpha 0.25, gamma 2)
      loss_box      GIoU loss of the decoded box vs its gt box, positives only
      loss_quality  BCE of the quality logit, positives only; target = centerness (paper Eq. 3) or, with
                    quality="iou", the IoU of the (detached) predicted box with its gt box
    """

    def __init__(self, *, num_classes: int, center_sampling_radius: float = 1.5, range_multiplier: float = 1.0,
                 size_ranges: list[tuple[float, float]] | None = None, quality: str = "centerness",
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        if quality not in ("centerness", "iou"):
            raise ValueError(f"detectors/fcos.py: quality must be 'centerness' or 'iou', got {quality!r}")
        self.num_classes = num_classes
        self.center_sampling_radius = center_sampling_radius
        self.range_multiplier = range_multiplier
        self.size_ranges = size_ranges  # None: size_of_interest(strides, range_multiplier)
        self.quality = quality
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_coder = LinearBoxCoder(normalize_by_size=True)

    @torch.no_grad()
    def assign(self, outputs: DenseOutput, targets: list[dict], image_sizes: Tensor) -> FCOSTargets:
        """Match every location of every image to a gt box (see the class docstring).

        Args:
            outputs: the model's DenseOutput (only anchors / strides are read).
            targets: B dicts with "boxes" (N_i, 4) xyxy, "labels" int64 (N_i,), optional "crowd" (M_i, 4).
            image_sizes: int (B, 2) (h, w) valid region of each image.
        """
        anchors = torch.cat(outputs.anchors)  # (N, 4)
        dtype, device = anchors.dtype, anchors.device
        points = (anchors[:, :2] + anchors[:, 2:]) / 2  # (N, 2) the FCOS locations
        counts = [a.shape[0] for a in outputs.anchors]
        ranges = self.size_ranges or size_of_interest(outputs.strides, self.range_multiplier)
        if len(ranges) != len(counts):
            raise ValueError(f"detectors/fcos.py: {len(ranges)} size ranges for {len(counts)} levels")
        stride = torch.repeat_interleave(torch.tensor(outputs.strides, dtype=dtype, device=device),
                                         torch.tensor(counts, device=device))  # (N,)
        lower, upper = torch.tensor(ranges, dtype=dtype, device=device).repeat_interleave(
            torch.tensor(counts, device=device), dim=0).unbind(1)  # (N,) each

        gt, gt_valid = pad_per_image([t["boxes"].to(device=device, dtype=dtype) for t in targets], fill=0.0,
                                     min_rows=0)  # (B, G, 4), (B, G)
        B, G = gt_valid.shape
        labels, _ = pad_per_image([t["labels"].to(device) for t in targets], fill=-1, min_rows=0)  # (B, G)
        sizes = image_sizes.to(device=device, dtype=dtype)
        in_image = (points[None, :, 0] < sizes[:, 1, None]) & (points[None, :, 1] < sizes[:, 0, None])  # (B, N)

        if G == 0:  # no gt box in the whole batch
            matched = torch.full((B, points.shape[0]), BACKGROUND, dtype=torch.int64, device=device)
        else:
            # (B, N, G, 4): distances from each location to the four sides of each gt box.
            x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, N, 1) each
            x1, y1, x2, y2 = gt[:, None, :, :].unbind(-1)  # (B, 1, G) each
            ltrb = torch.stack((x - x1, y - y1, x2 - x, y2 - y), dim=-1)
            inside = ltrb.amin(dim=-1) > 0  # (B, N, G)
            centres = (gt[..., :2] + gt[..., 2:]) / 2  # (B, G, 2)
            offset = (points[None, :, None, :] - centres[:, None, :, :]).abs().amax(dim=-1)  # (B, N, G)
            near_centre = offset < self.center_sampling_radius * stride[None, :, None]
            reach = ltrb.amax(dim=-1)  # (B, N, G)
            in_range = (reach > lower[None, :, None]) & (reach < upper[None, :, None])
            candidate = inside & near_centre & in_range & gt_valid[:, None, :] & in_image[:, :, None]
            # Ambiguous locations regress the smallest box (paper Sec. 3.1).
            area = torch.where(candidate, box_area(gt)[:, None, :], math.inf)  # (B, N, G)
            smallest_area, smallest = area.min(dim=-1)  # (B, N)
            matched = torch.where(torch.isfinite(smallest_area), smallest, BACKGROUND)

        crowd, crowd_valid = pad_per_image([crowd_boxes(t, dtype=dtype, device=device) for t in targets], fill=0.0,
                                           min_rows=0)  # (B, M, 4), (B, M)
        if crowd.shape[1]:
            x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, N, 1)
            cx1, cy1, cx2, cy2 = crowd[:, None, :, :].unbind(-1)  # (B, 1, M)
            in_crowd = ((x > cx1) & (x < cx2) & (y > cy1) & (y < cy2) & crowd_valid[:, None, :]).any(dim=-1)  # (B, N)
            matched = torch.where((matched == BACKGROUND) & in_crowd, IGNORED, matched)

        positive = matched >= 0
        index = matched.clamp(min=0)  # (B, N)
        if G == 0:
            boxes = torch.zeros(B, points.shape[0], 4, dtype=dtype, device=device)
            matched_labels = torch.full_like(matched, -1)
        else:
            boxes = torch.gather(gt, 1, index[..., None].expand(-1, -1, 4))  # (B, N, 4)
            matched_labels = torch.gather(labels, 1, index)  # (B, N)
        boxes = torch.where(positive[..., None], boxes, 0.0)
        return FCOSTargets(matched=matched, boxes=boxes, labels=torch.where(positive, matched_labels, -1))

    def __call__(self, outputs: DenseOutput, targets: list[dict], image_sizes: Tensor) -> dict[str, Tensor]:
        """outputs of B images, their targets (see `assign`), image_sizes int (B, 2)
        -> {"loss_cls", "loss_box", "loss_quality"}: unweighted scalars, each / max(1, num_pos)."""
        assigned = self.assign(outputs, targets, image_sizes)
        cls_logits = torch.cat(outputs.cls_logits, dim=1)  # (B, N, C)
        box_reg = torch.cat(outputs.box_reg, dim=1)  # (B, N, 4)
        quality = torch.cat(outputs.quality, dim=1).squeeze(-1)  # (B, N, 1) -> (B, N)
        anchors = torch.cat(outputs.anchors)  # (N, 4)

        loss_cls, positive, num_pos = focal_classification_loss(
            cls_logits, assigned.matched, assigned.labels, num_classes=self.num_classes, ignored=IGNORED,
            alpha=self.focal_alpha, gamma=self.focal_gamma)  # (), (B, N), max(1, positives) of the global batch

        pos_anchors = anchors.expand(positive.shape[0], -1, -1)[positive]  # (P, 4)
        gt_boxes = assigned.boxes[positive]  # (P, 4)
        pred_boxes = self.box_coder.decode(box_reg[positive], pos_anchors)  # (P, 4)
        loss_box = giou_loss(pred_boxes, gt_boxes, reduction="sum")

        if self.quality == "centerness":
            quality_targets = centerness(self.box_coder.encode(gt_boxes, pos_anchors))  # (P,)
        else:  # Dense Teacher's IoU branch: how well the predicted box fits its object
            quality_targets = elementwise_box_iou(pred_boxes.detach(), gt_boxes)  # (P,)
        loss_quality = F.binary_cross_entropy_with_logits(quality[positive], quality_targets, reduction="sum")
        return {"loss_cls": loss_cls / num_pos, "loss_box": loss_box / num_pos, "loss_quality": loss_quality / num_pos}


def centerness(ltrb: Tensor) -> Tensor:
    """Paper Eq. 3: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)). ltrb (..., 4) > 0 -> (...) in (0, 1]."""
    left_right, top_bottom = ltrb[..., [0, 2]], ltrb[..., [1, 3]]
    return torch.sqrt((left_right.amin(dim=-1) / left_right.amax(dim=-1))
                      * (top_bottom.amin(dim=-1) / top_bottom.amax(dim=-1)))


# --------------------------------------------------------------------------------------------------------
# Postprocessing
# --------------------------------------------------------------------------------------------------------


class FCOSPostprocessor(DensePostprocessor):
    """Raw outputs -> detections. The score of a (location, class) is sqrt(sigmoid(cls) * sigmoid(quality))
    (torchvision's; the paper multiplies, Sec. 3.3). Per level and image the `topk_candidates` best scores
    above `score_thresh` are decoded and clipped to the image; class-wise NMS at `nms_thresh` over all levels
    keeps the best `detections_per_image` (`detectors.dense.DensePostprocessor`).
    """

    def __init__(self, *, score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.6,
                 detections_per_image: int = 100):
        super().__init__(box_coder=LinearBoxCoder(normalize_by_size=True), score_thresh=score_thresh,
                         topk_candidates=topk_candidates, nms_thresh=nms_thresh,
                         detections_per_image=detections_per_image)

    def level_scores(self, outputs: DenseOutput) -> list[Tensor]:
        scores = super().level_scores(outputs)  # per level (B, N_l, C)
        if outputs.quality is None:
            return scores
        return [torch.sqrt(s * torch.sigmoid(q)) for s, q in zip(scores, outputs.quality)]


# --------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------


class FCOSParts(NamedTuple):
    model: FCOS
    criterion: FCOSCriterion
    postprocessor: FCOSPostprocessor


def build_fcos(*, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256,
               backbone_weights: str | None = None, frozen_stages: int = 1, num_convs: int = 4,
               norm_groups: int = 32, box_activation: str = "relu", center_sampling_radius: float = 1.5,
               range_multiplier: float = 1.0,
               size_ranges=None, quality: str = "centerness", score_thresh: float = 0.05,
               topk_candidates: int = 1000, nms_thresh: float = 0.6, detections_per_image: int = 100) -> FCOSParts:
    """FCOS + ResNet-FPN P3..P7 (P6, P7 from P5) with torchvision's defaults, except score_thresh 0.05
    (torchvision: 0.2). See FCOSHead, FCOSCriterion and FCOSPostprocessor for the arguments."""
    body = build_resnet_fpn(backbone, out_channels=fpn_channels, weights=backbone_weights,
                            frozen_stages=frozen_stages, levels=(3, 4, 5), extra_blocks="p6p7", p6p7_from="p5")
    model = FCOS(body, num_classes=num_classes, num_convs=num_convs, norm_groups=norm_groups,
                 box_activation=box_activation)
    criterion = FCOSCriterion(num_classes=num_classes, center_sampling_radius=center_sampling_radius,
                              range_multiplier=range_multiplier, size_ranges=size_ranges, quality=quality)
    postprocessor = FCOSPostprocessor(score_thresh=score_thresh, topk_candidates=topk_candidates,
                                      nms_thresh=nms_thresh, detections_per_image=detections_per_image)
    return FCOSParts(model, criterion, postprocessor)


# --------------------------------------------------------------------------------------------------------
# torchvision interop
# --------------------------------------------------------------------------------------------------------


def torchvision_key(key: str) -> str:
    """A key of torchvision's FCOS state dict -> ours:

        backbone.*                                   -> see torchvision_backbone_key
        head.classification_head.conv.<j>.<p>        -> head.cls_tower.<j>.<p>   (same conv / GN / ReLU order)
        head.classification_head.cls_logits.<p>      -> head.cls_logits.<p>
        head.regression_head.conv.<j>.<p>            -> head.box_tower.<j>.<p>
        head.regression_head.bbox_reg.<p>            -> head.box_reg.<p>
        head.regression_head.bbox_ctrness.<p>        -> head.quality.<p>
    """
    if key.startswith("backbone."):
        return torchvision_backbone_key(key)
    renames = {"head.classification_head.conv.": "head.cls_tower.",
               "head.classification_head.cls_logits.": "head.cls_logits.",
               "head.regression_head.conv.": "head.box_tower.",
               "head.regression_head.bbox_reg.": "head.box_reg.",
               "head.regression_head.bbox_ctrness.": "head.quality."}
    for theirs, ours in renames.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    raise KeyError(f"detectors/fcos.py: no mapping for torchvision key {key!r}")


def load_torchvision_state_dict(model: FCOS, tv_state_dict: dict[str, Tensor]) -> None:
    """Load the weights of torchvision's `fcos_resnet50_fpn` (or any torchvision FCOS of the same layout).

    Labels need no shift: torchvision's FCOS has no background logit either. BatchNorm's num_batches_tracked
    is dropped when this model uses frozen BatchNorm. Raises on any key missing or left over.
    """
    load_renamed_state_dict(model, tv_state_dict, rename=torchvision_key)
