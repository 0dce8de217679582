"""Assigning anchors (or RoIs) to ground-truth boxes, and sampling a balanced training subset.

    Matcher                           IoU thresholds -> gt index or a named sentinel per prediction
    BalancedPositiveNegativeSampler   a fixed-size subset with at most a given fraction of positives

Both work on one image or on a whole batch at once (a leading batch dimension), without a Python loop.
"""

import torch
from torch import Tensor


class Matcher:
    """Match every prediction to the ground-truth box it overlaps most (Faster R-CNN paper, Sec. 3.1.2).

    For prediction n with best quality q (IoU) over the gt boxes:
        q >= high_threshold               -> the index of that gt box (a positive)
        low_threshold <= q < high         -> BETWEEN_THRESHOLDS (ignored by the losses)
        q < low_threshold                 -> BELOW_LOW_THRESHOLD (a negative)

    With `allow_low_quality_matches`, each gt box also claims the predictions it overlaps most (all of them
    on a tie) even below `high_threshold`, so that no object is left without a positive (the RPN's rule (i)
    in Sec. 3.1.2). Such a prediction gets its own best gt (which may differ from the gt that claimed it,
    as in Detectron). A gt box that overlaps nothing (best quality 0) claims nothing.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"detectors/matcher.py: low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor, gt_valid: Tensor | None = None) -> Tensor:
        """Match predictions to gt boxes.

        Args:
            quality: float (G, N) or (B, G, N): IoU of each gt box with each prediction.
            gt_valid: optional bool (G,) or (B, G): False marks padding rows of a batch whose images have
                different numbers of gt boxes (padding never matches).
        Returns:
            int64 (N,) or (B, N): a gt index in [0, G) or BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS.
            With no gt box (G == 0) every prediction is BELOW_LOW_THRESHOLD.
        """
        *batch, G, N = quality.shape
        if G == 0:
            return torch.full((*batch, N), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=quality.device)
        if gt_valid is not None:  # padding rows get -1 < any IoU, so they never win a max
            quality = quality.masked_fill(~gt_valid[..., None], -1.0)
        best_quality, best_gt = quality.max(dim=-2)  # (..., N) each
        matches = torch.where(best_quality >= self.high_threshold, best_gt,
                              torch.where(best_quality >= self.low_threshold, self.BETWEEN_THRESHOLDS,
                                          self.BELOW_LOW_THRESHOLD))
        if self.allow_low_quality_matches:
            best_per_gt = quality.amax(dim=-1, keepdim=True)  # (..., G, 1)
            claimed = ((quality == best_per_gt) & (best_per_gt > 0)).any(dim=-2)  # (..., G, N) -> (..., N)
            matches = torch.where(claimed, best_gt, matches)
        return matches


class BalancedPositiveNegativeSampler:
    """Sample `batch_size_per_image` predictions per image, at most `positive_fraction` of them positive;
    negatives fill the rest (Faster R-CNN paper, Sec. 3.1.3). Chosen uniformly at random.

    Args:
        batch_size_per_image: the number sampled per image (fewer if there are not enough candidates).
        positive_fraction: the largest share of positives.
        generator: optional torch.Generator for reproducible draws.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float, generator: torch.Generator | None = None):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.generator = generator

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """labels int (N,) or (B, N): -1 ignored, 0 negative, >= 1 positive
        -> (positive, negative): bool masks of the labels' shape, the sampled positives and negatives."""
        rows = labels.reshape(-1, labels.shape[-1])  # (B, N)
        is_pos, is_neg = rows >= 1, rows == 0
        num_pos = is_pos.sum(dim=1).clamp(max=int(self.batch_size_per_image * self.positive_fraction))  # (B,)
        num_neg = is_neg.sum(dim=1).clamp(max=self.batch_size_per_image - num_pos)  # (B,)
        positive = _random_subset(is_pos, num_pos, self.generator)
        negative = _random_subset(is_neg, num_neg, self.generator)
        return positive.view(labels.shape), negative.view(labels.shape)


def _random_subset(candidates: Tensor, count: Tensor, generator: torch.Generator | None) -> Tensor:
    """candidates bool (B, N), count int (B,) -> bool (B, N): `count[b]` candidates of row b, uniformly at random.

    Each candidate gets a random key in [0, 1) and the rest the key 2; the `count` smallest keys win.
    """
    B, N = candidates.shape
    keys = torch.rand(B, N, generator=generator, device=candidates.device)
    keys = keys.masked_fill(~candidates, 2.0)
    order = keys.argsort(dim=1)  # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    return rank < count[:, None]
