"""Faster R-CNN with a feature pyramid (Ren et al. 2015; Lin et al. 2017, FPN), the detector of Soft Teacher.

The file reads top to bottom:

    outputs      RPNOutput, RoIOutput, TwoStageOutput: what the stages return
    heads        RPNHead (3x3 conv, objectness and deltas per anchor), TwoFCHead + BoxPredictor (the RoI head)
    model        FasterRCNN: features -> rpn -> propose -> roi_head, each callable on its own
    criterion    FasterRCNNCriterion: anchor targets + RPN loss, RoI sampling + RoI loss
    postprocess  FasterRCNNPostprocessor: class-specific boxes, score threshold, per-class NMS
    helpers      padding per image for batched matching, top-n per image after a batch-wide NMS
    builder      build_faster_rcnn(...)
    interop      load_torchvision_state_dict: torchvision's fasterrcnn_resnet50_fpn weights into this model

Conventions. Boxes are [x1, y1, x2, y2] in absolute pixels of the padded batch canvas. The model sees C
foreground classes 0..C-1; the RoI classifier has C + 1 logits with background LAST (index C), and the box
regressor predicts one box per foreground class (no background box). torchvision puts background first and
regresses a background box too; `load_torchvision_state_dict` permutes and drops those rows. P6's stride is
64 on any canvas (torchvision derives it as canvas // map size, which agrees on multiples of 64).

A training step (what `detectors.supervised_losses` runs):

    features = model.features(images)                        # P2..P6
    rpn_out  = model.rpn(features)
    proposals = model.propose(rpn_out, image_sizes)          # no grad
    sampled  = criterion.sample_rois(proposals, targets)     # 512 RoIs per image, gt boxes included
    roi_out  = model.roi_head(features, sampled.boxes, image_sizes)
    losses   = criterion(rpn_out, roi_out, sampled, targets, image_sizes)

The stages are separate methods because the semi-supervised methods call them one by one: Soft Teacher's
teacher scores the student's sampled RoIs (`roi_head` on given boxes) and refines jittered pseudo-boxes
(`decode_roi_boxes`); SED compares RPN outputs anchor for anchor and RoI outputs on a shared RoI set.
Nothing here switches its return type on `self.training`; the only train/test difference is the number of
proposals `propose` keeps by default (torchvision's 2000/2000 for training, 1000/1000 for testing).

Settings follow torchvision's `fasterrcnn_resnet50_fpn` (itself Detectron's FPN recipe): anchors of one size
per level P2..P6 with aspect ratios (0.5, 1, 2); RPN matcher 0.7 / 0.3 with low-quality matches, 256 anchors
per image, half positive; RPN NMS 0.7; RoIAlign 7x7, sampling ratio 2, from P2..P5 by the FPN paper's Eq. 1;
RoI matcher 0.5 / 0.5, 512 RoIs per image, a quarter positive; box coder weights (1, 1, 1, 1) for the RPN and
(10, 10, 5, 5) for the RoI head; smooth L1 with beta 1/9 for both box losses.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, batched_nms

from detectors.anchors import AnchorGenerator
from detectors.backbone import build_resnet_fpn, torchvision_backbone_key
from detectors.box_ops import BoxCoder, box_ioa, box_iou, crowd_boxes, pad_per_image, remove_small_boxes
from detectors.losses import smooth_l1_loss
from detectors.matcher import BalancedPositiveNegativeSampler, Matcher
from detectors.precision import in_float32
from structures import clip_boxes

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # the RPN regresses anchors with unit weights
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # RoI deltas are small (proposals are close): scale them up to ~1
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width of the anchors at every location (A = 3)
COCO_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one anchor size per level P2..P6
FPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P5 from the ResNet stages, P6 = P5 max-pooled with stride 2
ROI_LEVELS = 4  # RoIAlign pools from P2..P5; P6 serves the RPN only (FPN paper Sec. 4.2)


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------


class RPNOutput(NamedTuple):
    """Raw RPN outputs, one entry per FPN level P2..P6. Rows run over (y, x, anchor) of the level's grid."""

    objectness: list[Tensor]  # (B, H_l*W_l*A, 1) objectness logits
    deltas: list[Tensor]  # (B, H_l*W_l*A, 4) (dx, dy, dw, dh) w.r.t. the anchors, RPN_BOX_WEIGHTS
    anchors: list[Tensor]  # (H_l*W_l*A, 4) xyxy, the same for every image of the batch


class RoIOutput(NamedTuple):
    """RoI-head outputs for the RoIs of all images, concatenated in image order (K = sum_i K_i)."""

    class_logits: Tensor  # (K, C + 1) logits, background last (index C)
    box_deltas: Tensor  # (K, C, 4) class-specific (dx, dy, dw, dh) w.r.t. the RoI, ROI_BOX_WEIGHTS


