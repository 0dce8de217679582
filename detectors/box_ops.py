"""Box arithmetic shared by the detectors: box coders, overlaps, the GIoU loss, clipping.

Every box is [x1, y1, x2, y2] in absolute pixels. Functions broadcast over leading dimensions: a box tensor
is (..., 4), so one call handles a single image (N, 4) or a whole batch (B, N, 4).

    BoxCoder        anchor-relative deltas (dx, dy, dw, dh) with weights (Faster R-CNN, RetinaNet)
    LinearBoxCoder  distances (l, t, r, b) from an anchor centre to the box sides (FCOS)
    box_area, box_iou, box_ioa, generalized_box_iou      pairwise overlaps
    elementwise_box_iou, giou_loss                        aligned pairs (prediction i vs target i)
    remove_small_boxes                                    (clip_boxes: structures.py)
    pad_per_image, crowd_boxes                            per-image boxes / labels -> one padded batch
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from detectors.losses import reduce_loss

# dw, dh above log(1000 / 16) would grow a box more than 62x: clamp before exp() so that a wild early
# prediction cannot overflow (Detectron's value, kept by torchvision).
DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode boxes relative to anchors as (dx, dy, dw, dh) (R-CNN paper, Appendix C):

        dx = wx * (x_box - x_anchor) / w_anchor      dw = ww * log(w_box / w_anchor)
        dy = wy * (y_box - y_anchor) / h_anchor      dh = wh * log(h_box / h_anchor)

    with (x, y) box centres. The weights scale the deltas to about unit variance: (1, 1, 1, 1) for RPN and
    RetinaNet anchors, (10, 10, 5, 5) for RoIs that already sit close to their object.
    """

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = DEFAULT_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """boxes (..., 4) xyxy targets, anchors (..., 4) xyxy (broadcastable) -> deltas (..., 4) (dx, dy, dw, dh).

        Anchors must have positive width and height; the dtype of `boxes` is kept.
        """
        anchors = anchors.to(boxes.dtype)
        wx, wy, ww, wh = self.weights
        anchor_w = anchors[..., 2] - anchors[..., 0]
        anchor_h = anchors[..., 3] - anchors[..., 1]
        anchor_x = anchors[..., 0] + 0.5 * anchor_w
        anchor_y = anchors[..., 1] + 0.5 * anchor_h
        box_w = boxes[..., 2] - boxes[..., 0]
        box_h = boxes[..., 3] - boxes[..., 1]
        box_x = boxes[..., 0] + 0.5 * box_w
        box_y = boxes[..., 1] + 0.5 * box_h
        return torch.stack((wx * (box_x - anchor_x) / anchor_w,
                            wy * (box_y - anchor_y) / anchor_h,
                            ww * torch.log(box_w / anchor_w),
                            wh * torch.log(box_h / anchor_h)), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas (..., 4) (dx, dy, dw, dh), anchors (..., 4) xyxy (broadcastable) -> boxes (..., 4) xyxy.

        The output has the dtype of `deltas`; dw and dh are clamped at `bbox_xform_clip` before exp().
        """
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        anchor_w = anchors[..., 2] - anchors[..., 0]
        anchor_h = anchors[..., 3] - anchors[..., 1]
        anchor_x = anchors[..., 0] + 0.5 * anchor_w
        anchor_y = anchors[..., 1] + 0.5 * anchor_h
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        x = dx * anchor_w + anchor_x
        y = dy * anchor_h + anchor_y
        half_w = 0.5 * (torch.exp(dw) * anchor_w)
        half_h = 0.5 * (torch.exp(dh) * anchor_h)
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=-1)


class LinearBoxCoder:
    """Encode a box as the distances (l, t, r, b) from an anchor's centre to its four sides (FCOS paper, Eq. 1).

    With `normalize_by_size` the distances are divided by the anchor's width / height; FCOS's anchors are
    squares of side = stride, so this is the paper's per-level normalisation by the stride.
    """

    def __init__(self, normalize_by_size: bool = True):
        self.normalize_by_size = normalize_by_size

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """boxes (..., 4) xyxy, anchors (..., 4) xyxy (broadcastable) -> distances (..., 4) (l, t, r, b).

        A distance is negative when the anchor centre lies outside the box on that side.
        """
        anchors = anchors.to(boxes.dtype)
        centre_x = 0.5 * (anchors[..., 0] + anchors[..., 2])
        centre_y = 0.5 * (anchors[..., 1] + anchors[..., 3])
        codes = torch.stack((centre_x - boxes[..., 0], centre_y - boxes[..., 1],
                             boxes[..., 2] - centre_x, boxes[..., 3] - centre_y), dim=-1)
        if self.normalize_by_size:
            codes = codes / self._sizes(anchors)
        return codes

    def decode(self, codes: Tensor, anchors: Tensor) -> Tensor:
        """codes (..., 4) (l, t, r, b), anchors (..., 4) xyxy (broadcastable) -> boxes (..., 4) xyxy, codes' dtype."""
        anchors = anchors.to(codes.dtype)
        if self.normalize_by_size:
            codes = codes * self._sizes(anchors)
        centre_x = 0.5 * (anchors[..., 0] + anchors[..., 2])
        centre_y = 0.5 * (anchors[..., 1] + anchors[..., 3])
        return torch.stack((centre_x - codes[..., 0], centre_y - codes[..., 1],
                            centre_x + codes[..., 2], centre_y + codes[..., 3]), dim=-1)

    @staticmethod
    def _sizes(anchors: Tensor) -> Tensor:
        """anchors (..., 4) -> (..., 4) = (w, h, w, h)."""
        w = anchors[..., 2] - anchors[..., 0]
        h = anchors[..., 3] - anchors[..., 1]
        return torch.stack((w, h, w, h), dim=-1)


# --------------------------------------------------------------------------------------------------------
# Overlaps
# --------------------------------------------------------------------------------------------------------


def box_area(boxes: Tensor) -> Tensor:
    """boxes (..., 4) xyxy -> areas (...); a box with x2 < x1 or y2 < y1 has area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """boxes1 (..., N, 4), boxes2 (..., M, 4) -> intersection areas (..., N, M)."""
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # (..., N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU. boxes1 (..., N, 4), boxes2 (..., M, 4) xyxy -> (..., N, M).

    Leading dimensions broadcast, so (B, G, 4) x (N, 4) gives every image's gt-vs-anchor matrix (B, G, N).
    Two zero-area boxes have IoU 0 (not NaN).
    """
    inter = _pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of the first box: the share of each box inside each region.

    boxes (..., N, 4), regions (..., M, 4) xyxy -> (..., N, M) in [0, 1]. Used for crowd (ignore) regions.
    A zero-area box gets 0.
    """
    inter = _pairwise_intersection(boxes, regions)
    area = box_area(boxes)[..., :, None]
    return torch.where(area > 0, inter / area.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019, Alg. 1).

    boxes1 (..., N, 4), boxes2 (..., M, 4) xyxy -> (..., N, M) in [-1, 1].
    """
    inter = _pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    top_left = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    hull = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # (..., N, M) smallest enclosing box
    tiny = torch.finfo(inter.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), 0.0)
    return iou - torch.where(hull > 0, (hull - union) / hull.clamp(min=tiny), 0.0)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of aligned pairs. boxes1, boxes2 (..., 4) xyxy (broadcastable) -> (...); eps keeps 0/0 finite."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / (union + eps)


