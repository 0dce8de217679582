"""One training step (forward + backward) of each detector here against torchvision's same model, same batch,
same weights, same threads.

    python bench/detector_speed.py                       # both presets, all detectors
    python bench/detector_speed.py --preset cpu --steps 5 --threads 2

Presets:
    cpu   ResNet-18, 64-channel FPN, 128 x 128 images, batch 8, anchors / size ranges scaled for 8..96 px objects
    r50   ResNet-50, 256-channel FPN, 320 x 320 images, batch 2, torchvision's COCO settings

torchvision's model runs without its GeneralizedRCNNTransform (which would resize and re-normalise): its
backbone, heads and loss code run on the batch our model normalises itself, so both sides do the same work.
Its weights are copied into ours through each detector's `load_torchvision_state_dict`, which also checks
that the two architectures agree. Steps alternate between the two models so that both see the same load on a
shared machine; the table reports the median step time.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors import build_detector, supervised_losses  # noqa: E402

NUM_CLASSES = 8
PRESETS = {
    "cpu": dict(backbone="resnet18", fpn_channels=64, image_size=128, batch=8, object_sizes=(8, 96),
                fcos=dict(range_multiplier=1 / 8), retinanet=dict(anchor_sizes=(8, 16, 32, 64, 128)),
                faster_rcnn=dict(anchor_sizes=(8, 16, 32, 64, 128), representation_size=256,
                                 rpn_post_nms_train=300, roi_batch_size=128)),
    "r50": dict(backbone="resnet50", fpn_channels=256, image_size=320, batch=2, object_sizes=(20, 240),
                fcos={}, retinanet={}, faster_rcnn={}),
}


def random_batch(preset: dict, generator: torch.Generator):
    """Images (B, 3, S, S) in [0, 1] with 2..6 random boxes each of the preset's object sizes."""
    B, S = preset["batch"], preset["image_size"]
    lo, hi = preset["object_sizes"]
    images = torch.rand(B, 3, S, S, generator=generator)
    targets = []
    for _ in range(B):
        n = int(torch.randint(2, 7, (1,), generator=generator))
        wh = lo + torch.rand(n, 2, generator=generator) * (hi - lo)
        xy = torch.rand(n, 2, generator=generator) * (S - wh)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels, "crowd": torch.zeros(0, 4)})
    return images, torch.tensor([[S, S]] * B), targets


def torchvision_backbone(preset: dict, *, levels: list[str], extra) -> BackboneWithFPN:
    resnet = getattr(torchvision.models, preset["backbone"])(weights=None)
    widths = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    expansion = 4 if preset["backbone"] in ("resnet50", "resnet101") else 1
    return BackboneWithFPN(resnet, return_layers={name: str(i) for i, name in enumerate(levels)},
                           in_channels_list=[widths[name] * expansion for name in levels],
                           out_channels=preset["fpn_channels"], extra_blocks=extra)


