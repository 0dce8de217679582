"""The built-in dataset: shapes on cluttered, textured backgrounds, generated on first use.

    paths = ensure_builtin()                       # ~/.cache/ssod/builtin/builtin_<hash>/ (or $SSOD_CACHE/builtin)
    paths.train_json, paths.train_images           # COCO JSON + PNG folder, 3000 images by default
    paths.val_json, paths.val_images               # 500 images

    python -m data.synthetic --out DIR             # generate (if needed) and print statistics

What makes it a detection problem worth solving (the knobs are the fields of `BuiltinSpec`):

* Six classes told apart by shape only (square, circle, triangle, plus, ring, star);
  every object gets a random colour, a colour gradient and a low-frequency texture, so colour says nothing
  about the class. Shapes are rotated by at most `max_rotation_deg`, so that a square stays upright.
* Object sizes drawn log-uniformly from `min_size`..`max_size` px (default 12..96 px on 128 x 128 images,
  an 8x span): every octave 8-16, 16-32, 32-64, 64-128 holds many objects, as COCO's small / medium / large do.
* Backgrounds: a colour gradient, low-frequency colour noise and per-pixel noise (`noise_std`), with
  distractor clutter (lines, irregular blobs, scribbles; about `clutter` items per image) that belongs to no
  class; a share of the lines is drawn over the objects.
* Partial occlusion: objects may overlap (box IoU up to `max_overlap`; smaller objects are drawn on top).
  An annotation keeps the full object box; it is dropped when more than `max_hidden` of the object is
  covered by later objects or clutter.
* A long tail: class k is drawn with probability proportional to `tail_ratio ** (-k / (C - 1))`, so the
  most frequent class (square) is `tail_ratio` (5x) as frequent as the rarest (star).
* `empty_fraction` (5%) of the images hold no object; the others 1..`max_objects` (6), before drops.

Every image is generated from its own random stream, seeded by (seed, split, index), so the dataset is
byte-identical for a given spec whatever the number of worker processes. The JSON is COCO format:
`categories` (ids 1..6), `images` (ids 1..N per split, `file_name` relative to the split folder),
`annotations` (`bbox` [x, y, w, h] in pixels of the full object, `area` the object's pixel area,
`iscrowd` 0).

Generation is atomic: everything is written into a temporary folder that is renamed into place only when
complete, with a `DONE.json` marker recording the generator version and the spec; a folder without a
matching marker is regenerated, so a killed generation never passes for a dataset.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generator's output changes for a given spec: cached datasets of other versions are not reused.
GENERATOR_VERSION = 3

# Class order = frequency rank (index 0 the most frequent); category id = index + 1.
CLASS_NAMES = ("square", "circle", "triangle", "plus", "ring", "star",
               "hexagon", "diamond", "cross", "arrow", "semicircle", "frame")

_SPLIT_CODE = {"train": 0, "val": 1, "unlabeled": 2}
_SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered down: anti-aliased edges exact to 1/4 px


@dataclass(frozen=True)
class BuiltinSpec:
    """Everything the generated dataset depends on; a different spec is a different dataset (and folder)."""

    seed: int = 0
    num_train: int = 500
    num_val: int = 500
    unlabeled_per_train: float = 4.0  # extra unlabeled images (unlabeled.json, as COCO's unlabeled2017) per train image
    image_size: int = 128  # square images, pixels
    # ---- objects ---------------------------------------------------------------------------------------
    num_classes: int = 12  # the first num_classes of CLASS_NAMES (at most 12)
    min_size: float = 10.0  # object size (sqrt of its unrotated box area) is log-uniform in [min_size, max_size]
    max_size: float = 80.0
    max_objects: int = 14  # objects per non-empty image are uniform in 1..max_objects (before occlusion drops)
    empty_fraction: float = 0.05  # share of images with no object at all
    tail_ratio: float = 5.0  # frequency of the most frequent class / the rarest
    max_rotation_deg: float = 15.0  # shapes rotate by at most this (a square stays upright)
    max_aspect: float = 1.25  # width / height of a shape is in [1 / max_aspect, max_aspect]
    min_contrast: float = 0.4  # minimum RGB distance (in [0, 1] units) of an object's colour to its background
    # ---- occlusion -------------------------------------------------------------------------------------
    max_overlap: float = 0.3  # a new object's box may overlap an earlier one up to this IoU
    max_hidden: float = 0.5  # annotations of objects more hidden than this are dropped
    # ---- background and noise --------------------------------------------------------------------------
    clutter: float = 3.0  # mean number of distractor items (lines, blobs, scribbles) per image
    clutter_on_top: float = 0.15  # share of the distractor lines drawn over the objects
    texture: float = 0.15  # amplitude of the low-frequency colour noise of backgrounds and objects
    noise_std: float = 0.05  # per-pixel Gaussian noise, in [0, 1] units

    @property
    def num_unlabeled(self) -> int:
        return round(self.unlabeled_per_train * self.num_train)

    def validate(self) -> "BuiltinSpec":
        checks = [
            (self.num_train >= 1 and self.num_val >= 1, "num_train and num_val must be >= 1"),
            (self.unlabeled_per_train >= 0, "unlabeled_per_train must be >= 0"),
            (self.image_size >= 16, "image_size must be >= 16"),
            (0 < self.min_size <= self.max_size <= self.image_size, "need 0 < min_size <= max_size <= image_size"),
            (self.max_objects >= 1, "max_objects must be >= 1"),
            (2 <= self.num_classes <= len(CLASS_NAMES), f"num_classes must be in 2..{len(CLASS_NAMES)}"),
            (0 <= self.empty_fraction <= 1, "empty_fraction must be in [0, 1]"),
            (self.tail_ratio >= 1, "tail_ratio must be >= 1"),
            (0 <= self.max_hidden <= 1, "max_hidden must be in [0, 1]"),
            (0 <= self.max_overlap <= 1, "max_overlap must be in [0, 1]"),
            (self.max_aspect >= 1, "max_aspect must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"BuiltinSpec: {message}, got {self}")
        return self


class BuiltinPaths(NamedTuple):
    root: Path
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    unlabeled_json: Path | None  # the extra unlabeled images (their files in train_images), None without any


def default_cache_dir() -> Path:
    """$SSOD_CACHE/builtin when SSOD_CACHE is set, else ~/.cache/ssod/builtin."""
    base = os.environ.get("SSOD_CACHE")
    return Path(base) / "builtin" if base else Path.home() / ".cache" / "ssod" / "builtin"


def _fingerprint(spec: BuiltinSpec) -> dict:
    return {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}


def _paths(root: Path) -> BuiltinPaths:
    unlabeled = root / "unlabeled.json"
    return BuiltinPaths(root=root, train_json=root / "train.json", train_images=root / "train",
                        val_json=root / "val.json", val_images=root / "val",
                        unlabeled_json=unlabeled if unlabeled.exists() else None)


def ensure_builtin(cache_dir: str | Path | None = None, *, spec: BuiltinSpec = BuiltinSpec(),
                   num_workers: int = 2, verbose: bool = True) -> BuiltinPaths:
    """Return the paths of the built-in dataset described by `spec`, generating it first if needed.

    cache_dir: parent folder (default `default_cache_dir()`); the dataset lives in
    `cache_dir/builtin_<hash of generator version and spec>/`. num_workers: processes used to generate
    (0 or 1: in this process); the output does not depend on it.
    """
    spec.validate()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = _fingerprint(spec)
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir / f"builtin_{digest}"
    if _is_complete(root, fingerprint):
        return _paths(root)
    if root.exists():  # a folder without a matching marker is not a dataset: start again
        shutil.rmtree(root)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp_builtin_{digest}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        start = time.perf_counter()
        if verbose:
            print(f"data/synthetic.py: generating the built-in dataset ({spec.num_train} train + {spec.num_val} val "
                  f"images) into {root} ...", flush=True)
        _generate(tmp, spec, num_workers=num_workers)
        marker = dict(fingerprint, seconds=round(time.perf_counter() - start, 2))
        (tmp / "DONE.json").write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its copy if it is complete
            if not _is_complete(root, fingerprint):
                raise
        if verbose:
            print(f"data/synthetic.py: done in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def _is_complete(root: Path, fingerprint: dict) -> bool:
    marker = root / "DONE.json"
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(recorded.get(key) == value for key, value in fingerprint.items())


# --------------------------------------------------------------------------------------------------------
# Generation: one function per image, run over (split, index) pairs by a pool of workers
# --------------------------------------------------------------------------------------------------------


def _generate(out: Path, spec: BuiltinSpec, *, num_workers: int) -> None:
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, name in enumerate(CLASS_NAMES[:spec.num_classes])]
    # The extra unlabeled images share train/ (file names u000000.png, ...) and take the image ids after the
    # training images', so that they and the unlabeled part of a split make one set.
    splits = [("train", spec.num_train, "train", 1), ("val", spec.num_val, "val", 1)]
    if spec.num_unlabeled:
        splits.append(("unlabeled", spec.num_unlabeled, "train", spec.num_train + 1))
    for split, count, folder, first_id in splits:
        (out / folder).mkdir(parents=True, exist_ok=True)
        jobs = [(spec, split, index, str(out / folder)) for index in range(count)]
        if num_workers > 1:
            with multiprocessing.get_context("fork").Pool(num_workers) as pool:
                results = pool.map(_generate_and_write, jobs, chunksize=max(1, min(64, count // (4 * num_workers))))
        else:
            results = [_generate_and_write(job) for job in jobs]
        images, annotations = [], []
        for index, objects in enumerate(results):
            image_id = index + first_id
            images.append({"id": image_id, "file_name": _file_name(split, index), "width": spec.image_size,
                           "height": spec.image_size})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj, "iscrowd": 0})
        coco = {"info": {"description": "ssod built-in synthetic shapes", **_fingerprint(spec), "split": split},
                "licenses": [], "categories": categories, "images": images, "annotations": annotations}
        (out / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def _file_name(split: str, index: int) -> str:
    return f"u{index:06d}.png" if split == "unlabeled" else f"{index:06d}.png"


def _generate_and_write(job) -> list[dict]:
    spec, split, index, folder = job
    pixels, objects = generate_image(spec, split=split, index=index)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    Path(folder, _file_name(split, index)).write_bytes(buffer.getvalue())
    return objects


def generate_image(spec: BuiltinSpec, *, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One image and its annotations, a pure function of (spec, split, index).

    Returns pixels uint8 (S, S, 3) RGB and a list of {"category_id", "bbox" [x, y, w, h], "area"}.
    """
    rng = np.random.default_rng([spec.seed, _SPLIT_CODE[split], index])
    size = spec.image_size
    image = _background(rng, size, spec)  # float (S, S, 3) in [0, 1]

    # Distractor clutter: most of it under the objects, a share of the lines over them (occluders).
    num_clutter = rng.poisson(spec.clutter)
    on_top = []
    for _ in range(num_clutter):
        kind = rng.choice(("line", "blob", "scribble"))
        alpha = _clutter_alpha(rng, size, kind)
        colour = rng.uniform(0, 1, 3)
        if kind == "line" and rng.uniform() < spec.clutter_on_top:
            on_top.append((alpha, colour))
        else:
            image = image * (1 - alpha[..., None]) + colour * alpha[..., None]

    # Objects, largest first so that smaller ones are drawn over them.
    num_objects = 0 if rng.uniform() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    weights = spec.tail_ratio ** (-np.arange(spec.num_classes) / (spec.num_classes - 1))
    labels = rng.choice(spec.num_classes, size=num_objects, p=weights / weights.sum())
    sizes = np.exp(rng.uniform(np.log(spec.min_size), np.log(spec.max_size), size=num_objects))
    order = np.argsort(-sizes, kind="stable")
    placed = []  # (label, box xyxy, alpha (h, w), (x0, y0) offset)
    for label, obj_size in zip(labels[order], sizes[order]):
        obj = _place_object(rng, int(label), float(obj_size), spec, [p[1] for p in placed])
        if obj is None:
            continue
        box, polygons = obj
        alpha, offset = _rasterise(polygons, box, size)
        image = _paint_object(rng, image, alpha, offset, box, spec)
        placed.append((int(label), box, alpha, offset))

    for alpha, colour in on_top:
        image = image * (1 - alpha[..., None]) + colour * alpha[..., None]

    # Visibility: walk from the top layer down, accumulating the cover of everything drawn later.
    cover = np.zeros((size, size))
    for alpha, _ in on_top:
        cover = cover + alpha * (1 - cover)
    objects = []
    for label, box, alpha, (x0, y0) in reversed(placed):
        h, w = alpha.shape
        window = cover[y0:y0 + h, x0:x0 + w]
        visible = float((alpha * (1 - window)).sum() / max(alpha.sum(), 1e-6))
        cover[y0:y0 + h, x0:x0 + w] = window + alpha * (1 - window)
        if visible >= 1 - spec.max_hidden:
            x1, y1, x2, y2 = box
            objects.append({"category_id": label + 1,
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "area": round(float(alpha.sum()), 2)})
    objects.reverse()  # back to drawing order

    image = image + rng.normal(0, spec.noise_std, image.shape)
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return pixels, objects


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a (cells x cells) random grid, bilinearly upsampled to (height, width)."""
    grid = rng.uniform(-1, 1, (cells, cells, channels))
    ys = (np.arange(height) + 0.5) / height * (cells - 1)
    xs = (np.arange(width) + 0.5) / width * (cells - 1)
    y0, x0 = np.minimum(ys.astype(int), cells - 2), np.minimum(xs.astype(int), cells - 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx  # (H, W, C)
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear ramp in [0, 1] along a random direction, (height, width)."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    return (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)


def _background(rng: np.random.Generator, size: int, spec: BuiltinSpec) -> np.ndarray:
    start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ramp = _gradient(rng, size, size)[..., None]
    image = start * (1 - ramp) + end * ramp
    image = image + spec.texture * _smooth_noise(rng, size, size, cells=int(rng.integers(3, 9)))
    return np.clip(image, 0, 1)


def _clutter_alpha(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Coverage (S, S) in [0, 1] of one distractor: a straight line, an irregular blob or a scribble."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "line":
        (x1, y1), (x2, y2) = rng.uniform(-0.1, 1.1, (2, 2)) * size
        draw.line([(x1 * scale, y1 * scale), (x2 * scale, y2 * scale)], fill=255,
                  width=max(1, int(rng.uniform(0.6, 3.0) * scale)))
    elif kind == "blob":
        # An irregular polygon: radii jitter by up to 60%, so it reads as none of the shape classes.
        centre = rng.uniform(0, size, 2)
        radius = np.exp(rng.uniform(np.log(3), np.log(20)))
        n = int(rng.integers(7, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.4, 1.0, n)
        points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        draw.polygon([tuple(p) for p in points * scale], fill=255)
    else:  # scribble: a random walk of a few strokes
        point = rng.uniform(0, size, 2)
        points = [point]
        for _ in range(int(rng.integers(3, 8))):
            point = point + rng.normal(0, size / 10, 2)
            points.append(point)
        draw.line([tuple(p * scale) for p in points], fill=255, width=max(1, int(rng.uniform(0.6, 2.0) * scale)),
                  joint="curve")
    return _downsample(canvas, scale)


def _downsample(canvas: Image.Image, scale: int) -> np.ndarray:
    """Box-filter a supersampled 0/255 mask down by `scale`: coverage in [0, 1] (in steps of 1/255)."""
    return np.asarray(canvas.reduce(scale), dtype=np.float64) / 255


def _unit_polygons(rng: np.random.Generator, label: int) -> list[tuple[np.ndarray, int]]:
    """The shape of class `label` as polygons (V, 2) filling the box [-1, 1]^2, each with a fill (1 or 0: hole)."""
    name = CLASS_NAMES[label]
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)], 1)  # (64, 2)
    if name == "square":
        shape = [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 1)]
    elif name == "circle":
        shape = [(circle, 1)]
    elif name == "triangle":
        points = np.array([[0, -1], [1, 1], [-1, 1]], float)
        shape = [(points * [1, rng.choice((-1, 1))], 1)]  # pointing up or down
    elif name == "plus":
        t = rng.uniform(0.28, 0.4)  # half-width of an arm
        shape = [(np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t],
                            [-1, -t], [-t, -t]]), 1)]
    elif name == "ring":
        shape = [(circle, 1), (circle * rng.uniform(0.45, 0.62), 0)]
    elif name == "star":  # five points
        inner = rng.uniform(0.38, 0.5)
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        shape = [(_fill_box(np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]), 1)]
    elif name == "hexagon":
        angles = np.arange(6) * np.pi / 3
        shape = [(_fill_box(np.stack([np.cos(angles), np.sin(angles)], 1)), 1)]
    elif name == "diamond":
        shape = [(np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float), 1)]
    elif name == "cross":  # the plus turned by 45 degrees: an X
        t = rng.uniform(0.22, 0.32)
        plus = np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t],
                         [-1, -t], [-t, -t]])
        shape = [(_fill_box(plus @ (np.array([[1, -1], [1, 1]]) / np.sqrt(2)).T), 1)]
    elif name == "arrow":  # a shaft and a head, pointing in one of four directions
        s, h = rng.uniform(0.18, 0.3), rng.uniform(-0.1, 0.3)
        points = np.array([[-1, -s], [h, -s], [h, -1], [1, 0], [h, 1], [h, s], [-1, s]])
        shape = [(points @ _quarter_turn(int(rng.integers(4))).T, 1)]
    elif name == "semicircle":  # a half disc, its flat side in one of four directions
        half = np.linspace(0, np.pi, 33)
        points = _fill_box(np.stack([np.cos(half), np.sin(half)], 1))
        shape = [(points @ _quarter_turn(int(rng.integers(4))).T, 1)]
    else:  # frame: a square with a square hole, the ring's counterpart
        inner = rng.uniform(0.45, 0.65)
        square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
        shape = [(square, 1), (square * inner, 0)]
    return shape


def _fill_box(points: np.ndarray) -> np.ndarray:
    """Stretch points (V, 2) to fill [-1, 1]^2 exactly."""
    low, high = points.min(0), points.max(0)
    return 2 * (points - low) / (high - low) - 1


def _quarter_turn(k: int) -> np.ndarray:
    """The 2 x 2 rotation by k * 90 degrees (exact)."""
    return np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), k)


def _place_object(rng: np.random.Generator, label: int, obj_size: float, spec: BuiltinSpec, boxes: list):
    """Polygons in image pixels and the enclosing box (x1, y1, x2, y2), or None if no free place was found."""
    aspect = np.exp(rng.uniform(-np.log(spec.max_aspect), np.log(spec.max_aspect)))
    half = 0.5 * obj_size * np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)])
    theta = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    polygons = [((points * half) @ rotation.T, fill) for points, fill in _unit_polygons(rng, label)]
    outline = polygons[0][0]  # the first polygon is the outer boundary
    low, high = outline.min(0), outline.max(0)
    extent = high - low
    if extent.max() > spec.image_size:  # too big once rotated: shrink to fit
        factor = spec.image_size / extent.max()
        polygons = [(points * factor, fill) for points, fill in polygons]
        low, high, extent = low * factor, high * factor, extent * factor
    for _ in range(10):
        corner = rng.uniform(0, spec.image_size - extent)  # the box stays inside the image
        box = (corner[0], corner[1], corner[0] + extent[0], corner[1] + extent[1])
        if all(_iou(box, other) <= spec.max_overlap for other in boxes):
            shift = corner - low
            return tuple(float(v) for v in box), [(points + shift, fill) for points, fill in polygons]
    return None


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _rasterise(polygons, box, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Coverage (h, w) in [0, 1] of the polygons over the pixels of `box`, and the window's (x0, y0)."""
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = min(size, int(np.ceil(box[2]))), min(size, int(np.ceil(box[3])))
    scale = _SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * scale, (y1 - y0) * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in polygons:
        # Pixel (i, j) of the supersampled canvas covers [i, i+1) / scale: its centre is at (i + 0.5) / scale.
        draw.polygon([tuple(p) for p in (points - [x0, y0]) * scale - 0.5], fill=255 * fill)
    return _downsample(canvas, scale), (x0, y0)


