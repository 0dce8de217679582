"""Transforms of sample dicts that record where every pixel went, and the weak / strong views built from them.

Every geometric transform is an affine map of pixel coordinates, kept as a 3x3 matrix `A` (float64) with
`(x', y', 1) = A @ (x, y, 1)`. Coordinates are continuous: pixel (i, j) covers [j, j+1) x [i, i+1), so a box
[x1, y1, x2, y2] encloses whole pixels and a resize by s maps it exactly to s * box. The sample's `matrix`
accumulates the maps, `matrix <- A @ matrix`, so it always takes original-image coordinates to the view's.
A box seen in view a moves to view b by `M = T_b @ inverse(T_a)`: `warp_boxes(boxes, M)` transforms its four
corners and takes their enclosing box (docs/METHODS.md, "Views"; `structures.py`).

Every random transform is called as `t(sample, generator)` and draws only from that `torch.Generator`
(None: torch's global generator), so a seeded generator reproduces the view.

    weak   = RandomResize + RandomHorizontalFlip                                   (the teacher's view)
    strong = weak geometry + ColorJitter, RandomGrayscale, GaussianBlur, RandomErasing   (aligned: Dense Teacher, SED)
    strong = own RandomResize + RandomHorizontalFlip + RandomAffine + the same photometric ops (Soft Teacher)
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from structures import clip_boxes, warp_boxes

# --------------------------------------------------------------------------------------------------------
# Boxes and matrices
# --------------------------------------------------------------------------------------------------------


def scale_matrix(sx: float, sy: float) -> Tensor:
    """(3, 3) float64: (x, y) -> (sx * x, sy * y)."""
    return torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=torch.float64)


def hflip_matrix(width: float) -> Tensor:
    """(3, 3) float64: (x, y) -> (width - x, y), the mirror of an image `width` pixels wide."""
    return torch.tensor([[-1, 0, width], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)


def translation_matrix(tx: float, ty: float) -> Tensor:
    return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float64)


def rotation_matrix(degrees: float, center: Sequence[float]) -> Tensor:
    """(3, 3) float64: rotation by `degrees` about `center` (x, y); positive turns +x towards +y (clockwise on
    screen, since y points down)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    rotate = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    return translation_matrix(*center) @ rotate @ translation_matrix(-center[0], -center[1])


def shear_matrix(degrees_x: float, degrees_y: float, center: Sequence[float]) -> Tensor:
    """(3, 3) float64: shear about `center`, x' = x + tan(degrees_x) * y and y' = y + tan(degrees_y) * x."""
    shear = torch.tensor([[1, math.tan(math.radians(degrees_x)), 0], [math.tan(math.radians(degrees_y)), 1, 0],
                          [0, 0, 1]], dtype=torch.float64)
    return translation_matrix(*center) @ shear @ translation_matrix(-center[0], -center[1])


def warp_image(image: Tensor, matrix: Tensor, size: Sequence[int], *, fill: float = 0.0) -> Tensor:
    """Resample image (C, H, W) into an output of `size` (h, w) so that input point p lands at matrix @ p.

    Bilinear; each output pixel centre (x + 0.5, y + 0.5) reads the input at inverse(matrix) @ centre,
    in the same continuous coordinates as the boxes. Outside the input: `fill`.
    """
    h_out, w_out = size
    _, h_in, w_in = image.shape
    inverse = torch.linalg.inv(torch.as_tensor(matrix, dtype=torch.float64))
    ys = torch.arange(h_out, dtype=torch.float64) + 0.5
    xs = torch.arange(w_out, dtype=torch.float64) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], -1) @ inverse.T  # (h, w, 3)
    source = points[..., :2] / points[..., 2:]  # (h, w, 2) input (x, y)
    # grid_sample with align_corners=False puts -1 / +1 at the outer edges: normalised = 2 * x / W - 1.
    normalised = 2 * source / torch.tensor([w_in, h_in], dtype=torch.float64) - 1
    grid = normalised.to(image.dtype)[None]  # (1, h, w, 2)
    shifted = image[None] - fill  # zero padding of (image - fill) = padding with `fill`
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + fill  # (C, h, w)


