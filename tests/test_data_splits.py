"""Semi-supervised splits: the documented rule, determinism, disjointness, rounding, explicit split files."""

import json

import numpy as np
import pytest

from data.splits import (labeled_ids_from_file, make_split, select_labeled, split_from_file, split_overlap,
                         with_extra_unlabeled)
from data.splits import main as splits_main


def _write_train(path, ids):
    coco = {"info": {"description": "fixture"}, "categories": [{"id": 5, "name": "thing"}],
            "images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in ids],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": 5, "bbox": [0, 0, 2, 2], "iscrowd": 0}
                            for k, i in enumerate(i for i in ids for _ in range(i % 3))]}  # 0-2 per image
    path.write_text(json.dumps(coco))
    return coco


@pytest.fixture
def train(tmp_path):
    ids = [int(i) for i in np.random.default_rng(123).choice(10_000, size=37, replace=False)]
    path = tmp_path / "instances_train2017.json"
    return path, _write_train(path, ids), sorted(ids)


def _ids(path):
    return [image["id"] for image in json.loads(path.read_text())["images"]]


def test_rule_is_the_documented_one(train, tmp_path):
    path, _, ids = train
    labeled_json, unlabeled_json = make_split(path, percent=10, fold=1, out_dir=tmp_path / "splits")
    assert labeled_json.name == "instances_train2017.1@10.json"
    assert unlabeled_json.name == "instances_train2017.1@10-unlabeled.json"
    expected = sorted(np.array(ids)[np.random.default_rng(1).choice(37, size=round(3.7), replace=False)].tolist())
    assert _ids(labeled_json) == expected


def test_split_is_deterministic_disjoint_and_complete(train, tmp_path):
    path, coco, ids = train
    a = make_split(path, percent=25, fold=2, out_dir=tmp_path / "a")
    b = make_split(path, percent=25, fold=2, out_dir=tmp_path / "b")
    assert a.labeled_json.read_bytes() == b.labeled_json.read_bytes()
    assert a.unlabeled_json.read_bytes() == b.unlabeled_json.read_bytes()
    labeled, unlabeled = _ids(a.labeled_json), _ids(a.unlabeled_json)
    assert not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == ids
    assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
    other_fold = make_split(path, percent=25, fold=3, out_dir=tmp_path / "a")
    assert _ids(other_fold.labeled_json) != labeled

    # Annotations follow their images; the unlabeled part keeps its (hidden) annotations.
    for part in a:
        content = json.loads(part.read_text())
        kept = set(_ids(part))
        assert content["categories"] == coco["categories"]
        assert [x for x in coco["annotations"] if x["image_id"] in kept] == content["annotations"]


@pytest.mark.parametrize("num_images, percent, expected", [
    (37, 10, 4),     # 3.7 -> 4
    (10, 25, 2),     # 2.5 -> 2: Python's round, ties to even
    (10, 35, 4),     # 3.5 -> 4
    (37, 0.1, 1),    # 0.037 -> at least one labeled image
    (37, 100, 37),   # fully supervised: nothing unlabeled
])
def test_percent_rounding(num_images, percent, expected):
    labeled = select_labeled(list(range(100, 100 + num_images)), percent=percent, fold=1)
    assert len(labeled) == len(set(labeled)) == expected


def test_select_labeled_ignores_input_order_and_rejects_bad_percent():
    ids = list(range(50))
    assert select_labeled(ids, percent=20, fold=4) == select_labeled(ids[::-1], percent=20, fold=4)
    with pytest.raises(ValueError, match="percent"):
        select_labeled(ids, percent=0, fold=1)
    with pytest.raises(ValueError, match="empty"):
        select_labeled([], percent=10, fold=1)


def test_hundred_percent_and_built_in_names(tmp_path):
    path = tmp_path / "train.json"
    _write_train(path, [1, 2, 3])
    labeled_json, unlabeled_json = make_split(path, percent=100, fold=1, out_dir=tmp_path)
    assert labeled_json.name == "train.1@100.json" and unlabeled_json.name == "train.1@100-unlabeled.json"
    assert _ids(labeled_json) == [1, 2, 3] and _ids(unlabeled_json) == []
    assert make_split(path, percent=0.5, fold=2, out_dir=tmp_path).labeled_json.name == "train.2@0.5.json"


