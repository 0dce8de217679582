"""Transforms: boxes follow the recorded matrices exactly, images follow the same matrices, views are reproducible."""

import math

import pytest
import torch

from data.transforms import (ColorJitter, Compose, GaussianBlur, RandomAffine, RandomErasing, RandomGrayscale,
                             RandomHorizontalFlip, RandomResize, Resize, TwoViewTransform, build_eval_transform,
                             build_labeled_transform, clip_boxes, hflip_matrix, resized_shape, rotation_matrix,
                             scale_matrix, shear_matrix, translation_matrix, warp_boxes, warp_image)


def _sample(height=60, width=80, boxes=((10.0, 20.0, 30.0, 50.0),), labels=None):
    """A black image with a white filled rectangle per box (so pixels and boxes can be compared)."""
    image = torch.zeros(3, height, width)
    for x1, y1, x2, y2 in boxes:
        image[:, int(y1):int(y2), int(x1):int(x2)] = 1.0
    n = len(boxes)
    return {"image": image, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.arange(n) if labels is None else torch.tensor(labels),
            "crowd": torch.zeros(0, 4), "matrix": torch.eye(3, dtype=torch.float64), "image_id": 1,
            "orig_size": (height, width)}


def _pixel_box(image: torch.Tensor, threshold=0.5) -> list[float]:
    """Enclosing box [x1, y1, x2, y2] of the pixels brighter than threshold (in pixel-edge coordinates)."""
    rows, cols = torch.nonzero(image[0] > threshold, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# ---- warp_boxes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flip_and_scale_are_exact_and_invertible(dtype):
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0], [0.0, 0.0, 100.0, 60.0]], dtype=dtype)
    flipped = warp_boxes(boxes, hflip_matrix(100))
    assert flipped.dtype == dtype and flipped.shape == (2, 4)
    assert flipped.tolist() == [[70.0, 20.0, 90.0, 50.0], [0.0, 0.0, 100.0, 60.0]]
    assert torch.equal(warp_boxes(flipped, torch.linalg.inv(hflip_matrix(100))), boxes)

    scale = scale_matrix(1.5, 0.5)
    scaled = warp_boxes(boxes, scale)
    assert scaled.tolist() == [[15.0, 10.0, 45.0, 25.0], [0.0, 0.0, 150.0, 30.0]]
    torch.testing.assert_close(warp_boxes(scaled, torch.linalg.inv(scale)), boxes, rtol=0, atol=1e-12)

    both = scale @ hflip_matrix(100)  # flip first, then scale
    torch.testing.assert_close(warp_boxes(boxes, both), warp_boxes(flipped, scale))


def test_rotation_maps_corners():
    box = torch.tensor([[10.0, 20.0, 30.0, 50.0]], dtype=torch.float64)
    quarter = rotation_matrix(90, (50, 50))  # (x, y) -> (100 - y, x) about (50, 50)
    assert warp_boxes(box, quarter)[0].tolist() == pytest.approx([50.0, 10.0, 80.0, 30.0], abs=1e-9)

    rotation = rotation_matrix(30, (40, 30))
    rotated = warp_boxes(box, rotation)
    corners = torch.tensor([[10, 20, 1], [30, 20, 1], [30, 50, 1], [10, 50, 1]], dtype=torch.float64) @ rotation.T
    expected = torch.cat([corners[:, :2].min(0).values, corners[:, :2].max(0).values])
    torch.testing.assert_close(rotated[0], expected)
    # Back through the inverse: the enclosing box of the enclosing box contains the original corners.
    back = warp_boxes(rotated, torch.linalg.inv(rotation))[0]
    assert back[0] <= 10 and back[1] <= 20 and back[2] >= 30 and back[3] >= 50
    # ...and the original corners map to the rotated box's boundary: every side touches a corner.
    assert torch.isclose(corners[:, 0].min(), rotated[0, 0]) and torch.isclose(corners[:, 1].max(), rotated[0, 3])


def test_warp_boxes_empty_and_clip():
    assert warp_boxes(torch.zeros(0, 4), rotation_matrix(10, (0, 0))).shape == (0, 4)
    boxes = torch.tensor([[-5.0, 2.0, 50.0, 70.0]])
    assert clip_boxes(boxes, (60, 40)).tolist() == [[0.0, 2.0, 40.0, 60.0]]