def _apply_geometry(sample: dict, matrix: Tensor, image: Tensor, *, min_size: float = 0.0) -> dict:
    """A copy of `sample` with the new image, boxes moved by `matrix` and clipped, boxes (and their labels)
    narrower or lower than `min_size` (or empty) dropped, and matrix <- matrix @ sample["matrix"]."""
    out = dict(sample)
    size = image.shape[-2:]
    out["image"] = image
    boxes = clip_boxes(warp_boxes(sample["boxes"], matrix), size)  # (N, 4)
    keep = _large_enough(boxes, min_size)
    out["boxes"], out["labels"] = boxes[keep], sample["labels"][keep]
    crowd = clip_boxes(warp_boxes(sample["crowd"], matrix), size)  # (M, 4)
    out["crowd"] = crowd[_large_enough(crowd, 0.0)]
    out["matrix"] = matrix @ sample["matrix"]
    return out


def _large_enough(boxes: Tensor, min_size: float) -> Tensor:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w > 0) & (h > 0) & (w >= min_size) & (h >= min_size)  # (N,) bool


# --------------------------------------------------------------------------------------------------------
# Random draws, all from an explicit generator
# --------------------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _coin(generator: torch.Generator | None, p: float) -> bool:
    return _uniform(generator, 0.0, 1.0) < p


# --------------------------------------------------------------------------------------------------------
# Geometric transforms (change the matrix)
# --------------------------------------------------------------------------------------------------------


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def resized_shape(height: int, width: int, *, short_side: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the short side at `short_side` unless the long side would exceed `max_size`."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(sample: dict, size: tuple[int, int]) -> dict:
    image = sample["image"]
    _, h, w = image.shape
    new_h, new_w = size
    if (new_h, new_w) == (h, w):
        resized = image
    else:
        resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                                antialias=True)[0].clamp_(0, 1)  # (3, new_h, new_w)
    # The exact ratio of the integer sizes, so that box and pixel grids agree.
    return _apply_geometry(sample, scale_matrix(new_w / w, new_h / h), resized)


class Resize:
    """Deterministic resize: short side to `short_side`, long side at most `max_size` (evaluation)."""

    def __init__(self, short_side: int, max_size: int):
        self.short_side, self.max_size = short_side, max_size

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        _, h, w = sample["image"].shape
        return _resize(sample, resized_shape(h, w, short_side=self.short_side, max_size=self.max_size))

    def __repr__(self) -> str:
        return f"Resize(short_side={self.short_side}, max_size={self.max_size})"


