"""Evaluate a checkpoint on the validation set: COCO box metrics (VOC: and VOC07 AP50), per-class AP, results.

    python evaluate.py runs/supervised_fcos_10pct/last.pth      # last.pth: the run's newest checkpoint
    python evaluate.py CKPT --which student --vis 8            # also draw 8 images with boxes to PNG
    python evaluate.py CKPT --data-root /data/coco             # the COCO data on this machine
    python evaluate.py CKPT --test-sizes 96 128 160 --hflip    # multi-scale (and flip) test, merged by NMS

The model is rebuilt from the config stored in the checkpoint, so on the built-in dataset no other flag is
needed (the dataset is regenerated if it is not cached). `--which` picks the teacher (the default when the
checkpoint has one) or the student. Detections are written as a COCO results file next to the checkpoint
(`checkpoint_<iteration>.<which>.results.json`; multi-scale: `...<which>.ms96-128-160[-flip].results.json`) or
to `--out`.

`--test-sizes` runs the detector on every val image at each short side (the long side capped in the config's
proportion test_max_size / test_size), `--hflip` also on each mirrored; the passes' detections are mapped back
to the original image and merged per image by class-wise NMS at `--tta-nms` (SED paper, Tab. 7).
"""

import argparse
import os
from pathlib import Path

import torch

import detectors
from data.coco import CategoryMismatchError, CocoDetection
from data.loader import build_val_loader, collate
from data.transforms import build_eval_transform
from engine.checkpoint import load_checkpoint, load_model_state
from engine.config import Config, DatasetFiles, check_dataset_files, dataset_files, detector_kwargs
from engine.evaluation import evaluate, evaluate_multiscale, load_coco
from engine.visualize import save_boxes
from structures import warp_boxes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by train.py")
    parser.add_argument("--which", choices=("auto", "teacher", "student"), default="auto",
                        help="auto: the teacher when the checkpoint has one, else the student")
    parser.add_argument("--out", default="", help="results JSON (default: next to the checkpoint)")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="draw N val images with boxes to PNG files")
    parser.add_argument("--vis-dir", default="", help="where the PNG files go (default: <checkpoint dir>/vis)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="lowest score drawn by --vis")
    parser.add_argument("--data-root", default=None,
                        help="COCO root or VOCdevkit on this machine (overrides the checkpoint's)")
    parser.add_argument("--val-json", default=None)
    parser.add_argument("--val-images", default=None)
    parser.add_argument("--builtin-dir", default=None, help="cache folder of the built-in dataset")
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (default: the training batch)")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate the first N val images only (0: all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out (and count) val images whose files are missing, instead of stopping")
    parser.add_argument("--verbose", action="store_true", help="show pycocotools' own output")
    parser.add_argument("--test-sizes", type=int, nargs="+", default=None, metavar="S",
                        help="multi-scale test at these short sides (e.g. 96 128 160), passes merged by NMS")
    parser.add_argument("--hflip", action="store_true",
                        help="also test every size mirrored (alone: the config's test size and its mirror)")
    parser.add_argument("--tta-nms", type=float, default=0.5, help="IoU of the NMS that merges the test passes")
    return parser.parse_args(argv)