def _paint_object(rng, image, alpha, offset, box, spec: BuiltinSpec) -> np.ndarray:
    """Composite one object: a random colour far enough from its background, a gradient and a texture."""
    x0, y0 = offset
    h, w = alpha.shape
    window = image[y0:y0 + h, x0:x0 + w]
    background = (window * alpha[..., None]).sum((0, 1)) / max(alpha.sum(), 1e-6)
    colour = rng.uniform(0, 1, 3)
    for _ in range(20):
        if np.linalg.norm(colour - background) >= spec.min_contrast:
            break
        colour = rng.uniform(0, 1, 3)
    shade = rng.uniform(-0.15, 0.15, 3)  # the colour drifts by this across the object
    fill = colour + shade * (_gradient(rng, h, w)[..., None] - 0.5)
    fill = fill + spec.texture * 0.6 * _smooth_noise(rng, h, w, cells=int(rng.integers(2, 6)))
    fill = np.clip(fill, 0, 1)
    image = image.copy()
    image[y0:y0 + h, x0:x0 + w] = window * (1 - alpha[..., None]) + fill * alpha[..., None]
    return image


# --------------------------------------------------------------------------------------------------------
# Statistics and the command line
# --------------------------------------------------------------------------------------------------------


def dataset_stats(json_path: str | Path) -> dict:
    """Class counts, a histogram of object sizes (sqrt of box area) by octave, objects per image."""
    coco = json.loads(Path(json_path).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    counts = {name: 0 for name in names.values()}
    per_image = {image["id"]: 0 for image in coco["images"]}
    octaves = {"<8": 0, "8-16": 0, "16-32": 0, "32-64": 0, "64-128": 0, ">=128": 0}
    for ann in coco["annotations"]:
        counts[names[ann["category_id"]]] += 1
        per_image[ann["image_id"]] += 1
        side = float(np.sqrt(ann["bbox"][2] * ann["bbox"][3]))
        key = ("<8" if side < 8 else "8-16" if side < 16 else "16-32" if side < 32 else "32-64" if side < 64
               else "64-128" if side < 128 else ">=128")
        octaves[key] += 1
    objects = np.array(list(per_image.values()))
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]), "class_counts": counts,
            "size_octaves": octaves, "empty_images": int((objects == 0).sum()),
            "objects_per_image": {"mean": float(objects.mean()), "max": int(objects.max())}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the built-in dataset (if needed) and print statistics.")
    parser.add_argument("--out", default=None, help=f"cache folder (default {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=BuiltinSpec.seed)
    parser.add_argument("--num-train", type=int, default=BuiltinSpec.num_train)
    parser.add_argument("--num-val", type=int, default=BuiltinSpec.num_val)
    parser.add_argument("--image-size", type=int, default=BuiltinSpec.image_size)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    spec = BuiltinSpec(seed=args.seed, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size)
    start = time.perf_counter()
    paths = ensure_builtin(args.out, spec=spec, num_workers=args.workers)
    print(f"root: {paths.root}  ({time.perf_counter() - start:.1f} s)")
    for split, json_path in (("train", paths.train_json), ("val", paths.val_json)):
        print(f"{split}: {json.dumps(dataset_stats(json_path))}")


if __name__ == "__main__":
    main()
