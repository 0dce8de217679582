"""Every setting of a run in one dataclass, with a preset per dataset and a `--flag` per field.

    cfg = parse_config(sys.argv[1:])      # preset of the dataset (and method) <- command-line overrides

How a value is chosen, last wins:
  1. the field's default below;
  2. the preset of the dataset: `builtin` (this 2-core CPU), `coco` / `custom` (the papers' COCO schedules)
     or `voc` (the papers' Pascal VOC protocol),
     with the entries that depend on the method (which detector the paper used, the labeled:unlabeled ratio,
     warm-up and LR steps);
  3. `--flags` on the command line, one per field (`--max-iter 300`, `--train-sizes 112 128 144`,
     `--method-args unsup_weight=2 jitter_times=5`, `--no-resume`).
Method hyperparameters (burn-in, thresholds, EMA rate...) live in each method's own config dataclass in
`semi/`; `soft_teacher_config`, `dense_teacher_config` and `sed_config` map a run's settings onto them, and
`method_args` overrides them by name. `build_method` builds the method a run names.

The resolved config is printed, saved as `config.json` in the run directory and stored in every checkpoint
as plain values (`to_dict` / `from_dict`), so `evaluate.py` can rebuild the model from a checkpoint alone.
"""

import argparse
import dataclasses
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from data.coco import coco_paths
from data.synthetic import BuiltinSpec, ensure_builtin
from data.splits import with_extra_unlabeled
from data.voc import coco20_json, find_devkit, voc_json
from semi.dense_teacher import DenseTeacherConfig, build_dense_teacher
from semi.sed import SEDConfig, build_sed
from semi.soft_teacher import SoftTeacherConfig, build_soft_teacher

DATASETS = ("builtin", "coco", "custom", "voc")
METHODS = ("supervised", "soft_teacher", "dense_teacher", "sed")
DETECTORS = ("fcos", "retinanet", "faster_rcnn")

# The detector each paper trains: Soft Teacher and SED on Faster R-CNN, Dense Teacher on FCOS.
PAPER_DETECTOR = {"supervised": "fcos", "soft_teacher": "faster_rcnn", "dense_teacher": "fcos", "sed": "faster_rcnn"}


