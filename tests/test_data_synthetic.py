"""The built-in dataset: determinism, COCO validity, the properties the benchmark relies on, atomic caching."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import synthetic
from data.synthetic import CLASS_NAMES, BuiltinSpec, dataset_stats, ensure_builtin, generate_image

TINY = BuiltinSpec(num_train=12, num_val=4)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "DONE.json"}  # the marker records the generation time


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    serial = ensure_builtin(tmp_path / "a", spec=TINY, num_workers=0, verbose=False)
    parallel = ensure_builtin(tmp_path / "b", spec=TINY, num_workers=2, verbose=False)
    a, b = _tree_bytes(serial.root), _tree_bytes(parallel.root)
    # three JSON files (train, val, the extra unlabeled images) and the PNGs
    assert len(a) == 3 + TINY.num_train + TINY.num_val + TINY.num_unlabeled
    assert a == b


def test_different_seed_gives_different_data(tmp_path):
    a = ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    b = ensure_builtin(tmp_path, spec=BuiltinSpec(num_train=12, num_val=4, seed=1), num_workers=0, verbose=False)
    assert a.root != b.root
    assert a.train_json.read_bytes() != b.train_json.read_bytes()
    assert (a.train_images / "000000.png").read_bytes() != (b.train_images / "000000.png").read_bytes()


def test_files_are_valid_coco(tmp_path):
    paths = ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    for json_path, folder, count in ((paths.train_json, paths.train_images, TINY.num_train),
                                     (paths.val_json, paths.val_images, TINY.num_val)):
        coco = json.loads(json_path.read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
        assert len(coco["images"]) == count
        for image in coco["images"]:
            with Image.open(folder / image["file_name"]) as pil:
                assert pil.size == (image["width"], image["height"]) == (TINY.image_size, TINY.image_size)
                assert pil.mode == "RGB"
        ids = {image["id"] for image in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["image_id"] in ids and ann["iscrowd"] == 0 and ann["area"] > 0
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= TINY.image_size + 1e-6 and y + h <= TINY.image_size + 1e-6
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_default_spec_properties():
    """>= 12 classes, sizes spanning >= 6x with every octave populated, a long tail, empty images, and about as
    many objects per image as COCO (7.3)."""
    spec = BuiltinSpec()
    counts, sides, per_image = Counter(), [], []
    for index in range(200):
        _, objects = generate_image(spec, split="train", index=index)
        per_image.append(len(objects))
        for obj in objects:
            counts[obj["category_id"]] += 1
            sides.append(np.sqrt(obj["bbox"][2] * obj["bbox"][3]))
    sides = np.array(sides)
    assert len(counts) >= 12 and len(CLASS_NAMES) >= 12
    assert sides.max() / sides.min() >= 6
    for low in (8, 16, 32):
        assert ((sides >= low) & (sides < 2 * low)).sum() >= 0.08 * len(sides), f"octave {low}-{2 * low} is thin"
    assert counts[1] >= 0.6 * spec.tail_ratio * counts[len(CLASS_NAMES)]  # long tail (expected ratio: tail_ratio)
    assert 0 in per_image and max(per_image) <= spec.max_objects
    assert 5 <= np.mean(per_image) <= 9


def test_class_frequencies_follow_the_tail_ratio():
    spec = BuiltinSpec(tail_ratio=8.0)
    weights = spec.tail_ratio ** (-np.arange(len(CLASS_NAMES)) / (len(CLASS_NAMES) - 1))
    assert weights[0] / weights[-1] == pytest.approx(8.0)
    flat = BuiltinSpec(tail_ratio=1.0, empty_fraction=0.0)
    counts = Counter(o["category_id"] for i in range(100) for o in generate_image(flat, split="val", index=i)[1])
    assert max(counts.values()) < 2 * min(counts.values())


def test_knobs_change_the_data():
    empty = BuiltinSpec(empty_fraction=1.0)
    assert all(not generate_image(empty, split="train", index=i)[1] for i in range(5))
    crowded = BuiltinSpec(empty_fraction=0.0, max_objects=2, max_hidden=1.0, max_overlap=1.0)
    assert all(1 <= len(generate_image(crowded, split="train", index=i)[1]) <= 2 for i in range(20))
    small = BuiltinSpec(min_size=8, max_size=12, max_rotation_deg=0, max_aspect=1.0)
    sides = [np.sqrt(o["bbox"][2] * o["bbox"][3]) for i in range(10) for o in generate_image(small, split="train",
                                                                                              index=i)[1]]
    assert sides and 8 - 0.01 <= min(sides) and max(sides) <= 12 + 0.01
    quiet = BuiltinSpec(noise_std=0.0, clutter=0.0, texture=0.0, empty_fraction=1.0)
    pixels, _ = generate_image(quiet, split="train", index=0)
    noisy, _ = generate_image(BuiltinSpec(empty_fraction=1.0, noise_std=0.2), split="train", index=0)
    assert np.abs(np.diff(pixels.astype(float), axis=1)).mean() < np.abs(np.diff(noisy.astype(float), axis=1)).mean()


def test_box_encloses_the_rasterised_shape():
    """The annotated box is the full shape's box: the coverage mask fills it edge to edge (within a pixel)."""
    rng = np.random.default_rng(0)
    spec = BuiltinSpec(max_overlap=1.0)
    for label in range(len(CLASS_NAMES)):
        box, polygons = synthetic._place_object(rng, label, 40.0, spec, [])
        alpha, (x0, y0) = synthetic._rasterise(polygons, box, spec.image_size)
        rows, cols = np.nonzero(alpha > 0.5)
        assert abs(x0 + cols.min() - box[0]) <= 1 and abs(x0 + cols.max() + 1 - box[2]) <= 1, CLASS_NAMES[label]
        assert abs(y0 + rows.min() - box[1]) <= 1 and abs(y0 + rows.max() + 1 - box[3]) <= 1, CLASS_NAMES[label]


