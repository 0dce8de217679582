"""FCOS (detectors/fcos.py): output shapes, target assignment on hand-built cases, losses (no box, one box, many,
crowd, padding), postprocessing, equivalence with torchvision's fcos_resnet50_fpn, and a short overfit.

    pytest -x -q tests/test_fcos.py
"""

import math

import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList

from conftest import box_target as target
from detectors import build_detector, predict, supervised_losses
from detectors.anchors import AnchorGenerator
from detectors.dense import DenseOutput
from detectors.fcos import (BACKGROUND, IGNORED, STRIDES, FCOSCriterion, FCOSPostprocessor, centerness,
                            load_torchvision_state_dict, size_of_interest)

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def small_fcos(**overrides):
    """The CPU preset's shape: ResNet-18, a 64-channel FPN, a 2-conv head with GroupNorm(32)."""
    settings = dict(num_classes=NUM_CLASSES, backbone="resnet18", fpn_channels=64, num_convs=2, norm_groups=32)
    return build_detector("fcos", **(settings | overrides))


def synthetic_outputs(B, H, W, *, dtype=torch.float32, requires_grad=True):
    """Random raw outputs of the right shapes for a (H, W) canvas, without running a network."""
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    anchors = AnchorGenerator(sizes=tuple((s,) for s in STRIDES), aspect_ratios=((1.0,),) * 5,
                              strides=STRIDES)(shapes, dtype=dtype)

    def leaf(*shape, scale=1.0, offset=0.0, positive=False):
        values = torch.randn(*shape, dtype=dtype) * scale + offset
        return (values.abs() if positive else values).requires_grad_(requires_grad)

    return DenseOutput(cls_logits=[leaf(B, h * w, NUM_CLASSES, offset=-2) for h, w in shapes],
                       box_reg=[leaf(B, h * w, 4, scale=0.3, offset=1, positive=True) for h, w in shapes],
                       quality=[leaf(B, h * w, 1) for h, w in shapes], anchors=anchors, strides=list(STRIDES),
                       shapes=shapes, num_anchors_per_location=1)


def level_points(outputs):
    """(N, 2) location of every row and (N,) its level index."""
    anchors = torch.cat(outputs.anchors)
    levels = torch.cat([torch.full((a.shape[0],), i) for i, a in enumerate(outputs.anchors)])
    return (anchors[:, :2] + anchors[:, 2:]) / 2, levels


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


def test_output_shapes():
    model = small_fcos().model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 192), torch.tensor([[128, 192], [100, 150]]))
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert out.shapes == shapes and out.strides == [8, 16, 32, 64, 128] and out.num_anchors_per_location == 1
    for (h, w), cls, reg, q, a in zip(shapes, out.cls_logits, out.box_reg, out.quality, out.anchors):
        assert cls.shape == (2, h * w, NUM_CLASSES) and reg.shape == (2, h * w, 4) and q.shape == (2, h * w, 1)
        assert a.shape == (h * w, 4) and (reg >= 0).all()
    # The prior bias: every class starts at probability 0.01.
    assert torch.sigmoid(torch.cat(out.cls_logits, 1)).mean().item() == pytest.approx(0.01, rel=0.3)


def test_groupnorm_channels_must_divide():
    with pytest.raises(ValueError, match="GroupNorm"):
        small_fcos(fpn_channels=48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_activation_exp_keeps_a_gradient_where_relu_is_dead(dtype):
    """With every raw distance negative, ReLU passes no gradient (the collapse of a from-scratch run); exp does."""
    from detectors.fcos import FCOSHead

    features = [torch.randn(1, 32, 4, 4, dtype=dtype)]
    grads = {}
    for activation in ("relu", "exp"):
        torch.manual_seed(0)
        head = FCOSHead(32, NUM_CLASSES, num_convs=1, norm_groups=8, box_activation=activation).to(dtype)
        torch.nn.init.constant_(head.box_reg.bias, -5.0)  # every raw distance < 0
        distances = torch.cat(head(features).box_reg, 1)
        assert (distances >= 0).all() and distances.dtype == dtype
        distances.sum().backward()
        grads[activation] = head.box_reg.bias.grad.abs().sum().item()
    assert grads["relu"] == 0.0 and grads["exp"] > 0.0
    with pytest.raises(ValueError, match="box_activation"):
        FCOSHead(32, NUM_CLASSES, norm_groups=8, box_activation="softplus")


# --------------------------------------------------------------------------------------------------------
# Target assignment
# --------------------------------------------------------------------------------------------------------


def test_size_of_interest():
    assert size_of_interest(STRIDES) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf)]
    assert size_of_interest(STRIDES, 1 / 8) == [(0, 8), (8, 16), (16, 32), (32, 64), (64, math.inf)]


