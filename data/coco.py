"""COCO-format detection datasets: a validated loader with a contiguous label map.

    train = CocoDetection("annotations/instances_train2017.json", "train2017", transform=...)
    sample = train[0]      # the sample dict of ARCHITECTURE.md (image, boxes, labels, crowd, matrix, ...)

Category ids (e.g. COCO's 1..90 with gaps) become labels 0..C-1 in increasing id order; `label_to_category_id`
maps them back for results. What the loader does with imperfect data:

* `iscrowd = 1` annotations go to `crowd` (regions ignored by the losses), never to `boxes`;
* boxes of non-positive width or height are dropped, boxes reaching outside the image are clipped to it
  (dropped if nothing is left); both are counted in `self.stats` and reported once in a warning;
* a JSON that is not COCO (no `images` / `annotations` / `categories`, a field of the wrong type, a bad
  bbox, an unknown category or image id) is an error naming the file, the record and the problem;
* `check_images()` reads every image file's header before a run (data/images.py, in threads): a missing
  file is an error naming the annotation file, the image id and the path, or with `skip_missing=True` a
  counted warning, the image left out of the dataset;
* an unreadable or corrupt image (found by that check, or when decoding) is counted in
  `self.stats["unreadable"]` and named in a warning; with `strict=True` it is an error. Training sets
  (`substitute=True`) return the next index that reads instead; evaluation sets (`substitute=False`) return
  an `unreadable_sample` that `data.loader.collate` leaves out of the batch, so that no image is ever scored
  under another's id.

Pixels are decoded by data/images.py: every mode to 8-bit RGB (16-bit and float images scaled, not
clipped), with the EXIF orientation the annotations use.

Random transforms draw from an explicit `torch.Generator`: `dataset.get(index, generator=g)`;
`dataset[index]` uses the dataset's own generator (`dataset.generator`, seeded by `seed`).
"""

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from data.images import DECODE_ERRORS, check_files, read_rgb

# transform(sample, generator) -> sample, or {"weak": sample, "strong": sample} for two-view transforms.
Transform = Callable[[dict, torch.Generator], dict]


class CocoPaths(NamedTuple):
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    unlabeled_json: Path  # COCO's extra unlabeled images (image_info_unlabeled2017.json, no annotations)
    unlabeled_images: Path


def coco_paths(root: str | Path) -> CocoPaths:
    """The COCO 2017 layout under `root` (as downloaded from cocodataset.org)."""
    root = Path(root)
    return CocoPaths(train_json=root / "annotations" / "instances_train2017.json", train_images=root / "train2017",
                     val_json=root / "annotations" / "instances_val2017.json", val_images=root / "val2017",
                     unlabeled_json=root / "annotations" / "image_info_unlabeled2017.json",
                     unlabeled_images=root / "unlabeled2017")


