"""Semi-supervised splits of a training set: which images keep their labels.

    labeled_json, unlabeled_json = make_split("instances_train2017.json", percent=10, fold=1, out_dir="splits")

The rule of `make_split` (COCO-standard: p% labeled, the rest unlabeled; folds 1..5):

  1. ids = the `id` of every entry of the file's `images`, sorted ascending; N = len(ids).
  2. n = max(1, round(N * percent / 100)), with Python's round (a half goes to the even neighbour).
  3. positions = numpy.random.default_rng(fold).choice(N, size=n, replace=False)   (seed = fold)
  4. labeled = ids[positions], written in ascending id order; unlabeled = every other image.

Both parts are written as COCO JSON files with the source's `categories`:

  {out_dir}/{stem}.{fold}@{percent}.json              the labeled images and their annotations
  {out_dir}/{stem}.{fold}@{percent}-unlabeled.json    the other images, with their annotations kept as
                                                      hidden ground truth (diagnostics only, never a loss)

where stem is the training JSON's name without `.json` (`instances_train2017` for COCO, `train` for the
built-in dataset) and percent is printed with `:g` (10 -> "10", 0.5 -> "0.5"). Files are written atomically
and reused when they record the same source file (SHA-1), percent, fold and rule.

`split_from_file` takes an explicit split instead, in either of two formats:

  * a JSON list of labeled image ids:  [397133, 37777, ...]
  * the peers' shared split file:      {"<percent>": {"<fold>": [i, j, ...]}}, where i, j are indices into
    the sorted list of the training image ids (the order detectron2 loads COCO in), e.g.
    {"1.0": {"0": [...], "1": [...]}, "10.0": {...}}; `percent` and `fold` pick the list (percent keys are
    compared as numbers, so "10.0" matches percent=10).

Its outputs are named `{stem}.{split file stem}.json` (list) or `{stem}.{split file stem}.{fold}@{percent}.json`
(peers' format), each with its `-unlabeled` twin.
"""

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.coco import check_coco

SPLIT_RULE_VERSION = 1


class SplitPaths(NamedTuple):
    labeled_json: Path
    unlabeled_json: Path