class TwoStageOutput(NamedTuple):
    """Everything the inference path computes: `model(images, image_sizes)`."""

    features: list[Tensor]  # FPN maps P2..P6, each (B, F, H_l, W_l)
    rpn: RPNOutput
    proposals: list[Tensor]  # B x (K_i, 4) xyxy, clipped to each image, no grad
    roi: RoIOutput  # the RoI head on `proposals`


class SampledRoIs(NamedTuple):
    """The RoIs chosen for the RoI-head loss of each image, with their targets (`criterion.sample_rois`).

    `weights` are the per-RoI weights of the classification loss, ones by default; a method re-weights RoIs
    by replacing them (`sampled._replace(weights=...)`) or by passing `cls_weights` to `roi_losses`.
    """

    boxes: list[Tensor]  # B x (S_i, 4) xyxy: sampled proposals and ground-truth boxes
    labels: list[Tensor]  # B x (S_i,) int64 in 0..C, C = background
    matched_gt_boxes: list[Tensor]  # B x (S_i, 4) xyxy, the ground-truth box of each RoI (zeros for background)
    regression_targets: list[Tensor]  # B x (S_i, 4) encoded with ROI_BOX_WEIGHTS; zeros for background
    weights: list[Tensor]  # B x (S_i,) classification-loss weight of each RoI, ones by default


# --------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------


class RPNHead(nn.Module):
    """A 3x3 conv + ReLU shared by all levels, then 1x1 convs for A objectness logits and A x 4 deltas."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level (B, F, H_l, W_l) -> per level objectness (B, H_l*W_l*A, 1), deltas (B, H_l*W_l*A, 4)."""
        objectness, deltas = [], []
        for x in features:
            B, _, H, W = x.shape
            x = F.relu(self.conv(x))
            logits = self.objectness(x)  # (B, A, H, W)
            A = logits.shape[1]
            objectness.append(logits.permute(0, 2, 3, 1).reshape(B, H * W * A, 1))  # -> (B, H, W, A) -> (B, HWA, 1)
            d = self.deltas(x).view(B, A, 4, H, W)  # (B, A*4, H, W) -> (B, A, 4, H, W)
            deltas.append(d.permute(0, 3, 4, 1, 2).reshape(B, H * W * A, 4))  # -> (B, H, W, A, 4) -> (B, HWA, 4)
        return objectness, deltas