def test_one_box_gets_the_expected_locations():
    """A 40 px box centred at (40, 40): radius 1.5 * 8 = 12 around the centre gives the P3 locations
    x, y in {32, 40, 48}; their largest distance to a side (<= 28) is inside P3's range (0, 64)."""
    outputs = synthetic_outputs(1, 128, 128)
    assigned = FCOSCriterion(num_classes=NUM_CLASSES).assign(outputs, [target([[20, 20, 60, 60]], [2])],
                                                             torch.tensor([[128, 128]]))
    points, levels = level_points(outputs)
    positive = assigned.matched[0] >= 0
    expected = {(x, y) for x in (32, 40, 48) for y in (32, 40, 48)}
    assert {tuple(p.tolist()) for p in points[positive]} == expected
    assert (levels[positive] == 0).all()
    assert (assigned.labels[0][positive] == 2).all() and (assigned.labels[0][~positive] == -1).all()
    assert torch.equal(assigned.boxes[0][positive], torch.tensor([[20.0, 20, 60, 60]]).expand(9, 4))
    assert (assigned.matched[0][~positive] == BACKGROUND).all()


def test_level_by_object_size_and_range_multiplier():
    """A 100 px box centred at (64, 64). torchvision's ranges: P3 (radius 12, range (0, 64)) takes the 9
    locations x, y in {56, 64, 72} (largest side distance <= 58); P4 (radius 24, range (64, 128)) takes the 8
    locations x, y in {48, 64, 80} except the centre, whose distances (50) are below 64. With the 1/8
    multiplier the ranges are (0, 8), (8, 16), (16, 32), (32, 64), (64, inf): only P6's (64, 64) fits."""
    outputs = synthetic_outputs(1, 256, 256)
    box = [[14, 14, 114, 114]]
    points, levels = level_points(outputs)
    criterion = FCOSCriterion(num_classes=NUM_CLASSES)
    positive = criterion.assign(outputs, [target(box, [0])], torch.tensor([[256, 256]])).matched[0] >= 0
    assert torch.bincount(levels[positive], minlength=5).tolist() == [9, 8, 0, 0, 0]
    p4 = {tuple(p) for p in points[positive & (levels == 1)].tolist()}
    assert p4 == {(x, y) for x in (48.0, 64.0, 80.0) for y in (48.0, 64.0, 80.0)} - {(64.0, 64.0)}

    criterion = FCOSCriterion(num_classes=NUM_CLASSES, range_multiplier=1 / 8)
    positive = criterion.assign(outputs, [target(box, [0])], torch.tensor([[256, 256]])).matched[0] >= 0
    assert levels[positive].tolist() == [3] and points[positive].tolist() == [[64.0, 64.0]]


def test_ambiguous_location_takes_the_smallest_box():
    outputs = synthetic_outputs(1, 128, 128)
    boxes = [[0, 0, 100, 100], [30, 30, 50, 50]]  # the small box lies inside the large one
    assigned = FCOSCriterion(num_classes=NUM_CLASSES).assign(outputs, [target(boxes, [0, 1])],
                                                             torch.tensor([[128, 128]]))
    points, _ = level_points(outputs)
    at_40 = ((points == torch.tensor([40.0, 40.0])).all(1)) & (torch.arange(len(points)) < 256)  # P3 (40, 40)
    assert assigned.matched[0][at_40].item() == 1


def test_padding_gets_no_positives():
    """Image 1's valid region is 64 x 64 of a 128 x 128 canvas; a box running past it must not make
    positives in the padding (even though the box itself covers them)."""
    outputs = synthetic_outputs(2, 128, 128)
    box = [[30, 30, 90, 90]]
    sizes = torch.tensor([[128, 128], [64, 64]])
    assigned = FCOSCriterion(num_classes=NUM_CLASSES).assign(outputs, [target(box, [0]), target(box, [0])], sizes)
    points, _ = level_points(outputs)
    in_padding = (points[:, 0] >= 64) | (points[:, 1] >= 64)
    assert (assigned.matched[0][in_padding] >= 0).any()  # the full-size image has positives there
    assert not (assigned.matched[1][in_padding] >= 0).any()
    assert (assigned.matched[1] >= 0).any()


