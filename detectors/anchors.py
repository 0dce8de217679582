"""Anchor boxes on a feature pyramid, placed as torchvision places them.

At every location (x, y) of level l (stride s_l) there are A_l = len(sizes[l]) * len(aspect_ratios[l])
anchors, all centred on (x * s_l, y * s_l): the centre of the top-left cell is the image's corner, not the
cell's middle. This is torchvision's (and Detectron's) convention; FCOS uses the same grid with one square
anchor of side s_l per location, so its "anchor points" are the centres of those squares.

Cell anchors (the A_l boxes around the origin) are rounded to whole pixels in float32, which makes the anchors
bit-identical to torchvision's AnchorGenerator. Their order at a location is aspect-ratio-major:
[(r0, s0), (r0, s1), ..., (r1, s0), ...].

Unlike torchvision, which derives a level's stride from `image size // feature size`, the strides here are
given: the same grid for every padded canvas size. The two agree whenever the canvas is a multiple of the
largest stride (e.g. 128 px for P3..P7); the grids differ only in the floor of that division otherwise.
"""

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors for every level of a feature pyramid.

    Args:
        sizes: per level, the anchor sizes in pixels (sqrt of the area), e.g. ((32,), (64,), ...) or
            RetinaNet's ((32, 40, 50), (64, 80, 101), ...).
        aspect_ratios: per level, the ratios height / width, e.g. ((0.5, 1.0, 2.0),) * 5.
        strides: per level, the stride in pixels of the feature map, e.g. (8, 16, 32, 64, 128).

    Call with the feature-map shapes; the result is cached per (shapes, dtype, device).
    """

    def __init__(self, *, sizes, aspect_ratios, strides):
        super().__init__()
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(f"detectors/anchors.py: sizes ({len(sizes)}), aspect_ratios ({len(aspect_ratios)}) "
                             f"and strides ({len(strides)}) need one entry per level")
        self.sizes = tuple(tuple(level) for level in sizes)
        self.aspect_ratios = tuple(tuple(level) for level in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]  # float32 (A_l, 4)
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_level(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @property
    def num_anchors_per_location(self) -> int:
        """A, the number of anchors per location, which must be the same at every level."""
        counts = set(self.num_anchors_per_level)
        if len(counts) != 1:
            raise ValueError(f"detectors/anchors.py: levels have different anchor counts {self.num_anchors_per_level}")
        return counts.pop()

    def forward(self, shapes, *, dtype: torch.dtype = torch.float32, device=None) -> list[Tensor]:
        """shapes: per level (H_l, W_l) -> per level anchors (H_l*W_l*A_l, 4) xyxy pixels, rows ordered (y, x, a).

        The same anchors serve every image of a batch (they live on the padded canvas).
        """
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        if len(shapes) != len(self.strides):
            raise ValueError(f"detectors/anchors.py: got {len(shapes)} feature maps for {len(self.strides)} levels")
        key = (shapes, dtype, str(device))
        if key not in self._cache:
            self._cache[key] = [grid_anchors(cell.to(device), shape, stride).to(dtype)
                                for cell, shape, stride in zip(self.cell_anchors, shapes, self.strides)]
        return self._cache[key]


def cell_anchors(sizes, aspect_ratios) -> Tensor:
    """The anchors of one location centred on (0, 0): float32 (len(aspect_ratios) * len(sizes), 4) xyxy.

    An anchor of size s and ratio r = h / w has area s^2: w = s / sqrt(r), h = s * sqrt(r). Rounded to
    whole pixels (computed in float32 so that the rounding matches torchvision's exactly).
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)  # (S,)
    h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32))  # (R,)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # (R, S) -> (R*S,)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def grid_anchors(cell: Tensor, shape: tuple[int, int], stride: int) -> Tensor:
    """cell (A, 4) anchors around the origin, shape (H, W), stride -> (H*W*A, 4), centres at (x*stride, y*stride)."""
    H, W = shape
    shifts_x = torch.arange(W, dtype=torch.int32, device=cell.device) * stride
    shifts_y = torch.arange(H, dtype=torch.int32, device=cell.device) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # (H, W) each
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + cell[None]).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)