def test_reused_when_identical_and_rewritten_when_the_source_changes(train, tmp_path):
    path, _, ids = train
    first = make_split(path, percent=10, fold=1, out_dir=tmp_path / "s")
    stamp = first.labeled_json.stat().st_mtime_ns
    assert make_split(path, percent=10.0, fold=1, out_dir=tmp_path / "s") == first
    assert first.labeled_json.stat().st_mtime_ns == stamp
    _write_train(path, ids[:20])  # a different training set under the same name
    again = make_split(path, percent=10, fold=1, out_dir=tmp_path / "s")
    assert set(_ids(again.labeled_json)) | set(_ids(again.unlabeled_json)) == set(ids[:20])
    assert not list((tmp_path / "s").glob(".*.tmp"))  # no temporary left behind


def test_explicit_list_of_ids(train, tmp_path):
    path, _, ids = train
    split_file = tmp_path / "my_split.json"
    split_file.write_text(json.dumps([ids[5], ids[0], ids[9]]))
    labeled_json, unlabeled_json = split_from_file(path, split_file=split_file, out_dir=tmp_path / "out")
    assert labeled_json.name == "instances_train2017.my_split.json"
    assert unlabeled_json.name == "instances_train2017.my_split-unlabeled.json"
    assert _ids(labeled_json) == sorted([ids[0], ids[5], ids[9]])
    assert sorted(_ids(labeled_json) + _ids(unlabeled_json)) == ids

    split_file.write_text(json.dumps([ids[0], 999_999]))
    with pytest.raises(ValueError, match="my_split.json: 1 image ids are not in the training set"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path / "out")
    split_file.write_text(json.dumps([ids[0], ids[0]]))
    with pytest.raises(ValueError, match="more than once"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path / "out")


def _annotated_train(path):
    """Images 1..30: none for multiples of 5, only a crowd object for 7, one object for the others (23)."""
    coco = {"categories": [{"id": 5, "name": "thing"}],
            "images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 31)],
            "annotations": [{"id": i, "image_id": i, "category_id": 5, "bbox": [0, 0, 2, 2], "iscrowd": int(i == 7)}
                            for i in range(1, 31) if i % 5]}
    path.write_text(json.dumps(coco))
    return [i for i in range(1, 31) if i % 5 and i != 7]


def test_coco_supervision_positions_index_the_images_with_objects(tmp_path):
    path = tmp_path / "instances_train2017.json"
    annotated = _annotated_train(path)  # the list the authors' loaders index: 23 images
    split_file = tmp_path / "COCO_supervision.txt"
    split_file.write_text(json.dumps({"10.0": {"1": [22, 0], "2": [0, 1, 2]}, "50.0": {"0": list(range(3, 14))}}))
    labeled_json, unlabeled_json = split_from_file(path, split_file=split_file, out_dir=tmp_path, percent=10, fold=1)
    assert labeled_json.name == "instances_train2017.COCO_supervision.1@10.json"
    assert _ids(labeled_json) == [annotated[0], annotated[22]] == [1, 29]
    assert len(_ids(unlabeled_json)) == 28  # every other image of the file, empty ones included
    half = split_from_file(path, split_file=split_file, out_dir=tmp_path, percent=50.0, fold=0)
    assert _ids(half.labeled_json) == annotated[3:14]  # int(50 / 100 * 23) = 11 positions

    # The authors' count check: int(10 / 100 * 23) = 2 positions, not 3.
    with pytest.raises(ValueError, match=r"holds 3 positions; .* int\(10 / 100 \* 23\) = 2 .*another training"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path, percent=10, fold=2)
    with pytest.raises(ValueError, match="needs `percent` and `fold`"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no list for percent 5"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path, percent=5, fold=0)
    with pytest.raises(ValueError, match="no list for fold 7"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path, percent=10, fold=7)
    split_file.write_text(json.dumps({"10": {"0": [0, 23]}}))
    with pytest.raises(ValueError, match=r"COCO_supervision.txt: positions must be integers in \[0, 23\)"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path, percent=10, fold=0)


def test_soft_teacher_split_pair_is_taken_as_it_is(train, tmp_path):
    path, coco, ids = train
    labeled = tmp_path / "instances_train2017.1@10.json"
    unlabeled = tmp_path / "instances_train2017.1@10-unlabeled.json"
    labeled.write_text(json.dumps({**coco, "images": [im for im in coco["images"] if im["id"] in ids[:4]]}))
    with pytest.raises(FileNotFoundError, match="needs its unlabeled twin .*1@10-unlabeled.json"):
        split_from_file(path, split_file=labeled, out_dir=tmp_path / "out")
    unlabeled.write_text(json.dumps({**coco, "images": [im for im in coco["images"] if im["id"] not in ids[:4]]}))
    paths = split_from_file(path, split_file=labeled, out_dir=tmp_path / "out", percent=10, fold=1)
    assert paths == (labeled, unlabeled) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="give the labeled file of the pair"):
        split_from_file(path, split_file=unlabeled, out_dir=tmp_path / "out")
    assert labeled_ids_from_file(path, split_file=labeled) == ids[:4]


