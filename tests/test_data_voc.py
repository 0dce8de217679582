"""Pascal VOC (data/voc.py, --dataset voc): conversion rules, bad input, the cache, COCO-20cls, the presets,
and a few training iterations end to end, all on small VOC-format fixtures written here."""

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

import train
from data.coco import CocoDetection
from data.voc import COCO_ID_OFFSET, VOC_CLASSES, coco20_json, find_devkit, main, voc_json
from engine.config import parse_config, resolve_config, voc_files

def _xml(name, width, height, objects, *, size=True):
    """VOC annotation XML; objects: (class, xmin, ymin, xmax, ymax[, difficult[, truncated]])."""
    parts = [f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for obj in objects:
        cls, xmin, ymin, xmax, ymax, *flags = obj
        difficult, truncated = (list(flags) + [0, 0])[:2]
        parts.append(f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>{truncated}</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_year(devkit, year, sets, images, *, seed=0):
    """VOC<year> under devkit: sets {set: [names]}, images {name: (width, height, objects)}; a JPEG with one
    coloured rectangle per object (so that a detector has something to see)."""
    rng = np.random.default_rng(seed)
    folder = devkit / f"VOC{year}"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_set, names in sets.items():
        (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{n}\n" for n in names))
    for name, (width, height, objects) in images.items():
        (folder / "Annotations" / f"{name}.xml").write_text(_xml(name, width, height, objects))
        pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        for cls, xmin, ymin, xmax, ymax, *_ in objects:
            if cls in VOC_CLASSES:
                pixels[max(ymin - 1, 0):ymax, max(xmin - 1, 0):xmax] = 40 + 10 * VOC_CLASSES.index(cls)
        Image.fromarray(pixels).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)


@pytest.fixture
def devkit(tmp_path):
    root = tmp_path / "data" / "VOCdevkit"
    write_year(root, "2007", {"trainval": ["000005", "000007", "000009"], "test": ["000001", "000002"]}, {
        # odd sizes; a difficult and a truncated object; a box reaching past the border (clipped)
        "000005": (37, 23, [("chair", 1, 1, 37, 23), ("person", 5, 6, 20, 15, 1), ("dog", 10, 3, 30, 40, 0, 1)]),
        "000007": (51, 33, [("tvmonitor", 2, 2, 10, 10), ("unicorn", 1, 1, 5, 5), ("cat", 60, 40, 70, 50)]),
        "000009": (40, 40, [("aeroplane", 3, 4, 3, 4)]),  # a one-pixel box: 1 x 1 after the rule
        "000001": (32, 32, [("bus", 4, 4, 28, 28), ("car", 1, 1, 8, 8, 1)]),
        "000002": (32, 32, [("bird", 10, 10, 20, 20)]),
    })
    write_year(root, "2012", {"trainval": ["2008_000008", "2007_000027"]}, {
        "2008_000008": (48, 32, [("horse", 5, 5, 40, 30)]),
        "2007_000027": (32, 48, [("person", 2, 2, 30, 40)]),
    }, seed=1)
    return root


def _coco(path):
    return json.loads(path.read_text())


def test_conversion_rules(devkit, tmp_path):
    path = voc_json(devkit.parent, "2007", "trainval", cache_dir=tmp_path / "cache")  # the folder above works
    coco = _coco(path)
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    images = {im["id"]: im for im in coco["images"]}
    assert set(images) == {5, 7, 9}
    assert (images[5]["width"], images[5]["height"]) == (37, 23)  # odd sizes from the JPEG
    assert images[5]["file_name"] == "VOC2007/JPEGImages/000005.jpg"
    anns = {(a["image_id"], a["category_id"]): a for a in coco["annotations"]}
    chair = anns[(5, VOC_CLASSES.index("chair") + 1)]
    assert chair["bbox"] == [0, 0, 37, 23] and chair["iscrowd"] == 0  # 1..W, 1..H covers the whole image
    person = anns[(5, VOC_CLASSES.index("person") + 1)]
    assert person["bbox"] == [4, 5, 16, 10] and person["iscrowd"] == 1 and person["difficult"] == 1
    dog = anns[(5, VOC_CLASSES.index("dog") + 1)]  # truncated: an ordinary object; its box clipped to 23 px
    assert dog["iscrowd"] == 0 and dog["truncated"] == 1 and dog["bbox"] == [9, 2, 21, 21]
    assert anns[(9, 1)]["bbox"] == [2, 3, 1, 1]
    report = coco["info"]["voc_report"]
    assert report["unknown_class"] == 1 and report["outside"] == 1 and report["clipped"] == 1
    assert report["images"] == 3 and report["objects"] == 5 and report["difficult"] == 1

    # Through the loader: difficult -> an ignored (crowd) region, labels in VOC order.
    dataset = CocoDetection(path, find_devkit(devkit))
    sample = dataset[dataset.image_ids.index(5)]
    assert sample["image"].shape == (3, 23, 37)
    assert sorted(sample["labels"].tolist()) == [VOC_CLASSES.index("chair"), VOC_CLASSES.index("dog")]
    assert sample["crowd"].tolist() == [[4.0, 5.0, 20.0, 15.0]]
    assert dataset.class_names == list(VOC_CLASSES)


def test_image_ids_of_both_years_never_meet(devkit, tmp_path):
    ids07 = {im["id"] for im in _coco(voc_json(devkit, "2007", "test", cache_dir=tmp_path))["images"]}
    ids12 = {im["id"] for im in _coco(voc_json(devkit, "2012", "trainval", cache_dir=tmp_path))["images"]}
    assert ids07 == {1, 2} and ids12 == {2008000008, 2007000027}


def test_bad_images_are_counted_skips_or_errors_naming_the_file(devkit, tmp_path):
    folder = devkit / "VOC2007"
    (folder / "JPEGImages" / "000007.jpg").unlink()
    (folder / "Annotations" / "000009.xml").write_text("<annotation><size><width>4</width>")  # cut short
    with pytest.warns(UserWarning, match="2 of 3 images skipped") as record:
        coco = _coco(voc_json(devkit, "2007", "trainval", cache_dir=tmp_path / "a"))
    message = str(record[0].message)
    assert "000007.jpg: image file missing" in message and "000009.xml: not valid XML" in message
    assert [im["id"] for im in coco["images"]] == [5]
    report = coco["info"]["voc_report"]
    assert report["missing_jpeg"] == 1 and report["malformed_xml"] == 1
    with pytest.raises(ValueError, match="000007.jpg: image file missing"):
        voc_json(devkit, "2007", "trainval", cache_dir=tmp_path / "b", strict=True)

    # An object without a numeric box is malformed XML too; a missing XML file is counted as such.
    (folder / "Annotations" / "000009.xml").write_text(_xml("000009", 40, 40, [("cat", "a", 1, 5, 5)]))
    (folder / "Annotations" / "000005.xml").unlink()
    with pytest.warns(UserWarning, match="3 of 3 images skipped") as record:
        coco = _coco(voc_json(devkit, "2007", "trainval", cache_dir=tmp_path / "c"))
    assert "000009.xml: object 'cat' lacks a numeric bndbox" in str(record[0].message)
    assert coco["info"]["voc_report"]["missing_xml"] == 1 and coco["images"] == []


def test_missing_folders_and_sets_name_the_path(devkit, tmp_path):
    with pytest.raises(FileNotFoundError, match="test.txt: image-set file missing"):
        voc_json(devkit, "2012", "test", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="VOC2010 folder missing"):
        voc_json(devkit, "2010", "trainval", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no VOC<year> folder"):
        voc_json(tmp_path, "2007", "trainval", cache_dir=tmp_path)


def test_xml_size_disagreeing_with_the_jpeg_is_counted(devkit, tmp_path):
    (devkit / "VOC2007" / "Annotations" / "000002.xml").write_text(_xml("000002", 99, 98, [("bird", 1, 1, 5, 5)]))
    coco = _coco(voc_json(devkit, "2007", "test", cache_dir=tmp_path))
    assert coco["info"]["voc_report"]["size_mismatch"] == 1
    assert {(im["width"], im["height"]) for im in coco["images"]} == {(32, 32)}


def test_converted_once_and_rewritten_when_a_source_changes(devkit, tmp_path):
    path = voc_json(devkit, "2007", "test", cache_dir=tmp_path)
    stamp = path.stat().st_mtime_ns
    assert voc_json(devkit, "2007", "test", cache_dir=tmp_path) == path and path.stat().st_mtime_ns == stamp
    xml = devkit / "VOC2007" / "Annotations" / "000002.xml"
    xml.write_text(_xml("000002", 32, 32, [("bird", 10, 10, 20, 20), ("cow", 1, 1, 9, 9)]))
    os.utime(xml, ns=(stamp + 10**9, stamp + 10**9))
    assert len(_coco(voc_json(devkit, "2007", "test", cache_dir=tmp_path))["annotations"]) == 4  # was 3


def test_command_line_converts_the_papers_three_sets(devkit, tmp_path, capsys):
    written = main([str(devkit), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in written.values()) == ["voc2007_test.json", "voc2007_trainval.json",
                                                        "voc2012_trainval.json"]
    out = capsys.readouterr().out
    assert "VOC2007 trainval" in out and "unknown_class 1" in out and "3 images, 5 objects (1 difficult)" in out


def _coco_train(path):
    """A COCO file: image 1 only VOC classes, 2 a giraffe too, 3 nothing, 4 only a crowd person."""
    categories = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 25, "name": "giraffe"},
                  {"id": 63, "name": "couch"}] + [{"id": 100 + k, "name": n} for k, n in enumerate(
                      ["bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
                       "horse", "motorcycle", "potted plant", "sheep", "train", "tv"])]
    anns = [(1, 5, 0), (1, 63, 0), (2, 1, 0), (2, 25, 0), (4, 1, 1)]
    coco = {"categories": categories,
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 10, "height": 10} for i in range(1, 5)],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [1, 1, 3, 3], "iscrowd": crowd}
                            for k, (i, c, crowd) in enumerate(anns)]}
    path.write_text(json.dumps(coco))


