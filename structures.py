"""Batch types and box geometry: the bottom layer that data/, detectors/, semi/ and engine/ all import.

    Batch, UnlabeledBatch          what the loaders yield and the methods take (ARCHITECTURE.md, "data/")
    pad_to_multiple(images, m)     zero-pad a batch of images at the bottom / right to multiples of m
    warp_boxes(boxes, matrix)      boxes through a 3x3 map of pixel coordinates (the enclosing box of the corners)
    clip_boxes(boxes, image_sizes) boxes clamped to their image
    view_transform, carry_boxes    boxes moved from one view of an image to another (docs/METHODS.md, "Views")

Every box is [x1, y1, x2, y2] in absolute pixels. This module needs torch only, so that every folder may import
it without an arrow running back up: data/ knows nothing of detectors/, semi/ or engine/, and detectors/ nothing
of data/ or semi/, yet all of them share these types and functions.
"""

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch of B samples (ARCHITECTURE.md, "data/").

    images: float32 (B, 3, H, W) in [0, 1], zero-padded at the bottom / right to a multiple of size_divisible.
    image_sizes: int64 (B, 2), (h, w) of each image's valid region. targets: B dicts {"boxes" float32 (N_i, 4)
    xyxy, "labels" int64 (N_i,), "crowd" float32 (M_i, 4)} in the batch frame. matrices: float64 (B, 3, 3),
    original image -> batch frame. image_ids: B COCO ids. orig_sizes: B (h, w) of the original files.
    skipped_ids: ids of images drawn for the batch that could not be read and are not in it (evaluation sets,
    `data.coco.unreadable_sample`); B may then be 0.
    """

    images: Tensor
    image_sizes: Tensor
    targets: list[dict[str, Tensor]]
    matrices: Tensor
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]
    skipped_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "Batch":
        return self._apply(functools.partial(Tensor.to, device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory, from which `.to("cuda", non_blocking=True)` copies without holding up
        the training process; DataLoader(pin_memory=True) calls this in its own thread."""
        return self._apply(Tensor.pin_memory)

    def _apply(self, fn) -> "Batch":
        return Batch(images=fn(self.images), image_sizes=fn(self.image_sizes),
                     targets=[{key: fn(value) for key, value in t.items()} for t in self.targets],
                     matrices=fn(self.matrices), image_ids=list(self.image_ids), orig_sizes=list(self.orig_sizes),
                     skipped_ids=list(self.skipped_ids))


@dataclass
class UnlabeledBatch:
    """Two views of the same B images; `weak.targets` / `strong.targets` hold the hidden ground truth."""

    weak: Batch
    strong: Batch

    def __len__(self) -> int:
        return len(self.weak)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "UnlabeledBatch":
        return UnlabeledBatch(weak=self.weak.to(device, non_blocking=non_blocking),
                              strong=self.strong.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "UnlabeledBatch":
        return UnlabeledBatch(weak=self.weak.pin_memory(), strong=self.strong.pin_memory())


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right to (B, C, H', W') with H', W' multiples of `multiple`."""
    H, W = images.shape[-2:]
    pad_h, pad_w = -H % multiple, -W % multiple
    return F.pad(images, (0, pad_w, 0, pad_h))


# --------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------


def warp_boxes(boxes: Tensor, matrix: Tensor) -> Tensor:
    """Map boxes through a 3x3 matrix: the enclosing box of the four mapped corners (no clipping).

    boxes: (N, 4) xyxy absolute pixels; matrix: (3, 3), any float dtype (computed in float64).
    Returns (N, 4) xyxy in the dtype and on the device of `boxes`. Exact for scales, flips and translations;
    for rotations and shears the enclosing box of the rotated box (larger than the object's own box).
    """
    matrix = torch.as_tensor(matrix, dtype=torch.float64, device=boxes.device)
    x1, y1, x2, y2 = boxes.to(torch.float64).unbind(-1)  # each (N,)
    corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                           torch.stack([x2, y2], -1), torch.stack([x1, y2], -1)], 1)  # (N, 4 corners, 2)
    ones = torch.ones_like(corners[..., :1])
    mapped = torch.cat([corners, ones], -1) @ matrix.T  # (N, 4, 3)
    mapped = mapped[..., :2] / mapped[..., 2:]  # (N, 4, 2); the last row of an affine matrix keeps w = 1
    low, high = mapped.min(1).values, mapped.max(1).values  # (N, 2) each
    return torch.cat([low, high], -1).to(boxes.dtype)  # (N, 4)


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clamp boxes to their image: x to [0, w], y to [0, h].

    Args:
        boxes: (..., K, 4) xyxy.
        image_sizes: (h, w) of the valid image region: int or float, shape (2,) for all boxes, or (..., 2)
            matching the leading dims of `boxes` (e.g. (B, 2) with boxes (B, K, 4)).
    Returns:
        (..., K, 4), same dtype as `boxes`.
    """
    sizes = torch.as_tensor(image_sizes, device=boxes.device).to(boxes.dtype)
    h, w = sizes[..., 0, None], sizes[..., 1, None]  # (..., 1): broadcast over the K boxes
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    return torch.stack((boxes[..., 0].clamp(min=zero).minimum(w), boxes[..., 1].clamp(min=zero).minimum(h),
                        boxes[..., 2].clamp(min=zero).minimum(w), boxes[..., 3].clamp(min=zero).minimum(h)), dim=-1)


def view_transform(src_matrix: Tensor, dst_matrix: Tensor) -> Tensor:
    """The (3, 3) float64 matrix mapping pixel coordinates of the source view to the destination view.

    Each view records T: original image -> view, so M = T_dst @ inverse(T_src) (docs/METHODS.md, "Views").
    src_matrix, dst_matrix: (3, 3) or batched (B, 3, 3) -> same shape.
    """
    src = src_matrix.to(torch.float64)
    dst = dst_matrix.to(torch.float64)
    return dst @ torch.linalg.inv(src)


def carry_boxes(boxes: Tensor, src_matrix: Tensor, dst_matrix: Tensor, *,
                dst_size: Sequence[int] | Tensor | None = None) -> Tensor:
    """Move boxes from one view of an image to another view of the same image.

    boxes: (N, 4) xyxy pixels in the source view; src_matrix, dst_matrix: (3, 3), original -> view.
    dst_size: (h, w) of the destination view's valid region; the carried boxes are clipped to it (None:
    no clipping). Returns (N, 4) xyxy in the destination view, dtype of `boxes`: the enclosing box of the
    four mapped corners (exact for resizes, flips and translations; larger than the object under rotation).
    """
    carried = warp_boxes(boxes, view_transform(src_matrix, dst_matrix))  # (N, 4)
    if dst_size is not None:
        carried = clip_boxes(carried, [int(s) for s in dst_size])
    return carried
