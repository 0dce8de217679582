"""Shared detector pieces: anchors, box coders and overlaps, the matcher and sampler, losses, ResNet + FPN.

    pytest -x -q tests/test_detectors_common.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from detectors.anchors import AnchorGenerator, cell_anchors
from detectors.backbone import (FPN, build_resnet, build_resnet_fpn, load_backbone_weights,
                                torchvision_backbone_key)
from detectors.box_ops import (BoxCoder, LinearBoxCoder, box_ioa, box_iou, elementwise_box_iou, generalized_box_iou,
                               giou_loss, remove_small_boxes)
from detectors.losses import l1_loss, quality_focal_loss, sigmoid_focal_loss, smooth_l1_loss
from detectors.matcher import BalancedPositiveNegativeSampler, Matcher
from structures import clip_boxes

DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def random_boxes(n, size=100.0, dtype=torch.float32):
    """n valid xyxy boxes with corners in [0, size] and sides >= 1."""
    xy = torch.rand(n, 2, dtype=dtype) * size
    wh = torch.rand(n, 2, dtype=dtype) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


# --------------------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------------------


RETINANET_SIZES = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))


@pytest.mark.parametrize("sizes, ratios, strides", [
    (RETINANET_SIZES, ((0.5, 1.0, 2.0),) * 5, (8, 16, 32, 64, 128)),  # RetinaNet
    (((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5, (8, 16, 32, 64, 128)),  # FCOS
    (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, (4, 8, 16, 32, 64)),  # Faster R-CNN
])
@pytest.mark.parametrize("canvas", [(128, 128), (256, 384)])
def test_anchors_match_torchvision(sizes, ratios, strides, canvas):
    H, W = canvas
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in strides]
    ours = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=strides)(shapes)
    features = [torch.zeros(1, 1, h, w) for h, w in shapes]
    theirs = TVAnchorGenerator(sizes, ratios)(ImageList(torch.zeros(1, 3, H, W), [canvas]), features)[0]
    assert [a.shape for a in ours] == [(h * w * len(s) * len(r), 4) for (h, w), s, r in zip(shapes, sizes, ratios)]
    assert torch.equal(torch.cat(ours), theirs)


def test_anchor_placement_by_hand():
    generator = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(16,))
    assert torch.equal(cell_anchors((32,), (1.0,)), torch.tensor([[-16.0, -16, 16, 16]]))
    # ratio 0.5 (h / w): w = 32 / sqrt(0.5) = 45.25, h = 22.63 -> halves rounded 23 and 11.
    assert torch.equal(cell_anchors((32,), (0.5,)), torch.tensor([[-23.0, -11, 23, 11]]))
    anchors = generator([(2, 3)], dtype=torch.float64)[0]  # rows ordered (y, x, a)
    assert anchors.dtype == torch.float64 and anchors.shape == (2 * 3 * 3, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.tensor([[x * 16.0, y * 16.0] for y in range(2) for x in range(3) for _ in range(3)],
                            dtype=torch.float64)
    assert torch.equal(centres, expected)
    assert generator([(2, 3)], dtype=torch.float64)[0] is anchors  # cached
    assert generator.num_anchors_per_location == 3


def test_anchor_generator_rejects_bad_config():
    with pytest.raises(ValueError, match="one entry per level"):
        AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,),), strides=(8, 16))
    with pytest.raises(ValueError, match="different anchor counts"):
        AnchorGenerator(sizes=((8,), (16, 20)), aspect_ratios=((1.0,),) * 2, strides=(8, 16)).num_anchors_per_location


# --------------------------------------------------------------------------------------------------------
# Box coders and overlaps
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip_and_torchvision(dtype, weights):
    coder, theirs = BoxCoder(weights), tv_utils.BoxCoder(weights)
    boxes, anchors = random_boxes(200, dtype=dtype), random_boxes(200, dtype=dtype)
    deltas = coder.encode(boxes, anchors)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert deltas.dtype == dtype
    assert torch.allclose(coder.decode(deltas, anchors), boxes, atol=tol)
    assert torch.allclose(deltas, theirs.encode_single(boxes, anchors), atol=tol)
    random_deltas = torch.randn(200, 4, dtype=dtype)
    assert torch.allclose(coder.decode(random_deltas, anchors), theirs.decode_single(random_deltas, anchors), atol=tol)
    # Batched: (B, N, 4) deltas against (N, 4) anchors broadcast.
    batched = coder.decode(random_deltas.view(2, 100, 4), anchors[:100])
    assert batched.shape == (2, 100, 4)
    assert torch.allclose(batched[1], coder.decode(random_deltas[100:], anchors[:100]))


def test_box_coder_golden_and_clip():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    box = torch.tensor([[5.0, 10.0, 25.0, 50.0]])  # centre (15, 30) vs (5, 10), twice the size
    assert torch.allclose(coder.encode(box, anchor), torch.tensor([[1.0, 1.0, math.log(2), math.log(2)]]))
    huge = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchor)  # dw clamped at log(1000/16)
    assert torch.isfinite(huge).all() and torch.allclose(huge[0, 2] - huge[0, 0], torch.tensor(10.0 * 1000 / 16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_box_coder(dtype):
    coder = LinearBoxCoder(normalize_by_size=True)
    anchor = torch.tensor([[-4.0, -4.0, 4.0, 4.0]], dtype=dtype)  # stride-8 location at (0, 0)
    box = torch.tensor([[-8.0, -4.0, 16.0, 32.0]], dtype=dtype)
    assert torch.allclose(coder.encode(box, anchor), torch.tensor([[1.0, 0.5, 2.0, 4.0]], dtype=dtype))
    boxes, anchors = random_boxes(50, dtype=dtype), random_boxes(50, dtype=dtype)
    assert torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-4)
    theirs = tv_utils.BoxLinearCoder(normalize_by_size=True)
    assert torch.allclose(coder.encode(boxes, anchors), theirs.encode(anchors, boxes))


@pytest.mark.parametrize("dtype", DTYPES)
def test_overlaps_match_torchvision(dtype):
    a, b = random_boxes(30, dtype=dtype), random_boxes(20, dtype=dtype)
    assert torch.allclose(box_iou(a, b), torchvision.ops.box_iou(a, b))
    assert torch.allclose(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))
    assert torch.allclose(giou_loss(a[:20], b), torchvision.ops.generalized_box_iou_loss(a[:20], b), atol=1e-6)
    assert torch.allclose(elementwise_box_iou(a[:20], b), box_iou(a[:20], b).diagonal(), atol=1e-6)
    # Leading dimensions broadcast: (B, G, 4) x (N, 4) -> (B, G, N).
    stacked = box_iou(torch.stack([a[:10], a[10:20]]), b)
    assert stacked.shape == (2, 10, 20) and torch.allclose(stacked[1], box_iou(a[10:20], b))


def test_overlap_edge_cases():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]])  # zero area
    assert box_iou(point, point).item() == 0 and box_iou(box, point).item() == 0
    assert box_iou(torch.zeros(0, 4), box).shape == (0, 1)
    region = torch.tensor([[5.0, 0.0, 100.0, 100.0]])
    assert box_ioa(box, region).item() == 0.5  # half of the box lies in the region
    assert box_ioa(point, region).item() == 0.0
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]], requires_grad=True)  # degenerate prediction
    loss = giou_loss(pred, box, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert giou_loss(box, box, reduction="mean").item() == pytest.approx(0.0, abs=1e-6)
    assert giou_loss(torch.zeros(0, 4), torch.zeros(0, 4), reduction="mean").item() == 0.0
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])  # disjoint: IoU 0, hull 30x10, union 200 -> 2 - 2/3
    assert giou_loss(box, far).item() == pytest.approx(1 + 100 / 300, abs=1e-6)


def test_clip_and_small_boxes():
    boxes = torch.tensor([[[-5.0, -5.0, 50.0, 70.0]], [[-5.0, -5.0, 50.0, 70.0]]])  # (B=2, K=1, 4)
    clipped = clip_boxes(boxes, torch.tensor([[64, 64], [32, 40]]))  # (h, w) per image
    assert torch.equal(clipped, torch.tensor([[[0.0, 0.0, 50.0, 64.0]], [[0.0, 0.0, 40.0, 32.0]]]))
    assert torch.equal(clip_boxes(boxes[0], (20, 30)), torch.tensor([[0.0, 0.0, 30.0, 20.0]]))
    keep = remove_small_boxes(torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 2.0, 2.0]]), 2.0)
    assert keep.tolist() == [False, True]


# --------------------------------------------------------------------------------------------------------
# Matcher and sampler
# --------------------------------------------------------------------------------------------------------


def test_matcher_thresholds_and_low_quality():
    quality = torch.tensor([[0.9, 0.45, 0.3, 0.2, 0.0],   # gt 0
                            [0.1, 0.5, 0.35, 0.35, 0.0]])  # gt 1
    plain = Matcher(0.5, 0.4)(quality)
    assert plain.tolist() == [0, 1, Matcher.BELOW_LOW_THRESHOLD, Matcher.BELOW_LOW_THRESHOLD,
                              Matcher.BELOW_LOW_THRESHOLD]
    # gt 1's best prediction IoU 0.5 would already match; make it low quality at thresholds 0.6 / 0.4.
    low = Matcher(0.6, 0.4, allow_low_quality_matches=True)(quality)
    assert low.tolist() == [0, 1, Matcher.BELOW_LOW_THRESHOLD, Matcher.BELOW_LOW_THRESHOLD,
                            Matcher.BELOW_LOW_THRESHOLD]
    assert Matcher(0.6, 0.4)(quality)[1].item() == Matcher.BETWEEN_THRESHOLDS


def test_matcher_ties_and_claimed_prediction_keeps_its_best_gt():
    quality = torch.tensor([[0.3, 0.3, 0.1],    # gt 0 ties between predictions 0 and 1
                            [0.0, 0.35, 0.2]])  # gt 1's best is prediction 1 too
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality)
    # gt 0 claims predictions 0 and 1 (a tie); prediction 1's own best gt is gt 1 (0.35), which it keeps.
    assert matches.tolist() == [0, 1, Matcher.BELOW_LOW_THRESHOLD]


def test_matcher_no_ground_truth_and_zero_overlap():
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    assert matcher(torch.zeros(0, 7)).tolist() == [Matcher.BELOW_LOW_THRESHOLD] * 7
    assert matcher(torch.zeros(2, 0, 3)).shape == (2, 3)
    # A gt box that overlaps nothing (e.g. degenerate) must not claim every prediction through ties at 0.
    assert matcher(torch.zeros(1, 4)).tolist() == [Matcher.BELOW_LOW_THRESHOLD] * 4


def test_matcher_batched_with_padding_equals_per_image():
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    anchors = random_boxes(300)
    gts = [random_boxes(5), random_boxes(2), torch.zeros(0, 4)]
    padded = torch.zeros(3, 5, 4)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    for i, g in enumerate(gts):
        padded[i, :len(g)], valid[i, :len(g)] = g, True
    batched = matcher(box_iou(padded, anchors), valid)  # (3, 5, 300) -> (3, 300)
    for i, g in enumerate(gts):
        assert torch.equal(batched[i], matcher(box_iou(g, anchors)))
    # And torchvision's matcher agrees where every gt overlaps some anchor.
    assert torch.equal(batched[0], tv_utils.Matcher(0.5, 0.4, True)(box_iou(gts[0], anchors)))


def test_sampler_counts_and_membership():
    labels = torch.full((3, 1000), -1)
    labels[0, :10], labels[0, 10:500] = 1, 0      # few positives: negatives fill up
    labels[1, :400], labels[1, 400:900] = 2, 0    # many positives: capped at 25%
    labels[2, :5] = 0                             # almost nothing to sample
    sampler = BalancedPositiveNegativeSampler(256, 0.25, generator=torch.Generator().manual_seed(0))
    positive, negative = sampler(labels)
    assert positive.sum(1).tolist() == [10, 64, 0] and negative.sum(1).tolist() == [246, 192, 5]
    assert not (positive & (labels < 1)).any() and not (negative & (labels != 0)).any()
    again = BalancedPositiveNegativeSampler(256, 0.25, generator=torch.Generator().manual_seed(0))(labels)
    assert torch.equal(again[0], positive) and torch.equal(again[1], negative)
    single = sampler(labels[1])  # one image without a batch dimension
    assert single[0].shape == (1000,) and single[0].sum() == 64


def test_sampler_is_uniform():
    labels = torch.zeros(1, 10, dtype=torch.int64)
    sampler = BalancedPositiveNegativeSampler(5, 0.5, generator=torch.Generator().manual_seed(1))
    counts = torch.stack([sampler(labels)[1][0] for _ in range(400)]).sum(0).float()  # each ~ 200
    assert counts.min() > 150 and counts.max() < 250


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_loss(dtype):
    logits = torch.randn(50, 6, dtype=dtype) * 3
    targets = (torch.rand(50, 6) < 0.2).to(dtype)
    ours = sigmoid_focal_loss(logits, targets, reduction="sum")
    assert torch.allclose(ours, torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="sum"))
    plain = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0, reduction="mean")
    assert torch.allclose(plain, F.binary_cross_entropy_with_logits(logits, targets))
    # Golden: p = 0.5 on a negative: -(1 - 0.25) * 0.5^2 * log(0.5).
    value = sigmoid_focal_loss(torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype))
    assert value.item() == pytest.approx(0.75 * 0.25 * math.log(2))


def test_regression_losses():
    x, y = torch.tensor([0.0, 0.05, 2.0]), torch.zeros(3)
    assert torch.allclose(smooth_l1_loss(x, y, beta=0.1), torch.tensor([0.0, 0.5 * 0.05 ** 2 / 0.1, 2.0 - 0.05]))
    assert torch.equal(smooth_l1_loss(x, y, beta=0.0), l1_loss(x, y))
    assert l1_loss(x, y, reduction="sum").item() == pytest.approx(2.05)
    # QFL: BCE(p, y) |y - p|^2; at p = y the loss vanishes.
    target = torch.tensor([0.7])
    assert quality_focal_loss(torch.logit(target), target).item() == pytest.approx(0.0, abs=1e-7)
    assert quality_focal_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(math.log(2) * 0.25)
    with pytest.raises(ValueError, match="reduction"):
        l1_loss(x, y, reduction="max")


# --------------------------------------------------------------------------------------------------------
# Backbone and FPN
# --------------------------------------------------------------------------------------------------------


def test_resnet_fpn_shapes_and_strides():
    body = build_resnet_fpn("resnet18", out_channels=32)  # Faster R-CNN: P2..P6
    maps = body(torch.rand(2, 3, 96, 160))
    assert body.strides == (4, 8, 16, 32, 64)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 24, 40), (2, 32, 12, 20), (2, 32, 6, 10), (2, 32, 3, 5),
                                              (2, 32, 2, 3)]
    dense = build_resnet_fpn("resnet18", out_channels=32, levels=(3, 4, 5), extra_blocks="p6p7")
    maps = dense(torch.rand(1, 3, 128, 96))
    assert dense.strides == (8, 16, 32, 64, 128)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]


@pytest.mark.parametrize("extra, p6p7_from", [("p6p7", "p5"), ("p6p7", "c5"), ("maxpool", "p5")])
def test_fpn_matches_torchvision_through_the_key_map(extra, p6p7_from):
    in_channels = [16, 32, 64]
    if extra == "maxpool":
        block = LastLevelMaxPool()
    else:
        block = LastLevelP6P7(24 if p6p7_from == "p5" else 64, 24)
    theirs = FeaturePyramidNetwork(in_channels, 24, extra_blocks=block)
    ours = FPN(in_channels, 24, extra_blocks=extra, p6p7_from=p6p7_from)
    state = {torchvision_backbone_key("backbone.fpn." + k)[len("backbone.fpn."):]: v
             for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    features = [torch.randn(2, c, 32 // 2 ** i, 24 // 2 ** i) for i, c in enumerate(in_channels)]
    expected = theirs({str(i): f for i, f in enumerate(features)})
    outputs = ours(features)
    assert len(outputs) == len(expected)
    for a, b in zip(outputs, expected.values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_backbone_key_map():
    assert torchvision_backbone_key("backbone.body.layer2.0.conv1.weight") == "backbone.body.layer2.0.conv1.weight"
    assert torchvision_backbone_key("backbone.fpn.inner_blocks.1.0.bias") == "backbone.fpn.lateral.1.bias"
    assert torchvision_backbone_key("backbone.fpn.layer_blocks.0.0.weight") == "backbone.fpn.output.0.weight"
    assert torchvision_backbone_key("backbone.fpn.extra_blocks.p7.bias") == "backbone.fpn.p7.bias"
    with pytest.raises(KeyError, match="no mapping"):
        torchvision_backbone_key("backbone.fpn.something.0.weight")


def test_frozen_batchnorm_and_stages():
    body = build_resnet("resnet18", frozen_stages=1, frozen_bn=True)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    scratch = build_resnet_fpn("resnet18", out_channels=32)  # no weights: everything trains, BatchNorm learns
    assert all(p.requires_grad for p in scratch.parameters())
    assert isinstance(scratch.body.bn1, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_resnet("resnet9")


def test_load_backbone_weights(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    body = build_resnet_fpn("resnet18", out_channels=32, weights=path)  # frozen BN, stem + layer1 frozen
    assert torch.equal(body.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.body.bn1.running_var, reference.bn1.running_var)
    assert isinstance(body.body.bn1, FrozenBatchNorm2d) and not body.body.layer1[0].conv1.weight.requires_grad
    assert body.body.layer2[0].conv1.weight.requires_grad

    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet34.pth"):
        load_backbone_weights(build_resnet("resnet18"), wrong)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_backbone_weights(build_resnet("resnet18"), tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------------------
# build_detector / supervised_losses / predict
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, keys", [
    ("fcos", {"loss_cls", "loss_box", "loss_quality"}),
    ("retinanet", {"loss_cls", "loss_box"}),
    ("faster_rcnn", {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}),
])
def test_every_detector_through_the_common_wiring(name, keys):
    from detectors import build_detector, predict, supervised_losses

    detector = build_detector(name, num_classes=3, backbone="resnet18", fpn_channels=32,
                              **({"norm_groups": 16} if name == "fcos" else {}))
    images, sizes = torch.rand(2, 3, 64, 96), torch.tensor([[64, 96], [50, 60]])
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2]),
                "crowd": torch.zeros(0, 4)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "crowd": torch.zeros(0, 4)}]
    detector.model.train()
    losses = supervised_losses(detector, images, sizes, targets)
    assert set(losses) == keys and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    detector.model.eval()
    detections = predict(detector, images, sizes)
    assert len(detections) == 2
    for d, (h, w) in zip(detections, sizes.tolist()):
        assert set(d) == {"boxes", "scores", "labels"} and d["boxes"].shape[1] == 4
        assert (d["boxes"][:, 2] <= w).all() and (d["boxes"][:, 3] <= h).all()


def test_build_detector_rejects_unknown_names():
    from detectors import build_detector

    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo", num_classes=3)
    with pytest.raises(ValueError, match="trainable_layers"):
        build_detector("fcos", num_classes=3, trainable_layers=6)