def test_overlap_with_our_rule(train, tmp_path, capsys):
    path, _, ids = train
    ours = select_labeled(ids, percent=30, fold=2)  # 11 of 37
    split_file = tmp_path / "list.json"
    split_file.write_text(json.dumps(ours[:6] + [i for i in ids if i not in ours][:5]))
    result = split_overlap(path, split_file=split_file, percent=30, fold=2)
    assert (result["file"], result["ours"], result["both"], result["images"]) == (11, 11, 6, 37)
    assert result["jaccard"] == pytest.approx(6 / 16) and result["chance"] == pytest.approx(11 * 11 / 37)
    printed = splits_main(["overlap", "--train-json", str(path), "--split-file", str(split_file), "--percent", "30",
                           "--fold", "2"])
    assert printed == result
    assert "shared: 6 (54.5% of the file's, 54.5% of ours; Jaccard 0.375)" in capsys.readouterr().out


def test_bad_split_file(train, tmp_path):
    path, _, _ = train
    split_file = tmp_path / "bad.json"
    split_file.write_text('"labeled"')
    with pytest.raises(ValueError, match="bad.json: expected a JSON list of image ids"):
        split_from_file(path, split_file=split_file, out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        split_from_file(path, split_file=tmp_path / "nothing.json", out_dir=tmp_path)


def _coco(path, ids, *, categories=({"id": 1, "name": "a"},)):
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in ids],
                                "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2],
                                                 "area": 4, "iscrowd": 0} for i in ids],
                                "categories": list(categories)}))
    return path


def test_extra_unlabeled_images_join_the_splits_unlabeled_part(tmp_path):
    rest = _coco(tmp_path / "train.1@10-unlabeled.json", [2, 3, 5])
    extra = _coco(tmp_path / "unlabeled.json", [11, 12])
    merged = with_extra_unlabeled(rest, extra, out_dir=tmp_path / "out")
    coco = json.loads(merged.read_text())
    assert [im["id"] for im in coco["images"]] == [2, 3, 5, 11, 12]
    assert len(coco["annotations"]) == 5 and coco["categories"] == [{"id": 1, "name": "a"}]
    written = merged.stat().st_mtime_ns
    assert with_extra_unlabeled(rest, extra, out_dir=tmp_path / "out") == merged  # reused
    assert merged.stat().st_mtime_ns == written
    _coco(extra, [11, 12, 13])  # a changed source is merged again
    assert len(json.loads(with_extra_unlabeled(rest, extra, out_dir=tmp_path / "out").read_text())["images"]) == 6


def test_extra_unlabeled_images_with_repeated_ids_are_refused(tmp_path):
    rest = _coco(tmp_path / "rest.json", [1, 2])
    extra = _coco(tmp_path / "extra.json", [2, 9])
    with pytest.raises(ValueError, match=r"extra.json: 1 image ids also in .*rest.json"):
        with_extra_unlabeled(rest, extra, out_dir=tmp_path)


def test_an_annotation_of_no_image_is_an_error_naming_the_users_file(train, tmp_path):
    path, coco, _ = train
    coco["annotations"][0]["image_id"] = -4  # would otherwise land, unseen, in the unlabeled part
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances_train2017.json: annotation 1: image_id -4 is not in 'images'"):
        make_split(path, percent=10, fold=1, out_dir=tmp_path / "splits")
    with pytest.raises(FileNotFoundError, match=r"annotation file .*absent.json does not exist"):
        make_split(tmp_path / "absent.json", percent=10, fold=1, out_dir=tmp_path / "splits")