def test_warp_image_agrees_with_warp_boxes():
    """The pixels of a white rectangle land where warp_boxes puts its box (within a pixel)."""
    sample = _sample(64, 64, boxes=((20.0, 16.0, 36.0, 40.0),))
    for matrix in (translation_matrix(7, -5), scale_matrix(0.5, 0.75), hflip_matrix(64),
                   rotation_matrix(25, (32, 32)), shear_matrix(20, 0, (32, 32))):
        warped = warp_image(sample["image"], matrix, (64, 64))
        expected = warp_boxes(sample["boxes"], matrix)[0].tolist()
        assert _pixel_box(warped) == pytest.approx(expected, abs=1.0), matrix


def test_warp_image_fill():
    image = torch.full((3, 8, 8), 0.5)
    out = warp_image(image, translation_matrix(4, 0), (8, 8), fill=0.25)
    assert torch.allclose(out[:, :, :4], torch.tensor(0.25)) and torch.allclose(out[:, :, 5:], torch.tensor(0.5))


# ---- geometric transforms --------------------------------------------------------------------------------


def test_resize_moves_boxes_exactly_and_records_the_matrix():
    assert resized_shape(60, 80, short_side=120, max_size=1000) == (120, 160)
    assert resized_shape(60, 80, short_side=120, max_size=100) == (75, 100)  # long side capped
    sample = _sample()
    out = Resize(90, 1000)(sample)
    assert out["image"].shape == (3, 90, 120)
    assert out["boxes"].tolist() == [[15.0, 30.0, 45.0, 75.0]]
    torch.testing.assert_close(out["matrix"], scale_matrix(1.5, 1.5))
    torch.testing.assert_close(warp_boxes(sample["boxes"], out["matrix"]), out["boxes"])
    assert _pixel_box(out["image"]) == pytest.approx(out["boxes"][0].tolist(), abs=1.0)
    assert sample["image"].shape == (3, 60, 80)  # the input sample is not modified


def test_random_resize_and_flip_compose_matrices():
    sample = _sample()
    transform = build_labeled_transform(short_sides=[30, 45, 90], max_size=1000, flip_p=1.0)
    out = transform(sample, _generator(0))
    h, w = out["image"].shape[-2:]
    scale = h / 60
    torch.testing.assert_close(out["matrix"], hflip_matrix(w) @ scale_matrix(w / 80, h / 60))
    assert out["boxes"][0].tolist() == pytest.approx([w - 30 * scale, 20 * scale, w - 10 * scale, 50 * scale])
    assert _pixel_box(out["image"]) == pytest.approx(out["boxes"][0].tolist(), abs=1.0)
    sizes = {RandomResize([30, 45, 90], 1000)(sample, _generator(s))["image"].shape[-2] for s in range(20)}
    assert sizes == {30, 45, 90}


def test_flip_probability():
    sample = _sample()
    assert RandomHorizontalFlip(0.0)(sample, _generator(0)) is sample
    flipped = RandomHorizontalFlip(1.0)(sample, _generator(0))
    assert torch.equal(flipped["image"], sample["image"].flip(-1))
    assert flipped["boxes"].tolist() == [[50.0, 20.0, 70.0, 50.0]]


def test_random_affine_boxes_follow_pixels_and_matrix():
    sample = _sample(64, 64, boxes=((20.0, 16.0, 36.0, 40.0),))
    affine = RandomAffine(translate=0.1, rotate_deg=30, shear_deg=30, min_size=0)
    ops = set()
    for seed in range(12):
        out = affine(sample, _generator(seed))
        matrix = out["matrix"]
        ops.add("translate" if torch.allclose(matrix[:2, :2], torch.eye(2, dtype=torch.float64)) else "other")
        torch.testing.assert_close(out["boxes"], clip_boxes(warp_boxes(sample["boxes"], matrix), (64, 64)))
        assert out["image"].shape == (3, 64, 64)
        assert _pixel_box(out["image"]) == pytest.approx(out["boxes"][0].tolist(), abs=1.0)
    assert ops == {"translate", "other"}


def test_random_affine_drops_small_boxes_and_keeps_labels_aligned():
    boxes = ((0.0, 10.0, 3.0, 20.0), (30.0, 30.0, 40.0, 40.0), (61.0, 50.0, 64.0, 60.0), (10.0, 50.0, 30.0, 62.0))
    sample = _sample(64, 64, boxes=boxes, labels=[5, 6, 7, 8])
    affine = RandomAffine(translate=0.2, rotate_deg=0.0, shear_deg=0.0, min_size=2.0)  # rotate / shear: identity
    dropped = 0
    for seed in range(30):
        out = affine(sample, _generator(seed))
        moved = clip_boxes(warp_boxes(sample["boxes"], out["matrix"]), (64, 64))
        for box, label in zip(out["boxes"], out["labels"].tolist()):
            torch.testing.assert_close(box, moved[label - 5])  # the label still belongs to its own box
        sizes = (out["boxes"][:, 2:] - out["boxes"][:, :2])
        assert (sizes >= 2.0).all()
        dropped += len(boxes) - len(out["boxes"])
    assert dropped > 0