class RandomResize:
    """Resize with the short side drawn uniformly from `short_sides`, long side at most `max_size`."""

    def __init__(self, short_sides: Sequence[int], max_size: int):
        if not short_sides:
            raise ValueError("RandomResize needs at least one short side")
        self.short_sides, self.max_size = list(short_sides), max_size

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        short_side = self.short_sides[_randint(generator, 0, len(self.short_sides) - 1)]
        _, h, w = sample["image"].shape
        return _resize(sample, resized_shape(h, w, short_side=short_side, max_size=self.max_size))

    def __repr__(self) -> str:
        return f"RandomResize(short_sides={self.short_sides}, max_size={self.max_size})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if not _coin(generator, self.p):
            return sample
        image = sample["image"]
        return _apply_geometry(sample, hflip_matrix(image.shape[-1]), image.flip(-1))

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomAffine:
    """Soft Teacher's geometric op of the strong view: one of translate / rotate / shear, drawn at random.

    translate: shift of up to this fraction of the image width (x) and height (y); rotate_deg: rotation about
    the image centre by up to this many degrees; shear_deg: shear along x or y (one, at random) by up to this
    angle. The output keeps the input's size; uncovered pixels get `fill`. Boxes are moved by the matrix
    (enclosing box of the corners), clipped, and dropped (with their labels) when narrower or lower than
    `min_size` pixels.
    """

    OPS = ("translate", "rotate", "shear")

    def __init__(self, translate: float = 0.1, rotate_deg: float = 30.0, shear_deg: float = 30.0, *,
                 min_size: float = 1.0, fill: float = 0.0):
        self.translate, self.rotate_deg, self.shear_deg = translate, rotate_deg, shear_deg
        self.min_size, self.fill = min_size, fill

    def matrix(self, size: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Draw the (3, 3) float64 matrix for an image of size (h, w)."""
        h, w = size
        center = (w / 2, h / 2)
        op = self.OPS[_randint(generator, 0, len(self.OPS) - 1)]
        if op == "translate":
            return translation_matrix(_uniform(generator, -self.translate, self.translate) * w,
                                      _uniform(generator, -self.translate, self.translate) * h)
        if op == "rotate":
            return rotation_matrix(_uniform(generator, -self.rotate_deg, self.rotate_deg), center)
        angle = _uniform(generator, -self.shear_deg, self.shear_deg)
        return shear_matrix(angle, 0.0, center) if _coin(generator, 0.5) else shear_matrix(0.0, angle, center)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        size = sample["image"].shape[-2:]
        matrix = self.matrix(size, generator)
        image = warp_image(sample["image"], matrix, size, fill=self.fill)
        return _apply_geometry(sample, matrix, image, min_size=self.min_size)

    def __repr__(self) -> str:
        return (f"RandomAffine(translate={self.translate}, rotate_deg={self.rotate_deg}, "
                f"shear_deg={self.shear_deg}, min_size={self.min_size})")


# --------------------------------------------------------------------------------------------------------
# Photometric transforms (pixel-aligned: image only, matrix and boxes unchanged)
# --------------------------------------------------------------------------------------------------------


def _with_image(sample: dict, image: Tensor) -> dict:
    out = dict(sample)
    out["image"] = image
    return out


class ColorJitter:
    """With probability p, brightness / contrast / saturation / hue jitter in a random order.

    Factors drawn uniformly from [1 - b, 1 + b] (b = brightness, contrast, saturation) and hue shift from
    [-hue, hue] (fraction of the hue circle), as torchvision's ColorJitter.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 *, p: float = 0.8):
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if not _coin(generator, self.p):
            return sample
        image = sample["image"]
        for op in torch.randperm(4, generator=generator).tolist():
            if op == 0:
                image = TF.adjust_brightness(image, _uniform(generator, max(0.0, 1 - self.brightness),
                                                             1 + self.brightness))
            elif op == 1:
                image = TF.adjust_contrast(image, _uniform(generator, max(0.0, 1 - self.contrast), 1 + self.contrast))
            elif op == 2:
                image = TF.adjust_saturation(image, _uniform(generator, max(0.0, 1 - self.saturation),
                                                             1 + self.saturation))
            else:
                image = TF.adjust_hue(image, _uniform(generator, -self.hue, self.hue))
        return _with_image(sample, image)

    def __repr__(self) -> str:
        return (f"ColorJitter({self.brightness}, {self.contrast}, {self.saturation}, {self.hue}, p={self.p})")


class RandomGrayscale:
    def __init__(self, p: float = 0.2):
        self.p = p

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if not _coin(generator, self.p):
            return sample
        return _with_image(sample, TF.rgb_to_grayscale(sample["image"], num_output_channels=3))

    def __repr__(self) -> str:
        return f"RandomGrayscale(p={self.p})"


class GaussianBlur:
    """With probability p, a Gaussian blur with sigma uniform in `sigma` (kernel 2 * ceil(3 sigma) + 1)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), *, p: float = 0.5):
        self.sigma, self.p = sigma, p

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if not _coin(generator, self.p):
            return sample
        sigma = _uniform(generator, *self.sigma)
        image = sample["image"]
        # The kernel must stay smaller than the image for the reflect padding.
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(image.shape[-2:]) - 1) // 2) + 1)
        return _with_image(sample, TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma]))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, p={self.p})"


class RandomErasing:
    """Cutout: with probability p, erase 1..n rectangles filled with uniform noise.

    Each rectangle covers a fraction of the image area uniform in `scale`, with aspect ratio (h / w)
    log-uniform in `ratio`. Between Soft Teacher's 1-5 patches of up to 0.2 x 0.2 of the image and Dense
    Teacher's up to three patches of 2-20% of the area.
    """

    def __init__(self, *, p: float = 0.7, num_patches: tuple[int, int] = (1, 5),
                 scale: tuple[float, float] = (0.01, 0.05), ratio: tuple[float, float] = (0.3, 3.3)):
        self.p, self.num_patches, self.scale, self.ratio = p, num_patches, scale, ratio

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if not _coin(generator, self.p):
            return sample
        image = sample["image"].clone()
        channels, height, width = image.shape
        for _ in range(_randint(generator, *self.num_patches)):
            area = _uniform(generator, *self.scale) * height * width
            aspect = math.exp(_uniform(generator, math.log(self.ratio[0]), math.log(self.ratio[1])))
            h = min(height, max(1, round(math.sqrt(area * aspect))))
            w = min(width, max(1, round(math.sqrt(area / aspect))))
            top, left = _randint(generator, 0, height - h), _randint(generator, 0, width - w)
            image[:, top:top + h, left:left + w] = torch.rand((channels, h, w), generator=generator)
        return _with_image(sample, image)

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, num_patches={self.num_patches}, scale={self.scale}, ratio={self.ratio})"


# --------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------


def build_eval_transform(short_side: int, max_size: int) -> Resize:
    return Resize(short_side, max_size)


def build_labeled_transform(*, short_sides: Sequence[int], max_size: int, flip_p: float = 0.5) -> Compose:
    """The weak view, used for labeled images: random resize + horizontal flip."""
    return Compose([RandomResize(short_sides, max_size), RandomHorizontalFlip(flip_p)])


def build_photometric() -> Compose:
    """The strong view's pixel-aligned ops (docs/METHODS.md, "Views")."""
    return Compose([ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), RandomGrayscale(p=0.2),
                    GaussianBlur(sigma=(0.1, 2.0), p=0.5), RandomErasing()])


