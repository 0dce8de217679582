"""What the two dense (one-stage) detectors, FCOS and RetinaNet, share: their output format, the head-to-rows
reshape, and their postprocessing: per-level candidate selection and decoding, then NMS per image.

Rows. A dense head predicts K numbers for each of A anchors at each location of each level. The model returns
them per level as (B, H_l*W_l*A, K), rows ordered (y, x, anchor) like the anchors of `AnchorGenerator`, so that
row i of every tensor of a level belongs to anchor i of that level.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detectors.losses import positive_normalizer, sigmoid_focal_loss
from detectors.precision import in_float32
from structures import clip_boxes


@dataclass
class DenseOutput:
    """Raw outputs of a dense detector for a batch of B images (lists run over pyramid levels, finest first).

    cls_logits   list of (B, H_l*W_l*A, C)    class logits (sigmoid per class, no background logit)
    box_reg      list of (B, H_l*W_l*A, 4)    RetinaNet: deltas (dx, dy, dw, dh) of BoxCoder(1, 1, 1, 1);
                                              FCOS: distances (l, t, r, b) / stride, >= 0
    quality      list of (B, H_l*W_l*A, 1) or None   FCOS centerness / IoU logits; None for RetinaNet
    anchors      list of (H_l*W_l*A, 4)       xyxy pixels on the padded canvas, the same for every image
    strides      list[int]                    stride of each level in pixels
    shapes       list[(H_l, W_l)]             feature-map size of each level
    num_anchors_per_location   int            A (1 for FCOS, 9 for RetinaNet)
    """

    cls_logits: list[Tensor]
    box_reg: list[Tensor]
    quality: list[Tensor] | None
    anchors: list[Tensor]
    strides: list[int]
    shapes: list[tuple[int, int]]
    num_anchors_per_location: int


def conv_tower(channels: int, num_convs: int, norm_groups: int) -> nn.Sequential:
    """num_convs x [3x3 conv, GroupNorm(norm_groups), ReLU] (norm_groups = 0: no normalisation)."""
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, kernel_size=3, padding=1))
        if norm_groups:
            layers.append(nn.GroupNorm(norm_groups, channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def to_rows(x: Tensor, K: int) -> Tensor:
    """A head's map (B, A*K, H, W) -> (B, A, K, H, W) -> (B, H, W, A, K) -> rows (B, H*W*A, K)."""
    B, _, H, W = x.shape
    return x.view(B, -1, K, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, K)


def focal_classification_loss(cls_logits: Tensor, matched: Tensor, labels: Tensor, *, num_classes: int,
                              ignored: int, alpha: float, gamma: float) -> tuple[Tensor, Tensor, float]:
    """The dense detectors' classification term: the sigmoid focal loss of every (row, class), one-hot targets on
    the positive rows (background rows stay zero), summed over every row but the ignored ones.

    cls_logits: (B, N, C); matched: int64 (B, N), the matched gt index or a negative sentinel (`ignored`: no loss
    at all); labels: int64 (B, N), the class of each positive row. Returns (loss_cls () the unnormalised sum,
    positive bool (B, N), num_pos: max(1, positives), over the global batch under DDP).
    """
    positive = matched >= 0  # (B, N)
    num_pos = positive_normalizer(positive)
    cls_targets = F.one_hot(labels.clamp(min=0), num_classes).to(cls_logits.dtype)  # (B, N, C)
    cls_targets = cls_targets * positive[..., None]
    counted = matched != ignored  # (B, N)
    loss_cls = sigmoid_focal_loss(cls_logits[counted], cls_targets[counted], alpha=alpha, gamma=gamma,
                                  reduction="sum")
    return loss_cls, positive, num_pos


