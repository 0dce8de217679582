"""COCO-format detection datasets: a validated loader with a contiguous label map.

    train = CocoDetection("annotations/instances_train2017.json", "train2017", transform=...)
    sample = train[0]      # the sample dict of ARCHITECTURE.md (image, boxes, labels, crowd, matrix, ...)

Category ids (e.g. COCO's 1..90 with gaps) become labels 0..C-1 in increasing id order; `label_to_category_id`
maps them back for results. What the loader does with imperfect data:

* `iscrowd = 1` annotations go to `crowd` (regions ignored by the losses), never to `boxes`;
* boxes of non-positive width or height are dropped, boxes reaching outside the image are clipped to it
  (dropped if nothing is left); both are counted in `self.stats` and reported once in a warning;
* a JSON that is not COCO (no `images` / `annotations` / `categories`, a bad bbox, an unknown category or
  image id) is an error naming the file and the problem;
* a missing image file is an error naming the file (`check_files()` checks every file up-front);
* an unreadable or corrupt image is skipped: the next index that reads is returned instead, the file is
  named in a warning and counted in `self.stats["unreadable"]`; with `strict=True` it is an error.

Random transforms draw from an explicit `torch.Generator`: `dataset.get(index, generator=g)`;
`dataset[index]` uses the dataset's own generator (`dataset.generator`, seeded by `seed`).
"""

import json
import math
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset returning ARCHITECTURE.md's sample dicts.

    json_path: COCO JSON with `images`, `annotations`, `categories` (`annotations` may be absent when
    `require_annotations=False`, as in COCO's image_info_unlabeled2017.json). image_dir: folder that
    `file_name`s are relative to. transform: `transform(sample, generator) -> sample` (or a two-view dict).
    image_ids: restrict to these images, in this order (default: every image, sorted by id).
    categories: the COCO `categories` list to take the label map from (default: the file's own); give the
    labeled set's list to an unlabeled set so labels agree. strict: corrupt images raise instead of skipping.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, *, transform: Transform | None = None,
                 image_ids: list[int] | None = None, categories: list[dict] | None = None, strict: bool = False,
                 require_annotations: bool = True, seed: int = 0):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.strict = strict
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = {"degenerate": 0, "clipped": 0, "outside": 0, "crowd": 0, "unreadable": 0}
        self._unreadable: set[int] = set()

        coco = _read_json(self.json_path)
        if categories is None:
            categories = coco.get("categories")
            if categories is None and require_annotations:
                raise ValueError(f"{self.json_path}: not a COCO detection file: no 'categories' list")
        self._check_categories(categories or [])
        ordered = sorted(categories or [], key=lambda c: c["id"])
        self.label_to_category_id: list[int] = [c["id"] for c in ordered]
        self.category_id_to_label: dict[int, int] = {c["id"]: k for k, c in enumerate(ordered)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in ordered]

        self._records = self._build_records(coco, require_annotations=require_annotations)
        if image_ids is None:
            self.image_ids = sorted(self._records)
        else:
            unknown = [i for i in image_ids if i not in self._records]
            if unknown:
                raise ValueError(f"{self.json_path}: {len(unknown)} requested image ids are not in the file, "
                                 f"e.g. {unknown[:5]}")
            self.image_ids = [int(i) for i in image_ids]
        degenerate, clipped, outside = self.stats["degenerate"], self.stats["clipped"], self.stats["outside"]
        if degenerate or clipped or outside:
            warnings.warn(f"{self.json_path}: {degenerate} boxes of non-positive size dropped, {clipped} boxes "
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
        An unreadable image is replaced by the next readable index (see the module docstring).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"{self.json_path}: index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._unreadable:
                continue
            image = self._load_image(candidate)
            if image is not None:
                break
        else:
            raise RuntimeError(f"{self.json_path}: no readable image in {self.image_dir}")
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

    def check_files(self) -> None:
        """Raise FileNotFoundError naming the missing image files (the first few) if any is missing."""
        missing = [str(self.image_dir / self._records[i].file_name) for i in self.image_ids
                   if not (self.image_dir / self._records[i].file_name).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.json_path}: {len(missing)} of {len(self)} image files are missing from "
                                    f"{self.image_dir}, e.g. {missing[:5]}")

    # ---- internals ---------------------------------------------------------------------------------------

    def _load_image(self, index: int) -> torch.Tensor | None:
        """float32 (3, H, W) in [0, 1]; None (after a warning) if the file cannot be decoded and not strict."""
        record = self.record(index)
        path = self.image_dir / record.file_name
        if not path.is_file():
            raise FileNotFoundError(f"{self.json_path}: image file {path} (image id {record.image_id}) is missing")
        try:
            with Image.open(path) as pil:
                pixels = np.asarray(pil.convert("RGB"))  # (H, W, 3) uint8
            if pixels.shape[:2] != (record.height, record.width):
                raise ValueError(f"size {pixels.shape[1]}x{pixels.shape[0]} differs from the JSON's "
                                 f"{record.width}x{record.height}")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            if self.strict:
                raise RuntimeError(f"{self.json_path}: cannot read image {path}: {error}") from error
            self._unreadable.add(index)
            self.stats["unreadable"] += 1
            warnings.warn(f"{self.json_path}: skipping unreadable image {path}: {error}", stacklevel=3)
            return None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)  # (H, W, 3) -> (3, H, W)

    def _check_categories(self, categories) -> None:
        if not isinstance(categories, list):
            raise ValueError(f"{self.json_path}: 'categories' must be a list")
        ids = []
        for c in categories:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise ValueError(f"{self.json_path}: every category needs an integer 'id', got {c!r}")
            ids.append(c["id"])
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.json_path}: duplicate category ids in {sorted(ids)}")

    def _build_records(self, coco: dict, *, require_annotations: bool) -> dict[int, ImageRecord]:
        images = coco.get("images")
        if not isinstance(images, list):
            raise ValueError(f"{self.json_path}: not a COCO detection file: no 'images' list")
        annotations = coco.get("annotations")
        if annotations is None and not require_annotations:
            annotations = []
        if not isinstance(annotations, list):
            raise ValueError(f"{self.json_path}: not a COCO detection file: no 'annotations' list")

        info = {}
        for image in images:
            if not isinstance(image, dict) or not all(k in image for k in ("id", "file_name", "width", "height")):
                raise ValueError(f"{self.json_path}: every image needs 'id', 'file_name', 'width', 'height', "
                                 f"got {image!r}")
            if image["id"] in info:
                raise ValueError(f"{self.json_path}: duplicate image id {image['id']}")
            info[image["id"]] = image

        per_image: dict[int, dict[str, list]] = {i: {"boxes": [], "labels": [], "crowd": []} for i in info}
        for ann in annotations:
            image_id, box = self._check_annotation(ann, info)
            height, width = info[image_id]["height"], info[image_id]["width"]
            x, y, w, h = box
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

    def _check_annotation(self, ann, info: dict) -> tuple[int, tuple[float, float, float, float]]:
        where = f"{self.json_path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else '?'}"
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected an object, got {ann!r}")
        if ann.get("image_id") not in info:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in self.category_id_to_label:
            raise ValueError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        box = ann.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {box!r}")
        return ann["image_id"], tuple(float(v) for v in box)


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
