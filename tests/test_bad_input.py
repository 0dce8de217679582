"""Bad input as a user meets it, through train.py and evaluate.py on a small COCO-format dataset written here.

Covered: missing image files stop a run before its first iteration (naming the JSON, the image id and the
path), or are left out with --skip-missing; an unreadable val image is left out of the scoring, never
replaced by another; an output folder belongs to one run (lock, earlier runs, --overwrite, --resume without
a checkpoint, stale temporary checkpoints); configuration errors name the flag or the file and the record.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import evaluate
import train
from engine.logger import read_metrics
from engine.run_dir import RunDirError, claim_run_dir

SIZE = 64
CATEGORIES = [{"id": 5, "name": "box"}, {"id": 9, "name": "bar"}]


def write_dataset(root, name: str, image_ids: list[int], seed: int):
    """A COCO-format JSON and its PNG images: one bright rectangle per image, of category 5 or 9."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    images, annotations = [], []
    for image_id in image_ids:
        pixels = np.full((SIZE, SIZE, 3), 30, np.uint8)
        x, y = (int(v) for v in rng.integers(4, 30, size=2))
        w, h = (int(v) for v in rng.integers(16, 30, size=2))
        pixels[y:y + h, x:x + w] = (220, 200, 40)
        Image.fromarray(pixels).save(folder / f"{image_id:04d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:04d}.png", "width": SIZE, "height": SIZE})
        annotations.append({"id": 100 + image_id, "image_id": image_id, "category_id": 5 if image_id % 2 else 9,
                            "bbox": [x, y, w, h], "iscrowd": 0, "area": w * h})
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path, folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    train_json, train_images = write_dataset(root, "train", list(range(1, 9)), seed=0)
    val_json, val_images = write_dataset(root, "val", [21, 22, 23], seed=1)
    return dict(train_json=train_json, train_images=train_images, val_json=val_json, val_images=val_images)


def argv(data: dict, output_dir, *extra) -> list[str]:
    """A supervised FCOS run of 2 iterations: ResNet-18, a 32-channel FPN, 64 px images, all labels."""
    return ["--train-json", str(data["train_json"]), "--train-images", str(data["train_images"]),
            "--val-json", str(data["val_json"]), "--val-images", str(data["val_images"]),
            "--output-dir", str(output_dir), "--detector", "fcos", "--backbone", "resnet18", "--fpn-channels", "32",
            "--head-convs", "1", "--head-norm-groups", "8", "--train-sizes", str(SIZE), "--train-max-size", str(SIZE), "--test-size", str(SIZE),
            "--test-max-size", str(SIZE), "--labeled-batch", "2", "--percent", "100", "--max-iter", "2",
            "--warmup-iters", "1", "--milestones", "--eval-period", "1000", "--checkpoint-period", "1",
            "--log-period", "1", "--threads", "1", "--num-workers", "0", *extra]