def select_labeled(image_ids: list[int], *, percent: float, fold: int) -> list[int]:
    """The labeled image ids of split (percent, fold) of `image_ids`, sorted ascending (the rule above)."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    ids = np.array(sorted(image_ids), dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("cannot split an empty list of images")
    count = max(1, round(len(ids) * percent / 100))
    positions = np.random.default_rng(fold).choice(len(ids), size=count, replace=False)
    return sorted(int(i) for i in ids[positions])


def make_split(train_json: str | Path, *, percent: float, fold: int, out_dir: str | Path) -> SplitPaths:
    """Write (or reuse) the labeled / unlabeled COCO files of split (percent, fold); see the module docstring."""
    train_json = Path(train_json)
    tag = f"{fold}@{percent:g}"
    meta = {"rule_version": SPLIT_RULE_VERSION, "source_sha1": _sha1(train_json), "percent": percent, "fold": fold}
    paths = _output_paths(train_json, out_dir, tag)
    if _reusable(paths, meta):
        return paths
    coco = _read_coco(train_json)
    labeled = select_labeled([image["id"] for image in coco["images"]], percent=percent, fold=fold)
    _write_split(coco, labeled, paths, meta)
    return paths


def with_extra_unlabeled(unlabeled_json: str | Path, extra_json: str | Path, *, out_dir: str | Path) -> Path:
    """One COCO file of the images of `unlabeled_json` (a split's unlabeled part) and of `extra_json` (extra
    unlabeled images, e.g. the built-in dataset's unlabeled.json, in the same image folder), written once to
    out_dir/{stem}+{extra stem}.json and reused while both sources are unchanged. Image ids must not repeat."""
    unlabeled_json, extra_json = Path(unlabeled_json), Path(extra_json)
    out = Path(out_dir) / f"{unlabeled_json.stem}+{extra_json.stem}.json"
    meta = {"rule_version": SPLIT_RULE_VERSION, "sources": [_sha1(unlabeled_json), _sha1(extra_json)]}
    if out.is_file():
        try:
            if json.loads(out.read_text()).get("info", {}).get("merged") == meta:
                return out
        except json.JSONDecodeError:
            pass
    first, second = _read_coco(unlabeled_json), _read_coco(extra_json)
    repeated = {im["id"] for im in first["images"]} & {im["id"] for im in second["images"]}
    if repeated:
        raise ValueError(f"{extra_json}: {len(repeated)} image ids also in {unlabeled_json} (e.g. "
                         f"{sorted(repeated)[:3]}); extra unlabeled images need ids of their own")
    merged = {**first, "info": {**(first.get("info") or {}), "merged": meta},
              "images": first["images"] + second["images"],
              "annotations": first.get("annotations", []) + second.get("annotations", [])}
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, merged)
    return out


def split_from_file(train_json: str | Path, *, split_file: str | Path, out_dir: str | Path,
                    percent: float | None = None, fold: int | None = None) -> SplitPaths:
    """Write (or reuse) the labeled / unlabeled COCO files of an explicit split (either format above)."""
    train_json, split_file = Path(train_json), Path(split_file)
    try:
        split = json.loads(split_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {split_file} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{split_file}: not valid JSON: {error}") from error

    if isinstance(split, list):
        tag = split_file.stem
    elif isinstance(split, dict):
        if percent is None or fold is None:
            raise ValueError(f"{split_file}: a split file of the form {{percent: {{fold: indices}}}} needs "
                             f"`percent` and `fold` to choose a list")
        tag = f"{split_file.stem}.{fold}@{percent:g}"
    else:
        raise ValueError(f"{split_file}: expected a JSON list of image ids or {{percent: {{fold: indices}}}}, "
                         f"got a {type(split).__name__}")
    meta = {"rule_version": SPLIT_RULE_VERSION, "source_sha1": _sha1(train_json), "split_sha1": _sha1(split_file),
            "percent": percent, "fold": fold}
    paths = _output_paths(train_json, out_dir, tag)
    if _reusable(paths, meta):
        return paths

    coco = _read_coco(train_json)
    ids = sorted(image["id"] for image in coco["images"])
    if isinstance(split, list):
        labeled = _check_ids(split, ids, split_file)
    else:
        indices = _pick(split, percent=percent, fold=fold, split_file=split_file)
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(ids)]
        if bad:
            raise ValueError(f"{split_file}: indices must be integers in [0, {len(ids)}) (positions in the sorted "
                             f"image ids of {train_json}), got e.g. {bad[:5]}")
        labeled = _check_ids([ids[i] for i in indices], ids, split_file)
    _write_split(coco, labeled, paths, meta)
    return paths


# --------------------------------------------------------------------------------------------------------


def _pick(split: dict, *, percent: float, fold: int, split_file: Path) -> list:
    matches = [key for key in split if _as_float(key) == float(percent)]
    if not matches:
        raise ValueError(f"{split_file}: no list for percent {percent:g}; it has {sorted(split)}")
    by_fold = split[matches[0]]
    if not isinstance(by_fold, dict) or str(fold) not in by_fold:
        folds = sorted(by_fold) if isinstance(by_fold, dict) else by_fold
        raise ValueError(f"{split_file}: no list for fold {fold} under percent {matches[0]!r}; it has {folds}")
    indices = by_fold[str(fold)]
    if not isinstance(indices, list):
        raise ValueError(f"{split_file}: split [{matches[0]!r}][{str(fold)!r}] must be a list of indices")
    return indices


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_ids(labeled: list, ids: list[int], split_file: Path) -> list[int]:
    known = set(ids)
    unknown = [i for i in labeled if i not in known]
    if unknown:
        raise ValueError(f"{split_file}: {len(unknown)} image ids are not in the training set, e.g. {unknown[:5]}")
    if len(set(labeled)) != len(labeled):
        raise ValueError(f"{split_file}: the split lists an image more than once")
    if not labeled:
        raise ValueError(f"{split_file}: the split has no labeled image")
    return sorted(int(i) for i in labeled)


def _output_paths(train_json: Path, out_dir: str | Path, tag: str) -> SplitPaths:
    stem = train_json.name[:-len(".json")] if train_json.name.endswith(".json") else train_json.name
    out_dir = Path(out_dir)
    return SplitPaths(labeled_json=out_dir / f"{stem}.{tag}.json",
                      unlabeled_json=out_dir / f"{stem}.{tag}-unlabeled.json")


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_coco(path: Path) -> dict:
    try:
        coco = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: not a COCO detection file: expected a JSON object, got a {type(coco).__name__}")
    # Checked here, on the user's file: an annotation of an unknown image would otherwise fall silently into
    # the unlabeled part, and a bad field be reported against the generated split file.
    check_coco(coco, path, require_annotations=False)
    return coco


def _reusable(paths: SplitPaths, meta: dict) -> bool:
    """The labeled file is written last, so a labeled file recording `meta` means both files are complete."""
    if not (paths.labeled_json.is_file() and paths.unlabeled_json.is_file()):
        return False
    try:
        recorded = json.loads(paths.labeled_json.read_text()).get("info", {}).get("split")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return recorded == meta


def _write_split(coco: dict, labeled: list[int], paths: SplitPaths, meta: dict) -> None:
    chosen = set(labeled)
    info = dict(coco.get("info") or {})
    annotations = coco.get("annotations", [])

    def part(in_part, name: str) -> dict:
        images = sorted((im for im in coco["images"] if in_part(im["id"])), key=lambda im: im["id"])
        return {**coco, "info": {**info, "split": meta, "part": name}, "images": images,
                "annotations": [a for a in annotations if in_part(a.get("image_id"))]}

    paths.labeled_json.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(paths.unlabeled_json, part(lambda i: i not in chosen, "unlabeled"))
    _write_atomic(paths.labeled_json, part(lambda i: i in chosen, "labeled"))  # last: marks the pair complete


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