def test_coco20cls_keeps_images_whose_objects_are_all_voc_classes(tmp_path):
    _coco_train(tmp_path / "train.json")
    coco = _coco(coco20_json(tmp_path / "train.json", tmp_path / "train2017", tmp_path / "cache"))
    assert [im["id"] for im in coco["images"]] == [1 + COCO_ID_OFFSET]
    assert coco["images"][0]["file_name"] == str((tmp_path / "train2017" / "000000000001.jpg").resolve())
    assert sorted(VOC_CLASSES[a["category_id"] - 1] for a in coco["annotations"]) == ["aeroplane", "sofa"]


def test_voc_presets_follow_the_protocol(devkit, tmp_path):
    cfg = parse_config(["--dataset", "voc", "--data-root", str(devkit), "--method", "dense_teacher"])
    assert (cfg.percent, cfg.max_iter, cfg.lr, cfg.milestones) == (100.0, 180_000, 0.01, [])
    assert (cfg.labeled_batch, cfg.unlabeled_batch, cfg.method_args) == (16, 16, {"weight_cls": 2.0})
    assert cfg.train_sizes == list(range(480, 801, 32)) and cfg.test_size == 600
    sed = parse_config(["--dataset", "voc", "--data-root", str(devkit), "--method", "sed"])
    assert (sed.max_iter, sed.lr, sed.train_sizes[0], sed.test_size) == (40_000, 0.01, 640, 800)
    assert parse_config(["--dataset", "voc", "--data-root", str(devkit)]).max_iter == 40_000
    soft = parse_config(["--dataset", "voc", "--data-root", str(devkit), "--method", "soft_teacher"])
    assert (soft.labeled_batch, soft.unlabeled_batch, soft.detector) == (8, 32, "faster_rcnn")
    assert soft.output_dir == "runs/voc_soft_teacher_faster_rcnn_100pct"
    with pytest.raises(ValueError, match="dataset 'voc' needs --data-root"):
        parse_config(["--dataset", "voc"])
    with pytest.raises(ValueError, match="unlabeled-coco-root"):
        parse_config(["--unlabeled-coco-root", str(tmp_path)])

    # The files: VOC07 trainval / test, VOC12 trainval unlabeled, joined by COCO-20cls when asked.
    files = voc_files(resolve_config({"dataset": "voc", "data_root": str(devkit), "method": "sed",
                                      "voc_cache": str(tmp_path / "cache")}))
    assert [files.train_json.name, files.val_json.name, files.unlabeled_json.name] == [
        "voc2007_trainval.json", "voc2007_test.json", "voc2012_trainval.json"]
    assert files.train_images == files.unlabeled_images == devkit
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    _coco_train(tmp_path / "coco" / "annotations" / "instances_train2017.json")
    files = voc_files(resolve_config({"dataset": "voc", "data_root": str(devkit), "method": "sed",
                                      "voc_cache": str(tmp_path / "cache"),
                                      "unlabeled_coco_root": str(tmp_path / "coco")}))
    merged = CocoDetection(files.unlabeled_json, files.unlabeled_images, require_annotations=False)
    assert merged.image_ids == [2007000027, 2008000008, 1 + COCO_ID_OFFSET]
    supervised = voc_files(resolve_config({"dataset": "voc", "data_root": str(devkit),
                                           "voc_cache": str(tmp_path / "cache")}))
    assert supervised.unlabeled_json is None