def test_crowd_boxes_move_too():
    sample = _sample()
    sample["crowd"] = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = RandomHorizontalFlip(1.0)(sample, _generator(0))
    assert out["crowd"].tolist() == [[70.0, 0.0, 80.0, 10.0]]


# ---- photometric transforms ------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", [ColorJitter(p=1.0), RandomGrayscale(p=1.0), GaussianBlur(p=1.0),
                                       RandomErasing(p=1.0)])
def test_photometric_ops_keep_geometry(transform):
    sample = _sample()
    sample["image"] = torch.rand(sample["image"].shape, generator=_generator(1))
    out = transform(sample, _generator(0))
    assert out["image"].shape == sample["image"].shape and out["image"].dtype == torch.float32
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    assert not torch.equal(out["image"], sample["image"])
    assert out["boxes"] is sample["boxes"] and out["matrix"] is sample["matrix"]
    again = transform(sample, _generator(0))
    assert torch.equal(again["image"], out["image"])  # the generator alone decides


def test_grayscale_and_probability_zero():
    sample = _sample()
    sample["image"] = torch.rand(3, 60, 80, generator=_generator(2))
    gray = RandomGrayscale(p=1.0)(sample, _generator(0))["image"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    for transform in (ColorJitter(p=0.0), RandomGrayscale(p=0.0), GaussianBlur(p=0.0), RandomErasing(p=0.0)):
        assert transform(sample, _generator(0)) is sample


def test_erasing_patch_sizes():
    sample = _sample()
    sample["image"] = torch.full((3, 60, 80), 2.0)  # erased pixels are the ones now in [0, 1)
    erase = RandomErasing(p=1.0, num_patches=(1, 1), scale=(0.1, 0.1), ratio=(1.0, 1.0))
    erased = (erase(sample, _generator(3))["image"][0] < 1.5).sum().item()
    assert erased == round(math.sqrt(0.1 * 60 * 80)) ** 2


# ---- views -----------------------------------------------------------------------------------------------


def test_unaligned_views_relate_by_their_matrices():
    """M = T_strong @ inverse(T_weak) carries weak-view gt boxes onto strong-view gt boxes."""
    sample = _sample(64, 64, boxes=((20.0, 16.0, 36.0, 40.0), (8.0, 40.0, 20.0, 56.0)))
    views = TwoViewTransform(short_sides=[48, 64, 96], max_size=200, aligned=False,
                             affine=RandomAffine(min_size=0.0))
    rotated = 0
    for seed in range(10):
        out = views(sample, _generator(seed))
        weak, strong = out["weak"], out["strong"]
        M = strong["matrix"] @ torch.linalg.inv(weak["matrix"])
        carried = clip_boxes(warp_boxes(weak["boxes"], M), strong["image"].shape[-2:])
        assert len(carried) == len(strong["boxes"]) == 2
        torch.testing.assert_close(carried, strong["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(weak["labels"], strong["labels"])
        rotated += not torch.allclose(M[0, 1], torch.zeros((), dtype=torch.float64))
    assert rotated > 0  # some draws rotate or shear


def test_aligned_views_share_geometry():
    sample = _sample()
    sample["image"] = torch.rand(3, 60, 80, generator=_generator(5))
    views = TwoViewTransform(short_sides=[40, 60, 90], max_size=200, aligned=True)
    for seed in range(5):
        out = views(sample, _generator(seed))
        weak, strong = out["weak"], out["strong"]
        assert torch.equal(weak["matrix"], strong["matrix"])
        assert torch.equal(weak["boxes"], strong["boxes"]) and torch.equal(weak["labels"], strong["labels"])
        assert weak["image"].shape == strong["image"].shape
    assert not torch.equal(out["weak"]["image"], out["strong"]["image"])


def test_views_are_reproducible_from_the_generator():
    sample = _sample()
    views = TwoViewTransform(short_sides=[40, 60, 90], max_size=200, aligned=False)
    a, b, c = (views(sample, _generator(s)) for s in (7, 7, 8))
    for key in ("weak", "strong"):
        assert torch.equal(a[key]["image"], b[key]["image"]) and torch.equal(a[key]["matrix"], b[key]["matrix"])
    assert not torch.equal(a["strong"]["image"], c["strong"]["image"])


def test_eval_transform_is_deterministic():
    sample = _sample()
    transform = build_eval_transform(120, 1000)
    assert torch.equal(transform(sample)["image"], transform(sample, _generator(3))["image"])
    assert isinstance(Compose([transform]), Compose)
