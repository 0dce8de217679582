"""RetinaNet (detectors/retinanet.py): output shapes, anchor assignment, losses (no box, one box, many, crowd),
postprocessing, equivalence with torchvision's retinanet_resnet50_fpn, and a short overfit.

    pytest -x -q tests/test_retinanet.py
"""

import math

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.image_list import ImageList

from conftest import box_target as target
from detectors import build_detector, predict, supervised_losses
from detectors.anchors import AnchorGenerator
from detectors.box_ops import BoxCoder, box_iou
from detectors.dense import DenseOutput
from detectors.retinanet import (ASPECT_RATIOS, BACKGROUND, COCO_ANCHOR_SIZES, IGNORED, STRIDES, RetinaNetCriterion,
                                 RetinaNetPostprocessor, level_anchor_sizes, load_torchvision_state_dict)

NUM_CLASSES = 3
A = 9


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def small_retinanet(**overrides):
    """The CPU preset's shape: ResNet-18, a 64-channel FPN, a 2-conv head, anchors COCO / 4."""
    settings = dict(num_classes=NUM_CLASSES, backbone="resnet18", fpn_channels=64, num_convs=2,
                    anchor_sizes=[8, 16, 32, 64, 128])
    return build_detector("retinanet", **(settings | overrides))


def synthetic_outputs(B, H, W, *, dtype=torch.float32, requires_grad=True, anchor_sizes=COCO_ANCHOR_SIZES):
    """Random raw outputs of the right shapes for a (H, W) canvas, without running a network."""
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    anchors = AnchorGenerator(sizes=tuple(level_anchor_sizes(s) for s in anchor_sizes),
                              aspect_ratios=(ASPECT_RATIOS,) * 5, strides=STRIDES)(shapes, dtype=dtype)

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, dtype=dtype) * scale + offset).requires_grad_(requires_grad)

    return DenseOutput(cls_logits=[leaf(B, h * w * A, NUM_CLASSES, offset=-2) for h, w in shapes],
                       box_reg=[leaf(B, h * w * A, 4, scale=0.2) for h, w in shapes], quality=None,
                       anchors=anchors, strides=list(STRIDES), shapes=shapes, num_anchors_per_location=A)


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


def test_output_shapes():
    model = small_retinanet().model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 192), torch.tensor([[128, 192], [100, 150]]))
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert out.shapes == shapes and out.num_anchors_per_location == A and out.quality is None
    for (h, w), cls, reg, anchors in zip(shapes, out.cls_logits, out.box_reg, out.anchors):
        assert cls.shape == (2, h * w * A, NUM_CLASSES) and reg.shape == (2, h * w * A, 4)
        assert anchors.shape == (h * w * A, 4)
    assert torch.sigmoid(torch.cat(out.cls_logits, 1)).mean().item() == pytest.approx(0.01, rel=0.3)
    assert level_anchor_sizes(32) == (32, 40, 50)


def test_p6p7_source():
    from_p5 = small_retinanet().model.backbone.fpn
    from_c5 = small_retinanet(p6p7_from="c5").model.backbone.fpn
    assert from_p5.p6.in_channels == 64 and from_c5.p6.in_channels == 512  # ResNet-18's C5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_groupnorm_head_keeps_the_towers_alive(dtype):
    """With 64 channels and the paper's N(0, 0.01) init, a conv-ReLU tower all but erases its input (each conv
    scales it by about sqrt(9 * 64) * 0.01); GroupNorm after each conv keeps the output at unit scale."""
    from detectors.retinanet import RetinaNetHead

    features = torch.randn(2, 64, 8, 8, dtype=dtype)
    scale = {}
    for groups in (0, 16):
        torch.manual_seed(0)
        head = RetinaNetHead(64, A, NUM_CLASSES, num_convs=4, norm_groups=groups).to(dtype)
        assert any(isinstance(m, torch.nn.GroupNorm) for m in head.modules()) == (groups > 0)
        scale[groups] = head.cls_tower(features).std().item()
    assert scale[0] < 0.01 < 0.3 < scale[16]
    with pytest.raises(ValueError, match="GroupNorm"):
        RetinaNetHead(64, A, NUM_CLASSES, norm_groups=24)

# --------------------------------------------------------------------------------------------------------
# Anchor assignment
# --------------------------------------------------------------------------------------------------------


