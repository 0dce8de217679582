"""The COCO loader: label map, crowd / degenerate / out-of-image boxes, bad files, corrupt and missing images."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data.coco import CategoryMismatchError, CocoDetection, coco_paths, load_unlabeled

# Category ids with gaps and out of order, as in COCO (1..90 with holes).
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}]


def _write_image(path, height, width, value):
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = value
    pixels[: height // 2, :, 1] = 255
    Image.fromarray(pixels).save(path)


@pytest.fixture
def fixture(tmp_path):
    """Three images (ids 7, 2, 11): a normal box, a crowd box, a degenerate box, an out-of-image box."""
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "a.png", 30, 40, 10)  # id 7: 40 wide, 30 high
    _write_image(images / "b.png", 20, 20, 20)  # id 2
    _write_image(images / "c.png", 16, 24, 30)  # id 11
    coco = {
        "categories": CATEGORIES,
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
                   {"id": 11, "file_name": "c.png", "width": 24, "height": 16}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 17, "bbox": [5, 6, 10, 8], "iscrowd": 0},  # -> label 1
            {"id": 2, "image_id": 7, "category_id": 90, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped to 40x30
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [0, 0, 12, 12], "iscrowd": 1},  # crowd
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [4, 4, 0, 5], "iscrowd": 0},  # degenerate: w = 0
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 2, 3, 4]},  # no iscrowd key: not crowd
            {"id": 6, "image_id": 11, "category_id": 17, "bbox": [30, 2, 5, 5], "iscrowd": 0},  # entirely outside
        ],
    }
    json_path = tmp_path / "instances.json"
    json_path.write_text(json.dumps(coco))
    return json_path, images, coco


def test_label_map_and_boxes(fixture):
    json_path, images, _ = fixture
    with pytest.warns(UserWarning, match="1 boxes of non-positive size dropped, 1 boxes clipped"):
        dataset = CocoDetection(json_path, images)
    assert dataset.label_to_category_id == [3, 17, 90]
    assert dataset.category_id_to_label == {3: 0, 17: 1, 90: 2}
    assert dataset.class_names == ["car", "cat", "toothbrush"]
    assert dataset.num_classes == 3
    assert dataset.image_ids == [2, 7, 11]  # sorted ids
    assert dataset.stats == {"degenerate": 1, "clipped": 1, "outside": 1, "crowd": 1, "missing": 0, "unreadable": 0}

    sample = dataset[1]  # image 7
    assert sample["image_id"] == 7 and sample["orig_size"] == (30, 40)
    assert sample["image"].shape == (3, 30, 40) and sample["image"].dtype == torch.float32
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["image"][0, 0, 0].item() == pytest.approx(10 / 255)  # RGB order, scaled to [0, 1]
    assert sample["image"][1, 0, 0].item() == 1.0 and sample["image"][1, -1, 0].item() == 0.0
    torch.testing.assert_close(sample["boxes"], torch.tensor([[5.0, 6, 15, 14], [30, 20, 40, 30]]))
    assert sample["boxes"].dtype == torch.float32
    assert sample["labels"].tolist() == [1, 2] and sample["labels"].dtype == torch.int64
    torch.testing.assert_close(sample["crowd"], torch.tensor([[0.0, 0, 12, 12]]))
    torch.testing.assert_close(sample["matrix"], torch.eye(3, dtype=torch.float64))

    empty = dataset[2]  # image 11: its only box lies outside the image
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["crowd"].shape == (0, 4)
    assert dataset[0]["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]]
    with pytest.raises(IndexError):
        dataset[3]
    assert [s["image_id"] for s in dataset] == [2, 7, 11]  # iteration stops at the end


def test_image_ids_subset_and_transform(fixture):
    json_path, images, _ = fixture
    calls = []

    def transform(sample, generator):
        calls.append(generator)
        return {**sample, "image": sample["image"][:, :4, :4]}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images, image_ids=[11, 7], transform=transform, seed=5)
    assert len(dataset) == 2 and dataset.image_ids == [11, 7]
    assert dataset[1]["image"].shape == (3, 4, 4) and calls == [dataset.generator]
    generator = torch.Generator()
    dataset.get(0, generator=generator)
    assert calls[-1] is generator
    with pytest.raises(ValueError, match="instances.json.*not in the file"):
        CocoDetection(json_path, images, image_ids=[7, 12345])


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "expected a JSON object"),
    ({"annotations": [], "categories": []}, "no 'images' list"),
    ({"images": [], "categories": []}, "no 'annotations' list"),
    ({"images": [], "annotations": []}, "no 'categories' list"),
])
def test_not_coco_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "weird.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"weird.json.*{message}"):
        CocoDetection(path, tmp_path)


def test_invalid_json_and_missing_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        CocoDetection(path, tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetection(tmp_path / "absent.json", tmp_path)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "3", 4], None, [0, 0, float("nan"), 1]])
def test_bad_bbox_is_an_error_naming_the_file(fixture, bbox):
    json_path, images, coco = fixture
    coco["annotations"][0]["bbox"] = bbox
    json_path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="instances.json: annotation 1: bbox must be 4 finite numbers"):
        CocoDetection(json_path, images)


def test_unknown_category_or_image_is_an_error(fixture):
    json_path, images, coco = fixture
    coco["annotations"][0]["category_id"] = 4
    json_path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="instances.json: annotation 1: category_id 4"):
        CocoDetection(json_path, images)
    coco["annotations"][0]["category_id"] = 3
    coco["annotations"][0]["image_id"] = 99
    json_path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="instances.json: annotation 1: image_id 99"):
        CocoDetection(json_path, images)


def test_missing_image_is_an_error_naming_the_json_the_id_and_the_path(fixture):
    json_path, images, _ = fixture
    (images / "b.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images)
    with pytest.raises(FileNotFoundError, match=r"instances.json: 1 of 3 image files are missing: image id 2: "
                                                r".*b.png.*--skip-missing"):
        dataset.check_images()
    with pytest.raises(FileNotFoundError, match=r"instances.json: image file .*b.png \(image id 2\) is missing"):
        dataset[0]  # a file that goes away after the check
    assert dataset[1]["image_id"] == 7  # the others still load

    with pytest.warns(UserWarning, match=r"1 of 3 image files are missing and left out: image id 2"):
        found = dataset.check_images(skip_missing=True)
    assert (found.checked, found.missing, found.unreadable) == (3, 1, 0)
    assert dataset.image_ids == [7, 11] and dataset.stats["missing"] == 1


def test_the_check_names_the_users_file_not_a_split_made_from_it(fixture, tmp_path):
    json_path, images, _ = fixture
    (images / "c.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images, source=tmp_path / "mine.json")
    with pytest.raises(FileNotFoundError, match=r"mine.json: 1 of 3 image files are missing: image id 11: .*c.png"):
        dataset.check_images(workers=1)


def test_the_header_check_finds_corrupt_and_mis_sized_files_up_front(fixture):
    json_path, images, _ = fixture
    (images / "a.png").write_bytes(b"this is not a png")  # image 7
    _write_image(images / "c.png", 10, 10, 0)  # image 11: 10x10, the JSON says 24x16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images)
    with pytest.warns(UserWarning, match=r"2 of 3 image files cannot be read and will be skipped: image id 7: "
                                         r".*a.png \(not an image.*image id 11: .*c.png \(size 10x10 differs"):
        found = dataset.check_images()
    assert (found.missing, found.unreadable) == (0, 2) and dataset.stats["unreadable"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad: no second warning, nothing decoded for them
        assert [dataset[i]["image_id"] for i in range(3)] == [2, 2, 2]  # training sets substitute

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict = CocoDetection(json_path, images, strict=True)
    with pytest.raises(RuntimeError, match="2 image files cannot be read"):
        strict.check_images()


def test_an_evaluation_set_never_substitutes_an_unreadable_image(fixture):
    json_path, images, _ = fixture
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header, then garbage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images, substitute=False)
    with pytest.warns(UserWarning, match=r"leaving out unreadable image .*a.png \(image id 7\)"):
        assert dataset[1] == {"image_id": 7, "unreadable": True}
    assert dataset[2]["image_id"] == 11 and dataset.stats["unreadable"] == 1
    copy = dataset.with_transform(None)  # another scale of a multi-scale test: the same images, known bad ones
    assert copy.image_ids == dataset.image_ids and copy[1] == {"image_id": 7, "unreadable": True}


def test_corrupt_image_is_skipped_with_a_counted_warning(fixture):
    json_path, images, _ = fixture
    (images / "a.png").write_bytes(b"this is not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images)
    with pytest.warns(UserWarning, match="skipping unreadable image .*a.png"):
        sample = dataset[1]  # image 7 is corrupt: the next index (image 11) is returned instead
    assert sample["image_id"] == 11 and dataset.stats["unreadable"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad: skipped silently from now on, same replacement
        assert dataset[1]["image_id"] == 11
    assert dataset.stats["unreadable"] == 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict = CocoDetection(json_path, images, strict=True)
    with pytest.raises(RuntimeError, match="cannot read image .*a.png"):
        strict[1]


def test_image_size_disagreeing_with_the_json_counts_as_unreadable(fixture):
    json_path, images, _ = fixture
    _write_image(images / "c.png", 10, 10, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(json_path, images, strict=True)
    with pytest.raises(RuntimeError, match="c.png: size 10x10 differs from the annotation file's 24x16"):
        dataset[2]


def test_load_unlabeled_without_annotations(tmp_path, fixture):
    json_path, images, coco = fixture
    info = {"images": coco["images"], "categories": CATEGORIES}  # as image_info_unlabeled2017.json
    path = tmp_path / "image_info_unlabeled.json"
    path.write_text(json.dumps(info))
    unlabeled = load_unlabeled(path, images)
    assert len(unlabeled) == 3 and unlabeled.label_to_category_id == [3, 17, 90]
    assert unlabeled[1]["boxes"].shape == (0, 4)

    no_categories = tmp_path / "bare.json"
    no_categories.write_text(json.dumps({"images": coco["images"]}))
    shared = load_unlabeled(no_categories, images, categories=CATEGORIES)
    assert shared.category_id_to_label == {3: 0, 17: 1, 90: 2}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hidden = load_unlabeled(json_path, images)  # a split's unlabeled part keeps its annotations
    assert hidden[1]["labels"].tolist() == [1, 2]


def test_coco_paths(tmp_path):
    paths = coco_paths(tmp_path)
    assert paths.train_json == tmp_path / "annotations" / "instances_train2017.json"
    assert paths.val_json == tmp_path / "annotations" / "instances_val2017.json"
    assert paths.train_images == tmp_path / "train2017" and paths.val_images == tmp_path / "val2017"
    assert paths.unlabeled_json == tmp_path / "annotations" / "image_info_unlabeled2017.json"
    assert paths.unlabeled_images == tmp_path / "unlabeled2017"


@pytest.mark.parametrize("where, key, value, message", [
    ("images", "width", "40", r"images\[0\] \(id 7\): 'width' must be a positive integer, got '40' \(a string\)"),
    ("images", "height", 0, r"images\[0\] \(id 7\): 'height' must be a positive integer, got 0"),
    ("images", "id", "7", r"images\[0\]: 'id' must be an integer, got '7' \(a string\)"),
    ("images", "file_name", None, r"images\[0\] \(id 7\): 'file_name' must be a non-empty string, got None"),
    ("annotations", "category_id", "17", r"annotation 1: category_id must be an integer, got '17' \(a string\)"),
    ("annotations", "iscrowd", "0", r"annotation 1: iscrowd must be 0 or 1, got '0' \(a string\)"),
    ("annotations", "image_id", 99, r"annotation 1: image_id 99 is not in 'images'"),
])
def test_fields_of_the_wrong_type_name_the_file_and_the_record(fixture, where, key, value, message):
    json_path, images, coco = fixture
    coco[where][0][key] = value
    json_path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"instances.json: {message}"):
        CocoDetection(json_path, images)


def test_integral_float_sizes_are_accepted(fixture):
    json_path, images, coco = fixture
    coco["images"][0]["width"] = 40.0  # some tools write every number as a float
    json_path.write_text(json.dumps(coco))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert CocoDetection(json_path, images).record(1).width == 40


def test_a_label_map_from_elsewhere_that_lacks_annotated_categories_says_so(fixture):
    json_path, images, _ = fixture
    fewer = [c for c in CATEGORIES if c["id"] != 90]  # e.g. a checkpoint trained on two of the three classes
    with pytest.raises(CategoryMismatchError, match=r"instances.json: its annotations use 3 category ids and its "
                                                    r"'categories' list has 3, but the label map it is read with has "
                                                    r"2 classes \(category ids \[3, 17\]\); ids \[90\]"):
        CocoDetection(json_path, images, categories=fewer)