def test_a_method_trains_end_to_end_on_voc(devkit, tmp_path):
    """Dense Teacher on FCOS, 3 iterations: VOC07 labeled, VOC12 unlabeled, VOC07 test with both metrics."""
    cfg = resolve_config(dict(
        dataset="voc", data_root=str(devkit), voc_cache=str(tmp_path / "cache"), method="dense_teacher",
        output_dir=str(tmp_path / "run"), backbone="resnet18", fpn_channels=32, head_convs=1,
        train_sizes=[64], train_max_size=96, test_size=64, test_max_size=96, labeled_batch=2, unlabeled_batch=2,
        lr=0.01, warmup_iters=1, max_iter=3, eval_period=1000, checkpoint_period=1000, log_period=1, threads=1,
        num_workers=0, method_args={"burn_in": 1, "ramp": 1, "teacher_init": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's counted skips (an unknown class, a box outside)
        results = train.train(cfg)
    assert set(results) == {"student", "teacher"}
    for metrics in results.values():
        assert 0.0 <= metrics["AP50_VOC07"] <= 1.0 and 0.0 <= metrics["AP"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("unsup_") for key in records[-3])  # the unsupervised loss ran on VOC12
    assert any(r.get("eval") == "teacher" and "AP50_VOC07" in r for r in records)
