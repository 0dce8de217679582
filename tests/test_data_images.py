"""Image files to 8-bit RGB in every mode, EXIF orientation, and the header check before a run."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from data.coco import CocoDetection
from data.images import check_files, read_rgb, to_rgb8

H, W = 4, 6
GREY = np.array([[0, 40, 80, 120, 160, 255]] * H, np.uint8)  # (H, W)
RGB = np.stack([GREY, 255 - GREY, np.full_like(GREY, 77)], axis=-1)  # (H, W, 3)
ALPHA = np.full((H, W), 9, np.uint8)  # nearly transparent: the stored colours must still come back


def _palette_image(mode: str) -> Image.Image:
    palette = [0, 0, 0, 200, 10, 20, 30, 220, 40] + [0] * (3 * 253)
    indices = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    image = Image.fromarray(indices, "L").convert("P")
    image.putpalette(palette)
    if mode == "PA":
        image = image.convert("PA")
        image.putalpha(Image.fromarray(ALPHA))
    return image


def _palette_expected() -> np.ndarray:
    colours = np.array([[0, 0, 0], [200, 10, 20], [30, 220, 40]], np.uint8)
    return colours[np.arange(H * W).reshape(H, W) % 3]


SIXTEEN = np.array([[0, 257, 32896, 65535, 1000, 60000]] * H, np.uint16)  # 16-bit grey


# mode -> (file suffix, image builder, expected uint8 (H, W, 3))
CASES = {
    "1": ("png", lambda: Image.fromarray(GREY > 100).convert("1"),
          lambda: np.repeat(np.where(GREY > 100, 255, 0).astype(np.uint8)[..., None], 3, 2)),
    "L": ("png", lambda: Image.fromarray(GREY), lambda: np.repeat(GREY[..., None], 3, 2)),
    "LA": ("png", lambda: Image.fromarray(np.stack([GREY, ALPHA], -1), "LA"), lambda: np.repeat(GREY[..., None], 3, 2)),
    "P": ("png", lambda: _palette_image("P"), _palette_expected),
    "PA": ("tiff", lambda: _palette_image("PA"), _palette_expected),
    "RGB": ("png", lambda: Image.fromarray(RGB), lambda: RGB),
    "RGBA": ("png", lambda: Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), "RGBA"), lambda: RGB),
    # CMYK (255, 0, 0, 0) is cyan; (0, 0, 0, 255) black; all zero white.
    "CMYK": ("tiff", lambda: Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]] * 2] * H,
                                                      np.uint8), "CMYK"),
             lambda: np.array([[[0, 255, 255], [0, 0, 0], [255, 255, 255]] * 2] * H, np.uint8)),
    # 16 bits: v / 257, rounded; 65535 -> 255, never clipped (the all-white image of a plain convert("RGB")).
    "I;16": ("png", lambda: Image.fromarray(SIXTEEN),
             lambda: np.repeat(np.array([[0, 1, 128, 255, 4, 233]] * H, np.uint8)[..., None], 3, 2)),
    # 32-bit integers within 0..65535 read as 16-bit; beyond it the image's own range.
    "I": ("tiff", lambda: Image.fromarray(SIXTEEN.astype(np.int32)),
          lambda: np.repeat(np.array([[0, 1, 128, 255, 4, 233]] * H, np.uint8)[..., None], 3, 2)),
    "F": ("tiff", lambda: Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0, np.nan, 0.1]] * H, np.float32)),
          lambda: np.repeat(np.array([[0, 64, 128, 255, 0, 26]] * H, np.uint8)[..., None], 3, 2)),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_every_mode_loads_to_correct_8_bit_rgb(tmp_path, mode):
    suffix, build, expected = CASES[mode]
    image = build()
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds this mode
    pixels = read_rgb(path, size=(H, W))
    assert pixels.dtype == np.uint8 and pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(pixels, expected())

    # The dataset's samples carry the same pixels, as floats in [0, 1].
    coco = {"images": [{"id": 1, "file_name": path.name, "width": W, "height": H}], "annotations": [],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    sample = CocoDetection(tmp_path / "instances.json", tmp_path)[0]
    np.testing.assert_array_equal((sample["image"] * 255).round().byte().permute(1, 2, 0).numpy(), expected())


def test_integers_beyond_16_bits_and_floats_beyond_0_1_take_the_images_own_range():
    wide = Image.fromarray(np.array([[-1000, 0, 99000]], np.int32))
    np.testing.assert_array_equal(to_rgb8(wide)[..., 0], [[0, 3, 255]])  # 1000 / 100000 * 255 = 2.55
    floats = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.inf]], np.float32))
    np.testing.assert_array_equal(to_rgb8(floats)[..., 0], [[0, 128, 255, 0]])
    flat = Image.fromarray(np.full((2, 2), 70000, np.int32))
    np.testing.assert_array_equal(to_rgb8(flat), np.zeros((2, 2, 3), np.uint8))


def _oriented_file(path, orientation: int):
    """A 6 x 4 (w x h) PNG, red in its stored top-left pixel, tagged with an EXIF orientation."""
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_unless_the_annotations_use_the_stored_pixels(tmp_path):
    path = tmp_path / "photo.png"
    _oriented_file(path, 6)  # "turn 90 degrees clockwise to view": the upright picture is 4 wide, 6 high
    upright = read_rgb(path, size=(6, 4))
    assert upright.shape == (6, 4, 3) and tuple(upright[0, 3]) == (255, 0, 0)  # top-left -> top-right
    stored = read_rgb(path, size=(4, 6))  # the annotation file gives the stored size: stored pixels
    assert stored.shape == (4, 6, 3) and tuple(stored[0, 0]) == (255, 0, 0)
    assert read_rgb(path).shape == (6, 4, 3)  # no size to go by: the convention (applied)
    with pytest.raises(ValueError, match="size 4x6 differs from the annotation file's 5x5"):
        read_rgb(path, size=(5, 5))

    _oriented_file(path, 3)  # a half turn keeps the size: always applied
    half = read_rgb(path, size=(4, 6))
    assert tuple(half[3, 5]) == (255, 0, 0) and tuple(half[0, 0]) == (0, 0, 0)
    assert check_files([path, path], [(4, 6), (6, 4)]) == [check_files([path], [(6, 4)])[0]._replace(index=1)]


def test_check_files_reports_missing_unreadable_and_mis_sized_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(RGB).save(good)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "folder.png").mkdir()
    paths = [good, tmp_path / "absent.png", tmp_path / "bad.png", good, tmp_path / "folder.png"]
    sizes = [(H, W), (H, W), (H, W), (W, H), (H, W)]
    problems = check_files(paths, sizes, workers=1)
    assert [(p.index, p.kind) for p in problems] == [(1, "missing"), (2, "unreadable"), (3, "unreadable"),
                                                      (4, "missing")]
    assert problems[2].reason == f"size {W}x{H} differs from the annotation file's {H}x{W}"
    # Many files over threads: the same answers in the same order.
    many, many_sizes = paths * 200, sizes * 200
    assert check_files(many, many_sizes, workers=8) == check_files(many, many_sizes, workers=1)


def test_high_bit_depth_png_through_the_dataset_is_not_white(tmp_path):
    """16-bit PNGs (medical, depth, some cameras) came out all white (255) before."""
    Image.fromarray((np.arange(W * H, dtype=np.uint16).reshape(H, W) * 2000)).save(tmp_path / "deep.png")
    coco = {"images": [{"id": 3, "file_name": "deep.png", "width": W, "height": H}], "annotations": [],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "i.json").write_text(json.dumps(coco))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        image = CocoDetection(tmp_path / "i.json", tmp_path)[0]["image"]
    assert image.min() == 0 and image.max() == pytest.approx(round(46000 / 257) / 255)  # 46000 of 65535