def build_pair(name: str, preset: dict):
    """(torchvision model, its one-step loss function, our Detector) with identical weights."""
    C, F = NUM_CLASSES, preset["fpn_channels"]
    dense_levels = ["layer2", "layer3", "layer4"]
    if name == "fcos":
        from detectors.fcos import load_torchvision_state_dict, size_of_interest

        tv = torchvision.models.detection.FCOS(torchvision_backbone(preset, levels=dense_levels,
                                                                    extra=LastLevelP6P7(F, F)), num_classes=C)
        ours = build_detector("fcos", num_classes=C, backbone=preset["backbone"], fpn_channels=F, **preset["fcos"])
        multiplier = preset["fcos"].get("range_multiplier", 1.0)
        if multiplier != 1.0:  # torchvision's ranges are fixed at (4, 8) strides: give both the COCO ranges
            ours.criterion.size_ranges = size_of_interest((8, 16, 32, 64, 128))

        def tv_step(images, sizes, targets):
            features = list(tv.backbone(images).values())
            head = tv.head(features)
            anchors = tv.anchor_generator(ImageList(images, sizes), features)
            return tv.compute_loss(targets, head, anchors, [f.shape[2] * f.shape[3] for f in features])
    elif name == "retinanet":
        from detectors.retinanet import level_anchor_sizes, load_torchvision_state_dict

        base = preset["retinanet"].get("anchor_sizes", (32, 64, 128, 256, 512))
        generator = torchvision.models.detection.anchor_utils.AnchorGenerator(
            tuple(level_anchor_sizes(s) for s in base), ((0.5, 1.0, 2.0),) * 5)
        tv = torchvision.models.detection.RetinaNet(torchvision_backbone(preset, levels=dense_levels,
                                                                         extra=LastLevelP6P7(F, F)),
                                                    num_classes=C, anchor_generator=generator)
        ours = build_detector("retinanet", num_classes=C, backbone=preset["backbone"], fpn_channels=F,
                              **preset["retinanet"])

        def tv_step(images, sizes, targets):
            features = list(tv.backbone(images).values())
            head = tv.head(features)
            anchors = tv.anchor_generator(ImageList(images, sizes), features)
            return tv.compute_loss(targets, head, anchors)
    elif name == "faster_rcnn":
        from detectors.faster_rcnn import load_torchvision_state_dict

        settings = preset["faster_rcnn"]
        sizes = tuple((s,) for s in settings.get("anchor_sizes", (32, 64, 128, 256, 512)))
        generator = torchvision.models.detection.anchor_utils.AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
        representation = settings.get("representation_size", 1024)
        box_head = torchvision.models.detection.faster_rcnn.TwoMLPHead(F * 7 * 7, representation)
        predictor = torchvision.models.detection.faster_rcnn.FastRCNNPredictor(representation, C + 1)
        tv = torchvision.models.detection.FasterRCNN(
            torchvision_backbone(preset, levels=["layer1", "layer2", "layer3", "layer4"], extra=LastLevelMaxPool()),
            rpn_anchor_generator=generator, box_head=box_head, box_predictor=predictor,
            rpn_post_nms_top_n_train=settings.get("rpn_post_nms_train", 2000),
            box_batch_size_per_image=settings.get("roi_batch_size", 512))
        ours = build_detector("faster_rcnn", num_classes=C, backbone=preset["backbone"], fpn_channels=F, **settings)

        def tv_step(images, sizes, targets):
            features = tv.backbone(images)
            image_list = ImageList(images, sizes)
            proposals, rpn_losses = tv.rpn(image_list, features, targets)
            _, roi_losses = tv.roi_heads(features, proposals, image_list.image_sizes, targets)
            return rpn_losses | roi_losses
    else:
        raise ValueError(f"bench/detector_speed.py: unknown detector {name!r}")
    load_torchvision_state_dict(ours.model, tv.state_dict())
    return tv, tv_step, ours


def time_step(step) -> float:
    start = time.perf_counter()
    losses = step()
    sum(losses.values()).backward()
    return time.perf_counter() - start


def bench(name: str, preset_name: str, *, steps: int, warmup: int) -> tuple[float, float]:
    preset = PRESETS[preset_name]
    torch.manual_seed(0)
    tv, tv_step, ours = build_pair(name, preset)
    tv.train()
    ours.model.train()
    images, sizes, targets = random_batch(preset, torch.Generator().manual_seed(0))
    normalised = (images - ours.model.pixel_mean) / ours.model.pixel_std
    tv_sizes = [tuple(s) for s in sizes.tolist()]

    def ours_once():
        ours.model.zero_grad(set_to_none=True)
        return supervised_losses(ours, images, sizes, targets)

    def tv_once():
        tv.zero_grad(set_to_none=True)
        return tv_step(normalised, tv_sizes, targets)

    for _ in range(warmup):
        time_step(ours_once), time_step(tv_once)
    ours_times, tv_times = [], []
    for _ in range(steps):  # alternate, so that both see the same load
        ours_times.append(time_step(ours_once))
        tv_times.append(time_step(tv_once))
    return statistics.median(ours_times), statistics.median(tv_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--detectors", nargs="+", default=["fcos", "retinanet", "faster_rcnn"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detectors = [d for d in args.detectors
                 if d != "faster_rcnn" or (Path(__file__).resolve().parents[1] / "detectors/faster_rcnn.py").exists()]
    presets = list(PRESETS) if args.preset == "all" else [args.preset]

    print(f"threads {args.threads}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'detector':<12} {'preset':<6} {'ours (s)':>9} {'torchvision (s)':>16} {'ours / tv':>10}")
    for preset in presets:
        for name in detectors:
            ours, theirs = bench(name, preset, steps=args.steps, warmup=args.warmup)
            print(f"{name:<12} {preset:<6} {ours:>9.3f} {theirs:>16.3f} {ours / theirs:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