def test_square_area_matches_its_polygon():
    spec = BuiltinSpec(max_rotation_deg=0.0, max_aspect=1.0)
    box, polygons = synthetic._place_object(np.random.default_rng(3), 0, 20.0, spec, [])
    alpha, _ = synthetic._rasterise(polygons, box, spec.image_size)
    # Rasterised at 4x: each edge is exact to a quarter pixel.
    edge = 1 / synthetic._SUPERSAMPLE
    assert (20 - edge) ** 2 - 1 <= alpha.sum() <= (20 + edge) ** 2 + 1  # +-1: coverage is stored in 1/255 steps
    assert box[2] - box[0] == pytest.approx(20.0) and box[3] - box[1] == pytest.approx(20.0)


def test_cache_is_reused_and_a_half_written_folder_is_regenerated(tmp_path):
    paths = ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    stamp = paths.train_json.stat().st_mtime_ns
    assert ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False) == paths
    assert paths.train_json.stat().st_mtime_ns == stamp  # reused, not rewritten

    (paths.root / "DONE.json").unlink()  # as if generation had died before the marker
    (paths.train_images / "000003.png").unlink()
    ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    assert (paths.train_images / "000003.png").is_file() and (paths.root / "DONE.json").is_file()

    marker = json.loads((paths.root / "DONE.json").read_text())
    marker["generator_version"] = -1  # an older generator wrote this folder
    (paths.root / "DONE.json").write_text(json.dumps(marker))
    ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    assert json.loads((paths.root / "DONE.json").read_text())["generator_version"] == synthetic.GENERATOR_VERSION


def test_killed_generation_leaves_nothing_that_passes_for_a_dataset(tmp_path, monkeypatch):
    def die(out, spec, *, num_workers):
        (out / "train").mkdir(parents=True)
        (out / "train.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_generate", die)
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    assert list(tmp_path.iterdir()) == []  # no final folder, no temporary left behind


def test_spec_validation_and_cache_dir_default(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="min_size"):
        ensure_builtin(tmp_path, spec=BuiltinSpec(min_size=50, max_size=10))
    monkeypatch.setenv("SSOD_CACHE", str(tmp_path))
    assert synthetic.default_cache_dir() == tmp_path / "builtin"


def test_stats(tmp_path):
    paths = ensure_builtin(tmp_path, spec=TINY, num_workers=0, verbose=False)
    stats = dataset_stats(paths.train_json)
    assert stats["images"] == TINY.num_train
    assert sum(stats["class_counts"].values()) == stats["annotations"] == sum(stats["size_octaves"].values())


def test_extra_unlabeled_images_share_the_train_folder_with_ids_of_their_own(tmp_path):
    spec = BuiltinSpec(num_train=5, num_val=2, unlabeled_per_train=2.0)
    paths = ensure_builtin(tmp_path, spec=spec, num_workers=0, verbose=False)
    assert spec.num_unlabeled == 10 and paths.unlabeled_json is not None
    train, extra = json.loads(paths.train_json.read_text()), json.loads(paths.unlabeled_json.read_text())
    assert [im["id"] for im in train["images"]] == [1, 2, 3, 4, 5]
    assert [im["id"] for im in extra["images"]] == list(range(6, 16))
    assert all((paths.train_images / im["file_name"]).is_file() for im in extra["images"])
    assert extra["categories"] == train["categories"]
    # The extra images are drawn from their own stream: none repeats a training image.
    first_train = (paths.train_images / train["images"][0]["file_name"]).read_bytes()
    assert all((paths.train_images / im["file_name"]).read_bytes() != first_train for im in extra["images"])
    none = ensure_builtin(tmp_path, spec=BuiltinSpec(num_train=5, num_val=2, unlabeled_per_train=0.0),
                          num_workers=0, verbose=False)
    assert none.unlabeled_json is None


def test_six_classes_reproduce_the_first_six_shapes():
    """num_classes picks a prefix of CLASS_NAMES: a 6-class spec never draws the newer shapes."""
    spec = BuiltinSpec(num_classes=6)
    labels = {obj["category_id"] for i in range(40) for obj in generate_image(spec, split="train", index=i)[1]}
    assert labels <= set(range(1, 7)) and len(labels) == 6