def giou_loss(pred: Tensor, target: Tensor, *, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - GIoU of aligned pairs (Rezatofighi et al. 2019, Eq. for L_GIoU).

    Args:
        pred, target: (..., 4) xyxy, broadcastable; the gradient flows into both.
        reduction: "none" -> (...), "sum" or "mean" -> scalar (an empty input gives 0 for both).
        eps: added to the union and the hull area so that degenerate boxes give a finite loss.
    """
    x1, y1, x2, y2 = pred.unbind(-1)
    tx1, ty1, tx2, ty2 = target.unbind(-1)
    inter = ((torch.minimum(x2, tx2) - torch.maximum(x1, tx1)).clamp(min=0)
             * (torch.minimum(y2, ty2) - torch.maximum(y1, ty1)).clamp(min=0))
    union = (x2 - x1) * (y2 - y1) + (tx2 - tx1) * (ty2 - ty1) - inter
    iou = inter / (union + eps)
    hull = (torch.maximum(x2, tx2) - torch.minimum(x1, tx1)) * (torch.maximum(y2, ty2) - torch.minimum(y1, ty1))
    loss = 1 - iou + (hull - union) / (hull + eps)
    return reduce_loss(loss, reduction)


# --------------------------------------------------------------------------------------------------------
# Clipping and filtering
# --------------------------------------------------------------------------------------------------------


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """boxes (..., 4) xyxy -> bool mask (...): True where both sides are >= min_size."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


# --------------------------------------------------------------------------------------------------------
# Batching per-image rows
# --------------------------------------------------------------------------------------------------------


def pad_per_image(tensors: list[Tensor], *, fill, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """B tensors (N_i, ...) -> padded (B, G, ...) with G = max(min_rows, max_i N_i), and valid bool (B, G).

    For batched target assignment: each image's boxes (or labels) in one tensor, padding rows filled with `fill`
    (zero boxes intersect nothing; a label fill marks "no class"). min_rows=1 keeps one row even for a batch
    without any box, so that gathering with index 0 works (Faster R-CNN); the dense detectors take 0.
    """
    G = max(min_rows, max((t.shape[0] for t in tensors), default=0))
    padded = torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, G - t.shape[0]), value=fill) for t in tensors])
    lengths = torch.tensor([t.shape[0] for t in tensors], device=padded.device)
    return padded, torch.arange(G, device=padded.device) < lengths[:, None]


def crowd_boxes(target: dict, *, dtype: torch.dtype, device) -> Tensor:
    """A target's crowd (ignored) regions as (M, 4) xyxy in `dtype` on `device`; (0, 4) when it has none."""
    crowd = target.get("crowd")
    if crowd is None:
        return torch.zeros(0, 4, dtype=dtype, device=device)
    return crowd.to(device=device, dtype=dtype).reshape(-1, 4)