def test_anchor_equal_to_the_box_is_positive():
    """The ratio-1, size-32 anchor at P3 location (64, 64) is [48, 48, 80, 80]: row (8 * 16 + 8) * 9 + 3."""
    outputs = synthetic_outputs(1, 128, 128)
    assigned = RetinaNetCriterion(num_classes=NUM_CLASSES).assign(outputs, [target([[48, 48, 80, 80]], [2])])
    row = (8 * 16 + 8) * 9 + 3
    assert torch.equal(torch.cat(outputs.anchors)[row], torch.tensor([48.0, 48, 80, 80]))
    assert assigned.matched[0, row] == 0 and assigned.labels[0, row] == 2
    iou = box_iou(torch.tensor([[48.0, 48, 80, 80]]), torch.cat(outputs.anchors))[0]
    matched = assigned.matched[0]
    assert ((matched >= 0) == (iou >= 0.5)).all()
    assert ((matched == BACKGROUND) == (iou < 0.4)).all()
    assert ((matched == IGNORED) == ((iou >= 0.4) & (iou < 0.5))).all()


def test_small_box_gets_its_best_anchors_as_low_quality_matches():
    outputs = synthetic_outputs(1, 128, 128)
    box = torch.tensor([[60.0, 60, 70, 70]])  # 10 px: IoU < 0.1 with every anchor
    iou = box_iou(box, torch.cat(outputs.anchors))[0]
    assert iou.max() < 0.4
    matched = RetinaNetCriterion(num_classes=NUM_CLASSES).assign(outputs, [target(box.tolist(), [1])]).matched[0]
    assert torch.equal(matched >= 0, iou == iou.max())  # the best anchors (ties included), nothing else
    no_low = RetinaNetCriterion(num_classes=NUM_CLASSES)
    no_low.matcher.allow_low_quality_matches = False
    assert not (no_low.assign(outputs, [target(box.tolist(), [1])]).matched >= 0).any()


def test_batched_assignment_equals_torchvision_matcher_per_image():
    outputs = synthetic_outputs(3, 128, 128)
    targets = [target([[10, 10, 50, 70], [60, 60, 120, 100], [5, 80, 20, 95]], [0, 1, 2]), target([], []),
               target([[0, 0, 128, 128]], [1])]
    assigned = RetinaNetCriterion(num_classes=NUM_CLASSES).assign(outputs, targets)
    anchors = torch.cat(outputs.anchors)
    matcher = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for i in (0, 2):
        assert torch.equal(assigned.matched[i], matcher(box_iou(targets[i]["boxes"], anchors)))
    assert (assigned.matched[1] == BACKGROUND).all()