@dataclass
class Config:
    """Every setting of a run. The defaults here are COCO-like; `builtin_preset` / `coco_preset` fill them in.

    Only plain types (str, int, float, bool, list, dict), so that a config survives JSON and
    `torch.load(weights_only=True)`; "" / [] / 0 stand for "not set" where a field is optional.
    """

    # ---- data ------------------------------------------------------------------------------------------
    dataset: str = "builtin"  # "builtin" (generated on first use), "coco", "voc" (data_root), "custom" (paths)
    data_root: str = ""  # COCO: the folder of annotations/, train2017/, val2017/; VOC: VOCdevkit (or its parent)
    voc_cache: str = ""  # VOC: where its COCO JSON conversion goes; empty: data.voc's cache (~/.cache/ssod/voc)
    unlabeled_coco_root: str = ""  # VOC: a COCO root whose COCO-20cls train images join VOC12 as unlabeled images
    builtin_dir: str = ""  # parent folder of the generated built-in dataset; empty: data.synthetic's default cache
    builtin_spec: dict = field(default_factory=dict)  # overrides of data.synthetic.BuiltinSpec, e.g. num_train=2000
    train_json: str = ""  # explicit paths; override the COCO layout, required for "custom"
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    unlabeled_json: str = ""  # extra unlabeled images; empty: the split's rest (COCO at 100%: unlabeled2017)
    unlabeled_images: str = ""
    percent: float = 10.0  # share of the training images that keep their labels; 100 = fully supervised
    fold: int = 1  # which random split of that share (1..5, seeded per fold; with a peers' --split-file, its key)
    split_file: str = ""  # explicit split: ids list, COCO_supervision.txt, or Soft Teacher's {fold}@{percent}.json
    split_dir: str = ""  # where the split's JSON files go; empty: <dataset root>/splits (built-in), <output_dir>/splits
    train_sizes: list[int] = field(default_factory=lambda: [800])  # short side, one drawn per image
    train_max_size: int = 1333  # cap on the long side
    test_size: int = 800
    test_max_size: int = 1333
    size_divisible: int = 32  # batches are zero-padded to a multiple of this
    num_workers: int = 0  # data-loading processes; 0 loads in the training process

    # ---- detector --------------------------------------------------------------------------------------
    detector: str = "fcos"  # "fcos", "retinanet" or "faster_rcnn"
    backbone: str = "resnet50"  # torchvision ResNet architecture name
    backbone_weights: str = ""  # path to ImageNet weights; empty: from scratch (trainable BatchNorm)
    backbone_pretrain: str = ""  # without --backbone-weights: "glyphs" pretrains on generated glyphs (cached); "": none
    trainable_layers: int = 3  # with pretrained weights: ResNet parts that train (of 5; 3 freezes stem + layer1)
    fpn_channels: int = 256
    head_convs: int = 4  # FCOS / RetinaNet: conv layers per head tower
    head_norm_groups: int = -1  # FCOS / RetinaNet: GroupNorm groups in the towers; -1: the detector's (32 / none)
    anchor_sizes: list[int] = field(default_factory=list)  # base anchor size per FPN level; [] = COCO default
    fcos_range_multiplier: float = 1.0  # FCOS: scales every size-of-interest bound (COCO: 64, 128, 256, 512)
    fcos_box_activation: str = "relu"  # FCOS: "relu" (torchvision) or "exp" (the FCOS paper; cannot die)
    box_head_dim: int = 1024  # Faster R-CNN: width of the two fully connected RoI layers
    rpn_pre_nms_train: int = 2000  # Faster R-CNN: candidates per level before NMS, training
    rpn_pre_nms_test: int = 1000  # ... and testing
    rpn_post_nms_train: int = 2000  # Faster R-CNN: proposals per image kept after NMS, training
    rpn_post_nms_test: int = 1000  # ... and testing
    roi_batch_size: int = 512  # Faster R-CNN: RoIs sampled per image for the RoI-head loss
    roi_canonical_scale: int = 224  # Faster R-CNN: RoI size mapped to P4 by the FPN paper's Eq. 1

    # ---- method ----------------------------------------------------------------------------------------
    method: str = "supervised"  # "supervised", "soft_teacher", "dense_teacher" or "sed"
    method_args: dict = field(default_factory=dict)  # overrides of the method's own config, by field name
    # Which forward passes of the student update its BatchNorm running statistics, which the teacher and the
    # evaluation normalise with: "labeled" (the labeled weak view only; the papers' frozen BatchNorm leaves
    # them to the pretrained images) or "all" (every pass: strong views and SED's X_hat too).
    norm_stats: str = "labeled"

    # ---- batch: images per iteration summed over all processes (the global batch, as the papers state it) --
    # One process takes all of it; under torchrun each of N processes takes 1 / N of both (`per_process_batch`).
    labeled_batch: int = 16  # global labeled images per iteration; each of N processes takes labeled_batch / N
    unlabeled_batch: int = 0  # global unlabeled images per iteration (0 for supervised runs); per process: / N

    # ---- optimisation ----------------------------------------------------------------------------------
    lr: float = 0.01  # for the preset's global batch; a different batch scales it linearly unless --lr is given
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001  # the LR starts at lr * warmup_factor and rises linearly
    schedule: str = "step"  # "step" (x gamma at each milestone) or "cosine" (to 0 at max_iter)
    milestones: list[float] = field(default_factory=lambda: [2 / 3, 8 / 9])  # fractions of max_iter (120k/160k of 180k)
    gamma: float = 0.1
    max_iter: int = 180_000
    clip_grad_norm: float = 0.0  # 0: no clipping

    # ---- run -------------------------------------------------------------------------------------------
    eval_period: int = 4000  # evaluate teacher and student every this many iterations (and at the end)
    eval_max_images: int = 0  # periodic evaluations use this many val images (0: all); the final one uses all
    checkpoint_period: int = 4000
    keep_checkpoints: int = 2  # periodic checkpoints kept on disk, newest first (0: all)
    log_period: int = 20
    draw_period: int = 0  # semi methods: draw one unlabeled image's pseudo-boxes (weak and strong view) every N iterations (0: never)
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int = 0  # torch intra-op threads; 0: all cores, shared evenly by a machine's processes under torchrun
    amp: str = ""  # mixed precision of the forward passes: "" off, "bf16" (CPU, CUDA), "fp16" (CUDA, loss scaling)
    tensorboard: bool = False  # also write TensorBoard event files next to metrics.jsonl (pip install tensorboard)
    output_dir: str = ""  # empty: runs/[<dataset>_]<method>_<detector>_<percent>pct[_fold<fold>] (builtin, fold 1 bare)
    resume: bool = False  # continue from output_dir's last checkpoint
    overwrite: bool = False  # start afresh in an output_dir that holds an earlier run, deleting that run's files
    skip_missing: bool = False  # leave out (and count) images whose files are missing, instead of stopping

    # ------------------------------------------------------------------------------------------------------

    def milestone_iters(self) -> list[int]:
        """The LR milestones as iteration numbers."""
        return [round(f * self.max_iter) for f in self.milestones]

    def images_per_iteration(self) -> int:
        """The global batch the linear LR rule counts: labeled + unlabeled images (labeled only when supervised)."""
        return self.labeled_batch + (self.unlabeled_batch if self.method != "supervised" else 0)

    def per_process_batch(self, world_size: int) -> "ProcessBatch":
        """The images each of `world_size` processes takes per iteration: the global batches divided evenly.

        Raises a ValueError when a global batch (the unlabeled one only for a method) is smaller than
        world_size or not a multiple of it: every process must get the same number of images, at least one.
        """
        batches = {"labeled_batch": self.labeled_batch}
        if self.method != "supervised":
            batches["unlabeled_batch"] = self.unlabeled_batch
        for name, value in batches.items():
            if value < world_size or value % world_size:
                raise ValueError(f"config: {name} {value} is the global batch of all {world_size} processes and "
                                 f"must be a multiple of {world_size} (each process takes {name} / {world_size} "
                                 f"images, at least one)")
        return ProcessBatch(labeled=self.labeled_batch // world_size,
                            unlabeled=batches.get("unlabeled_batch", 0) // world_size)

    def validate(self) -> "Config":
        """Raise a ValueError naming the flag (`--max-iter` for the field max_iter) of a setting that cannot
        work, and what it expects; return self."""
        def check(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"config: {flag(name)} {expected}, got {getattr(self, name)!r}")

        check(self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
        check(self.method in METHODS, "method", f"must be one of {METHODS}")
        check(self.detector in DETECTORS, "detector", f"must be one of {DETECTORS}")
        if self.dataset == "coco" and not (self.data_root or (self.train_json and self.val_json)):
            raise ValueError("config: dataset 'coco' needs --data-root (or --train-json/--train-images/--val-json/"
                             "--val-images)")
        if self.dataset == "custom" and not all([self.train_json, self.train_images, self.val_json, self.val_images]):
            raise ValueError("config: dataset 'custom' needs --train-json, --train-images, --val-json and "
                             "--val-images")
        if self.dataset == "voc" and not self.data_root:
            raise ValueError("config: dataset 'voc' needs --data-root (the VOCdevkit folder)")
        check(not self.unlabeled_coco_root or self.dataset == "voc", "unlabeled_coco_root",
              "(COCO-20cls) belongs to --dataset voc")
        check(0 < self.percent <= 100, "percent", "must be in (0, 100]")
        # Without a split file the fold seeds the draw; the peers' split files number their folds from 0.
        check(1 <= self.fold <= 5 if not self.split_file else self.fold >= 0, "fold",
              "must be 1..5" if not self.split_file else "must be >= 0 (a fold of the split file)")
        check(self.labeled_batch >= 1, "labeled_batch", "must be >= 1")
        check(self.method == "supervised" or self.unlabeled_batch >= 1, "unlabeled_batch",
              f"must be >= 1 for method {self.method!r}")
        check(self.norm_stats in ("labeled", "all"), "norm_stats", "must be 'labeled' or 'all'")
        check(self.schedule in ("step", "cosine"), "schedule", "must be 'step' or 'cosine'")
        check(all(0 < f <= 1 for f in self.milestones), "milestones", "must be fractions of --max-iter in (0, 1]")
        check(self.max_iter >= 1, "max_iter", "must be >= 1")
        check(self.warmup_iters >= 0, "warmup_iters", "must be >= 0")
        check(0 < self.warmup_factor <= 1, "warmup_factor", "must be in (0, 1]")
        check(bool(self.train_sizes) and all(s > 0 for s in self.train_sizes), "train_sizes", "must be positive")
        for name in ("test_size", "test_max_size", "train_max_size"):
            check(getattr(self, name) > 0, name, "must be positive")
        for name in ("eval_period", "checkpoint_period", "log_period"):
            check(getattr(self, name) >= 1, name, "must be >= 1 (iterations between two)")
        for name in ("draw_period", "eval_max_images", "keep_checkpoints", "num_workers", "threads"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.device.split(":")[0] in ("cpu", "cuda"), "device", "must be cpu or cuda")
        check(self.amp in ("", "bf16", "fp16"), "amp", "must be '' (off), 'bf16' or 'fp16'")
        check(self.backbone_pretrain in ("", "glyphs"), "backbone_pretrain", "must be '' (none) or 'glyphs'")
        check(not (self.resume and self.overwrite), "overwrite",
              "deletes the run that --resume would continue: give one of them")
        return self

    def to_dict(self) -> dict:
        """Plain values only (str, int, float, bool, list, dict): JSON- and `weights_only`-safe."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Rebuild a Config from `to_dict()` output (a checkpoint's or config.json's); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config: unknown settings {unknown}")
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}} {getattr(self, f.name)!r}" for f in dataclasses.fields(self))


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------


class ProcessBatch(NamedTuple):
    """Images one process takes per iteration (`Config.per_process_batch`)."""

    labeled: int
    unlabeled: int  # 0 for supervised runs


# The built-in benchmark's schedule: the main job (`python train.py --method soft_teacher --percent 10`) is one
# row of the results table (docs/RESULTS.md, `bench/benchmark.py`). Every schedule setting of the preset is a
# fraction of max_iter, so any --max-iter scales the whole run. 1200 iterations: at 600 neither method beat
# supervised training over three seeds, at 1200 Soft Teacher does (docs/BENCHMARK.md, "The preset").
BUILTIN_ITERATIONS = 1200
BENCHMARK_ITERATIONS = BUILTIN_ITERATIONS
BUILTIN_PERCENT = 10.0  # the headline label fraction of the results table


def builtin_preset(method: str, detector: str, max_iter: int = BUILTIN_ITERATIONS) -> Config:
    """The built-in dataset (128 px images, 12 classes, objects 10-80 px) on a 2-core CPU (docs/BENCHMARK.md).

    ResNet-18 pretrained on generated glyphs (`engine/pretrain.py`, the built-in stand-in for ImageNet: stem
    and layer1 frozen, frozen BatchNorm, as the papers do) with a 64-channel FPN. Anchors and FCOS ranges are
    scaled to the small images. 8 labeled images per iteration and, for the methods, 4 unlabeled.
    """
    def at(fraction: float) -> int:  # an iteration of the run, as a fraction of max_iter
        return round(fraction * max_iter)

    cfg = Config(
        dataset="builtin", detector=detector, method=method,
        train_sizes=[96, 112, 128, 144, 160], train_max_size=256, test_size=128, test_max_size=256,
        backbone="resnet18", backbone_pretrain="glyphs", trainable_layers=3, fpn_channels=64, head_convs=4,
        # Base anchor sizes: Faster R-CNN P2-P6 at COCO's 32..512 / 4; RetinaNet P3-P7 at COCO's / 2, as FCOS's
        # ranges (32, 64, 128, 256), since at / 4 an object's few positives split over several levels.
        anchor_sizes=[8, 16, 32, 64, 128] if detector == "faster_rcnn" else [16, 32, 64, 128, 256],
        fcos_range_multiplier=0.5,
        head_norm_groups=16 if detector == "retinanet" else -1,  # a norm in RetinaNet's 64-channel towers
        fcos_box_activation="exp",  # the FCOS paper's: its distances cannot die at a high lr
        roi_canonical_scale=56,  # COCO's 224 / 4
        box_head_dim=256, rpn_pre_nms_train=1000, rpn_pre_nms_test=1000, rpn_post_nms_train=300,
        rpn_post_nms_test=300, roi_batch_size=128,
        labeled_batch=8, unlabeled_batch=0 if method == "supervised" else 4,
        lr=0.02, warmup_iters=100, milestones=[2 / 3, 8 / 9], max_iter=max_iter, clip_grad_norm=10.0,
        eval_period=200, eval_max_images=200, checkpoint_period=200, log_period=20, draw_period=0,
        num_workers=0,
    )
    # The methods start after a supervised burn-in (the papers start from ImageNet weights and a far longer
    # schedule): a quarter of the run, half of it for Dense Teacher (below); their teachers average over about
    # 100 iterations (EMA 0.99).
    if method == "soft_teacher":
        # Thresholds 0.7 (the paper's Table 8 spans 0.5-0.95) and unsupervised weight 1 (the paper's 4 with
        # 4x as many unlabeled as labeled images per GPU; here 1:2). Regression pseudo-boxes below an
        # uncertainty of 0.04, not the paper's 0.02: an uncorrected jitter of 6% reads about 0.06, and this
        # preset's teachers average 0.035-0.054, so at 0.02 no box ever reached the regression loss
        # (docs/BENCHMARK.md).
        cfg.method_args = {"ema_max_momentum": 0.99, "burn_in": at(0.25), "ramp": at(0.05),
                           "rpn_score_thr": 0.7, "cls_score_thr": 0.7, "unsup_weight": 1.0,
                           "reg_uncertainty_thr": 0.04}
    if method == "dense_teacher":
        # A quarter of the paper's loss weights, and a region of about 5x the positives (the paper's 1% of
        # COCO's locations is about their number; FCOS's positives here are 13% of its locations). Teacher and
        # unsupervised loss start at half the run: at a quarter, supervised FCOS is still below 1 AP, and the
        # dense pseudo-labels of a teacher copied there cost the student 2 AP over three seeds (BENCHMARK.md).
        cfg.method_args = {"teacher_init": at(0.5), "burn_in": at(0.5), "ramp": at(0.05), "ema_momentum": 0.99,
                           "weight_cls": 1.0, "weight_box": 0.25, "weight_quality": 0.25,
                           "ratio": 0.4 if detector == "fcos" else 0.08}
    if method == "sed":
        # lambda_s = lambda_d per detector, from the gradient balance of `bench/loss_balance.py`; 300 RoIs per
        # view (the preset's proposals); padding to 2 x 32 px.
        weight = {"faster_rcnn": 0.02, "fcos": 0.25, "retinanet": 0.5}[detector]
        cfg.method_args = {"roi_topk": 300, "pad_stride": 32, "burn_in": at(0.25), "ramp": at(0.05),
                           "lambda_scale": weight, "lambda_distill": weight}
    return cfg


def coco_preset(method: str, detector: str) -> Config:
    """The papers' COCO settings (docs/METHODS.md): ResNet-50 FPN, 180k iterations, SGD lr 0.01, steps at 120k/160k.

    Soft Teacher: 8 GPUs x (1 labeled + 4 unlabeled), 500-iteration warm-up, short side drawn from 400-1200
    (its (1333, 400)-(1333, 1200) range, here in steps of 32). Dense Teacher: 16 + 16, 1k warm-up, no LR decay,
    short side 640-800 (Unbiased Teacher's augmentation), gradients clipped. SED: short side 640-800
    (paper Sec. 4); its batch is not stated, 16 + 16 as Dense Teacher. Supervised: detectron2's 16 images at
    lr 0.02. Test: short side 800, long side <= 1333.
    """
    cfg = Config(
        dataset="coco", detector=detector, method=method,
        train_sizes=[640, 672, 704, 736, 768, 800], train_max_size=1333, test_size=800, test_max_size=1333,
        backbone="resnet50", fpn_channels=256, trainable_layers=3, head_convs=4, anchor_sizes=[],
        fcos_range_multiplier=1.0, box_head_dim=1024, rpn_pre_nms_train=2000, rpn_pre_nms_test=1000,
        rpn_post_nms_train=2000, rpn_post_nms_test=1000, roi_batch_size=512, roi_canonical_scale=224,
        labeled_batch=16, unlabeled_batch=16 if method != "supervised" else 0,
        lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_iters=1000, warmup_factor=0.001,
        milestones=[120_000 / 180_000, 160_000 / 180_000], max_iter=180_000, clip_grad_norm=0.0,
        eval_period=4000, checkpoint_period=4000, num_workers=4,
    )
    if method == "supervised":
        cfg.lr = 0.02
    if method == "soft_teacher":
        cfg.train_sizes = list(range(400, 1201, 32))
        cfg.labeled_batch, cfg.unlabeled_batch = 8, 32
        cfg.warmup_iters = 500
    if method == "dense_teacher":
        cfg.milestones = []  # the authors' steps sit in the last 10 iterations: no decay in effect
        cfg.clip_grad_norm = 10.0
    return cfg


VOC_SIZES = list(range(480, 801, 32))  # Unbiased Teacher's VOC training sizes (short side)


def voc_preset(method: str, detector: str) -> Config:
    """The papers' Pascal VOC protocol: VOC07 trainval (5011 images) labeled, VOC12 trainval (11540) unlabeled
    (and COCO-20cls with --unlabeled-coco-root), VOC07 test (4952) for evaluation; 20 classes; ResNet-50 FPN as
    on COCO. Where each value comes from ("our choice" where no paper states it):

    * Images: short side drawn from 480-800 in steps of 32, tested at 600, long side <= 1333: the released VOC
      config of Unbiased Teacher (Liu et al., ICLR 2021, arXiv:2102.09480), whose augmentation Dense Teacher
      says it uses (Sec. 4.1). SED states 640-800 for its weak view (Sec. 4) and nothing VOC-specific: its
      preset keeps 640-800, tested at 800 (our choice).
    * Supervised: lr 0.01 for 40k iterations (SED, Table 1, the "Supervised, VOC07" row); 16 images per
      iteration and the LR steps at 2/3 and 8/9 of the run (COCO's proportions) are our choice.
    * SED: lr 0.01 for 40k iterations (Table 1). Batch not stated: 16 + 16, as its COCO preset; LR steps, and
      with them its EMA decay, at 2/3 and 8/9 of the run (our choice).
    * Dense Teacher: 16 labeled + 16 unlabeled images, lr 0.01 (Sec. 4.1, "all of our experiments"),
      unsupervised weight w_u = 2 outside COCO-standard (Sec. 4.1; the classification weight, 4 on COCO). The
      length is stated neither in the paper nor in the authors' released code (which has no VOC config): we
      take Unbiased Teacher's VOC schedule, whose burn-in and augmentation the paper follows: 180k iterations
      without LR decay (its steps sit in the last 10 iterations). Teacher start, burn-in and ramp keep Dense
      Teacher's COCO values (the teacher at 3k, the unsupervised loss from 5k, at full weight from 10k: about
      10, 16 and 32 epochs of VOC07 at 16 images); gradient clipping as its COCO preset.
    * Soft Teacher: its paper (Xu et al., ICCV 2021, arXiv:2106.09018) reports no VOC result and its released
      configs hold none. Our choice: its COCO method settings and 1:4 batch (8 + 32 images, lr 0.01), for the
      40k iterations of SED's Table 1 (the one VOC length among the three papers), LR steps at 2/3 and 8/9.
    """
    cfg = coco_preset(method, detector)
    cfg.dataset, cfg.percent = "voc", 100.0  # all of VOC07 trainval is labeled; VOC12 is the unlabeled set
    cfg.train_sizes, cfg.test_size, cfg.test_max_size = list(VOC_SIZES), 600, 1333
    cfg.max_iter, cfg.milestones, cfg.lr = 40_000, [2 / 3, 8 / 9], 0.01
    if method == "sed":
        cfg.train_sizes, cfg.test_size = [640, 672, 704, 736, 768, 800], 800
    if method == "dense_teacher":
        cfg.max_iter, cfg.milestones = 180_000, []
        cfg.method_args = {"weight_cls": 2.0}
    return cfg


# --------------------------------------------------------------------------------------------------------
# From settings to the arguments of data/ and detectors/
# --------------------------------------------------------------------------------------------------------


# The DatasetFiles entries that settings can give explicitly (a flag each).
DATASET_PATHS = ("train_json", "train_images", "val_json", "val_images", "unlabeled_json", "unlabeled_images")


class DatasetFiles(NamedTuple):
    root: Path  # the dataset's folder (split files of the built-in dataset go under it)
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    unlabeled_json: Path | None = None  # images for the unsupervised loss besides the split's unlabeled part
    unlabeled_images: Path | None = None


def dataset_files(cfg: Config) -> DatasetFiles:
    """Where the dataset's annotation files and images are; the built-in dataset is generated on first use.

    builtin: data.synthetic.ensure_builtin(builtin_dir, spec=BuiltinSpec(**builtin_spec)).
    voc: `voc_files`, the papers' protocol.
    coco: the COCO 2017 layout under data_root; at percent 100 (COCO-full) the unlabeled images are
    unlabeled2017. Explicit --train-json / --val-json / --unlabeled-json ... override either.
    """
    if cfg.dataset == "builtin":
        spec = BuiltinSpec(**cfg.builtin_spec)
        paths = ensure_builtin(cfg.builtin_dir or None, spec=spec)
        files = DatasetFiles(paths.root, paths.train_json, paths.train_images, paths.val_json, paths.val_images,
                             paths.unlabeled_json, paths.train_images if paths.unlabeled_json else None)
    elif cfg.dataset == "voc":
        files = voc_files(cfg)
    elif cfg.data_root:
        paths = coco_paths(cfg.data_root)
        files = DatasetFiles(Path(cfg.data_root), paths.train_json, paths.train_images, paths.val_json,
                             paths.val_images)
        if cfg.percent == 100:  # COCO-full: all of train2017 labeled, unlabeled2017 unlabeled
            files = files._replace(unlabeled_json=paths.unlabeled_json, unlabeled_images=paths.unlabeled_images)
    else:
        files = DatasetFiles(Path(cfg.train_json).parent, Path(cfg.train_json), Path(cfg.train_images),
                             Path(cfg.val_json), Path(cfg.val_images))
    explicit = {name: Path(getattr(cfg, name)) for name in DATASET_PATHS if getattr(cfg, name)}
    return files._replace(**explicit)


def voc_files(cfg: Config) -> DatasetFiles:
    """The VOC protocol's files, converted to COCO JSON once (data/voc.py): VOC07 trainval to train on, VOC07
    test to evaluate on, and for the methods VOC12 trainval as unlabeled images, joined by COCO-20cls when
    unlabeled_coco_root is set. Every image path is relative to VOCdevkit (COCO-20cls's are absolute)."""
    devkit = find_devkit(cfg.data_root)
    cache = cfg.voc_cache or None
    files = DatasetFiles(devkit, voc_json(devkit, "2007", "trainval", cache_dir=cache, verbose=True), devkit,
                         voc_json(devkit, "2007", "test", cache_dir=cache, verbose=True), devkit)
    if cfg.method == "supervised":
        return files
    unlabeled = voc_json(devkit, "2012", "trainval", cache_dir=cache, verbose=True)
    if cfg.unlabeled_coco_root:
        coco = coco_paths(cfg.unlabeled_coco_root)
        extra = coco20_json(coco.train_json, coco.train_images, unlabeled.parent)
        unlabeled = with_extra_unlabeled(unlabeled, extra, out_dir=unlabeled.parent)
    return files._replace(unlabeled_json=unlabeled, unlabeled_images=devkit)


def check_dataset_files(cfg: Config, files: DatasetFiles, names: tuple[str, ...] = DATASET_PATHS) -> None:
    """Raise FileNotFoundError naming the flag that gave a dataset file or folder (or --data-root's layout)
    when it is not there; `names` picks which of DATASET_PATHS to look at (evaluation needs the val ones)."""
    for name in names:
        path = getattr(files, name)
        if path is None:
            continue
        kind = "file" if name.endswith("_json") else "folder"
        if path.is_file() if kind == "file" else path.is_dir():
            continue
        if getattr(cfg, name):
            given = f"{flag(name)} {path}"
        elif cfg.dataset == "builtin":
            given = f"the built-in dataset's {path}"
        elif cfg.dataset == "voc":
            given = f"{path} (converted from the VOCdevkit under --data-root {cfg.data_root})"
        else:
            given = f"{path} (the COCO 2017 layout under --data-root {cfg.data_root}; {flag(name)} overrides it)"
        raise FileNotFoundError(f"{given}: no such {kind}")


def detector_kwargs(cfg: Config) -> dict:
    """The keyword arguments of `detectors.build_detector(cfg.detector, num_classes=..., **kwargs)`."""
    kwargs = dict(backbone=cfg.backbone, fpn_channels=cfg.fpn_channels, backbone_weights=cfg.backbone_weights or None,
                  trainable_layers=cfg.trainable_layers)
    norm = {} if cfg.head_norm_groups < 0 else dict(norm_groups=cfg.head_norm_groups)  # dense heads only
    if cfg.detector == "fcos":
        return kwargs | norm | dict(num_convs=cfg.head_convs, range_multiplier=cfg.fcos_range_multiplier,
                                    box_activation=cfg.fcos_box_activation)
    if cfg.detector == "retinanet":
        return kwargs | norm | dict(num_convs=cfg.head_convs, anchor_sizes=cfg.anchor_sizes or None)
    if cfg.detector == "faster_rcnn":
        return kwargs | dict(anchor_sizes=cfg.anchor_sizes or None, representation_size=cfg.box_head_dim,
                             rpn_pre_nms_train=cfg.rpn_pre_nms_train, rpn_pre_nms_test=cfg.rpn_pre_nms_test,
                             rpn_post_nms_train=cfg.rpn_post_nms_train, rpn_post_nms_test=cfg.rpn_post_nms_test,
                             roi_batch_size=cfg.roi_batch_size, roi_canonical_scale=cfg.roi_canonical_scale)
    raise ValueError(f"config: unknown detector {cfg.detector!r}")


# --------------------------------------------------------------------------------------------------------
# From settings to a method: each method's own config dataclass, then its builder
# --------------------------------------------------------------------------------------------------------


def soft_teacher_config(cfg: Config) -> SoftTeacherConfig:
    """Soft Teacher's settings for a run: its teacher proposes with the run's training pre-NMS count and test
    post-NMS count (2000 / 1000 on COCO, as the authors' `rpn_proposal`), then `cfg.method_args` by field name."""
    run = dict(teacher_rpn_pre_nms=cfg.rpn_pre_nms_train, teacher_rpn_post_nms=cfg.rpn_post_nms_test)
    return _method_config(SoftTeacherConfig, "Soft Teacher", run, cfg.method_args)


def dense_teacher_config(cfg: Config) -> DenseTeacherConfig:
    """Dense Teacher's settings for a run: DenseTeacherConfig's defaults updated by `cfg.method_args`."""
    return _method_config(DenseTeacherConfig, "Dense Teacher", {}, cfg.method_args)


def sed_config(cfg: Config) -> SEDConfig:
    """SED's settings for a run: Eq. 1's batch sizes, Table 9's first LR milestone, the run's length (the
    cosine EMA's horizon), the supervised branch's proposal count for the RoI terms (Sec. 3.1), then
    `cfg.method_args` by field name."""
    milestones = cfg.milestone_iters()
    run = dict(num_labeled=cfg.labeled_batch, num_unlabeled=cfg.unlabeled_batch,
               ema_milestone=milestones[0] if milestones else None, max_iter=cfg.max_iter,
               roi_topk=cfg.rpn_post_nms_train)
    return _method_config(SEDConfig, "SED", run, cfg.method_args)


def _method_config(config_class, name: str, run: dict, method_args: dict):
    """config_class(**(run | method_args)), naming every key of method_args that is not one of its fields."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(method_args) - known)
    if unknown:
        raise ValueError(f"config: unknown {name} settings {unknown} in method_args; known: {sorted(known)}")
    return config_class(**(run | method_args))


def build_method(name: str, *, cfg: Config, detector_name: str):
    """The method object of `train.py` (a `semi.core.Method`) for a run's settings; None for "supervised"."""
    if name == "supervised":
        return None
    if name == "soft_teacher":
        return build_soft_teacher(soft_teacher_config(cfg), detector_name=detector_name)
    if name == "dense_teacher":
        return build_dense_teacher(dense_teacher_config(cfg), detector_name=detector_name)
    if name == "sed":
        return build_sed(sed_config(cfg), detector_name=detector_name)
    raise ValueError(f"config: unknown method {name!r}; expected one of {METHODS}")


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true' / 'True' -> True, 'none' -> None, '[1,2]' -> [1, 2]; else the string."""
    lowered = {"true": "true", "false": "false", "none": "null", "null": "null"}.get(text.lower())
    try:
        return json.loads(lowered or text)
    except json.JSONDecodeError:
        return text


def parse_key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value)


def flag(name: str) -> str:
    """The command-line flag of a Config field: max_iter -> --max-iter."""
    return f"--{name.replace('_', '-')}"


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per Config field; unset flags stay out of the namespace.

    int / float / str fields take one value, list fields one or more (`--milestones 0.5 0.8`, or `--milestones`
    with none for an empty list), bool fields `--flag` / `--no-flag`, dict fields `key=value` pairs.
    """
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Config)
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        flags = [flag(f.name)]
        kind = hints[f.name]
        help_text = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parser.add_argument(*flags, dest=f.name, type=item, nargs="*", help=help_text)
        elif kind is dict:
            parser.add_argument(*flags, dest=f.name, type=parse_key_value, nargs="*", metavar="KEY=VALUE",
                                help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(*flags, dest=f.name, type=kind, help=help_text)
        else:
            raise TypeError(f"config: no command-line parser for field {f.name} of type {kind}")
    return parser


def _field_comments() -> dict[str, str]:
    """The trailing comment of each field in Config's source: the help text of its flag."""
    pattern = re.compile(r"^    (\w+): [^=]+=.*?#\s*(.+)$")
    return {m.group(1): m.group(2) for line in inspect.getsource(Config).splitlines() if (m := pattern.match(line))}


def parse_config(argv: list[str] | None = None, *, description: str = "") -> Config:
    """Config from the command line: the dataset's preset, then every flag given, validated.

    The dataset defaults to "coco" when --data-root is given, "custom" when --train-json is, else "builtin".
    The detector defaults to the method's paper detector (PAPER_DETECTOR).
    """
    overrides = vars(build_parser(description).parse_args(argv))
    hints = typing.get_type_hints(Config)
    for name, value in overrides.items():
        if hints[name] is dict:  # key=value pairs -> dict
            overrides[name] = dict(value)
    return resolve_config(overrides)


def dataset_preset(dataset: str, method: str, detector: str, max_iter: int | None = None) -> Config:
    """The preset of `method` on `detector` for a dataset: the built-in one's (scaled to max_iter, None: the
    benchmark schedule), the papers' COCO settings, which a custom COCO-format dataset takes too, or their
    Pascal VOC settings."""
    if dataset == "builtin":
        return builtin_preset(method, detector, max_iter or BUILTIN_ITERATIONS)
    if dataset in ("coco", "custom"):
        cfg = coco_preset(method, detector)
        cfg.dataset = dataset
        return cfg
    if dataset == "voc":
        return voc_preset(method, detector)
    raise ValueError(f"config: dataset must be one of {DATASETS}, got {dataset!r}")


def resolve_config(overrides: dict) -> Config:
    """The preset chosen by `overrides` (dataset, method, detector), updated with every override, validated.

    A global batch other than the preset's (labeled + unlabeled images per iteration) scales the preset's lr
    by new / preset images, unless `overrides` sets lr itself.
    """
    dataset = overrides.get("dataset") or ("coco" if overrides.get("data_root") else
                                           "custom" if overrides.get("train_json") else "builtin")
    method = overrides.get("method", "supervised")
    if method not in METHODS:
        raise ValueError(f"config: method must be one of {METHODS}, got {method!r}")
    detector = overrides.get("detector") or PAPER_DETECTOR[method]
    cfg = dataset_preset(dataset, method, detector, overrides.get("max_iter"))
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"config: unknown settings {unknown}")
    updates = {k: v for k, v in overrides.items() if k not in ("dataset", "method", "detector")}
    for key in ("method_args", "builtin_spec"):  # dict settings update the preset's entries, key by key
        if key in updates:
            updates[key] = getattr(cfg, key) | updates[key]
    preset = cfg
    cfg = dataclasses.replace(cfg, **updates)
    if "lr" not in overrides and cfg.images_per_iteration() != preset.images_per_iteration():
        # The linear scaling rule (Goyal et al. 2017): the preset's lr is for the preset's global batch.
        cfg.lr = preset.lr * cfg.images_per_iteration() / preset.images_per_iteration()
    if not cfg.output_dir:
        dataset = f"{cfg.dataset}_" if cfg.dataset != "builtin" else ""
        fold = f"_fold{cfg.fold}" if cfg.fold != 1 else ""
        cfg.output_dir = f"runs/{dataset}{cfg.method}_{cfg.detector}_{cfg.percent:g}pct{fold}"
    return cfg.validate()
