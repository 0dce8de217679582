"""Pascal VOC in its own layout, converted once to COCO JSON and reused.

    python -m data.voc /data/VOCdevkit --out /data/voc_coco        # the conversion alone, with its report
    json_path = voc_json("/data/VOCdevkit", "2007", "trainval")     # converted on first use, cached after

ROOT is the `VOCdevkit` folder (or the folder holding it), with one folder per year, as the VOC archives
unpack:

    VOCdevkit/VOC2007/Annotations/000005.xml       one XML file per image
    VOCdevkit/VOC2007/ImageSets/Main/trainval.txt  the image names of a set, one per line (also test.txt)
    VOCdevkit/VOC2007/JPEGImages/000005.jpg
    VOCdevkit/VOC2012/...                          the same for 2012 (trainval only; its test set has no labels)

Each (year, image set) becomes `voc{year}_{set}.json`, COCO format, `file_name` relative to VOCdevkit
("VOC2007/JPEGImages/000005.jpg"), so that one image folder serves every year. The rules:

* Classes: the 20 of `VOC_CLASSES`, in VOC's order (the devkit's), category ids 1..20; contiguous labels
  (data/coco.py) are then 0..19 in the same order.
* Boxes: VOC's xmin, ymin, xmax, ymax are 1-based pixel indices, both ends included (a box from xmin = 1 to
  xmax = W covers the whole width). They become 0-based continuous xyxy by the rule of detectron2's VOC
  reader, which the SS-OD codebases built on it share:

      x1 = xmin - 1    y1 = ymin - 1    x2 = xmax    y2 = ymax       (COCO bbox [x1, y1, x2 - x1, y2 - y1])

  so a box is xmax - xmin + 1 pixels wide, as the devkit counts it, and IoU in these coordinates equals the
  devkit's "+1" IoU (engine/evaluation.py relies on it for VOC07 AP50).
* `difficult` objects: annotations with `iscrowd: 1` and `difficult: 1`. data/coco.py puts crowd boxes among
  the ignored regions of a training sample; pycocotools ignores them as crowd ground truth in COCO-style AP;
  the VOC07 metric counts them as difficult (neither missed nor matched). `truncated` and `occluded` objects
  are ordinary objects (their flags are kept in the annotation, unused).
* Image ids: VOC2007 names "000005" -> 5; VOC2012 names "2008_000008" -> 2008000008 (year * 10^6 + number),
  so the ids of the two years never meet. A set with any other name gets ids 1..N in its file's order.
* Image size: from the JPEG's header; an XML whose `size` disagrees is counted (`size_mismatch`).

Bad input never passes silently:

* a missing year folder or image-set file: FileNotFoundError naming it;
* per image, skipped, counted in the report and named in a warning (with `strict=True`, an error naming the
  file instead): a missing XML file (`missing_xml`), XML that does not parse or lacks a field this reader
  needs (`malformed_xml`), a missing or unreadable JPEG (`missing_jpeg`, `unreadable_jpeg`);
* per object, counted: a class outside the 20 (`unknown_class`, dropped), a box reaching outside the image
  (`clipped`, clipped to it), a box with nothing left inside the image (`outside`, dropped).

The JSON is written atomically with a `.meta.json` twin, written last, that records the reader's version and
a fingerprint of the sources (the image-set file's content, the size and mtime of every XML and JPEG); a
cached file is reused while both match, and rewritten when any source changes.

`coco20_json` builds the papers' COCO-20cls: the COCO train images all of whose objects belong to the 20 VOC
classes, an extra unlabeled set for the "VOC07 + VOC12 + COCO-20cls" setting.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from data.splits import write_json_atomic

# Bump when the conversion's output changes: cached files of other versions are rewritten.
READER_VERSION = 1

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CATEGORIES = [{"id": k + 1, "name": name, "supercategory": "voc"} for k, name in enumerate(VOC_CLASSES)]

# COCO's names of the 20 VOC classes (the others are the same word).
COCO_TO_VOC = {"airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
               "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
               "dining table": "diningtable", "dog": "dog", "horse": "horse", "motorcycle": "motorbike",
               "person": "person", "potted plant": "pottedplant", "sheep": "sheep", "couch": "sofa",
               "train": "train", "tv": "tvmonitor"}
# COCO-20cls image ids are COCO's plus this offset, so that they never meet a VOC id in a merged set.
COCO_ID_OFFSET = 10**10

REPORT_KEYS = ("images", "objects", "difficult", "missing_xml", "malformed_xml", "missing_jpeg", "unreadable_jpeg",
               "size_mismatch", "unknown_class", "clipped", "outside")


class VocError(ValueError):
    """A VOC file this reader cannot use; the message names the file."""


def default_cache_dir() -> Path:
    """$SSOD_CACHE/voc when SSOD_CACHE is set, else ~/.cache/ssod/voc."""
    base = os.environ.get("SSOD_CACHE")
    return Path(base) / "voc" if base else Path.home() / ".cache" / "ssod" / "voc"


def find_devkit(root: str | Path) -> Path:
    """The VOCdevkit folder: `root` itself when it holds VOC<year> folders, else root/VOCdevkit."""
    root = Path(root)
    if any(root.glob("VOC20[0-9][0-9]")):
        return root
    if (root / "VOCdevkit").is_dir():
        return root / "VOCdevkit"
    raise FileNotFoundError(f"{root}: no VOC<year> folder (e.g. VOC2007) in it or in {root / 'VOCdevkit'}")


def voc_json(root: str | Path, year: str, image_set: str, *, cache_dir: str | Path | None = None,
             strict: bool = False, verbose: bool = False) -> Path:
    """The COCO JSON of VOC<year>/<image_set>, converted into the cache on first use and reused after.

    cache_dir: where the JSON goes; default `default_cache_dir() / voc_<hash of the devkit's path>`.
    strict: a bad image is an error naming its file instead of a counted skip. Returns the JSON's path;
    its `info.voc_report` holds the counts of the module docstring.
    """
    devkit = find_devkit(root)
    if cache_dir is None:
        cache_dir = default_cache_dir() / f"voc_{hashlib.sha1(str(devkit.resolve()).encode()).hexdigest()[:10]}"
    out = Path(cache_dir) / f"voc{year}_{image_set}.json"
    meta_path = out.with_name(out.name[:-len(".json")] + ".meta.json")
    names = _read_image_set(devkit, year, image_set)
    meta = {"reader_version": READER_VERSION, "strict": strict,
            "fingerprint": _fingerprint(devkit, year, image_set, names)}
    if out.is_file() and _read_meta(meta_path) == meta:
        return out
    coco, report = convert_set(devkit, year, image_set, names=names, strict=strict)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, coco)
    write_json_atomic(meta_path, meta)  # last: marks the JSON complete
    if verbose:
        print(f"{out}: {format_report(report)}", flush=True)
    return out


def convert_set(devkit: Path, year: str, image_set: str, *, names: list[str] | None = None,
                strict: bool = False) -> tuple[dict, dict]:
    """VOC<year>/<image_set> as a COCO dict, and the report of what was counted or skipped (REPORT_KEYS)."""
    folder = devkit / f"VOC{year}"
    names = names if names is not None else _read_image_set(devkit, year, image_set)
    ids = _image_ids(names)
    report = dict.fromkeys(REPORT_KEYS, 0)
    images, annotations, skipped = [], [], []
    for name, image_id in zip(names, ids):
        xml_path = folder / "Annotations" / f"{name}.xml"
        try:
            image, objects = _read_image(folder, name, xml_path, report)
        except VocError as error:
            if strict:
                raise
            skipped.append(str(error))
            continue
        images.append({"id": image_id, "file_name": f"VOC{year}/JPEGImages/{name}.jpg", "width": image.width,
                       "height": image.height, "voc_name": name})
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj.category_id,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(obj.difficult), "difficult": int(obj.difficult),
                                "truncated": int(obj.truncated)})
    report["images"] = len(images)
    report["objects"] = len(annotations)
    report["difficult"] = sum(a["difficult"] for a in annotations)
    if skipped:
        shown = "\n  ".join(skipped[:10]) + (f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        warnings.warn(f"VOC{year}/{image_set}: {len(skipped)} of {len(names)} images skipped:\n  {shown}",
                      stacklevel=2)
    coco = {"info": {"description": f"Pascal VOC{year} {image_set}, converted by data/voc.py",
                     "voc_report": report},
            "categories": CATEGORIES, "images": images, "annotations": annotations}
    return coco, report


def format_report(report: dict) -> str:
    kept = f"{report['images']} images, {report['objects']} objects ({report['difficult']} difficult)"
    counted = ", ".join(f"{key} {report[key]}" for key in REPORT_KEYS[3:] if report[key])
    return kept + (f"; {counted}" if counted else "; nothing skipped or changed")


# --------------------------------------------------------------------------------------------------------
# COCO-20cls: extra unlabeled images from COCO
# --------------------------------------------------------------------------------------------------------


def coco20_json(coco_train_json: str | Path, coco_images: str | Path, out_dir: str | Path) -> Path:
    """COCO-20cls: the images of a COCO training file with at least one object, every object (crowd ones
    included) of one of the 20 VOC classes. Written once to out_dir/coco20cls.json and reused.

    Category ids become VOC's 1..20 (the annotations stay as hidden ground truth for the pseudo-label
    diagnostics, never used by a loss); image ids become COCO's + COCO_ID_OFFSET; `file_name` becomes the
    image's absolute path, so that the set can be merged with VOC images of another folder.
    """
    coco_train_json, coco_images = Path(coco_train_json), Path(coco_images)
    out = Path(out_dir) / "coco20cls.json"
    meta_path = out.with_name("coco20cls.meta.json")
    if not coco_train_json.is_file():
        raise FileNotFoundError(f"COCO annotation file {coco_train_json} does not exist")
    stat = coco_train_json.stat()
    meta = {"reader_version": READER_VERSION, "source": str(coco_train_json.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "images": str(coco_images.resolve())}
    if out.is_file() and _read_meta(meta_path) == meta:
        return out
    coco = json.loads(coco_train_json.read_text())
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations",
                                                                                   "categories")):
        raise ValueError(f"{coco_train_json}: not a COCO detection file (needs 'images', 'annotations', "
                         f"'categories' lists)")
    voc_id = {name: k + 1 for k, name in enumerate(VOC_CLASSES)}
    to_voc = {c["id"]: voc_id[COCO_TO_VOC[c["name"]]] for c in coco["categories"] if c.get("name") in COCO_TO_VOC}
    if len(set(to_voc.values())) != len(VOC_CLASSES):
        missing = sorted(set(COCO_TO_VOC) - {c.get("name") for c in coco["categories"]})
        raise ValueError(f"{coco_train_json}: COCO's names of the 20 VOC classes are not all among its "
                         f"categories; missing {missing}")
    per_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    images, annotations = [], []
    for image in coco["images"]:
        anns = per_image.get(image["id"], [])
        if not any(not a.get("iscrowd", 0) for a in anns) or any(a["category_id"] not in to_voc for a in anns):
            continue
        new_id = image["id"] + COCO_ID_OFFSET
        images.append({**image, "id": new_id, "file_name": str((coco_images / image["file_name"]).resolve())})
        annotations += [{**a, "id": len(annotations) + k + 1, "image_id": new_id,
                         "category_id": to_voc[a["category_id"]]} for k, a in enumerate(anns)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"info": {"description": f"COCO-20cls of {coco_train_json}"}, "categories": CATEGORIES,
                            "images": images, "annotations": annotations})
    write_json_atomic(meta_path, meta)
    return out


# --------------------------------------------------------------------------------------------------------
# Reading one image's files
# --------------------------------------------------------------------------------------------------------


class VocObject(NamedTuple):
    category_id: int  # 1..20
    box: tuple[float, float, float, float]  # 0-based xyxy, clipped to the image
    difficult: bool
    truncated: bool


class ImageSize(NamedTuple):
    width: int
    height: int


def _read_image(folder: Path, name: str, xml_path: Path, report: dict) -> tuple[ImageSize, list[VocObject]]:
    """The JPEG's size and the XML's objects of one image; VocError (naming the file) if it cannot be used.

    Per-object counts go into `report`; per-image problems raise, and the caller counts or re-raises them.
    """
    def fail(key: str, message: str):
        report[key] += 1
        raise VocError(message)

    if not xml_path.is_file():
        fail("missing_xml", f"{xml_path}: annotation file missing")
    try:
        tree = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        fail("malformed_xml", f"{xml_path}: not valid XML: {error}")
    jpeg_path = folder / "JPEGImages" / f"{name}.jpg"
    if not jpeg_path.is_file():
        fail("missing_jpeg", f"{jpeg_path}: image file missing (annotated in {xml_path.name})")
    try:
        with Image.open(jpeg_path) as pil:  # reads the header only
            size = ImageSize(*pil.size)
    except (OSError, UnidentifiedImageError) as error:
        fail("unreadable_jpeg", f"{jpeg_path}: cannot read the image: {error}")

    xml_size = (_number(tree, "size/width"), _number(tree, "size/height"))
    if xml_size != (size.width, size.height):
        report["size_mismatch"] += 1
    objects = []
    for obj in tree.findall("object"):
        class_name = (obj.findtext("name") or "").strip()
        fields = [_number(obj, f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
        if None in fields:
            fail("malformed_xml", f"{xml_path}: object {class_name!r} lacks a numeric bndbox xmin/ymin/xmax/ymax")
        if class_name not in VOC_CLASSES:
            report["unknown_class"] += 1
            continue
        xmin, ymin, xmax, ymax = fields
        box = (xmin - 1.0, ymin - 1.0, xmax, ymax)  # the module docstring's rule: 1-based inclusive -> 0-based xyxy
        clipped = (min(max(box[0], 0.0), size.width), min(max(box[1], 0.0), size.height),
                   min(max(box[2], 0.0), size.width), min(max(box[3], 0.0), size.height))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            report["outside"] += 1
            continue
        if clipped != box:
            report["clipped"] += 1
        objects.append(VocObject(category_id=VOC_CLASSES.index(class_name) + 1, box=clipped,
                                 difficult=_number(obj, "difficult") == 1, truncated=_number(obj, "truncated") == 1))
    return size, objects


def _number(node, path: str) -> float | int | None:
    """The number at `path` under an XML node (int when whole), or None when absent or not a number."""
    text = node.findtext(path)
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return int(value) if value.is_integer() else value


def _read_image_set(devkit: Path, year: str, image_set: str) -> list[str]:
    folder = devkit / f"VOC{year}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: VOC{year} folder missing from {devkit}")
    path = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image-set file missing (VOC{year} {image_set})")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise VocError(f"{path}: an image is listed more than once")
    if not names:
        raise VocError(f"{path}: lists no image")
    return names


def _image_ids(names: list[str]) -> list[int]:
    """VOC2007 "000005" -> 5; VOC2012 "2008_000008" -> 2008000008; else 1..N in order (module docstring)."""
    pattern = re.compile(r"^(\d{6})$|^(\d{4})_(\d{6})$")
    matches = [pattern.match(name) for name in names]
    if all(matches):
        ids = [int(m.group(1)) if m.group(1) else int(m.group(2)) * 10**6 + int(m.group(3)) for m in matches]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(names) + 1))


def _fingerprint(devkit: Path, year: str, image_set: str, names: list[str]) -> str:
    """A digest of the set's list and of the size and mtime of every XML and JPEG it names."""
    folder = devkit / f"VOC{year}"
    digest = hashlib.sha1((folder / "ImageSets" / "Main" / f"{image_set}.txt").read_bytes())
    for name in names:
        for path in (folder / "Annotations" / f"{name}.xml", folder / "JPEGImages" / f"{name}.jpg"):
            try:
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            except FileNotFoundError:
                digest.update(f"{path.name}:missing;".encode())
    return digest.hexdigest()


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description="Convert Pascal VOC (VOC2007 trainval / test, VOC2012 trainval) "
                                                 "to COCO JSON, once; print what was kept and skipped.")
    parser.add_argument("root", help="the VOCdevkit folder, or the folder holding it")
    parser.add_argument("--out", default=None, help="where the JSON files go (default: the cache of data/voc.py)")
    parser.add_argument("--sets", nargs="+", default=["2007:trainval", "2007:test", "2012:trainval"],
                        metavar="YEAR:SET", help="which image sets (default: the papers' three)")
    parser.add_argument("--strict", action="store_true", help="a bad image is an error instead of a counted skip")
    args = parser.parse_args(argv)
    written = {}
    for item in args.sets:
        year, _, image_set = item.partition(":")
        if not (year and image_set):
            parser.error(f"--sets takes YEAR:SET, e.g. 2007:trainval; got {item!r}")
        path = voc_json(args.root, year, image_set, cache_dir=args.out, strict=args.strict)
        report = json.loads(path.read_text())["info"]["voc_report"]
        print(f"VOC{year} {image_set}: {path}\n  {format_report(report)}", flush=True)
        written[f"{year}:{image_set}"] = path
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