def copy_dataset(data: dict, root) -> dict:
    """A copy of the dataset that a test may damage."""
    copied = {}
    for key, path in data.items():
        target = root / path.name
        (shutil.copytree if path.is_dir() else shutil.copy)(path, target)
        copied[key] = target
    return copied


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A finished run: its folder (2 checkpoints, metrics.jsonl) and the final evaluation."""
    out = tmp_path_factory.mktemp("run")
    return out, train.main(argv(dataset, out))


def train_iterations(run_dir) -> list[int]:
    return [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


# ---- image files -------------------------------------------------------------------------------------------


def test_a_missing_train_image_stops_the_run_before_it_starts(dataset, tmp_path, capsys):
    data = copy_dataset(dataset, tmp_path)
    (data["train_images"] / "0003.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{data['train_json']}: 1 of 8 image files are missing: image id 3: "
                                                rf".*0003.png.*--skip-missing"):
        train.main(argv(data, tmp_path / "out"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # not one iteration ran

    # --skip-missing: a counted skip, and the run goes on in the same folder.
    with pytest.warns(UserWarning, match="1 of 8 image files are missing and left out: image id 3"):
        train.main(argv(data, tmp_path / "out", "--skip-missing"))
    assert "data: 7 labeled" in capsys.readouterr().out
    assert train_iterations(tmp_path / "out") == [1, 2]


def test_an_unreadable_val_image_is_left_out_of_the_scoring_never_replaced(run, dataset, tmp_path, capsys):
    run_dir, _ = run
    data = copy_dataset(dataset, tmp_path)
    # Cut short: the header reads, so the check before the evaluation passes it; decoding fails during it.
    damaged = data["val_images"] / "0022.png"
    damaged.write_bytes(damaged.read_bytes()[:80])
    results = tmp_path / "results.json"
    with pytest.warns(UserWarning, match=r"leaving out unreadable image .*0022.png \(image id 22\)"):
        metrics = evaluate.main([str(run_dir / "last.pth"), "--val-json", str(data["val_json"]), "--val-images",
                                 str(data["val_images"]), "--out", str(results)])
    out = capsys.readouterr().out
    assert "2 images scored; 1 unreadable images left out of the scoring (image ids 22)" in out
    detections = json.loads(results.read_text())
    assert detections and {d["image_id"] for d in detections} <= {21, 23}
    assert all(sum(d["image_id"] == i for d in detections) <= 100 for i in (21, 23))  # no image scored twice

    # The scores are those of the two readable images alone.
    coco = json.loads(data["val_json"].read_text())
    coco["images"] = [im for im in coco["images"] if im["id"] != 22]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 22]
    (tmp_path / "two.json").write_text(json.dumps(coco))
    alone = evaluate.main([str(run_dir / "last.pth"), "--val-json", str(tmp_path / "two.json"), "--val-images",
                           str(data["val_images"]), "--out", str(tmp_path / "two.results.json")])
    assert alone == pytest.approx(metrics, nan_ok=True)


def test_a_missing_val_image_stops_evaluate_or_is_left_out(run, dataset, tmp_path, capsys):
    run_dir, _ = run
    data = copy_dataset(dataset, tmp_path)
    (data["val_images"] / "0021.png").unlink()
    common = [str(run_dir / "last.pth"), "--val-json", str(data["val_json"]), "--val-images", str(data["val_images"]),
              "--out", str(tmp_path / "r.json")]
    with pytest.raises(FileNotFoundError, match=r"val.json: 1 of 3 image files are missing: image id 21: .*0021.png"):
        evaluate.main(common)
    with pytest.warns(UserWarning, match="missing and left out"):
        evaluate.main(common + ["--skip-missing"])
    assert "2 images scored" in capsys.readouterr().out


# ---- the output folder -------------------------------------------------------------------------------------


def test_a_fresh_run_in_an_earlier_runs_folder_is_refused(run, dataset):
    run_dir, _ = run
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"holds an earlier run \(checkpoint_0000001.pth, checkpoint_0000002.pth, "
                                          r"last.pth, metrics.jsonl\): give --resume to continue it, --overwrite"):
        train.main(argv(dataset, run_dir))
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_second_live_run_in_the_same_folder_is_refused(dataset, tmp_path):
    with claim_run_dir(tmp_path, resume=False, overwrite=False):  # a run holding the folder
        with pytest.raises(RunDirError, match=r"is in use by another run \(pid \d+ on host"):
            train.main(argv(dataset, tmp_path, "--resume"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_without_a_checkpoint_drops_the_earlier_rows_and_overwrite_starts_afresh(run, dataset, tmp_path):
    run_dir, _ = run
    shutil.copy(run_dir / "metrics.jsonl", tmp_path / "metrics.jsonl")  # a run that died before its checkpoint
    (tmp_path / ".checkpoint_0000002.pth.tmp4242").write_bytes(b"\0" * 4096)  # killed while writing one
    train.main(argv(dataset, tmp_path, "--resume"))
    assert train_iterations(tmp_path) == [1, 2]  # each once: the stale rows are gone
    assert not list(tmp_path.glob(".*.tmp*"))

    (tmp_path / "checkpoint_0000001.pth").unlink()
    train.main(argv(dataset, tmp_path, "--overwrite", "--max-iter", "1"))
    assert train_iterations(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_0000001.pth"]


# ---- configuration errors name the flag or the file and the record -----------------------------------------


def test_configuration_errors_name_the_flag(dataset, tmp_path):
    missing = argv(dataset, tmp_path / "out")
    missing[missing.index("--train-json") + 1] = str(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match=r"--train-json .*absent.json: no such file"):
        train.main(missing)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunDirError, match=r"--output-dir .*a_file is a file, not a folder"):
        train.main(argv(dataset, tmp_path / "a_file"))
    with pytest.raises(ValueError, match=r"--eval-period must be >= 1"):
        train.main(argv(dataset, tmp_path / "out", "--eval-period", "0"))
    with pytest.raises(ValueError, match=r"--fold must be 1\.\.5, got 0"):
        train.main(argv(dataset, tmp_path / "out", "--fold", "0"))


def test_bad_records_in_the_users_json_are_errors_naming_it(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path)
    coco = json.loads(data["train_json"].read_text())
    coco["images"][1]["width"] = "64"
    data["train_json"].write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=rf"{data['train_json']}: images\[1\] \(id 2\): 'width' must be a positive "
                                         rf"integer, got '64' \(a string\)"):
        train.main(argv(data, tmp_path / "out", "--percent", "50"))

    coco["images"][1]["width"] = SIZE
    coco["annotations"][0]["image_id"] = 77  # an annotation of no image: never silently moved to the unlabeled part
    data["train_json"].write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=rf"{data['train_json']}: annotation 101: image_id 77 is not in 'images'"):
        train.main(argv(data, tmp_path / "out", "--percent", "50"))


def test_evaluate_names_a_class_count_mismatch(run, dataset, tmp_path):
    run_dir, _ = run
    coco = json.loads(dataset["val_json"].read_text())
    coco["categories"].append({"id": 12, "name": "disc"})
    coco["annotations"][0]["category_id"] = 12
    (tmp_path / "val4.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"checkpoint .*last.pth was trained on 2 classes, which the val annotations "
                                         r"do not match: .*val4.json: its annotations use 3 category ids and its "
                                         r"'categories' list has 3, but the label map it is read with has 2 classes "
                                         r"\(category ids \[5, 9\]\); ids \[12\]"):
        evaluate.main([str(run_dir / "last.pth"), "--val-json", str(tmp_path / "val4.json"), "--val-images",
                       str(dataset["val_images"])])
