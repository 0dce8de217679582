"""A generated image-classification set for pretraining backbones: what ImageNet is to COCO, for the built-in data.

    images, labels = glyph_batch(GlyphSpec(), indices)     # uint8 (N, S, S, 3), int64 (N,)

The papers start every detector from an ImageNet-pretrained backbone. No such weights can be downloaded here,
so the built-in benchmark pretrains its backbone on this set instead (`engine/pretrain.py`). Its classes are
not the detection classes: each class is a fixed "glyph", a handful of strokes (line segments and arcs)
drawn once from the class's own random stream, as a letter is a fixed set of strokes. Every image draws its
class's glyph under a random similarity transform (scale, rotation, position), a random stroke width and
colour, on a noisy colour background with a few clutter strokes. To tell the classes apart a network must
learn edges, corners, curvature and their arrangement at several scales, which is what the detector needs.

Every image is a pure function of (spec, index): the set needs no disk, and any worker draws the same image.
"""

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

_SUPERSAMPLE = 2  # strokes are drawn at 2x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class GlyphSpec:
    """Everything the set depends on."""

    seed: int = 0
    num_classes: int = 32
    image_size: int = 32  # square images, pixels
    min_scale: float = 0.5  # glyph size as a fraction of the image side, uniform in [min_scale, max_scale]
    max_scale: float = 0.9
    max_rotation_deg: float = 30.0
    clutter: float = 1.0  # mean number of clutter strokes per image
    noise_std: float = 0.05  # per-pixel Gaussian noise, in [0, 1] units


@functools.lru_cache(maxsize=4096)
def glyph_strokes(spec: GlyphSpec, label: int) -> tuple[np.ndarray, ...]:
    """The strokes of class `label`: polylines (P, 2) in [-1.1, 1.1]^2 (segments end on a grid of the unit box,
    arcs may reach a little beyond it), fixed for a given spec.

    3 to 5 strokes, each a straight segment or a circular arc, from the class's own random stream.
    """
    rng = np.random.default_rng([spec.seed, 1_000_003, label])
    strokes = []
    for _ in range(int(rng.integers(3, 6))):
        if rng.uniform() < 0.5:  # straight segment between two points of a 5 x 5 grid (distinct)
            grid = np.linspace(-1, 1, 5)
            while True:
                a, b = rng.choice(grid, 2), rng.choice(grid, 2)
                if np.abs(a - b).sum() > 0:
                    break
            strokes.append(np.stack([a, b]))
        else:  # an arc of 90-300 degrees around a grid point
            centre = rng.choice(np.linspace(-0.5, 0.5, 3), 2)
            radius = rng.uniform(0.3, 0.6)
            start = rng.uniform(0, 2 * np.pi)
            sweep = np.deg2rad(rng.uniform(90, 300))
            angles = start + np.linspace(0, sweep, 16)
            strokes.append(centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1))
    return tuple(strokes)


def glyph_image(spec: GlyphSpec, index: int) -> tuple[np.ndarray, int]:
    """Image `index` of the set: pixels uint8 (S, S, 3) RGB and its class in 0..num_classes-1."""
    rng = np.random.default_rng([spec.seed, 2, index])
    size, scale = spec.image_size, _SUPERSAMPLE
    label = int(rng.integers(spec.num_classes))

    # Background: a two-colour ramp plus coarse colour noise.
    start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    ramp = (xs * np.cos(angle) + ys * np.sin(angle))[..., None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    coarse = np.asarray(Image.fromarray(np.uint8(rng.uniform(0, 255, (4, 4, 3)))).resize((size, size),
                                                                                        Image.BILINEAR)) / 255
    image = start * (1 - ramp) + end * ramp + 0.15 * (coarse - 0.5)

    def paint(strokes: list[np.ndarray], width: float, colour: np.ndarray) -> np.ndarray:
        canvas = Image.new("L", (size * scale, size * scale), 0)
        draw = ImageDraw.Draw(canvas)
        for points in strokes:
            draw.line([tuple(p) for p in points * scale], fill=255, width=max(1, int(round(width * scale))),
                      joint="curve")
        alpha = np.asarray(canvas.reduce(scale), dtype=np.float64)[..., None] / 255
        return image * (1 - alpha) + colour * alpha

    # Clutter strokes under the glyph: random segments that belong to no class.
    for _ in range(rng.poisson(spec.clutter)):
        segment = rng.uniform(0, size, (2, 2))
        image = paint([segment], rng.uniform(0.8, 2.5), rng.uniform(0, 1, 3))

    # The glyph: a similarity transform of its unit-box strokes.
    half = 0.5 * size * rng.uniform(spec.min_scale, spec.max_scale)
    theta = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = rng.uniform(half, size - half, 2)
    strokes = [(points * half) @ rotation.T + centre for points in glyph_strokes(spec, label)]
    colour = rng.uniform(0, 1, 3)
    background = image.mean((0, 1))
    for _ in range(20):  # keep the glyph visible against the mean background colour
        if np.linalg.norm(colour - background) >= 0.4:
            break
        colour = rng.uniform(0, 1, 3)
    image = paint(strokes, rng.uniform(1.5, 4.0) * half / 20, colour)

    image = image + rng.normal(0, spec.noise_std, image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), label


def glyph_batch(spec: GlyphSpec, indices) -> tuple[np.ndarray, np.ndarray]:
    """Images `indices` of the set: uint8 (N, S, S, 3) and labels int64 (N,)."""
    pairs = [glyph_image(spec, int(i)) for i in indices]
    if not pairs:
        return np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int64)