def top_candidates(scores: Tensor, *, score_thresh: float, topk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The `topk` highest (anchor, class) scores of each image above `score_thresh`, for one level.

    Args:
        scores: (B, N_l, C) detection scores in [0, 1].
    Returns:
        top_scores (B, k), anchor_index int64 (B, k), label int64 (B, k), keep bool (B, k) with
        k = min(topk, N_l * C); `keep` is False for the slots that did not pass the threshold.
    """
    B, N, C = scores.shape
    flat = scores.reshape(B, N * C)  # (B, N_l, C) -> (B, N_l*C), index = anchor * C + class
    flat = flat.masked_fill(flat <= score_thresh, -1.0)  # below threshold: never ahead of a kept score
    top_scores, index = flat.topk(min(topk, N * C), dim=1)  # (B, k) each
    return top_scores, index // C, index % C, top_scores > score_thresh


def nms_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, keep: Tensor, *, image_sizes: Tensor,
                  nms_thresh: float, detections_per_image: int) -> list[dict[str, Tensor]]:
    """Clip the candidates to their image, run class-wise NMS per image, keep the best `detections_per_image`.

    Args:
        boxes: (B, K, 4) xyxy candidates of all levels; scores (B, K); labels int64 (B, K); keep bool (B, K).
        image_sizes: int (B, 2) (h, w) of the valid region of each image.
    Returns:
        B dicts {"boxes" (D_i, 4), "scores" (D_i,), "labels" int64 (D_i,)}, by decreasing score.
    """
    boxes = clip_boxes(boxes, image_sizes)  # (B, K, 4)
    detections = []
    for b in range(boxes.shape[0]):  # images keep different numbers of boxes: NMS runs per image
        k_boxes, k_scores, k_labels = boxes[b][keep[b]], scores[b][keep[b]], labels[b][keep[b]]
        chosen = batched_nms(k_boxes, k_scores, k_labels, nms_thresh)[:detections_per_image]
        detections.append({"boxes": k_boxes[chosen], "scores": k_scores[chosen], "labels": k_labels[chosen]})
    return detections


class DensePostprocessor:
    """Raw outputs -> detections, as FCOS and RetinaNet both do it: per level and image the `topk_candidates`
    best (anchor, class) scores above `score_thresh` are decoded against their anchors by `box_coder`; the
    candidates of all levels are clipped to the image, class-wise NMS at `nms_thresh` runs per image, and the
    best `detections_per_image` are kept. A detector says how a level's scores come from its outputs
    (`level_scores`: sigmoid of the class logits here; FCOS folds its quality branch in).
    """

    def __init__(self, *, box_coder, score_thresh: float, topk_candidates: int, nms_thresh: float,
                 detections_per_image: int):
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image

    def level_scores(self, outputs: DenseOutput) -> list[Tensor]:
        """Per level (B, N_l, C) detection scores in [0, 1]."""
        return [torch.sigmoid(cls_logits) for cls_logits in outputs.cls_logits]

    @torch.no_grad()
    @in_float32  # scores are compared with thresholds: float32 under mixed precision too
    def __call__(self, outputs: DenseOutput, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs of B images, image_sizes int (B, 2) (h, w) -> B dicts {"boxes" (D, 4) xyxy in the batch's
        frame, "scores" (D,), "labels" int64 (D,)}, D <= detections_per_image, by decreasing score."""
        boxes, scores, labels, keep = [], [], [], []
        for level_scores, box_reg, anchors in zip(self.level_scores(outputs), outputs.box_reg, outputs.anchors):
            top_scores, anchor_index, top_labels, top_keep = top_candidates(
                level_scores, score_thresh=self.score_thresh, topk=self.topk_candidates)  # (B, k) each
            top_reg = torch.gather(box_reg, 1, anchor_index[..., None].expand(-1, -1, 4))  # (B, k, 4)
            boxes.append(self.box_coder.decode(top_reg, anchors[anchor_index]))  # (B, k, 4)
            scores.append(top_scores)
            labels.append(top_labels)
            keep.append(top_keep)
        return nms_per_image(torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1), torch.cat(keep, 1),
                             image_sizes=image_sizes, nms_thresh=self.nms_thresh,
                             detections_per_image=self.detections_per_image)
