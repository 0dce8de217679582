"""RetinaNet: focal loss for dense object detection (Lin et al. 2017), a detector of Dense Teacher (Table 6)
and SED (Table 5).

The file reads top to bottom:

    head         RetinaNetHead: two towers of 4 conv-ReLU; A*C class logits and A*4 deltas per location
    model        RetinaNet: ResNet-FPN P3..P7 -> head -> DenseOutput (raw outputs, no losses, no boxes)
    targets      RetinaNetCriterion.assign: IoU matching of every anchor of every image at once
    loss         RetinaNetCriterion: focal loss + L1 (or smooth L1) on encoded deltas, / max(1, num_pos)
    postprocess  RetinaNetPostprocessor: per-level top-k, decode, clip, class-wise NMS
    builder      build_retinanet(...)
    interop      load_torchvision_state_dict: torchvision's retinanet_resnet50_fpn weights into this model

Settings follow torchvision's `retinanet_resnet50_fpn` (v1): P6 and P7 from P5 (the paper takes P6 from C5,
Sec. 4, as torchvision's v2 does: `p6p7_from="c5"`); A = 9 anchors per location, sizes 2^0, 2^(1/3), 2^(2/3)
times the level's base size (32..512) and aspect ratios 1:2, 1:1, 2:1 (Sec. 4); IoU >= 0.5 positive, < 0.4
negative, in between ignored, plus low-quality matches so every object has an anchor; box coder weights
(1, 1, 1, 1); postprocessing keeps 1000 candidates per level above 0.05, NMS 0.5, 300 detections.

One difference from torchvision: the losses are divided by the positives of the whole batch (as in the
paper and Detectron), not per image and then averaged.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from detectors.anchors import AnchorGenerator
from detectors.backbone import ResNetFPN, build_resnet_fpn, load_renamed_state_dict, torchvision_backbone_key
from detectors.box_ops import BoxCoder, box_ioa, box_iou, crowd_boxes, pad_per_image
from detectors.dense import DenseOutput, DensePostprocessor, conv_tower, focal_classification_loss, to_rows
from detectors.losses import l1_loss, smooth_l1_loss
from detectors.matcher import Matcher

STRIDES = (8, 16, 32, 64, 128)  # P3..P7
COCO_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # base anchor size per level
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width
BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target sentinels of an anchor (the Matcher's values).
BACKGROUND = Matcher.BELOW_LOW_THRESHOLD  # IoU < 0.4 with every gt: a negative
IGNORED = Matcher.BETWEEN_THRESHOLDS  # 0.4 <= IoU < 0.5, or a negative lying in a crowd region: no loss


def level_anchor_sizes(base: float) -> tuple[int, ...]:
    """Three scales per level, 2^0, 2^(1/3), 2^(2/3) times the base size (paper Sec. 4), truncated to whole
    pixels as torchvision does: 32 -> (32, 40, 50)."""
    return tuple(int(base * 2 ** (octave / 3)) for octave in range(3))


# --------------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------------


class RetinaNetHead(nn.Module):
    """Shared over levels: a classification subnet (4 conv-ReLU + a conv to A*C logits) and a box subnet
    (4 conv-ReLU + a conv to A*4 deltas), paper Sec. 4 and Fig. 3.

    Args:
        in_channels: FPN channels. num_anchors: A. num_classes: C. num_convs: convs per subnet (4).
        prior_probability: initial foreground probability of every logit (paper Sec. 4.1, pi = 0.01), so that
            the ~100k background anchors do not dominate the first iterations.
        norm_groups: 0 (the paper and torchvision's v1: conv-ReLU) or the GroupNorm groups after each tower
            conv (torchvision's v2 layout). Without a norm, the paper's N(0, 0.01) init shrinks activations by
            about sqrt(9 * F) * 0.01 per conv: 0.48 at F = 256 channels, but 0.24 at F = 64, so a narrow
            head trained from scratch starts with towers whose output is ~1e-3 of their input and learns slowly.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, num_convs: int = 4,
                 prior_probability: float = 0.01, norm_groups: int = 0):
        super().__init__()
        if norm_groups and in_channels % norm_groups:
            raise ValueError(f"detectors/retinanet.py: {in_channels} head channels are not divisible into "
                             f"{norm_groups} GroupNorm groups")
        self.num_classes = num_classes
        self.cls_tower = conv_tower(in_channels, num_convs, norm_groups)
        self.box_tower = conv_tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.box_reg = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level (B, F, H_l, W_l) -> (cls_logits per level (B, H_l*W_l*A, C),
        box deltas per level (B, H_l*W_l*A, 4))."""
        cls_logits, box_reg = [], []
        for x in features:
            # (B, A*C, H, W) -> (B, HWA, C) and (B, A*4, H, W) -> (B, HWA, 4)
            cls_logits.append(to_rows(self.cls_logits(self.cls_tower(x)), self.num_classes))
            box_reg.append(to_rows(self.box_reg(self.box_tower(x)), 4))
        return cls_logits, box_reg


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


class RetinaNet(nn.Module):
    """ResNet-FPN (P3..P7) + RetinaNetHead. Returns raw outputs; see RetinaNetCriterion and RetinaNetPostprocessor.

    Args:
        backbone: a ResNetFPN with 5 output levels of strides `strides`.
        num_classes: C.
        anchor_sizes: base anchor size per level (COCO: 32..512; a preset of small objects scales them down).
        head: a RetinaNetHead (None builds the stock one with `num_convs`, `norm_groups`).
    """

    def __init__(self, backbone: ResNetFPN, *, num_classes: int, anchor_sizes=COCO_ANCHOR_SIZES,
                 head: nn.Module | None = None, strides: tuple[int, ...] = STRIDES, num_convs: int = 4,
                 norm_groups: int = 0, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
        super().__init__()
        if tuple(backbone.strides) != tuple(strides):
            raise ValueError(f"detectors/retinanet.py: backbone strides {backbone.strides} != head strides {strides}")
        if len(anchor_sizes) != len(strides):
            raise ValueError(f"detectors/retinanet.py: anchor_sizes needs one base size per level "
                             f"({len(strides)}), got {list(anchor_sizes)}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.anchor_generator = AnchorGenerator(sizes=tuple(level_anchor_sizes(s) for s in anchor_sizes),
                                                aspect_ratios=(ASPECT_RATIOS,) * len(strides), strides=strides)
        A = self.anchor_generator.num_anchors_per_location
        self.head = head if head is not None else RetinaNetHead(backbone.out_channels, A, num_classes,
                                                                num_convs=num_convs, norm_groups=norm_groups)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> DenseOutput:
        """images float (B, 3, H, W) in [0, 1], zero-padded, H and W multiples of 32 (image_sizes int (B, 2)
        is accepted for a uniform detector interface; the network itself does not need it)
        -> DenseOutput with A = 9: cls_logits (B, H_l*W_l*A, C), box_reg (B, H_l*W_l*A, 4) deltas,
        quality None, anchors (H_l*W_l*A, 4) per level."""
        features = self.backbone((images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype))
        cls_logits, box_reg = self.head(features)
        shapes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(shapes, dtype=images.dtype, device=images.device)
        return DenseOutput(cls_logits=cls_logits, box_reg=box_reg, quality=None, anchors=anchors,
                           strides=list(self.anchor_generator.strides), shapes=shapes,
                           num_anchors_per_location=self.anchor_generator.num_anchors_per_location)


# --------------------------------------------------------------------------------------------------------
# Target assignment and loss
# --------------------------------------------------------------------------------------------------------


class RetinaNetTargets(NamedTuple):
    """Per anchor of every image (N = all levels' anchors, concatenated finest first)."""

    matched: Tensor  # int64 (B, N): gt index, BACKGROUND or IGNORED
    boxes: Tensor  # (B, N, 4) xyxy matched gt box (zeros unless positive)
    labels: Tensor  # int64 (B, N) class of the matched gt, -1 unless positive


class RetinaNetCriterion:
    """RetinaNet training losses from raw outputs and ground truth.

    Assignment: Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches) on the IoU of every anchor
    with every gt box, all images at once; a negative anchor whose area lies for at least `crowd_ioa_thresh`
    inside a crowd box is ignored.
    Losses (each summed and divided by max(1, number of positive anchors in the batch), paper Sec. 3.3):
      loss_cls   sigmoid focal loss (alpha 0.25, gamma 2) over all non-ignored anchors and classes
      loss_box   L1 (torchvision) or smooth L1 (`box_loss="smooth_l1"`, Detectron's beta 0.1) between
                 predicted and target deltas of the positives
    """

    def __init__(self, *, num_classes: int, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 allow_low_quality_matches: bool = True, box_loss: str = "l1", smooth_l1_beta: float = 0.1,
                 crowd_ioa_thresh: float = 0.5, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"detectors/retinanet.py: box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        self.num_classes = num_classes
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=allow_low_quality_matches)
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_coder = BoxCoder(BOX_WEIGHTS)

    @torch.no_grad()
    def assign(self, outputs: DenseOutput, targets: list[dict], image_sizes: Tensor | None = None) -> RetinaNetTargets:
        """Match every anchor of every image (see the class docstring).

        Args:
            outputs: the model's DenseOutput (only anchors are read).
            targets: B dicts with "boxes" (N_i, 4) xyxy, "labels" int64 (N_i,), optional "crowd" (M_i, 4).
            image_sizes: unused (anchors over padding simply overlap no gt box); kept for a uniform interface.
        """
        anchors = torch.cat(outputs.anchors)  # (N, 4)
        dtype, device = anchors.dtype, anchors.device
        gt, gt_valid = pad_per_image([t["boxes"].to(device=device, dtype=dtype) for t in targets], fill=0.0,
                                     min_rows=0)  # (B, G, 4), (B, G)
        B, G = gt_valid.shape
        matched = self.matcher(box_iou(gt, anchors), gt_valid)  # (B, G, N) -> (B, N)

        crowd, crowd_valid = pad_per_image([crowd_boxes(t, dtype=dtype, device=device) for t in targets], fill=0.0,
                                           min_rows=0)  # (B, M, 4), (B, M)
        if crowd.shape[1]:
            share = box_ioa(anchors, crowd).masked_fill(~crowd_valid[:, None, :], 0.0)  # (B, N, M)
            in_crowd = share.amax(dim=-1) >= self.crowd_ioa_thresh  # (B, N)
            matched = torch.where((matched == BACKGROUND) & in_crowd, IGNORED, matched)

        positive = matched >= 0
        index = matched.clamp(min=0)  # (B, N)
        if G == 0:
            boxes = torch.zeros(B, anchors.shape[0], 4, dtype=dtype, device=device)
            labels = torch.full_like(matched, -1)
        else:
            boxes = torch.gather(gt, 1, index[..., None].expand(-1, -1, 4))  # (B, N, 4)
            labels, _ = pad_per_image([t["labels"].to(device) for t in targets], fill=-1, min_rows=0)  # (B, G)
            labels = torch.gather(labels, 1, index)  # (B, N)
        return RetinaNetTargets(matched=matched, boxes=torch.where(positive[..., None], boxes, 0.0),
                                labels=torch.where(positive, labels, -1))

    def __call__(self, outputs: DenseOutput, targets: list[dict], image_sizes: Tensor) -> dict[str, Tensor]:
        """outputs of B images, their targets (see `assign`), image_sizes int (B, 2)
        -> {"loss_cls", "loss_box"}: unweighted scalars, each / max(1, num_pos)."""
        assigned = self.assign(outputs, targets, image_sizes)
        cls_logits = torch.cat(outputs.cls_logits, dim=1)  # (B, N, C)
        deltas = torch.cat(outputs.box_reg, dim=1)  # (B, N, 4)
        anchors = torch.cat(outputs.anchors)  # (N, 4)

        loss_cls, positive, num_pos = focal_classification_loss(
            cls_logits, assigned.matched, assigned.labels, num_classes=self.num_classes, ignored=IGNORED,
            alpha=self.focal_alpha, gamma=self.focal_gamma)  # (), (B, N), max(1, positives) of the global batch

        pos_anchors = anchors.expand(positive.shape[0], -1, -1)[positive]  # (P, 4)
        box_targets = self.box_coder.encode(assigned.boxes[positive], pos_anchors)  # (P, 4)
        if self.box_loss == "l1":
            loss_box = l1_loss(deltas[positive], box_targets, reduction="sum")
        else:
            loss_box = smooth_l1_loss(deltas[positive], box_targets, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls / num_pos, "loss_box": loss_box / num_pos}


# --------------------------------------------------------------------------------------------------------
# Postprocessing
# --------------------------------------------------------------------------------------------------------


class RetinaNetPostprocessor(DensePostprocessor):
    """Raw outputs -> detections: per level and image the `topk_candidates` best sigmoid scores above
    `score_thresh` (paper Sec. 4, "Inference": 1000 per level, 0.05); decode, clip to the image, class-wise
    NMS at `nms_thresh` over all levels, keep the best `detections_per_image` (torchvision: 300)
    (`detectors.dense.DensePostprocessor`)."""

    def __init__(self, *, score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_image: int = 300):
        super().__init__(box_coder=BoxCoder(BOX_WEIGHTS), score_thresh=score_thresh,
                         topk_candidates=topk_candidates, nms_thresh=nms_thresh,
                         detections_per_image=detections_per_image)


# --------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------


class RetinaNetParts(NamedTuple):
    model: RetinaNet
    criterion: RetinaNetCriterion
    postprocessor: RetinaNetPostprocessor


def build_retinanet(*, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256,
                    backbone_weights: str | None = None, frozen_stages: int = 1, anchor_sizes=None,
                    num_convs: int = 4, norm_groups: int = 0, p6p7_from: str = "p5", fg_iou_thresh: float = 0.5,
                    bg_iou_thresh: float = 0.4, box_loss: str = "l1", score_thresh: float = 0.05,
                    topk_candidates: int = 1000, nms_thresh: float = 0.5,
                    detections_per_image: int = 300) -> RetinaNetParts:
    """RetinaNet + ResNet-FPN P3..P7 with torchvision's (v1) defaults. anchor_sizes: one base size per level
    (None: COCO's 32..512). See RetinaNetHead, RetinaNetCriterion and RetinaNetPostprocessor."""
    body = build_resnet_fpn(backbone, out_channels=fpn_channels, weights=backbone_weights,
                            frozen_stages=frozen_stages, levels=(3, 4, 5), extra_blocks="p6p7", p6p7_from=p6p7_from)
    model = RetinaNet(body, num_classes=num_classes, num_convs=num_convs, norm_groups=norm_groups,
                      anchor_sizes=tuple(anchor_sizes) if anchor_sizes else COCO_ANCHOR_SIZES)
    criterion = RetinaNetCriterion(num_classes=num_classes, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
                                   box_loss=box_loss)
    postprocessor = RetinaNetPostprocessor(score_thresh=score_thresh, topk_candidates=topk_candidates,
                                           nms_thresh=nms_thresh, detections_per_image=detections_per_image)
    return RetinaNetParts(model, criterion, postprocessor)


# --------------------------------------------------------------------------------------------------------
# torchvision interop
# --------------------------------------------------------------------------------------------------------


def torchvision_key(key: str) -> str:
    """A key of torchvision's RetinaNet (v1) state dict -> ours:

        backbone.*                                      -> see torchvision_backbone_key
        head.classification_head.conv.<i>.0.<p>        -> head.cls_tower.<2i>.<p>  (our tower: conv, ReLU, conv, ...)
        head.classification_head.cls_logits.<p>         -> head.cls_logits.<p>
        head.regression_head.conv.<i>.0.<p>            -> head.box_tower.<2i>.<p>
        head.regression_head.bbox_reg.<p>               -> head.box_reg.<p>
    """
    if key.startswith("backbone."):
        return torchvision_backbone_key(key)
    parts = key.split(".")
    towers = {"classification_head": "cls_tower", "regression_head": "box_tower"}
    if len(parts) == 6 and parts[0] == "head" and parts[1] in towers and parts[2] == "conv" and parts[4] == "0":
        return f"head.{towers[parts[1]]}.{2 * int(parts[3])}.{parts[5]}"
    if len(parts) == 4 and parts[:3] == ["head", "classification_head", "cls_logits"]:
        return f"head.cls_logits.{parts[3]}"
    if len(parts) == 4 and parts[:3] == ["head", "regression_head", "bbox_reg"]:
        return f"head.box_reg.{parts[3]}"
    raise KeyError(f"detectors/retinanet.py: no mapping for torchvision key {key!r}")


def load_torchvision_state_dict(model: RetinaNet, tv_state_dict: dict[str, Tensor]) -> None:
    """Load the weights of torchvision's `retinanet_resnet50_fpn` (v1 layout: no norm in the head).

    Labels need no shift (no background logit). BatchNorm's num_batches_tracked is dropped when this model
    uses frozen BatchNorm. Raises on any key missing or left over.
    """
    load_renamed_state_dict(model, tv_state_dict, rename=torchvision_key)
