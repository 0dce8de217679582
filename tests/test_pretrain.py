"""The generated glyph set and the backbone pretraining on it (data/glyphs.py, engine/pretrain.py)."""

import numpy as np
import pytest
import torch

from data.glyphs import GlyphSpec, glyph_batch, glyph_image, glyph_strokes
from detectors.backbone import build_resnet_fpn
from engine.pretrain import PretrainSpec, ensure_pretrained_backbone, one_cycle, weights_path

TINY = PretrainSpec(glyphs=GlyphSpec(num_classes=4, image_size=32), num_images=64, num_val=16, steps=3, batch_size=8)


def test_glyph_images_are_a_pure_function_of_spec_and_index():
    spec = GlyphSpec(image_size=32)
    a, label_a = glyph_image(spec, 5)
    b, label_b = glyph_image(spec, 5)
    c, _ = glyph_image(spec, 6)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and label_a == label_b
    assert not np.array_equal(a, c)


def test_glyph_classes_are_fixed_and_distinct():
    spec = GlyphSpec()
    first = glyph_strokes(spec, 3)
    assert all(np.array_equal(x, y) for x, y in zip(first, glyph_strokes(spec, 3)))
    other = glyph_strokes(spec, 4)
    assert len(first) != len(other) or not all(np.array_equal(x, y) for x, y in zip(first, other))
    assert all(np.abs(points).max() <= 1.1 + 1e-9 for points in first)  # about the unit box


def test_glyph_batch_labels_cover_the_classes_and_empty_batches_work():
    spec = GlyphSpec(num_classes=5, image_size=32)
    images, labels = glyph_batch(spec, range(200))
    assert images.shape == (200, 32, 32, 3) and labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(5))
    images, labels = glyph_batch(spec, [])
    assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)


def test_one_cycle_rises_then_falls_to_zero():
    values = [one_cycle(step, 100, 0.1) for step in range(100)]
    assert values[0] == pytest.approx(0.1 / 20)
    assert max(values) == pytest.approx(0.1) and values.index(max(values)) == 19
    assert values[-1] < 1e-3 and all(a >= b for a, b in zip(values[19:], values[20:]))


def test_pretrained_weights_are_cached_and_load_into_the_detector_backbone(tmp_path):
    path = ensure_pretrained_backbone(TINY, tmp_path, threads=1, workers=0, verbose=False)
    assert path == weights_path(TINY, tmp_path) and path.is_file()
    assert path.with_suffix(".json").is_file()
    state = torch.load(path, weights_only=True)
    assert not any(key.startswith("fc.") for key in state)
    modified = path.stat().st_mtime_ns
    assert ensure_pretrained_backbone(TINY, tmp_path, verbose=False) == path  # reused, not trained again
    assert path.stat().st_mtime_ns == modified
    # Another spec is another file.
    assert weights_path(PretrainSpec(steps=4), tmp_path) != path
    # The file loads as an ImageNet checkpoint would: frozen BatchNorm, the stem frozen, the weights copied.
    body = build_resnet_fpn("resnet18", out_channels=16, weights=str(path))
    assert torch.equal(body.body.conv1.weight, state["conv1.weight"])
    assert not body.body.conv1.weight.requires_grad and body.body.layer4[0].conv1.weight.requires_grad
