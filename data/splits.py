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

`split_from_file` takes an explicit split instead, in any of three formats:

  * a JSON list of labeled image ids:  [397133, 37777, ...]
  * Unbiased Teacher's and Dense Teacher's `COCO_supervision.txt` (JSON despite its name):
    {"<percent>": {"<fold>": [i, j, ...]}}, e.g. {"1.0": {"0": [...], "1": [...]}, "10.0": {...}}; `percent` and
    `fold` pick the list (percent keys are compared as numbers, so "10.0" matches percent=10). The entries are
    POSITIONS in the image list the authors' frameworks load (detectron2, cvpods), not image ids. That list is
    the training file's images sorted by id, without the images that have no annotation other than crowd
    ones (the loaders' default filter of empty images): 117266 of COCO train2017's 118287 images. The
    authors' loaders assert that a list holds int(percent / 100 * N) positions for that N; the same check
    here tells a file made for another training set. Unlabeled: every other image of the training file.
  * Soft Teacher's split files, `instances_train2017.{fold}@{percent}.json` (a COCO file of the labeled
    images) with its `-unlabeled` twin beside it: taken as they are, as the labeled and the unlabeled set
    (nothing is written; `percent` and `fold` are the file's own).

The first two write `{stem}.{split file stem}.json` (list) or `{stem}.{split file stem}.{fold}@{percent}.json`
(positions), each with its `-unlabeled` twin.

    python -m data.splits overlap --train-json instances_train2017.json --split-file COCO_supervision.txt \
        --percent 10 --fold 1

prints how many labeled images a split file shares with this module's rule for the same percent and fold,
next to what two independent random draws of those sizes would share.
"""

import argparse
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
    write_json_atomic(out, merged)
    return out


def split_from_file(train_json: str | Path, *, split_file: str | Path, out_dir: str | Path,
                    percent: float | None = None, fold: int | None = None) -> SplitPaths:
    """The labeled / unlabeled COCO files of an explicit split (any format above): written (or reused) for a
    list of ids or of positions, the pair itself for Soft Teacher's files."""
    train_json, split_file = Path(train_json), Path(split_file)
    split = _read_split_file(split_file)
    if _is_coco(split):
        return _soft_teacher_pair(split_file)
    if isinstance(split, dict):
        _need_percent_and_fold(split_file, percent, fold)
    tag = split_file.stem if isinstance(split, list) else f"{split_file.stem}.{fold}@{percent:g}"
    meta = {"rule_version": SPLIT_RULE_VERSION, "source_sha1": _sha1(train_json), "split_sha1": _sha1(split_file),
            "percent": percent, "fold": fold}
    paths = _output_paths(train_json, out_dir, tag)
    if _reusable(paths, meta):
        return paths
    coco = _read_coco(train_json)
    _write_split(coco, _labeled_ids(split, coco, split_file=split_file, percent=percent, fold=fold), paths, meta)
    return paths


def labeled_ids_from_file(train_json: str | Path, *, split_file: str | Path, percent: float | None = None,
                          fold: int | None = None) -> list[int]:
    """The labeled image ids (sorted) that a split file of any format above picks from `train_json`."""
    return _labeled_ids(_read_split_file(Path(split_file)), _read_coco(Path(train_json)), split_file=Path(split_file),
                        percent=percent, fold=fold)


def annotated_image_ids(coco: dict) -> list[int]:
    """The ids of the images with at least one non-crowd annotation, ascending: the list that the positions
    of COCO_supervision.txt index (detectron2's and cvpods' training loaders drop the other images)."""
    annotated = {a.get("image_id") for a in coco.get("annotations", []) if not a.get("iscrowd", 0)}
    return sorted(image["id"] for image in coco["images"] if image["id"] in annotated)


def split_overlap(train_json: str | Path, *, split_file: str | Path, percent: float, fold: int) -> dict:
    """How far a split file's labeled images overlap this module's rule for the same percent and fold.

    Returns {"file": n labeled by the file, "ours": n labeled by the rule, "both": shared, "images": N of the
    training file, "jaccard": both / union, "chance": what two independent uniform draws of those sizes share
    on average (file * ours / N)}.
    """
    coco = _read_coco(Path(train_json))
    theirs = set(_labeled_ids(_read_split_file(Path(split_file)), coco, split_file=Path(split_file), percent=percent,
                              fold=fold))
    ids = [image["id"] for image in coco["images"]]
    ours = set(select_labeled(ids, percent=percent, fold=fold))
    both = len(theirs & ours)
    return {"file": len(theirs), "ours": len(ours), "both": both, "images": len(ids),
            "jaccard": both / len(theirs | ours), "chance": len(theirs) * len(ours) / len(ids)}


# --------------------------------------------------------------------------------------------------------


def _read_split_file(split_file: Path):
    try:
        split = json.loads(split_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {split_file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{split_file}: not valid JSON: {error}") from error
    if not isinstance(split, (list, dict)):
        raise ValueError(f"{split_file}: expected a JSON list of image ids, {{percent: {{fold: positions}}}} or a "
                         f"COCO file of labeled images, got a {type(split).__name__}")
    return split


def _is_coco(split) -> bool:
    return isinstance(split, dict) and isinstance(split.get("images"), list)


def _soft_teacher_pair(split_file: Path) -> SplitPaths:
    """Soft Teacher's labeled file and its `-unlabeled` twin, as they are."""
    if split_file.name.endswith("-unlabeled.json"):
        raise ValueError(f"{split_file}: give the labeled file of the pair (without '-unlabeled'); its twin is "
                         f"found beside it")
    twin = split_file.with_name(split_file.name[:-len(".json")] + "-unlabeled.json")
    if not twin.is_file():
        raise FileNotFoundError(f"{split_file}: a COCO split file needs its unlabeled twin {twin} beside it")
    return SplitPaths(labeled_json=split_file, unlabeled_json=twin)


def _labeled_ids(split, coco: dict, *, split_file: Path, percent: float | None, fold: int | None) -> list[int]:
    """The labeled ids of a split file of any format above (module docstring), checked against `coco`."""
    ids = sorted(image["id"] for image in coco["images"])
    if _is_coco(split):  # Soft Teacher's labeled file
        return _check_ids([image["id"] for image in split["images"]], ids, split_file)
    if isinstance(split, list):
        return _check_ids(split, ids, split_file)
    _need_percent_and_fold(split_file, percent, fold)
    positions = _pick(split, percent=percent, fold=fold, split_file=split_file)
    annotated = annotated_image_ids(coco)
    bad = [i for i in positions if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(annotated)]
    if bad:
        raise ValueError(f"{split_file}: positions must be integers in [0, {len(annotated)}) (the images with a "
                         f"non-crowd annotation, sorted by id), got e.g. {bad[:5]}")
    expected = int(percent / 100.0 * len(annotated))  # the authors' loaders assert this count
    if len(positions) != expected:
        raise ValueError(f"{split_file}: the list for percent {percent:g}, fold {fold} holds {len(positions)} "
                         f"positions; for this training file the authors' loaders expect int({percent:g} / 100 * "
                         f"{len(annotated)}) = {expected} ({len(annotated)} of its {len(ids)} images have a "
                         f"non-crowd annotation). Was the file made for another training set?")
    return _check_ids([annotated[i] for i in positions], ids, split_file)


def _need_percent_and_fold(split_file: Path, percent: float | None, fold: int | None) -> None:
    if percent is None or fold is None:
        raise ValueError(f"{split_file}: a split file of the form {{percent: {{fold: positions}}}} needs "
                         f"`percent` and `fold` to choose a list")


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
    write_json_atomic(paths.unlabeled_json, part(lambda i: i not in chosen, "unlabeled"))
    write_json_atomic(paths.labeled_json, part(lambda i: i in chosen, "labeled"))  # last: marks the pair complete


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Semi-supervised split files (data/splits.py).")
    commands = parser.add_subparsers(dest="command", required=True)
    overlap = commands.add_parser("overlap", help="how many labeled images a split file shares with this "
                                                  "module's rule for the same percent and fold")
    overlap.add_argument("--train-json", required=True, help="the training COCO file the split is of")
    overlap.add_argument("--split-file", required=True, help="a list of ids, COCO_supervision.txt, or Soft "
                                                             "Teacher's instances_train2017.{fold}@{percent}.json")
    overlap.add_argument("--percent", type=float, required=True)
    overlap.add_argument("--fold", type=int, required=True)
    args = parser.parse_args(argv)
    result = split_overlap(args.train_json, split_file=args.split_file, percent=args.percent, fold=args.fold)
    print(f"{args.split_file} (percent {args.percent:g}, fold {args.fold}): {result['file']} labeled images\n"
          f"this rule (percent {args.percent:g}, fold {args.fold}): {result['ours']} labeled images, of "
          f"{result['images']}\n"
          f"shared: {result['both']} ({100 * result['both'] / max(result['file'], 1):.1f}% of the file's, "
          f"{100 * result['both'] / max(result['ours'], 1):.1f}% of ours; Jaccard {result['jaccard']:.3f}); two "
          f"independent random draws of these sizes share {result['chance']:.1f} on average")
    return result


if __name__ == "__main__":
    main()