class TwoViewTransform:
    """sample -> {"weak": sample, "strong": sample}, two views of one image, each with its own matrix.

    aligned=True (Dense Teacher, SED): strong = photometric(weak); the two views share geometry, so their
    matrices, boxes and sizes are identical and teacher and student maps align location for location.
    aligned=False (Soft Teacher): strong = photometric(RandomAffine(flip(resize(original)))) with its own
    draws; a box moves from the weak frame to the strong one by `T_strong @ inverse(T_weak)`.
    Both views carry the (hidden) ground truth moved into their own frame.
    """

    def __init__(self, *, short_sides: Sequence[int], max_size: int, aligned: bool, flip_p: float = 0.5,
                 affine: RandomAffine | None = None, photometric: Compose | None = None):
        self.aligned = aligned
        self.weak = build_labeled_transform(short_sides=short_sides, max_size=max_size, flip_p=flip_p)
        self.photometric = photometric if photometric is not None else build_photometric()
        self.strong_geometry = None if aligned else Compose([
            RandomResize(short_sides, max_size), RandomHorizontalFlip(flip_p),
            affine if affine is not None else RandomAffine()])

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        weak = self.weak(sample, generator)
        strong_geometry = weak if self.aligned else self.strong_geometry(sample, generator)
        return {"weak": weak, "strong": self.photometric(strong_geometry, generator)}

    def __repr__(self) -> str:
        return (f"TwoViewTransform(aligned={self.aligned}, weak={self.weak}, strong_geometry={self.strong_geometry}, "
                f"photometric={self.photometric})")


def build_unlabeled_transform(*, short_sides: Sequence[int], max_size: int, aligned: bool) -> TwoViewTransform:
    return TwoViewTransform(short_sides=short_sides, max_size=max_size, aligned=aligned)
