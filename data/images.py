"""Image files: decoded to 8-bit RGB whatever their mode, and checked by their headers before a run.

    pixels = read_rgb(path, size=(h, w))        # uint8 (H, W, 3), the orientation the annotations use
    problems = check_files(paths, sizes)        # [FileProblem]: missing, undecodable or mis-sized files

Modes (Pillow's names; every mode a COCO-format dataset's PNG, JPEG or TIFF files hold):

  1, L, P, RGB, CMYK, YCbCr   Pillow's own conversion to RGB (palettes looked up, CMYK to RGB)
  LA, PA, RGBA                the colour channels as stored, the alpha channel dropped (as detectron2's
                              `convert("RGB")` and OpenCV's IMREAD_COLOR do), not composited on a background
  I;16, I;16B, I;16L          16-bit grey, scaled 0..65535 -> 0..255 (v / 257, rounded), never clipped
  I                           32-bit integers: as 16-bit when every value fits 0..65535 (Pillow opens some
                              16-bit files this way), else the image's own min..max stretched to 0..255
  F                           32-bit floats: 0..1 -> 0..255 when every finite value fits, else the image's
                              own finite min..max stretched to 0..255; NaN and infinities read 0

EXIF orientation: applied, as detectron2's `read_image` and mmcv's `imread` (OpenCV's default) apply it, so
that the pixels are the upright picture a viewer shows. COCO's own annotations, and those of tools that do
not apply the tag, are made on the stored pixels; a quarter-turn tag (5-8) swaps width and height, so the
annotation file's width and height decide: when the stored size matches them and the turned size does not,
the stored pixels are used. Mirror and half-turn tags (2-4) keep the size and are always applied.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 1..8
QUARTER_TURNS = (5, 6, 7, 8)  # orientations that swap width and height
# What decoding a broken or unsupported file raises (Pillow raises SyntaxError for some truncated headers).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)
_CHUNK = 256  # files per task of check_files' thread pool: few tasks, yet every thread busy


class FileProblem(NamedTuple):
    """One file that `check_files` found wrong."""

    index: int  # position in the list given to check_files
    kind: str  # "missing" (no such file) or "unreadable" (no image header, or a size unlike the expected one)
    reason: str


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


def read_rgb(path: str | Path, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3) RGB, in the orientation of the module docstring.

    size: (h, w) the annotations expect; a file of neither that size nor (for a quarter-turn tag) its stored
    size raises ValueError. Raises FileNotFoundError for a missing file and one of DECODE_ERRORS for a file
    that cannot be decoded.
    """
    with Image.open(path) as image:
        image.load()
        image = orient(image, size=size)
        pixels = to_rgb8(image)
    if size is not None and pixels.shape[:2] != tuple(size):
        raise ValueError(f"size {pixels.shape[1]}x{pixels.shape[0]} differs from the annotation file's "
                         f"{size[1]}x{size[0]}")
    return pixels


def orient(image: Image.Image, *, size: tuple[int, int] | None = None) -> Image.Image:
    """The image turned and mirrored as its EXIF orientation says, unless `size` (h, w) shows that the
    annotations use the stored pixels (module docstring)."""
    orientation = exif_orientation(image)
    if orientation in (None, 1):
        return image
    stored = (image.height, image.width)
    if size is not None and orientation in QUARTER_TURNS and tuple(size) == stored:
        return image
    return ImageOps.exif_transpose(image)


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1..8) of an opened image, None without one (or with an unreadable one)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION)
    except DECODE_ERRORS:
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def to_rgb8(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a Pillow image of any mode (the table of the module docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.repeat(_grey_to_uint8(np.asarray(image), mode)[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return np.asarray(image.convert("RGB"))  # alpha, if any, dropped


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) grey values of a high-bit-depth mode -> uint8 (H, W), scaled (never clipped)."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    values = np.where(finite, values, low)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0  # 65535 -> 255
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:  # no nominal range: the image's own
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.where(finite, np.rint(scaled), 0).astype(np.uint8)  # NaN, inf: 0


# --------------------------------------------------------------------------------------------------------
# Checking many files before a run
# --------------------------------------------------------------------------------------------------------


def check_file(path: str | Path, size: tuple[int, int] | None = None) -> FileProblem | None:
    """Existence and header of one file (index 0 in the answer); None when it looks readable.

    Reads the header only (Pillow's `open` parses it and decodes no pixel): format, size and EXIF
    orientation; a size unlike `size` (h, w) under the orientation rule of the module docstring is a problem.
    """
    try:
        with Image.open(path) as image:
            stored = (image.height, image.width)
            turned = (stored[1], stored[0]) if exif_orientation(image) in QUARTER_TURNS else stored
    except FileNotFoundError:
        return FileProblem(0, "missing", "no such file")
    except IsADirectoryError:
        return FileProblem(0, "missing", "a folder, not a file")
    except DECODE_ERRORS as error:
        return FileProblem(0, "unreadable", f"not an image Pillow can read: {error}")
    if size is not None and tuple(size) not in (stored, turned):
        return FileProblem(0, "unreadable", f"size {stored[1]}x{stored[0]} differs from the annotation file's "
                                            f"{size[1]}x{size[0]}")
    return None


def check_files(paths: Sequence[str | Path], sizes: Sequence[tuple[int, int] | None] | None = None, *,
                workers: int = 16) -> list[FileProblem]:
    """`check_file` over many files: [FileProblem] in the order of `paths`, empty when all look readable.

    sizes: (h, w) per path, or None. workers: threads reading headers at once. A header read is a few
    system calls and a little parsing, so threads pay off where a file system answers slowly (network
    storage, a cold cache); bench/check_images.py measures it.
    """
    sizes = list(sizes) if sizes is not None else [None] * len(paths)
    if len(sizes) != len(paths):
        raise ValueError(f"check_files: {len(paths)} paths but {len(sizes)} sizes")
    pairs = list(zip(paths, sizes))
    chunks = [range(start, min(start + _CHUNK, len(pairs))) for start in range(0, len(pairs), _CHUNK)]

    def check_chunk(indices: range) -> list[FileProblem]:
        return [problem._replace(index=i) for i in indices if (problem := check_file(*pairs[i])) is not None]

    if workers <= 1 or len(chunks) <= 1:
        return [problem for chunk in chunks for problem in check_chunk(chunk)]
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return [problem for answer in pool.map(check_chunk, chunks) for problem in answer]
