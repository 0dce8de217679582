"""Data: the built-in dataset, COCO loading, semi-supervised splits, transforms with recorded matrices, loaders.

    data.synthetic    ensure_builtin(cache_dir, *, spec) -> BuiltinPaths (generated once, cached)
    data.coco         CocoDetection(json_path, image_dir, *, transform), load_unlabeled, coco_paths, check_coco
    data.images       read_rgb (every mode to 8-bit RGB, EXIF orientation), check_files (headers, in threads)
    data.splits       make_split(train_json, *, percent, fold, out_dir), split_from_file(...)
    data.transforms   geometric / photometric transforms, weak / strong views
    data.loader       InfiniteSampler, collate -> Batch, build_train_loader, build_val_loader

Batches and box geometry come from `structures.py`; this package knows nothing of detectors/, semi/ or engine/.
"""