def test_crowd_negatives_are_ignored():
    outputs = synthetic_outputs(1, 128, 128)
    crowd = [[0, 0, 128, 64]]
    assigned = RetinaNetCriterion(num_classes=NUM_CLASSES).assign(
        outputs, [target([[48, 48, 80, 80]], [0], crowd=crowd)])
    plain = RetinaNetCriterion(num_classes=NUM_CLASSES).assign(outputs, [target([[48, 48, 80, 80]], [0])])
    anchors = torch.cat(outputs.anchors)
    x1, y1, x2, y2 = anchors.unbind(1)
    in_top_half = (x2.clamp(max=128) - x1.clamp(min=0)).clamp(min=0) * (y2.clamp(max=64) - y1.clamp(min=0)).clamp(min=0)
    inside = in_top_half / ((x2 - x1) * (y2 - y1)) >= 0.5  # at least half of the anchor lies in the crowd box
    assert torch.equal(assigned.matched[0] >= 0, plain.matched[0] >= 0)  # positives untouched
    newly_ignored = (assigned.matched[0] == IGNORED) & (plain.matched[0] == BACKGROUND)
    assert torch.equal(newly_ignored, inside & (plain.matched[0] == BACKGROUND))


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_without_boxes(dtype):
    outputs = synthetic_outputs(2, 128, 128, dtype=dtype)
    losses = RetinaNetCriterion(num_classes=NUM_CLASSES)(outputs, [target([], [], dtype=dtype)] * 2,
                                                         torch.tensor([[128, 128]] * 2))
    p = torch.sigmoid(torch.cat(outputs.cls_logits, 1))
    assert torch.allclose(losses["loss_cls"], (-(1 - 0.25) * p ** 2 * torch.log(1 - p)).sum())
    assert losses["loss_box"].item() == 0 and losses["loss_box"].requires_grad
    sum(losses.values()).backward()
    assert torch.isfinite(outputs.box_reg[0].grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1"])
def test_loss_with_one_box_by_hand(dtype, box_loss):
    outputs = synthetic_outputs(1, 128, 128, dtype=dtype)
    criterion = RetinaNetCriterion(num_classes=NUM_CLASSES, box_loss=box_loss)
    gt = torch.tensor([[48.0, 48, 80, 80]], dtype=dtype)
    losses = criterion(outputs, [target(gt.tolist(), [2], dtype=dtype)], torch.tensor([[128, 128]]))
    anchors = torch.cat(outputs.anchors)
    positive = box_iou(gt, anchors)[0] >= 0.5
    P = int(positive.sum())
    deltas = torch.cat(outputs.box_reg, 1)[0, positive]
    encoded = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode(gt.expand(P, 4), anchors[positive])
    if box_loss == "l1":
        expected = (deltas - encoded).abs().sum() / P
    else:
        expected = torch.nn.functional.smooth_l1_loss(deltas, encoded, beta=0.1, reduction="sum") / P
    assert torch.allclose(losses["loss_box"], expected)
    logits = torch.cat(outputs.cls_logits, 1)[0]
    counted = box_iou(gt, anchors)[0]
    counted = (counted >= 0.5) | (counted < 0.4)
    cls_targets = torch.zeros_like(logits)
    cls_targets[positive, 2] = 1
    expected_cls = torchvision.ops.sigmoid_focal_loss(logits[counted], cls_targets[counted], reduction="sum") / P
    assert torch.allclose(losses["loss_cls"], expected_cls)


def test_loss_many_boxes_matches_torchvision_on_one_image():
    """torchvision divides per image and averages; with one image both normalisations agree."""
    outputs = synthetic_outputs(1, 128, 256)
    tgt = target([[10, 10, 50, 70], [60, 60, 120, 100], [5, 80, 20, 95], [130, 10, 250, 120]], [0, 1, 2, 1])
    ours = RetinaNetCriterion(num_classes=NUM_CLASSES)(outputs, [tgt], torch.tensor([[128, 256]]))
    head = {"cls_logits": torch.cat(outputs.cls_logits, 1), "bbox_regression": torch.cat(outputs.box_reg, 1)}
    anchors = [torch.cat(outputs.anchors)]
    matched = [tv_utils.Matcher(0.5, 0.4, True)(box_iou(tgt["boxes"], anchors[0]))]
    cls_head = torchvision.models.detection.retinanet.RetinaNetClassificationHead(8, A, NUM_CLASSES)
    reg_head = torchvision.models.detection.retinanet.RetinaNetRegressionHead(8, A)
    assert torch.allclose(ours["loss_cls"], cls_head.compute_loss([tgt], head, matched), rtol=1e-5)
    assert torch.allclose(ours["loss_box"], reg_head.compute_loss([tgt], head, anchors, matched), rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Postprocessing
# --------------------------------------------------------------------------------------------------------


def test_postprocessing_by_hand():
    outputs = synthetic_outputs(2, 128, 128, requires_grad=False)
    for c in outputs.cls_logits:
        c.fill_(-10.0)
    for d in outputs.box_reg:
        d.zero_()
    row, neighbour = (8 * 16 + 8) * 9 + 3, (8 * 16 + 8) * 9 + 4  # [48, 48, 80, 80] and the 40 px anchor there
    outputs.cls_logits[0][0, row, 1] = 3.0
    outputs.cls_logits[0][0, neighbour, 1] = 2.0  # IoU (32/40)^2 = 0.64 > 0.5: suppressed
    outputs.cls_logits[0][0, neighbour, 0] = 1.0  # another class: kept
    outputs.box_reg[0][0, row] = torch.tensor([0.25, 0.0, 0.0, 0.0])  # shift right by a quarter width
    outputs.cls_logits[0][1, row, 2] = 3.0
    detections = RetinaNetPostprocessor()(outputs, torch.tensor([[128, 128], [60, 70]]))
    first, second = detections
    assert first["labels"].tolist() == [1, 0]
    assert torch.allclose(first["boxes"][0], torch.tensor([56.0, 48, 88, 80]))
    assert first["scores"][0].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert torch.allclose(second["boxes"], torch.tensor([[48.0, 48, 70, 60]]))  # clipped to (h 60, w 70)
    full = torch.tensor([[128, 128]] * 2)
    assert RetinaNetPostprocessor(detections_per_image=1)(outputs, full)[0]["labels"].tolist() == [1]
    assert RetinaNetPostprocessor(score_thresh=0.99)(outputs, full)[1]["boxes"].shape == (0, 4)


def test_predict_and_supervised_losses_wiring():
    detector = small_retinanet()
    images, sizes = torch.rand(2, 3, 128, 128), torch.tensor([[128, 128], [96, 128]])
    losses = supervised_losses(detector, images, sizes, [target([[10, 10, 50, 50]], [0]), target([], [])])
    assert set(losses) == {"loss_cls", "loss_box"}
    detector.model.eval()
    detections = predict(detector, images, sizes)
    assert len(detections) == 2 and all((d["boxes"][:, 3] <= h).all() for d, (h, _) in zip(detections, sizes.tolist()))



def test_float64_model_end_to_end():
    detector = small_retinanet()
    detector.model.double().train()
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    sizes = torch.tensor([[64, 64], [64, 48]])
    targets = [target([[4, 4, 40, 30]], [1], dtype=torch.float64), target([], [], dtype=torch.float64)]
    losses = supervised_losses(detector, images, sizes, targets)
    assert set(losses) == {"loss_cls", "loss_box"}
    assert all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    detector.model.eval()
    detections = predict(detector, images, sizes)
    assert all(d["boxes"].dtype == torch.float64 for d in detections)

# --------------------------------------------------------------------------------------------------------
# torchvision equivalence
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_torchvision_equivalence():
    """Same weights, same preprocessed batch -> same raw outputs, anchors and detections.

    torchvision's GeneralizedRCNNTransform is bypassed (see tests/test_fcos.py). A random ResNet-50 in eval mode
    produces features in the thousands; the final convs are scaled down so that sigmoid scores stay below 1.0
    (saturated scores would tie and make the ranking arbitrary).
    """
    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                                             num_classes=NUM_CLASSES)
    tv.head.classification_head.cls_logits.weight.mul_(0.1)
    tv.head.classification_head.cls_logits.bias.normal_(-2.0, 1.0)
    tv.head.regression_head.bbox_reg.weight.mul_(0.1)
    tv.eval()
    detector = build_detector("retinanet", num_classes=NUM_CLASSES, backbone="resnet50")
    load_torchvision_state_dict(detector.model, tv.state_dict())
    detector.model.eval()
    cases = [(torch.rand(1, 3, 128, 128), [(128, 128)]), (torch.rand(1, 3, 128, 256), [(128, 256)]),
             (torch.rand(2, 3, 128, 256), [(128, 256), (100, 150)])]
    for images, sizes in cases:
        for i, (h, w) in enumerate(sizes):
            images[i, :, h:], images[i, :, :, w:] = 0, 0
        image_sizes = torch.tensor(sizes)
        out = detector.model(images, image_sizes)
        features = list(tv.backbone((images - detector.model.pixel_mean) / detector.model.pixel_std).values())
        head = tv.head(features)
        anchors = tv.anchor_generator(ImageList(images, sizes), features)
        scale = head["cls_logits"].abs().max()  # raw outputs are large here: compare relative to their size
        assert torch.allclose(torch.cat(out.cls_logits, 1), head["cls_logits"], atol=1e-4 * max(1.0, scale))
        assert torch.allclose(torch.cat(out.box_reg, 1), head["bbox_regression"],
                              atol=1e-4 * max(1.0, head["bbox_regression"].abs().max()))
        assert torch.equal(torch.cat(out.anchors), anchors[0])

        counts = [f.shape[2] * f.shape[3] * A for f in features]
        split = {k: list(v.split(counts, dim=1)) for k, v in head.items()}
        theirs = tv.postprocess_detections(split, [list(a.split(counts)) for a in anchors], sizes)
        ours = detector.postprocessor(out, image_sizes)
        for a, b in zip(ours, theirs):
            assert a["boxes"].shape[0] > 0 and a["boxes"].shape == b["boxes"].shape
            assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
            assert torch.allclose(a["scores"], b["scores"], atol=1e-6)
            assert torch.equal(a["labels"], b["labels"])


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def test_overfit_one_image_lowers_the_loss():
    detector = small_retinanet()
    detector.model.train()
    image = torch.zeros(1, 3, 128, 128)
    image[0, :, 20:60, 30:90] = 1.0
    image[0, 0, 80:110, 70:100] = 1.0
    targets = [target([[30, 20, 90, 60], [70, 80, 100, 110]], [0, 2])]
    sizes = torch.tensor([[128, 128]])
    optimizer = torch.optim.Adam(detector.model.parameters(), lr=1e-3)
    history = []
    for _ in range(25):
        losses = supervised_losses(detector, image, sizes, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5, history