class TwoFCHead(nn.Module):
    """Flatten the pooled RoI features and apply two fully connected layers with ReLU (FPN paper Sec. 4.2)."""

    def __init__(self, in_features: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled (K, F, 7, 7) -> (K, representation_size)."""
        x = pooled.flatten(start_dim=1)  # (K, F, 7, 7) -> (K, F*49)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class BoxPredictor(nn.Module):
    """C + 1 class logits (background last) and C class-specific boxes per RoI."""

    def __init__(self, representation_size: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.bbox_pred = nn.Linear(representation_size, num_classes * 4)
        # Small initial outputs: near-uniform class probabilities and near-zero deltas (Detectron's init).
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> RoIOutput:
        """x (K, R) -> RoIOutput(class_logits (K, C + 1), box_deltas (K, C, 4))."""
        deltas = self.bbox_pred(x).view(x.shape[0], self.num_classes, 4)  # (K, C*4) -> (K, C, 4)
        return RoIOutput(class_logits=self.cls_score(x), box_deltas=deltas)


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


class FasterRCNN(nn.Module):
    """Backbone + FPN (P2..P6), RPN, RoIAlign and the two-FC box head. Returns raw outputs, never losses.

    Args:
        backbone: module mapping normalised images (B, 3, H, W) to the FPN maps P2..P6, each (B, F, H_l, W_l),
            with an `out_channels` attribute (F).
        num_classes: C, foreground classes.
        anchor_sizes: one anchor size (pixels) per level P2..P6; torchvision's COCO values by default.
        representation_size: width of the two fully connected RoI layers (1024 in the paper's setting).
        pre_nms_top_n / post_nms_top_n: default proposal counts (train, test): candidates kept per level
            before NMS, proposals kept per image after it.
        rpn_nms_thresh, rpn_min_size, rpn_score_thresh: proposal NMS IoU, smallest side kept (pixels), and
            lowest objectness probability kept.
        roi_canonical_scale: the FPN paper's Eq. 1 maps a 224 x 224 RoI to P4 (k0 = 4); a smaller value
            moves RoIs of a given size to coarser levels (useful when objects are much smaller than COCO's).
        rpn_head, box_head, box_predictor: replace the stock modules.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int, anchor_sizes=COCO_ANCHOR_SIZES,
                 representation_size: int = 1024, pre_nms_top_n=(2000, 1000), post_nms_top_n=(2000, 1000),
                 rpn_nms_thresh: float = 0.7, rpn_min_size: float = 1e-3, rpn_score_thresh: float = 0.0,
                 roi_canonical_scale: int = 224, rpn_head: nn.Module | None = None,
                 box_head: nn.Module | None = None, box_predictor: nn.Module | None = None,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)):
        super().__init__()
        if len(anchor_sizes) != len(FPN_STRIDES):
            raise ValueError(f"detectors/faster_rcnn.py: anchor_sizes needs one size per level P2..P6 "
                             f"({len(FPN_STRIDES)}), got {list(anchor_sizes)}")
        if num_classes < 1:
            raise ValueError(f"detectors/faster_rcnn.py: num_classes must be >= 1, got {num_classes}")
        if tuple(getattr(backbone, "strides", FPN_STRIDES)) != FPN_STRIDES:
            raise ValueError(f"detectors/faster_rcnn.py: the backbone must give P2..P6 (strides {FPN_STRIDES}), "
                             f"got strides {backbone.strides}")
        self.num_classes = num_classes
        self.backbone = backbone
        channels = backbone.out_channels
        self.anchor_generator = AnchorGenerator(sizes=tuple((s,) for s in anchor_sizes),
                                                aspect_ratios=(ASPECT_RATIOS,) * len(anchor_sizes),
                                                strides=FPN_STRIDES)
        self.rpn_head = (rpn_head if rpn_head is not None
                         else RPNHead(channels, self.anchor_generator.num_anchors_per_location))
        # RoIAlign: 7x7 bins, 2x2 samples per bin, the level of each RoI by the FPN paper's Eq. 1.
        self.roi_pool = MultiScaleRoIAlign(featmap_names=[f"p{level}" for level in range(2, 2 + ROI_LEVELS)],
                                           output_size=7, sampling_ratio=2, canonical_scale=roi_canonical_scale)
        self.box_head = box_head if box_head is not None else TwoFCHead(channels * 7 * 7, representation_size)
        self.box_predictor = (box_predictor if box_predictor is not None
                              else BoxPredictor(representation_size, num_classes))
        self.rpn_box_coder = BoxCoder(RPN_BOX_WEIGHTS)
        self.roi_box_coder = BoxCoder(ROI_BOX_WEIGHTS)
        self.pre_nms_top_n = dict(zip(("train", "test"), pre_nms_top_n))
        self.post_nms_top_n = dict(zip(("train", "test"), post_nms_top_n))
        self.rpn_nms_thresh = rpn_nms_thresh
        self.rpn_min_size = rpn_min_size
        self.rpn_score_thresh = rpn_score_thresh
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    # ---- stage 0: features -------------------------------------------------------------------------------

    def features(self, images: Tensor) -> list[Tensor]:
        """images float (B, 3, H, W) in [0, 1], zero-padded, H and W multiples of 32
        -> FPN maps P2..P6, each (B, F, H / s, W / s) for strides s = 4, 8, 16, 32, 64 (P6 rounded up)."""
        return list(self.backbone((images - self.pixel_mean) / self.pixel_std))

    # ---- stage 1: region proposal network ----------------------------------------------------------------

    def rpn(self, features: list[Tensor]) -> RPNOutput:
        """FPN maps P2..P6 -> raw RPN outputs and the anchors of every level (see RPNOutput)."""
        objectness, deltas = self.rpn_head(features)
        anchors = self.anchor_generator([f.shape[-2:] for f in features], dtype=features[0].dtype,
                                        device=features[0].device)
        return RPNOutput(objectness=objectness, deltas=deltas, anchors=anchors)

    @torch.no_grad()
    def propose(self, rpn_out: RPNOutput, image_sizes: Tensor, *, pre_nms_top_n: int | None = None,
                post_nms_top_n: int | None = None) -> list[Tensor]:
        """Turn RPN outputs into proposals: per level top-k, decode, clip, drop tiny, NMS per image and level.

        Args:
            rpn_out: the RPN outputs of B images.
            image_sizes: int64 (B, 2), (h, w) of each image's valid region; proposals are clipped to it.
            pre_nms_top_n: candidates kept per level and image before NMS (default: the model's train or test
                value, by `self.training`).
            post_nms_top_n: proposals kept per image after NMS (default: likewise).
        Returns:
            B tensors (K_i, 4) xyxy, K_i <= post_nms_top_n, by decreasing objectness; no grad.
        """
        mode = "train" if self.training else "test"
        pre_nms_top_n = self.pre_nms_top_n[mode] if pre_nms_top_n is None else pre_nms_top_n
        post_nms_top_n = self.post_nms_top_n[mode] if post_nms_top_n is None else post_nms_top_n
        B = rpn_out.objectness[0].shape[0]

        # Per level, the top-k anchors of every image in one call (FPN paper Sec. 5.1).
        boxes, logits, levels = [], [], []
        for level, (objectness, deltas, anchors) in enumerate(zip(rpn_out.objectness, rpn_out.deltas, rpn_out.anchors)):
            k = min(pre_nms_top_n, objectness.shape[1])
            top_logits, top_index = objectness.squeeze(2).topk(k, dim=1)  # (B, HWA) -> (B, k)
            top_deltas = deltas.gather(1, top_index[..., None].expand(B, k, 4))  # (B, k, 4)
            top_anchors = anchors[top_index]  # (B, k, 4)
            decoded = self.rpn_box_coder.decode(top_deltas.reshape(-1, 4), top_anchors.reshape(-1, 4))
            boxes.append(decoded.view(B, k, 4))  # (B*k, 4) -> (B, k, 4)
            logits.append(top_logits)
            levels.append(torch.full_like(top_index, level))
        boxes = clip_boxes(torch.cat(boxes, dim=1), image_sizes)  # (B, N, 4), N = sum of k, each image its own size
        scores = torch.cat(logits, dim=1).sigmoid()  # (B, N)
        levels = torch.cat(levels, dim=1)  # (B, N)
        image_index = torch.arange(B, device=boxes.device)[:, None].expand_as(levels)  # (B, N)

        keep = remove_small_boxes(boxes, self.rpn_min_size) & (scores >= self.rpn_score_thresh)  # (B, N)
        boxes, scores, levels, image_index = boxes[keep], scores[keep], levels[keep], image_index[keep]  # (M, ...)

        # One NMS call for the whole batch; a group is one (image, level) pair, so groups never suppress
        # each other, exactly as a loop over images with NMS per level would.
        num_levels = len(rpn_out.objectness)
        kept = batched_nms(boxes, scores, image_index * num_levels + levels, self.rpn_nms_thresh)
        kept = first_n_per_image(kept, image_index[kept], n=post_nms_top_n)
        counts = torch.bincount(image_index[kept], minlength=B).tolist()
        return list(boxes[kept].split(counts))

    # ---- stage 2: RoI head -------------------------------------------------------------------------------

    def roi_head(self, features: list[Tensor], boxes: list[Tensor], image_sizes: Tensor) -> RoIOutput:
        """Score and regress ANY given boxes (proposals, sampled RoIs, another model's RoIs, jittered boxes).

        Args:
            features: FPN maps P2..P6, each (B, F, H_l, W_l); P6 is not pooled from.
            boxes: B tensors (K_i, 4) xyxy in the batch canvas; K_i may be 0.
            image_sizes: int64 (B, 2); only its length is used (the boxes are pooled as given, not clipped).
        Returns:
            RoIOutput(class_logits (K, C + 1), box_deltas (K, C, 4)), K = sum_i K_i, rows in image order.
        """
        B, _, H, W = features[0].shape
        if len(boxes) != B or len(image_sizes) != B:
            raise ValueError(f"detectors/faster_rcnn.py: roi_head got {len(boxes)} box lists and "
                             f"{len(image_sizes)} image sizes for a batch of {B}")
        named = {f"p{level}": f for level, f in zip(range(2, 2 + ROI_LEVELS), features)}
        # MultiScaleRoIAlign infers each level's scale from the map size over the given image size, once:
        # giving the padded canvas size (B x 4 stride of P2) makes the scales exactly 1 / stride.
        canvas = [(H * FPN_STRIDES[0], W * FPN_STRIDES[0])] * B
        pooled = self.roi_pool(named, [b.to(features[0].dtype) for b in boxes], canvas)  # (K, F, 7, 7)
        return self.box_predictor(self.box_head(pooled))

    def decode_roi_boxes(self, roi_out: RoIOutput, boxes: list[Tensor]) -> Tensor:
        """Class-specific refined boxes of the RoIs `boxes` (B x (K_i, 4)): (K, C, 4) xyxy, not clipped.

        Soft Teacher's box jittering measures the spread of these refinements (Sec. 3.3, Eq. 8)."""
        return decode_class_boxes(roi_out.box_deltas, torch.cat(boxes), box_coder=self.roi_box_coder)

    # ---- the inference path ------------------------------------------------------------------------------

    def forward(self, images: Tensor, image_sizes: Tensor) -> TwoStageOutput:
        """images float (B, 3, H, W) in [0, 1] padded; image_sizes int64 (B, 2) -> TwoStageOutput.

        The RoI head runs on the proposals. Training calls the stages one by one instead, with the RoI head on
        `criterion.sample_rois(proposals, targets).boxes` (`detectors.supervised_losses`)."""
        features = self.features(images)
        rpn_out = self.rpn(features)
        proposals = self.propose(rpn_out, image_sizes)
        return TwoStageOutput(features=features, rpn=rpn_out, proposals=proposals,
                              roi=self.roi_head(features, proposals, image_sizes))


@in_float32
def roi_class_probs(roi_out: RoIOutput) -> Tensor:
    """Per-RoI class distribution: softmax over (K, C + 1) logits, background last (float32)."""
    return roi_out.class_logits.softmax(dim=-1)


def decode_class_boxes(box_deltas: Tensor, rois: Tensor, *, box_coder: BoxCoder) -> Tensor:
    """box_deltas (K, C, 4) relative to rois (K, 4) xyxy -> one box per class (K, C, 4) xyxy."""
    K, C, _ = box_deltas.shape
    rois = rois.to(box_deltas.dtype)[:, None, :].expand(K, C, 4)  # (K, 4) -> (K, C, 4)
    return box_coder.decode(box_deltas.reshape(K * C, 4), rois.reshape(K * C, 4)).view(K, C, 4)


# --------------------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------------------


class FasterRCNNCriterion:
    """Targets and losses of both stages. Every loss is unweighted; keys loss_rpn_cls, loss_rpn_box, loss_cls,
    loss_box.

    Normalisation follows torchvision and Detectron: each loss is divided by the number of SAMPLED anchors
    (RPN) or RoIs (RoI head), positives and negatives together, not by the number of positives.

    Crowd regions (targets[i]["crowd"]): an anchor or RoI that is not positive and lies mostly inside a crowd
    box (intersection over its own area >= crowd_ioa_thresh) is ignored rather than called background, since
    it may well cover one of the crowd's unannotated objects.
    """

    def __init__(self, *, num_classes: int, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 roi_fg_iou_thresh: float = 0.5, roi_bg_iou_thresh: float = 0.5,
                 roi_batch_size_per_image: int = 512, roi_positive_fraction: float = 0.25,
                 crowd_ioa_thresh: float = 0.5, smooth_l1_beta: float = 1 / 9):
        self.num_classes = num_classes
        # RPN: an anchor's best gt must reach 0.7 IoU, but every gt keeps its best anchors (low quality).
        self.rpn_matcher = Matcher(rpn_fg_iou_thresh, rpn_bg_iou_thresh, allow_low_quality_matches=True)
        self.rpn_sampler = BalancedPositiveNegativeSampler(rpn_batch_size_per_image, rpn_positive_fraction)
        self.roi_matcher = Matcher(roi_fg_iou_thresh, roi_bg_iou_thresh, allow_low_quality_matches=False)
        self.roi_sampler = BalancedPositiveNegativeSampler(roi_batch_size_per_image, roi_positive_fraction)
        self.rpn_box_coder = BoxCoder(RPN_BOX_WEIGHTS)
        self.roi_box_coder = BoxCoder(ROI_BOX_WEIGHTS)
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.beta = smooth_l1_beta

    # ---- RPN ---------------------------------------------------------------------------------------------

    def rpn_losses(self, rpn_out: RPNOutput, targets: list[dict]) -> dict[str, Tensor]:
        """Objectness BCE and box smooth L1 over 256 sampled anchors per image.

        Args:
            rpn_out: raw RPN outputs of B images.
            targets: B dicts with "boxes" float (N_i, 4) xyxy (labels are not needed: the RPN is class-agnostic;
                Soft Teacher passes its pseudo-boxes here) and optionally "crowd" (M_i, 4).
        Returns:
            {"loss_rpn_cls": scalar, "loss_rpn_box": scalar}, both divided by the number of sampled anchors.
        """
        anchors = torch.cat(rpn_out.anchors)  # (N, 4), N = sum over levels of H_l*W_l*A
        logits = torch.cat(rpn_out.objectness, dim=1).squeeze(2)  # (B, N)
        deltas = torch.cat(rpn_out.deltas, dim=1)  # (B, N, 4)
        labels, matched_gt = self.rpn_targets(anchors, targets)  # (B, N) in {-1, 0, 1}; (B, N, 4)
        positive, negative = self.rpn_sampler(labels)  # (B, N) bool each
        sampled = positive | negative
        num_sampled = max(1, int(sampled.sum()))

        loss_cls = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled].to(logits.dtype),
                                                      reduction="sum") / num_sampled
        box_targets = self.rpn_box_coder.encode(matched_gt[positive], anchors.expand_as(deltas)[positive])
        loss_box = smooth_l1_loss(deltas[positive], box_targets, beta=self.beta, reduction="sum") / num_sampled
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}

    @torch.no_grad()
    def rpn_targets(self, anchors: Tensor, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """anchors (N, 4) -> labels int64 (B, N): 1 object, 0 background, -1 ignored; matched gt (B, N, 4).

        One call for the batch: the gt boxes are padded to (B, G, 4) and the padding rows never match."""
        gt, gt_valid = pad_per_image([t["boxes"].to(anchors.dtype) for t in targets], fill=0.0,
                                     min_rows=1)  # (B, G, 4), (B, G)
        index = self.rpn_matcher(box_iou(gt, anchors), gt_valid)  # (B, G, N) -> (B, N) gt index or sentinel
        labels = torch.where(index >= 0, 1, torch.where(index == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
        # Background anchors inside a crowd region are ignored; positives stay positive.
        labels = torch.where(self.crowd_covered(anchors, targets) & (labels == 0), -1, labels)
        return labels, gather_rows(gt, index.clamp(min=0))  # (B, N), (B, G, 4) -> (B, N, 4)

    def crowd_covered(self, boxes: Tensor, targets: list[dict]) -> Tensor:
        """boxes (N, 4) or (B, N, 4) -> bool (B, N): the box lies mostly inside one of its image's crowd
        regions (intersection over the box's own area >= crowd_ioa_thresh)."""
        crowd, _ = pad_per_image([crowd_boxes(t, dtype=boxes.dtype, device=boxes.device) for t in targets],
                                 fill=0.0, min_rows=1)  # (B, M, 4)
        # Padding rows are all-zero boxes: they intersect nothing, so their IoA is 0.
        return box_ioa(boxes, crowd).amax(dim=-1) >= self.crowd_ioa_thresh  # (B, N, M) -> (B, N)

    # ---- RoI head ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_rois(self, proposals: list[Tensor], targets: list[dict]) -> SampledRoIs:
        """Match proposals (plus the gt boxes themselves) to the gt and sample 512 RoIs per image, 25% positive.

        Args:
            proposals: B tensors (K_i, 4) xyxy, e.g. `model.propose(...)`.
            targets: B dicts with "boxes" float (N_i, 4), "labels" int64 (N_i,) in 0..C-1, optionally "crowd".
        Returns:
            SampledRoIs; at most roi_batch_size_per_image RoIs per image (fewer when the image has fewer
            candidates that are not ignored), in candidate order (proposals, then gt boxes).
        """
        C = self.num_classes
        dtype = proposals[0].dtype
        gt, gt_valid = pad_per_image([t["boxes"].to(dtype) for t in targets], fill=0.0, min_rows=1)  # (B, G, 4), (B, G)
        gt_labels, _ = pad_per_image([t["labels"] for t in targets], fill=C, min_rows=1)  # (B, G)
        # The gt boxes join the candidates, so every image has positives from the first iteration on.
        rois, roi_valid = pad_per_image([torch.cat([p, t["boxes"].to(dtype)]) for p, t in zip(proposals, targets)],
                                        fill=0.0, min_rows=1)
        B, R, _ = rois.shape  # (B, R, 4): R = max_i (K_i + N_i), padded

        index = self.roi_matcher(box_iou(gt, rois), gt_valid)  # (B, G, R) -> (B, R)
        labels = torch.where(index >= 0, gt_labels.gather(1, index.clamp(min=0)),
                             torch.where(index == Matcher.BELOW_LOW_THRESHOLD, C, -1))  # (B, R) in -1..C
        labels = torch.where(self.crowd_covered(rois, targets) & (labels == C), -1, labels)
        labels = labels.masked_fill(~roi_valid, -1)  # padding is never sampled
        # The sampler counts 0 as background and >= 1 as object.
        is_object = (labels >= 0) & (labels < C)
        positive, negative = self.roi_sampler(torch.where(is_object, 1, torch.where(labels == C, 0, -1)))

        # Gather the sampled rows of every image at once; nonzero() lists them image by image.
        image, row = torch.nonzero(positive | negative, as_tuple=True)  # (S,) each, S = sum_i S_i
        counts = (positive | negative).sum(dim=1).tolist()
        labels, rois = labels[image, row], rois[image, row]  # (S,), (S, 4)
        matched = torch.where((labels < C)[:, None], gather_rows(gt, index.clamp(min=0))[image, row], 0.0)
        return SampledRoIs(boxes=list(rois.split(counts)), labels=list(labels.split(counts)),
                           matched_gt_boxes=list(matched.split(counts)),
                           regression_targets=list(self.encode_foreground(matched, rois, labels).split(counts)),
                           weights=list(torch.ones_like(labels, dtype=dtype).split(counts)))

    def encode_foreground(self, matched: Tensor, rois: Tensor, labels: Tensor) -> Tensor:
        """Regression targets (S, 4) of foreground RoIs; zeros for background ones (no gt box to encode)."""
        foreground = labels < self.num_classes
        targets = torch.zeros_like(rois)
        targets[foreground] = self.roi_box_coder.encode(matched[foreground], rois[foreground])
        return targets

    def roi_losses(self, roi_out: RoIOutput, sampled: SampledRoIs, *, cls_weights: Tensor | None = None
                   ) -> dict[str, Tensor]:
        """Cross-entropy over C + 1 classes and smooth L1 on the gt class's box of each positive RoI.

        Args:
            roi_out: the RoI head on `sampled.boxes` (K = sum_i S_i rows, in the same order).
            sampled: from `sample_rois`.
            cls_weights: float (K,) per-RoI classification weights; default: `sampled.weights`.
        Returns:
            {"loss_cls": sum_k w_k CE_k / max(sum_k w_k, 1),
             "loss_box": sum over positives of smooth L1 (beta 1/9) / max(K, 1)}.
            With unit weights loss_cls is the mean CE, as in torchvision. Soft Teacher's Eq. 4-5 set the
            weight of a background RoI to the teacher's background probability.
        """
        labels = torch.cat(sampled.labels)  # (K,)
        weights = torch.cat(sampled.weights) if cls_weights is None else cls_weights  # (K,)
        if roi_out.class_logits.shape[0] != labels.shape[0] or weights.shape != labels.shape:
            raise ValueError(f"detectors/faster_rcnn.py: roi_losses got {roi_out.class_logits.shape[0]} RoI "
                             f"outputs, {labels.shape[0]} labels and {tuple(weights.shape)} weights")
        ce = F.cross_entropy(roi_out.class_logits, labels, reduction="none")  # (K,)
        weights = weights.to(ce.dtype)
        loss_cls = (weights * ce).sum() / weights.sum().clamp(min=1.0)

        positive = torch.nonzero(labels < self.num_classes).squeeze(1)  # (P,)
        pred = roi_out.box_deltas[positive, labels[positive]]  # (K, C, 4) -> (P, 4), the gt class's box
        targets = torch.cat(sampled.regression_targets)[positive].to(pred.dtype)  # (P, 4)
        loss_box = smooth_l1_loss(pred, targets, beta=self.beta, reduction="sum") / max(1, labels.shape[0])
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def __call__(self, rpn_out: RPNOutput, roi_out: RoIOutput, sampled: SampledRoIs, targets: list[dict],
                 image_sizes: Tensor) -> dict[str, Tensor]:
        """Both stages' losses: rpn_losses(rpn_out, targets) | roi_losses(roi_out, sampled).

        image_sizes (B, 2) is accepted for the detectors' common criterion signature; as in torchvision,
        every anchor of the padded canvas takes part in the RPN loss."""
        if len(targets) != len(image_sizes):
            raise ValueError(f"detectors/faster_rcnn.py: {len(targets)} targets for {len(image_sizes)} images")
        return self.rpn_losses(rpn_out, targets) | self.roi_losses(roi_out, sampled)


# --------------------------------------------------------------------------------------------------------
# Postprocessor
# --------------------------------------------------------------------------------------------------------


class FasterRCNNPostprocessor:
    """RoI outputs -> detections: each RoI yields one box per class, scored by that class's probability;
    keep scores > 0.05, drop boxes thinner than 0.01 px, NMS 0.5 within each class, 100 per image."""

    def __init__(self, *, score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
                 min_size: float = 1e-2):
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.min_size = min_size
        self.box_coder = BoxCoder(ROI_BOX_WEIGHTS)

    @in_float32  # scores are compared with thresholds: float32 under mixed precision too
    def __call__(self, roi_out: RoIOutput, proposals: list[Tensor], image_sizes: Tensor) -> list[dict]:
        """roi_out on `proposals` (B x (K_i, 4)), image_sizes int64 (B, 2) -> B dicts
        {"boxes" (D_i, 4) xyxy clipped to the image, "scores" (D_i,), "labels" int64 (D_i,) in 0..C-1},
        by decreasing score."""
        K, C, _ = roi_out.box_deltas.shape
        B = len(proposals)
        device = roi_out.class_logits.device
        boxes = decode_class_boxes(roi_out.box_deltas, torch.cat(proposals), box_coder=self.box_coder)  # (K, C, 4)
        image_index = torch.repeat_interleave(torch.arange(B, device=device),
                                              torch.tensor([p.shape[0] for p in proposals], device=device))  # (K,)
        boxes = clip_boxes(boxes, image_sizes[image_index])  # (K, C, 4), each RoI to its image's (h, w)
        scores = roi_out.class_logits.softmax(dim=-1)[:, :C]  # (K, C + 1) -> (K, C), background dropped
        labels = torch.arange(C, device=device).expand(K, C)  # (K, C)
        image_index = image_index[:, None].expand(K, C)  # (K, C)

        keep = (scores > self.score_thresh) & remove_small_boxes(boxes, self.min_size)  # (K, C)
        boxes, scores, labels, image_index = boxes[keep], scores[keep], labels[keep], image_index[keep]  # (M, ...)
        # One NMS call: a group is one (image, class) pair.
        kept = batched_nms(boxes, scores, image_index * C + labels, self.nms_thresh)
        kept = first_n_per_image(kept, image_index[kept], n=self.detections_per_image)
        counts = torch.bincount(image_index[kept], minlength=B).tolist()
        return [{"boxes": b, "scores": s, "labels": l}
                for b, s, l in zip(boxes[kept].split(counts), scores[kept].split(counts), labels[kept].split(counts))]


# --------------------------------------------------------------------------------------------------------
# Batch helpers
# --------------------------------------------------------------------------------------------------------


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """table (B, G, D), index int64 (B, N) in [0, G) -> (B, N, D): row index[b, n] of image b."""
    return table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))


def first_n_per_image(kept: Tensor, image_index: Tensor, *, n: int) -> Tensor:
    """kept int64 (M,) sorted by decreasing score (NMS output), image_index (M,) of each -> the first n of
    every image, grouped by image in image order and still by decreasing score inside each image."""
    order = torch.sort(image_index, stable=True).indices  # group by image, keep the score order within
    kept, image_index = kept[order], image_index[order]
    counts = torch.bincount(image_index)  # images with no entries count 0
    start = torch.cumsum(counts, 0) - counts  # first position of each image
    rank = torch.arange(kept.shape[0], device=kept.device) - start[image_index]  # rank within the image
    return kept[rank < n]


# --------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------


class FasterRCNNParts(NamedTuple):
    """What `build_faster_rcnn` returns; `detectors.build_detector` wraps it into a `Detector`."""

    model: FasterRCNN
    criterion: FasterRCNNCriterion
    postprocessor: FasterRCNNPostprocessor


def build_faster_rcnn(*, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256,
                      backbone_weights: str | None = None, frozen_stages: int = 1, anchor_sizes=None,
                      representation_size: int = 1024, rpn_pre_nms_train: int = 2000, rpn_pre_nms_test: int = 1000,
                      rpn_post_nms_train: int = 2000, rpn_post_nms_test: int = 1000, roi_batch_size: int = 512,
                      roi_canonical_scale: int = 224, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                      detections_per_image: int = 100) -> FasterRCNNParts:
    """Faster R-CNN + FPN with torchvision's defaults; the arguments are the settings a preset changes.

    anchor_sizes: one size per level P2..P6 (None: COCO's 32..512). Without `backbone_weights` the network
    trains from scratch with trainable BatchNorm; with them, BatchNorm is frozen and so are the stem and
    `frozen_stages` stages.
    """
    body = build_resnet_fpn(backbone, out_channels=fpn_channels, weights=backbone_weights or None,
                            frozen_stages=frozen_stages, levels=(2, 3, 4, 5), extra_blocks="maxpool")
    model = FasterRCNN(body, num_classes=num_classes,
                       anchor_sizes=tuple(anchor_sizes) if anchor_sizes else COCO_ANCHOR_SIZES,
                       representation_size=representation_size,
                       pre_nms_top_n=(rpn_pre_nms_train, rpn_pre_nms_test),
                       post_nms_top_n=(rpn_post_nms_train, rpn_post_nms_test),
                       roi_canonical_scale=roi_canonical_scale)
    criterion = FasterRCNNCriterion(num_classes=num_classes, roi_batch_size_per_image=roi_batch_size)
    postprocessor = FasterRCNNPostprocessor(score_thresh=score_thresh, nms_thresh=nms_thresh,
                                            detections_per_image=detections_per_image)
    return FasterRCNNParts(model, criterion, postprocessor)


# --------------------------------------------------------------------------------------------------------
# torchvision interop
# --------------------------------------------------------------------------------------------------------


# torchvision name -> ours, for the RPN head and the two FC layers (same shapes).
TORCHVISION_HEAD_KEYS = {
    **{f"rpn.head.conv.0.0.{p}": f"rpn_head.conv.{p}" for p in ("weight", "bias")},
    **{f"rpn.head.cls_logits.{p}": f"rpn_head.objectness.{p}" for p in ("weight", "bias")},
    **{f"rpn.head.bbox_pred.{p}": f"rpn_head.deltas.{p}" for p in ("weight", "bias")},
    **{f"roi_heads.box_head.{fc}.{p}": f"box_head.{fc}.{p}" for fc in ("fc6", "fc7") for p in ("weight", "bias")},
}


def load_torchvision_state_dict(model: FasterRCNN, tv_state_dict: dict[str, Tensor]) -> None:
    """Load the weights of torchvision's `fasterrcnn_resnet50_fpn` (any num_classes = C + 1, background 0).

    Every key is mapped explicitly; the classifier rows are permuted (background moves from first to last)
    and the background's box-regression rows are dropped. Raises on any key left over or missing.
    """
    C = model.num_classes
    renamed = {}
    for key, value in tv_state_dict.items():
        if key.startswith("backbone."):
            renamed[torchvision_backbone_key(key)] = value
        elif key in TORCHVISION_HEAD_KEYS:
            renamed[TORCHVISION_HEAD_KEYS[key]] = value
        elif key.startswith("roi_heads.box_predictor.cls_score."):  # (C + 1, ...): background row 0 -> C
            if value.shape[0] != C + 1:
                raise ValueError(f"detectors/faster_rcnn.py: torchvision classifier has {value.shape[0]} classes, "
                                 f"the model {C} + background")
            renamed[key.replace("roi_heads.", "")] = torch.cat([value[1:], value[:1]])
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):  # ((C + 1) * 4, ...): drop the background box
            renamed[key.replace("roi_heads.", "")] = value[4:]
        else:
            raise KeyError(f"detectors/faster_rcnn.py: no mapping for torchvision key {key!r}")
    model.load_state_dict(renamed, strict=True)

