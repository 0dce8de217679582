"""Element-wise detection losses. Each takes a `reduction` of "none", "sum" or "mean"; callers normalise sums
by the number of positives themselves (`max(1, num_pos)`), so "sum" is the usual choice.

    sigmoid_focal_loss   RetinaNet / FCOS classification (Lin et al. 2017, Eq. 5)
    quality_focal_loss   soft-target focal loss (Li et al. 2020, GFL Eq. 6), Dense Teacher's QFL
    smooth_l1_loss       box regression (Fast R-CNN paper, Eq. 3), `beta` the quadratic zone
    l1_loss              box regression (torchvision RetinaNet's default)
    positive_normalizer  the max(1, num_pos) divisor, the same for one process and for N under DDP

Under mixed precision the four losses run in float32 (`detectors.precision.in_float32`): 16-bit inputs are
cast up and autocast is off inside, so that sums over many anchors keep their small terms.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from detectors.precision import in_float32


def positive_normalizer(positive: Tensor) -> float:
    """The divisor of a loss summed over a batch: max(1, P), P = number of True in `positive` (any shape).

    Under torch.distributed each of the N ranks holds 1/N of the global batch and DDP averages the ranks'
    gradients. The divisor is then max(1, P_global) / N with P_global summed over the ranks (mmdetection's FCOS
    averages num_pos over the ranks alike), so that the mean of the ranks' losses is the one-process loss of
    the global batch, and so is the averaged gradient. An all-reduce: every rank must call this equally often.
    """
    count = positive.sum()  # () int64, on positive's device (NCCL needs the GPU)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return max(1, int(count))
    dist.all_reduce(count)
    return max(1, int(count)) / dist.get_world_size()


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """loss (...,) -> itself ("none") or a scalar ("sum", "mean"; an empty input gives 0, not NaN)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / max(1, loss.numel())
    raise ValueError(f"detectors/losses.py: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


@in_float32
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t) per element (RetinaNet paper, Eq. 5).

    Args:
        logits: float (...,) raw class scores.
        targets: same shape, 1 for the true class of a positive, 0 elsewhere (soft values are allowed and
            enter through the binary cross-entropy).
        alpha: weight of the positive term, 1 - alpha for negatives; alpha < 0 disables the weighting.
        gamma: focusing exponent; 0 gives the (alpha-weighted) binary cross-entropy.
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return reduce_loss(loss, reduction)


@in_float32
def quality_focal_loss(logits: Tensor, targets: Tensor, *, beta: float = 2.0, reduction: str = "none") -> Tensor:
    """QFL(p) = BCE(p, y) * |y - p|^beta with a soft target y in [0, 1] (GFL paper, Eq. 6).

    logits and targets (...,) of the same shape; y = 0 gives BCE(p, 0) * p^beta.
    """
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = ce * (targets - torch.sigmoid(logits)).abs() ** beta
    return reduce_loss(loss, reduction)


@in_float32
def smooth_l1_loss(input: Tensor, target: Tensor, *, beta: float = 1.0, reduction: str = "none") -> Tensor:
    """0.5 * x^2 / beta if |x| < beta else |x| - 0.5 * beta, with x = input - target (element-wise).

    beta = 0 (or below 1e-5) is the plain L1 loss. input and target (...,) of the same shape.
    """
    if beta < 1e-5:  # the quadratic zone vanishes; avoid dividing by a tiny beta
        return l1_loss(input, target, reduction=reduction)
    return reduce_loss(F.smooth_l1_loss(input, target, beta=beta, reduction="none"), reduction)


@in_float32
def l1_loss(input: Tensor, target: Tensor, *, reduction: str = "none") -> Tensor:
    """|input - target| element-wise; input and target (...,) of the same shape."""
    return reduce_loss((input - target).abs(), reduction)