def validation_set(cfg: Config, meta: dict, *, path: Path) -> tuple[DatasetFiles, CocoDetection]:
    """The validation set of a checkpoint's run at its test size, with the checkpoint's label map (labels must
    mean what they meant in training), and the dataset's files. Unreadable images are left out of the scoring
    (substitute=False), never replaced by another image. meta: the checkpoint's "meta"; path names it in errors."""
    files = dataset_files(cfg)
    check_dataset_files(cfg, files, names=("val_json", "val_images"))
    categories = [{"id": i, "name": n} for i, n in zip(meta["category_ids"], meta["class_names"])]
    try:
        val = CocoDetection(files.val_json, files.val_images, categories=categories, substitute=False,
                            transform=build_eval_transform(cfg.test_size, cfg.test_max_size))
    except CategoryMismatchError as error:
        raise ValueError(f"checkpoint {path} was trained on {meta['num_classes']} classes, which the val "
                         f"annotations do not match: {error}") from None
    return files, val


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    path = Path(args.checkpoint)
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    if args.data_root is not None:  # the data moved: the training machine's explicit paths no longer apply
        cfg.train_json = cfg.train_images = cfg.val_json = cfg.val_images = ""
    for name in ("data_root", "val_json", "val_images", "builtin_dir", "device"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    meta = state["meta"]

    # The model, with the weights asked for.
    which = args.which if args.which != "auto" else ("teacher" if state["teacher"] is not None else "student")
    weights = state["model"] if which == "student" else state["teacher"]
    if weights is None:
        raise ValueError(f"checkpoint {path} has no teacher (a supervised run); use --which student")
    device = torch.device(cfg.device)
    detector = detectors.build_detector(cfg.detector, num_classes=meta["num_classes"], **detector_kwargs(cfg))
    load_model_state(detector.model, weights, path=path, what=which)
    detector.model.to(device).eval()

    files, val = validation_set(cfg, meta, path=path)  # at the test size: the drawings' view
    found = val.check_images(skip_missing=args.skip_missing)  # every file's header, before the model runs
    print(f"checked the {found.checked} val image files in {found.seconds:.1f} s", flush=True)

    def val_loader(dataset: CocoDetection):
        return build_val_loader(dataset, batch_size=args.batch_size or cfg.labeled_batch, num_workers=cfg.num_workers,
                                size_divisible=cfg.size_divisible)

    common = dict(coco_gt=load_coco(files.val_json, verbose=args.verbose), category_ids=meta["category_ids"],
                  class_names=meta["class_names"], max_images=args.max_images or None, verbose=args.verbose,
                  progress=True, voc07=cfg.dataset == "voc")
    print(f"evaluating the {which} of {path} ({cfg.detector}, {cfg.method}) on {files.val_json}", flush=True)
    multiscale = args.test_sizes is not None or args.hflip
    if multiscale:
        short_sides = args.test_sizes or [cfg.test_size]
        max_sizes = [round(s * cfg.test_max_size / cfg.test_size) for s in short_sides]  # the config's proportion
        max_detections = getattr(detector.postprocessor, "detections_per_image", 100)
        scale_sets = [val.with_transform(build_eval_transform(s, m)) for s, m in zip(short_sides, max_sizes)]
        result = evaluate_multiscale(detector, [val_loader(scale_set) for scale_set in scale_sets],
                                     hflip=args.hflip, iou_threshold=args.tta_nms, max_detections=max_detections,
                                     **common)
        scales = ", ".join(f"{s}/{m}" for s, m in zip(short_sides, max_sizes))
        print(f"multi-scale test, short/long side {scales}{', each also mirrored' if args.hflip else ''}; passes "
              f"merged by class-wise NMS at IoU {args.tta_nms:g}, best {max_detections} per image kept")
        tag = f".ms{'-'.join(map(str, short_sides))}{'-flip' if args.hflip else ''}"  # results file, drawings
    else:
        result = evaluate(detector, val_loader(val), **common)
        tag = ""
    print(result.table())
    print(f"{result.counts()}; {result.seconds:.1f} s ({result.num_images / max(result.seconds, 1e-9):.1f} images/s)")
    target = Path(os.path.realpath(path))  # last.pth -> the checkpoint it links to
    out = Path(args.out) if args.out else target.with_name(f"{target.stem}.{which}{tag}.results.json")
    print(f"detections: {result.write_results_json(out)}")

    samples = [val[i] for i in range(min(args.vis, len(val)))]
    samples = [sample for sample in samples if not sample.get("unreadable")]  # the readable ones are drawn
    if samples:
        vis_dir = Path(args.vis_dir) if args.vis_dir else path.parent / "vis"
        if multiscale:  # the merged detections, moved from the original image onto the drawn view
            detections = [results_in_view(result.results, sample, category_ids=meta["category_ids"])
                          for sample in samples]
        else:
            batch = collate(samples, size_divisible=cfg.size_divisible)
            detections = detectors.predict(detector, batch.images.to(device), batch.image_sizes.to(device))
        for sample, det in zip(samples, detections):
            save_boxes(vis_dir / f"{sample['image_id']}.{which}{tag}.png", sample["image"],
                       class_names=meta["class_names"], boxes=det["boxes"].cpu(), labels=det["labels"].cpu(),
                       scores=det["scores"].cpu(),
                       gt_boxes=sample["boxes"], gt_labels=sample["labels"], score_threshold=args.score_threshold)
        print(f"drawings: {vis_dir} ({len(samples)} images)")
    return result.metrics


def results_in_view(results: list[dict], sample: dict, *, category_ids: list[int]) -> dict:
    """The COCO result entries of the sample's image as {"boxes" (K, 4) xyxy in the sample's frame, "scores"
    (K,), "labels" int64 (K,)}."""
    mine = [r for r in results if r["image_id"] == sample["image_id"]]
    xywh = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)  # original pixels
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # (K, 4) xyxy
    return {"boxes": warp_boxes(boxes, sample["matrix"]),
            "scores": torch.tensor([r["score"] for r in mine], dtype=torch.float32),
            "labels": torch.tensor([category_ids.index(r["category_id"]) for r in mine], dtype=torch.int64)}


if __name__ == "__main__":
    main()