def test_crowd_region_is_ignored_but_positives_stay():
    outputs = synthetic_outputs(1, 128, 128)
    crowd = [[0, 0, 128, 64]]  # the top half
    assigned = FCOSCriterion(num_classes=NUM_CLASSES).assign(
        outputs, [target([[20, 20, 60, 60]], [1], crowd=crowd)], torch.tensor([[128, 128]]))
    points, _ = level_points(outputs)
    inside = (points[:, 0] > 0) & (points[:, 0] < 128) & (points[:, 1] > 0) & (points[:, 1] < 64)
    matched = assigned.matched[0]
    assert (matched[inside & (matched < 0)] == IGNORED).all() and (matched[inside] == IGNORED).any()
    assert (matched[inside] >= 0).sum() == 9  # the box's positives are untouched
    assert (matched[~inside] != IGNORED).all()


def test_batched_assignment_equals_one_image_at_a_time():
    outputs = synthetic_outputs(3, 128, 128)
    targets = [target([[10, 10, 50, 70], [60, 60, 120, 100], [5, 80, 20, 95]], [0, 1, 2]),
               target([], []), target([[0, 0, 128, 128]], [1], crowd=[[90, 0, 128, 30]])]
    sizes = torch.tensor([[128, 128], [100, 90], [128, 128]])
    criterion = FCOSCriterion(num_classes=NUM_CLASSES)
    batched = criterion.assign(outputs, targets, sizes)
    for i in range(3):
        single = DenseOutput(**{**vars(outputs), "cls_logits": [c[i:i + 1] for c in outputs.cls_logits]})
        alone = criterion.assign(single, targets[i:i + 1], sizes[i:i + 1])
        assert torch.equal(alone.matched[0], batched.matched[i]) and torch.equal(alone.boxes[0], batched.boxes[i])


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_without_boxes(dtype):
    outputs = synthetic_outputs(2, 128, 128, dtype=dtype)
    losses = FCOSCriterion(num_classes=NUM_CLASSES)(outputs, [target([], [], dtype=dtype)] * 2,
                                                    torch.tensor([[128, 128]] * 2))
    logits = torch.cat(outputs.cls_logits, 1)
    p = torch.sigmoid(logits)
    expected = (-(1 - 0.25) * p ** 2 * torch.log(1 - p)).sum()  # every element a negative, / max(1, 0)
    assert torch.allclose(losses["loss_cls"], expected)
    assert losses["loss_box"].item() == 0 and losses["loss_quality"].item() == 0
    assert all(v.dtype == dtype and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(outputs.box_reg[0].grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("quality", ["centerness", "iou"])
def test_loss_with_one_box_by_hand(dtype, quality):
    outputs = synthetic_outputs(1, 128, 128, dtype=dtype)
    criterion = FCOSCriterion(num_classes=NUM_CLASSES, quality=quality)
    losses = criterion(outputs, [target([[20, 20, 60, 60]], [2], dtype=dtype)], torch.tensor([[128, 128]]))
    # The 9 positives are P3 rows y * 16 + x for x, y in {4, 5, 6} (locations 32, 40, 48).
    rows = torch.tensor([y * 16 + x for y in (4, 5, 6) for x in (4, 5, 6)])
    reg, q = outputs.box_reg[0][0, rows], outputs.quality[0][0, rows, 0]  # (9, 4), (9,)
    centres = torch.tensor([[8.0 * x, 8.0 * y] for y in (4, 5, 6) for x in (4, 5, 6)], dtype=dtype)
    pred = torch.cat([centres - reg[:, :2] * 8, centres + reg[:, 2:] * 8], dim=1)
    gt = torch.tensor([[20.0, 20, 60, 60]], dtype=dtype).expand(9, 4)
    expected_box = torchvision.ops.generalized_box_iou_loss(pred, gt, reduction="sum") / 9
    assert torch.allclose(losses["loss_box"], expected_box)
    if quality == "centerness":
        ltrb = torch.cat([centres - gt[:, :2], gt[:, 2:] - centres], dim=1)
        targets_q = centerness(ltrb)
        assert targets_q[4].item() == pytest.approx(1.0)  # the box centre (40, 40)
    else:
        targets_q = torchvision.ops.box_iou(pred, gt[:1]).squeeze(1).detach()
    expected_q = torch.nn.functional.binary_cross_entropy_with_logits(q, targets_q, reduction="sum") / 9
    assert torch.allclose(losses["loss_quality"], expected_q, atol=1e-6)
    for value in losses.values():
        assert torch.isfinite(value)


def test_loss_many_boxes_crowd_ignores_logits():
    outputs = synthetic_outputs(2, 128, 128)
    targets = [target([[10, 10, 50, 70], [60, 60, 120, 100], [5, 80, 20, 95]], [0, 1, 2], crowd=[[70, 0, 128, 40]]),
               target([[30, 30, 40, 44]], [1])]
    sizes = torch.tensor([[128, 128], [128, 128]])
    criterion = FCOSCriterion(num_classes=NUM_CLASSES)
    losses = criterion(outputs, targets, sizes)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # Changing the logits of ignored locations changes nothing.
    ignored = criterion.assign(outputs, targets, sizes).matched == IGNORED  # (B, N)
    assert ignored.any()
    with torch.no_grad():
        logits = torch.cat(outputs.cls_logits, 1)
        logits[ignored] = 10.0
        for level, part in enumerate(logits.split([c.shape[1] for c in outputs.cls_logits], dim=1)):
            outputs.cls_logits[level].copy_(part)
    assert torch.allclose(criterion(outputs, targets, sizes)["loss_cls"], losses["loss_cls"])


# --------------------------------------------------------------------------------------------------------
# Postprocessing
# --------------------------------------------------------------------------------------------------------


def test_postprocessing_by_hand():
    outputs = synthetic_outputs(2, 128, 128, requires_grad=False)
    for c in outputs.cls_logits:
        c.fill_(-10.0)
    # Image 0: class 1 at P3 location (40, 40), box (l, t, r, b) = (2, 2, 3, 3) strides -> [24, 24, 64, 64];
    # a duplicate at (48, 40) that NMS removes, and a second class at the same place that it keeps.
    row, dup = 5 * 16 + 5, 5 * 16 + 6
    outputs.cls_logits[0][0, row, 1] = 4.0
    outputs.cls_logits[0][0, dup, 1] = 3.0
    outputs.cls_logits[0][0, row, 2] = 2.0
    outputs.box_reg[0][0, row] = torch.tensor([2.0, 2.0, 3.0, 3.0])
    outputs.box_reg[0][0, dup] = torch.tensor([3.0, 2.0, 2.0, 3.0])
    for q in outputs.quality:
        q.fill_(0.0)
    # Image 1: one box that runs past its 50 x 60 valid region: clipped.
    outputs.cls_logits[0][1, row, 0] = 4.0
    outputs.box_reg[0][1, row] = torch.tensor([2.0, 2.0, 3.0, 3.0])
    detections = FCOSPostprocessor(score_thresh=0.05)(outputs, torch.tensor([[128, 128], [50, 60]]))
    first, second = detections
    score = math.sqrt(torch.sigmoid(torch.tensor(4.0)).item() * 0.5)
    assert first["labels"].tolist() == [1, 2]
    assert torch.allclose(first["boxes"][0], torch.tensor([24.0, 24, 64, 64]))
    assert first["scores"][0].item() == pytest.approx(score, rel=1e-5)
    assert torch.allclose(second["boxes"], torch.tensor([[24.0, 24, 60, 50]]))
    # Threshold and cap.
    assert FCOSPostprocessor(score_thresh=0.9)(outputs, torch.tensor([[128, 128]] * 2))[0]["boxes"].shape == (0, 4)
    capped = FCOSPostprocessor(detections_per_image=1)(outputs, torch.tensor([[128, 128]] * 2))
    assert capped[0]["labels"].tolist() == [1]


def test_predict_and_supervised_losses_wiring():
    detector = small_fcos()
    images, sizes = torch.rand(2, 3, 128, 128), torch.tensor([[128, 128], [96, 128]])
    losses = supervised_losses(detector, images, sizes, [target([[10, 10, 50, 50]], [0]), target([], [])])
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    detector.model.eval()
    detections = predict(detector, images, sizes)
    assert len(detections) == 2 and all(d["boxes"].shape[1] == 4 for d in detections)
    assert all((d["boxes"][:, 3] <= 96).all() for d in detections[1:])



def test_float64_model_end_to_end():
    detector = small_fcos()
    detector.model.double().train()
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    sizes = torch.tensor([[64, 64], [64, 48]])
    targets = [target([[4, 4, 40, 30]], [1], dtype=torch.float64), target([], [], dtype=torch.float64)]
    losses = supervised_losses(detector, images, sizes, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
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
    """Same weights, same preprocessed batch -> same raw outputs, detections and losses.

    torchvision's GeneralizedRCNNTransform (resize to 800, normalise, pad) is bypassed: its backbone, head,
    anchor generator and postprocessing are called on the batch our model normalises itself. Canvases are
    multiples of 128, where torchvision's stride (canvas // map size) equals ours at every level.
    """
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                        num_classes=NUM_CLASSES, score_thresh=0.05)
    tv.head.classification_head.cls_logits.bias.normal_(-2.0, 1.0)  # spread scores across the threshold
    tv.eval()
    detector = build_detector("fcos", num_classes=NUM_CLASSES, backbone="resnet50")
    load_torchvision_state_dict(detector.model, tv.state_dict())
    detector.model.eval()
    cases = [(torch.rand(1, 3, 128, 128), [(128, 128)]), (torch.rand(1, 3, 128, 256), [(128, 256)]),
             (torch.rand(2, 3, 128, 256), [(128, 256), (100, 150)])]
    for images, sizes in cases:
        for i, (h, w) in enumerate(sizes):  # zero padding outside each valid region, as collate does
            images[i, :, h:], images[i, :, :, w:] = 0, 0
        image_sizes = torch.tensor(sizes)
        out = detector.model(images, image_sizes)
        features = list(tv.backbone((images - detector.model.pixel_mean) / detector.model.pixel_std).values())
        head = tv.head(features)
        anchors = tv.anchor_generator(ImageList(images, sizes), features)
        assert torch.allclose(torch.cat(out.cls_logits, 1), head["cls_logits"], atol=1e-4)
        assert torch.allclose(torch.cat(out.box_reg, 1), head["bbox_regression"], atol=1e-4)
        assert torch.allclose(torch.cat(out.quality, 1), head["bbox_ctrness"], atol=1e-4)
        assert torch.equal(torch.cat(out.anchors), anchors[0])

        counts = [f.shape[2] * f.shape[3] for f in features]
        split = {k: list(v.split(counts, dim=1)) for k, v in head.items()}
        theirs = tv.postprocess_detections(split, [list(a.split(counts)) for a in anchors], sizes)
        ours = detector.postprocessor(out, image_sizes)
        for a, b in zip(ours, theirs):
            assert a["boxes"].shape[0] > 0 and a["boxes"].shape == b["boxes"].shape
            assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
            assert torch.allclose(a["scores"], b["scores"], atol=1e-6)
            assert torch.equal(a["labels"], b["labels"])

        # Losses (same normalisation: the positives of the whole batch).
        boxes = [[10, 12, 60, 70], [64, 20, 120, 90], [30, 30, 46, 44]]
        targets = [target(boxes[: 3 - i], [0, 2, 1][: 3 - i]) for i in range(len(sizes))]
        ours = detector.criterion(out, targets, image_sizes)
        theirs = tv.compute_loss(targets, head, anchors, counts)
        assert torch.allclose(ours["loss_cls"], theirs["classification"], rtol=1e-4)
        assert torch.allclose(ours["loss_box"], theirs["bbox_regression"], rtol=1e-4)
        assert torch.allclose(ours["loss_quality"], theirs["bbox_ctrness"], rtol=1e-4)


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def test_overfit_one_image_lowers_the_loss():
    detector = small_fcos()
    detector.model.train()
    image = torch.zeros(1, 3, 128, 128)
    image[0, :, 20:60, 30:90] = 1.0  # a bright rectangle
    image[0, 0, 80:110, 70:100] = 1.0  # a red square
    targets = [target([[30, 20, 90, 60], [70, 80, 100, 110]], [0, 2])]
    sizes = torch.tensor([[128, 128]])
    optimizer = torch.optim.SGD(detector.model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(25):
        losses = supervised_losses(detector, image, sizes, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5, history