class ImageRecord(NamedTuple):
    """One image's annotations, already validated, in the original image's pixels."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # float32 (N, 4) xyxy
    labels: np.ndarray  # int64 (N,)
    crowd: np.ndarray  # float32 (M, 4) xyxy


class ImageCheck(NamedTuple):
    """What `CocoDetection.check_images` found."""

    checked: int  # image files looked at
    missing: int  # of them not on disk (left out of the dataset; an error unless skip_missing)
    unreadable: int  # of them without a readable header or of another size than the JSON says (skipped)
    seconds: float


class CategoryMismatchError(ValueError):
    """The file's annotations use category ids that the label map it is read with (`categories=`) lacks."""


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset returning ARCHITECTURE.md's sample dicts.

    json_path: COCO JSON with `images`, `annotations`, `categories` (`annotations` may be absent when
    `require_annotations=False`, as in COCO's image_info_unlabeled2017.json). image_dir: folder that
    `file_name`s are relative to. transform: `transform(sample, generator) -> sample` (or a two-view dict).
    image_ids: restrict to these images, in this order (default: every image, sorted by id).
    categories: the COCO `categories` list to take the label map from (default: the file's own); give the
    labeled set's list to an unlabeled set so labels agree. strict: corrupt images raise instead of skipping.
    substitute: an unreadable image is replaced by the next readable one (training), or returned as an
    `unreadable_sample` (evaluation: no image may stand in for another).
    source: the file json_path was made from (the user's annotation file, when json_path is a generated
    split of it); messages name it. Default: json_path.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, *, transform: Transform | None = None,
                 image_ids: list[int] | None = None, categories: list[dict] | None = None, strict: bool = False,
                 require_annotations: bool = True, substitute: bool = True, source: str | Path | None = None,
                 seed: int = 0):
        self.json_path = Path(json_path)
        self.source = Path(source) if source is not None else self.json_path
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.strict = strict
        self.substitute = substitute
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = {"degenerate": 0, "clipped": 0, "outside": 0, "crowd": 0, "missing": 0, "unreadable": 0}
        self._unreadable: set[int] = set()  # image ids known not to decode

        coco = _read_json(self.json_path)
        check_coco(coco, self.source, require_annotations=require_annotations)
        own_categories = coco.get("categories")
        if categories is None:
            categories = own_categories
            if categories is None and require_annotations:
                raise ValueError(f"{self.source}: not a COCO detection file: no 'categories' list")
        self._check_categories(categories or [])
        ordered = sorted(categories or [], key=lambda c: c["id"])
        self.label_to_category_id: list[int] = [c["id"] for c in ordered]
        self.category_id_to_label: dict[int, int] = {c["id"]: k for k, c in enumerate(ordered)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in ordered]
        self._check_label_map(coco, given=categories is not own_categories)

        self._records = self._build_records(coco)
        if image_ids is None:
            self.image_ids = sorted(self._records)
        else:
            unknown = [i for i in image_ids if i not in self._records]
            if unknown:
                raise ValueError(f"{self.source}: {len(unknown)} requested image ids are not in the file, "
                                 f"e.g. {unknown[:5]}")
            self.image_ids = [int(i) for i in image_ids]
        degenerate, clipped, outside = self.stats["degenerate"], self.stats["clipped"], self.stats["outside"]
        if degenerate or clipped or outside:
            warnings.warn(f"{self.source}: {degenerate} boxes of non-positive size dropped, {clipped} boxes "
                          f"clipped to their image, {outside} boxes entirely outside their image dropped",
                          stacklevel=2)

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category_id)

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, index: int) -> ImageRecord:
        """The annotations of image `index` in the original image's pixels, without reading the image."""
        return self._records[self.image_ids[index]]

    def __getitem__(self, index: int) -> dict:
        return self.get(index, generator=self.generator)

    def get(self, index: int, *, generator: torch.Generator) -> dict:
        """Sample `index` after the transform, which draws its randomness from `generator`.

        Without a transform: image float32 (3, H, W) in [0, 1] RGB, boxes float32 (N, 4) xyxy pixels,
        labels int64 (N,), crowd float32 (M, 4), matrix float64 (3, 3) identity, image_id, orig_size (H, W).
        An unreadable image is replaced by the next readable index, or without `substitute` comes back as
        `unreadable_sample(image_id)` (see the module docstring).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range for {len(self)} images")
        candidates = range(index, index + len(self)) if self.substitute else [index]
        for candidate in candidates:
            candidate %= len(self)
            image = None if self.image_ids[candidate] in self._unreadable else self._load_image(candidate)
            if image is not None:
                break
        else:
            if not self.substitute:
                return unreadable_sample(self.image_ids[index])
            raise RuntimeError(f"{self.source}: no readable image in {self.image_dir}")
        record = self.record(candidate)
        sample = {
            "image": image,
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "crowd": torch.from_numpy(record.crowd.copy()),
            "matrix": torch.eye(3, dtype=torch.float64),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        return self.transform(sample, generator) if self.transform is not None else sample

    def with_transform(self, transform: Transform | None) -> "CocoDetection":
        """This dataset with another transform: the same images, records and known-unreadable files."""
        other = copy.copy(self)
        other.transform = transform
        other.stats, other._unreadable = dict(self.stats), set(self._unreadable)
        other.generator = torch.Generator().set_state(self.generator.get_state())
        return other

    def check_images(self, *, skip_missing: bool = False, workers: int = 16) -> ImageCheck:
        """Look at every image file before a run: that it exists, and its header (format and size).

        A missing file raises FileNotFoundError naming the annotation file, the image ids and the paths;
        with skip_missing those images leave the dataset instead (counted in stats["missing"], warned).
        A file without a readable header, or of another size than the JSON says, is unreadable: counted,
        warned and skipped as one found while decoding would be (an error when strict). workers: threads
        (data.images.check_files).
        """
        start = time.perf_counter()
        records = [self._records[i] for i in self.image_ids]
        problems = check_files([self.image_dir / r.file_name for r in records],
                               [(r.height, r.width) for r in records], workers=workers)
        missing = [p for p in problems if p.kind == "missing"]
        unreadable = [p for p in problems if p.kind == "unreadable"]

        def listing(found) -> str:
            shown = [f"image id {records[p.index].image_id}: {self.image_dir / records[p.index].file_name}"
                     + ("" if p.kind == "missing" else f" ({p.reason})") for p in found[:5]]
            return "; ".join(shown + ([f"... {len(found) - 5} more"] if len(found) > 5 else []))

        if missing and not skip_missing:
            raise FileNotFoundError(f"{self.source}: {len(missing)} of {len(records)} image files are missing: "
                                    f"{listing(missing)}. Restore them, or leave those images out with "
                                    f"skip_missing (train.py / evaluate.py --skip-missing)")
        if unreadable and self.strict:
            raise RuntimeError(f"{self.source}: {len(unreadable)} image files cannot be read: {listing(unreadable)}")
        if missing:
            gone = {records[p.index].image_id for p in missing}
            self.image_ids = [i for i in self.image_ids if i not in gone]
            self.stats["missing"] += len(missing)
            warnings.warn(f"{self.source}: {len(missing)} of {len(records)} image files are missing and left out: "
                          f"{listing(missing)}", stacklevel=2)
        if unreadable:
            self._unreadable |= {records[p.index].image_id for p in unreadable}
            self.stats["unreadable"] += len(unreadable)
            fate = "skipped" if self.substitute else "left out"
            warnings.warn(f"{self.source}: {len(unreadable)} of {len(records)} image files cannot be read and will "
                          f"be {fate}: {listing(unreadable)}", stacklevel=2)
        return ImageCheck(checked=len(records), missing=len(missing), unreadable=len(unreadable),
                          seconds=time.perf_counter() - start)

    # ---- internals ---------------------------------------------------------------------------------------

    def _load_image(self, index: int) -> torch.Tensor | None:
        """float32 (3, H, W) in [0, 1]; None (after a warning) if the file cannot be decoded and not strict."""
        record = self.record(index)
        path = self.image_dir / record.file_name
        try:
            pixels = read_rgb(path, size=(record.height, record.width))  # (H, W, 3) uint8
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.source}: image file {path} (image id {record.image_id}) is "
                                    f"missing") from None
        except DECODE_ERRORS as error:
            if self.strict:
                raise RuntimeError(f"{self.source}: cannot read image {path}: {error}") from error
            self._unreadable.add(record.image_id)
            self.stats["unreadable"] += 1
            fate = "skipping" if self.substitute else "leaving out"
            warnings.warn(f"{self.source}: {fate} unreadable image {path} (image id {record.image_id}): {error}",
                          stacklevel=3)
            return None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)  # (H, W, 3) -> (3, H, W)

    def _check_categories(self, categories) -> None:
        if not isinstance(categories, list):
            raise ValueError(f"{self.source}: 'categories' must be a list")
        ids = []
        for c in categories:
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise ValueError(f"{self.source}: every category needs an integer 'id', got {c!r}")
            ids.append(c["id"])
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.source}: duplicate category ids in {sorted(ids)}")

    def _check_label_map(self, coco: dict, *, given: bool) -> None:
        """Every annotation's category in the label map; `given`: the map came from elsewhere (a checkpoint's,
        the labeled set's), so a mismatch is a CategoryMismatchError that says how the two differ."""
        for ann in coco.get("annotations") or []:
            if ann["category_id"] in self.category_id_to_label:
                continue
            if not given:
                raise ValueError(f"{self.source}: annotation {ann.get('id', '?')}: category_id "
                                 f"{ann['category_id']!r} is not in 'categories'")
            used = {a["category_id"] for a in coco["annotations"]}
            own = sorted(c["id"] for c in coco.get("categories") or [] if isinstance(c, dict) and "id" in c)
            foreign = sorted(used - set(self.category_id_to_label))
            raise CategoryMismatchError(
                f"{self.source}: its annotations use {len(used)} category ids and its 'categories' list has "
                f"{len(own)}, but the label map it is read with has {self.num_classes} classes (category ids "
                f"{self.label_to_category_id}); ids {foreign[:10]} are not among them")

    def _build_records(self, coco: dict) -> dict[int, ImageRecord]:
        """One ImageRecord per image (`check_coco` has checked the types): boxes xyxy, clipped or dropped."""
        info = {image["id"]: image for image in coco["images"]}
        per_image: dict[int, dict[str, list]] = {i: {"boxes": [], "labels": [], "crowd": []} for i in info}
        for ann in coco.get("annotations") or []:
            image_id = ann["image_id"]
            height, width = info[image_id]["height"], info[image_id]["width"]
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                self.stats["degenerate"] += 1
                continue
            x1, y1, x2, y2 = x, y, x + w, y + h
            cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
            cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
            if cx2 <= cx1 or cy2 <= cy1:
                self.stats["outside"] += 1
                continue
            if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                self.stats["clipped"] += 1
            if ann.get("iscrowd", 0):
                self.stats["crowd"] += 1
                per_image[image_id]["crowd"].append((cx1, cy1, cx2, cy2))
            else:
                per_image[image_id]["boxes"].append((cx1, cy1, cx2, cy2))
                per_image[image_id]["labels"].append(self.category_id_to_label[ann["category_id"]])

        return {image_id: ImageRecord(image_id=int(image_id), file_name=str(image["file_name"]),
                                      height=int(image["height"]), width=int(image["width"]),
                                      boxes=np.asarray(per_image[image_id]["boxes"], np.float32).reshape(-1, 4),
                                      labels=np.asarray(per_image[image_id]["labels"], np.int64).reshape(-1),
                                      crowd=np.asarray(per_image[image_id]["crowd"], np.float32).reshape(-1, 4))
                for image_id, image in info.items()}


