"""Run machinery without method logic: config presets, checkpoints, COCO evaluation, logging, drawing."""
