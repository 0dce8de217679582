"""The detectors: FCOS and RetinaNet (dense, one-stage) and Faster R-CNN (two-stage), each a model, a criterion
and a postprocessor.

    build_detector(name, ...) -> Detector(model, criterion, postprocessor)
    supervised_losses(detector, images, image_sizes, targets) -> dict of unweighted losses
    predict(detector, images, image_sizes) -> list of per-image detections

The two wiring functions treat the three detectors alike, so that the training loop and the semi-supervised
methods need no detector-specific code for the supervised part.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from detectors.fcos import FCOS, build_fcos
from detectors.retinanet import RetinaNet, build_retinanet

DETECTORS = ("fcos", "retinanet", "faster_rcnn")


class Detector(NamedTuple):
    model: nn.Module  # raw outputs: DenseOutput (FCOS, RetinaNet) or TwoStageOutput (Faster R-CNN)
    criterion: object  # raw outputs + targets -> dict of unweighted losses
    postprocessor: object  # raw outputs -> list of {"boxes", "scores", "labels"}


def build_detector(name: str, *, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256,
                   backbone_weights: str | None = None, trainable_layers: int = 3, **detector_kwargs) -> Detector:
    """Build a detector by name.

    Args:
        name: "fcos", "retinanet" or "faster_rcnn".
        num_classes: C foreground classes (labels 0..C-1).
        backbone: "resnet18", "resnet34", "resnet50" or "resnet101".
        fpn_channels: channels of every FPN level.
        backbone_weights: path of a torchvision ImageNet checkpoint; None trains from scratch (BatchNorm
            trainable, nothing frozen).
        trainable_layers: with pretrained weights, how many of the 5 ResNet parts (layer4, layer3, layer2,
            layer1, stem) train, torchvision's convention; 3 freezes the stem and layer1.
        detector_kwargs: the detector's own settings, see build_fcos / build_retinanet / build_faster_rcnn
            (e.g. anchor_sizes, range_multiplier, num_convs, norm_groups, score_thresh).
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"detectors/__init__.py: trainable_layers must be in 0..5, got {trainable_layers}")
    common = dict(num_classes=num_classes, backbone=backbone, fpn_channels=fpn_channels,
                  backbone_weights=backbone_weights, frozen_stages=4 - trainable_layers)
    if name == "fcos":
        return Detector(*build_fcos(**common, **detector_kwargs))
    if name == "retinanet":
        return Detector(*build_retinanet(**common, **detector_kwargs))
    if name == "faster_rcnn":
        from detectors.faster_rcnn import build_faster_rcnn

        return Detector(*build_faster_rcnn(**common, **detector_kwargs))
    raise ValueError(f"detectors/__init__.py: unknown detector {name!r}, expected one of {DETECTORS}")


def is_dense(detector: Detector) -> bool:
    """True for the one-stage detectors, whose model returns a DenseOutput."""
    return isinstance(detector.model, (FCOS, RetinaNet))


def supervised_losses(detector: Detector, images: Tensor, image_sizes: Tensor,
                      targets: list[dict]) -> dict[str, Tensor]:
    """One supervised forward pass.

    Args:
        images: float (B, 3, H, W) in [0, 1], zero-padded to a multiple of 32.
        image_sizes: int64 (B, 2) (h, w) of each image's valid region.
        targets: B dicts {"boxes" (N_i, 4) xyxy pixels, "labels" int64 (N_i,), "crowd" (M_i, 4)}.
    Returns:
        unweighted scalar losses: FCOS loss_cls, loss_box, loss_quality; RetinaNet loss_cls, loss_box;
        Faster R-CNN loss_rpn_cls, loss_rpn_box, loss_cls, loss_box.
    """
    model, criterion, _ = detector
    if is_dense(detector):
        return criterion(model(images, image_sizes), targets, image_sizes)
    # Faster R-CNN: the stages one by one, because the RoI head trains on proposals sampled against the targets.
    features = model.features(images)
    rpn_out = model.rpn(features)
    proposals = model.propose(rpn_out, image_sizes)
    sampled = criterion.sample_rois(proposals, targets)
    roi_out = model.roi_head(features, sampled.boxes, image_sizes)
    return criterion(rpn_out, roi_out, sampled, targets, image_sizes)


@torch.no_grad()
def predict(detector: Detector, images: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
    """Detections for a batch (images and image_sizes as in `supervised_losses`), in the batch's frame:
    B dicts {"boxes" (D_i, 4) xyxy pixels, "scores" (D_i,), "labels" int64 (D_i,)}.

    The caller chooses train / eval mode (a teacher runs in eval mode); this function only wires the parts.
    """
    model, _, postprocessor = detector
    if is_dense(detector):
        return postprocessor(model(images, image_sizes), image_sizes)
    outputs = model(images, image_sizes)  # TwoStageOutput(features, rpn, proposals, roi)
    return postprocessor(outputs.roi, outputs.proposals, image_sizes)