def unreadable_sample(image_id: int) -> dict:
    """What an evaluation set (`substitute=False`) returns for an image it cannot read; `data.loader.collate`
    leaves it out of the batch and lists its id in `Batch.skipped_ids`."""
    return {"image_id": int(image_id), "unreadable": True}


def check_coco(coco: dict, path: str | Path, *, require_annotations: bool = True) -> None:
    """Raise a ValueError naming `path`, the record and the field for a COCO dict that cannot be read.

    images: objects with an integer `id` (no repeats), a non-empty string `file_name` and positive integer
    `width` and `height`. annotations (optional when not require_annotations): objects whose `image_id` is an
    image's id, with an integer `category_id`, a `bbox` of 4 finite numbers [x, y, width, height] and an
    `iscrowd` of 0 or 1 if any. Which category ids are known is the label map's business (CocoDetection).
    """
    images = coco.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{path}: not a COCO detection file: no 'images' list")
    annotations = coco.get("annotations")
    if annotations is None and not require_annotations:
        annotations = []
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: not a COCO detection file: no 'annotations' list")

    ids = set()
    for position, image in enumerate(images):
        where = f"{path}: images[{position}]"
        if not isinstance(image, dict) or not all(k in image for k in ("id", "file_name", "width", "height")):
            raise ValueError(f"{where}: every image needs 'id', 'file_name', 'width', 'height', got {image!r}")
        if not _is_int(image["id"]):
            raise ValueError(f"{where}: 'id' must be an integer, got {_shown(image['id'])}")
        where = f"{where} (id {image['id']})"
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ValueError(f"{where}: 'file_name' must be a non-empty string, got {_shown(image['file_name'])}")
        for key in ("width", "height"):  # 640.0 passes: some tools write every number as a float
            value = image[key]
            if not (_is_int(value) or isinstance(value, float) and value.is_integer()) or value <= 0:
                raise ValueError(f"{where}: {key!r} must be a positive integer, got {_shown(image[key])}")
        if image["id"] in ids:
            raise ValueError(f"{path}: duplicate image id {image['id']}")
        ids.add(image["id"])

    for ann in annotations:
        where = f"{path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else '?'}"
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected an object, got {ann!r}")
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in ids:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if not _is_int(ann.get("category_id")):
            raise ValueError(f"{where}: category_id must be an integer, got {_shown(ann.get('category_id'))}")
        box = ann.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {box!r}")
        if ann.get("iscrowd", 0) not in (0, 1):  # True / False compare equal to 1 / 0
            raise ValueError(f"{where}: iscrowd must be 0 or 1, got {_shown(ann['iscrowd'])}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    """A bad value and its JSON type, for messages: '96' (a string)."""
    kinds = {str: "a string", float: "a number", bool: "a boolean", list: "a list",
             dict: "an object", type(None): "null"}
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


def load_unlabeled(json_path: str | Path, image_dir: str | Path, *, transform: Transform | None = None,
                   categories: list[dict] | None = None, **kwargs) -> CocoDetection:
    """Images for the unsupervised loss, from a COCO file with or without annotations.

    COCO's image_info_unlabeled2017.json lists images only: samples then have no boxes. Files that do carry
    annotations (the unlabeled part of a split, the built-in dataset) keep them as the hidden ground truth,
    used by diagnostics only. Pass the labeled set's `categories` so that labels agree.
    """
    return CocoDetection(json_path, image_dir, transform=transform, categories=categories,
                         require_annotations=False, **kwargs)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a COCO detection file: expected a JSON object with 'images', "
                         f"'annotations' and 'categories', got a {type(data).__name__}")
    return data
