"""Faster R-CNN (detectors/faster_rcnn.py): stage shapes, proposals, RoI sampling, losses, postprocessing,
equivalence with torchvision's fasterrcnn_resnet50_fpn, and a short overfit.

    pytest -x -q tests/test_faster_rcnn.py
"""

import math

import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, roi_align

from conftest import box_target as box_targets
import detectors
from detectors.box_ops import pad_per_image
from detectors.faster_rcnn import (FPN_STRIDES, FasterRCNNCriterion, FasterRCNNPostprocessor, RoIOutput, RPNOutput,
                                   SampledRoIs, build_faster_rcnn, first_n_per_image, gather_rows,
                                   load_torchvision_state_dict, roi_class_probs)

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def small_detector(**overrides):
    """A light model for fast tests: ResNet-18, 32-channel FPN, anchors COCO / 4, a 64-wide box head."""
    settings = dict(backbone="resnet18", fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128],
                    representation_size=64, rpn_post_nms_train=300, rpn_post_nms_test=300, roi_batch_size=128)
    return detectors.build_detector("faster_rcnn", num_classes=NUM_CLASSES, **(settings | overrides))


def make_images(B=2, H=128, W=128, dtype=torch.float32):
    return torch.rand(B, 3, H, W, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# Model stages
# --------------------------------------------------------------------------------------------------------


def test_stage_shapes():
    model, _, _ = small_detector()
    model.eval()
    images, sizes = make_images(2, 128, 192), torch.tensor([[128, 192], [100, 150]])
    features = model.features(images)
    assert [tuple(f.shape) for f in features] == [(2, 32, 128 // s, 192 // s) for s in (4, 8, 16, 32)] + [(2, 32, 2, 3)]
    rpn = model.rpn(features)
    for f, logits, deltas, anchors in zip(features, *rpn):
        HWA = f.shape[2] * f.shape[3] * 3
        assert logits.shape == (2, HWA, 1) and deltas.shape == (2, HWA, 4) and anchors.shape == (HWA, 4)
    # The anchors of a level are centred on i * stride (torchvision's placement); row order (y, x, anchor).
    for anchors, stride, f in zip(rpn.anchors, FPN_STRIDES, features):
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (HWA, 2)
        W_l = f.shape[3]
        assert torch.allclose(centres[3 * (W_l + 1)], torch.tensor([stride, stride], dtype=centres.dtype))
    out = model(images, sizes)
    K = sum(p.shape[0] for p in out.proposals)
    assert out.roi.class_logits.shape == (K, NUM_CLASSES + 1) and out.roi.box_deltas.shape == (K, NUM_CLASSES, 4)
    assert all(p.shape[0] <= 300 for p in out.proposals)


def test_rpn_head_layout_matches_conv_channels():
    """Row (y, x, a) of the flattened outputs is channel a (objectness) / 4a..4a+3 (deltas) at (y, x)."""
    model, _, _ = small_detector()
    feature = torch.randn(2, 32, 5, 7)
    objectness, deltas = model.rpn_head([feature])
    x = torch.relu(model.rpn_head.conv(feature))
    raw_logits, raw_deltas = model.rpn_head.objectness(x), model.rpn_head.deltas(x)  # (2, 3, 5, 7), (2, 12, 5, 7)
    y, xx, a = 3, 4, 2
    row = (y * 7 + xx) * 3 + a
    assert torch.allclose(objectness[0][1, row, 0], raw_logits[1, a, y, xx])
    assert torch.allclose(deltas[0][1, row], raw_deltas[1, 4 * a:4 * a + 4, y, xx])


def test_roi_head_on_given_boxes():
    model, _, _ = small_detector()
    model.eval()
    images, sizes = make_images(2, 128, 128), torch.tensor([[128, 128], [128, 128]])
    features = model.features(images)
    boxes = [torch.tensor([[10.0, 10.0, 50.0, 60.0], [0.0, 0.0, 128.0, 128.0], [30.0, 40.0, 33.0, 42.0]]),
             torch.zeros(0, 4)]
    out = model.roi_head(features, boxes, sizes)
    assert out.class_logits.shape == (3, NUM_CLASSES + 1) and out.box_deltas.shape == (3, NUM_CLASSES, 4)
    again = model.roi_head(features, boxes, sizes)
    assert torch.equal(out.class_logits, again.class_logits) and torch.equal(out.box_deltas, again.box_deltas)
    # Rows belong to their own image: a batch call equals one call per image.
    boxes = [boxes[0], torch.tensor([[5.0, 6.0, 70.0, 90.0]])]
    both = model.roi_head(features, boxes, sizes)
    second = model.roi_head([f[1:] for f in features], boxes[1:], sizes[1:])
    assert torch.allclose(both.class_logits[3:], second.class_logits, atol=1e-6)
    # The inference path runs the same head on its proposals.
    inference = model(images, sizes)
    direct = model.roi_head(inference.features, inference.proposals, sizes)
    assert torch.equal(direct.class_logits, inference.roi.class_logits)
    assert torch.equal(direct.box_deltas, inference.roi.box_deltas)
    probs = roi_class_probs(out)
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def test_empty_rois_and_detections():
    model, criterion, post = small_detector()
    model.eval()
    features = model.features(make_images(2))
    sizes = torch.tensor([[128, 128], [128, 128]])
    out = model.roi_head(features, [torch.zeros(0, 4), torch.zeros(0, 4)], sizes)
    assert out.class_logits.shape == (0, NUM_CLASSES + 1) and out.box_deltas.shape == (0, NUM_CLASSES, 4)
    assert model.decode_roi_boxes(out, [torch.zeros(0, 4)] * 2).shape == (0, NUM_CLASSES, 4)
    detections = post(out, [torch.zeros(0, 4)] * 2, sizes)
    assert [d["boxes"].shape for d in detections] == [(0, 4), (0, 4)]
    # No proposal and no gt: nothing to sample, and the RoI loss is a finite zero.
    sampled = criterion.sample_rois([torch.zeros(0, 4)] * 2, [box_targets([], [])] * 2)
    assert [b.shape[0] for b in sampled.boxes] == [0, 0]
    losses = criterion.roi_losses(out, sampled)
    assert losses["loss_cls"] == 0 and losses["loss_box"] == 0


def test_float64_matches_float32():
    model, _, _ = small_detector()
    model.eval()
    images, sizes = make_images(2, 128, 160), torch.tensor([[128, 160], [90, 120]])
    boxes = [torch.tensor([[10.0, 10.0, 50.0, 60.0], [3.0, 4.0, 120.0, 90.0]]), torch.tensor([[5.0, 6.0, 70.0, 80.0]])]
    with torch.no_grad():
        single = model(images, sizes)
        roi32 = model.roi_head(single.features, boxes, sizes)
        model.double()
        double = model(images.double(), sizes)
        roi64 = model.roi_head(double.features, [b.double() for b in boxes], sizes)
    assert roi64.class_logits.dtype == torch.float64 and double.proposals[0].dtype == torch.float64
    assert torch.allclose(roi64.class_logits, roi32.class_logits.double(), atol=1e-4)
    assert torch.allclose(roi64.box_deltas, roi32.box_deltas.double(), atol=1e-4)
    for a, b in zip(single.rpn.objectness, double.rpn.objectness):
        assert torch.allclose(a.double(), b, atol=1e-4)


def test_roi_head_pools_the_fpn_level_of_eq1():
    """FPN Eq. 1: k = floor(4 + log2(sqrt(wh) / 224)), clamped to P2..P5; a 112 x 112 box is pooled from P3."""
    model, _, _ = small_detector()
    model.eval()
    features = model.features(make_images(1, 256, 256))
    box = torch.tensor([[40.0, 60.0, 152.0, 172.0]])  # 112 x 112
    pooled = roi_align(features[1], [box], output_size=7, spatial_scale=1 / 8, sampling_ratio=2)  # P3
    expected = model.box_predictor(model.box_head(pooled))
    out = model.roi_head(features, [box], torch.tensor([[256, 256]]))
    assert torch.allclose(out.class_logits, expected.class_logits, atol=1e-6)
    assert torch.allclose(out.box_deltas, expected.box_deltas, atol=1e-6)


def test_decode_roi_boxes():
    model, _, _ = small_detector()
    rois = [torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    deltas = torch.zeros(2, NUM_CLASSES, 4)
    deltas[0, 1] = torch.tensor([10.0, 0.0, 0.0, 5 * math.log(2)])  # dx = 1 box width, height doubled
    decoded = model.decode_roi_boxes(RoIOutput(torch.zeros(2, NUM_CLASSES + 1), deltas), rois)
    assert decoded.shape == (2, NUM_CLASSES, 4)
    assert torch.allclose(decoded[0, 0], rois[0][0]) and torch.allclose(decoded[1, 2], rois[1][0])
    assert torch.allclose(decoded[0, 1], torch.tensor([30.0, 0.0, 50.0, 80.0]))


# --------------------------------------------------------------------------------------------------------
# Proposals
# --------------------------------------------------------------------------------------------------------


def test_proposals_inside_each_image():
    model, _, _ = small_detector(rpn_post_nms_test=50)
    model.eval()
    # Large random deltas push many decoded boxes across the borders and into the padding.
    torch.nn.init.normal_(model.rpn_head.deltas.weight, std=0.5)
    images, sizes = make_images(2, 128, 192), torch.tensor([[128, 192], [70, 90]])
    rpn = model.rpn(model.features(images))
    proposals = model.propose(rpn, sizes)
    assert len(proposals) == 2
    for boxes, (h, w) in zip(proposals, sizes.tolist()):
        assert 0 < boxes.shape[0] <= 50 and not boxes.requires_grad
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # The batch-wide NMS never mixes images: image 1 alone gives the same proposals.
    alone = model.propose(RPNOutput(objectness=[o[1:] for o in rpn.objectness], deltas=[d[1:] for d in rpn.deltas],
                                    anchors=rpn.anchors), sizes[1:])
    assert torch.equal(alone[0], proposals[1])
    more = model.propose(rpn, sizes, pre_nms_top_n=5, post_nms_top_n=1000)
    assert all(p.shape[0] <= 5 * 5 for p in more)  # at most 5 candidates per level survive


def test_propose_defaults_follow_mode():
    model, _, _ = small_detector(rpn_post_nms_train=20, rpn_post_nms_test=7)
    images, sizes = make_images(1), torch.tensor([[128, 128]])
    rpn = model.rpn(model.features(images))
    model.train()
    assert model.propose(rpn, sizes)[0].shape[0] == 20
    model.eval()
    assert model.propose(rpn, sizes)[0].shape[0] == 7


def test_batch_helpers():
    kept = torch.tensor([5, 2, 7, 0, 3, 1])  # decreasing score
    image = torch.tensor([1, 0, 1, 1, 0, 2])
    assert first_n_per_image(kept, image, n=2).tolist() == [2, 3, 5, 7, 1]
    assert first_n_per_image(kept[:0], image[:0], n=2).shape == (0,)
    padded, valid = pad_per_image([torch.ones(2, 4), torch.zeros(0, 4), torch.full((3, 4), 2.0)], fill=-1.0)
    assert padded.shape == (3, 3, 4) and valid.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert (padded[0, 2] == -1).all() and (padded[2] == 2).all()
    padded, valid = pad_per_image([torch.zeros(0, dtype=torch.int64)] * 2, fill=7)
    assert padded.tolist() == [[7], [7]] and not valid.any()  # at least one row
    table = torch.arange(12.0).view(2, 3, 2)
    assert gather_rows(table, torch.tensor([[2, 0], [1, 1]])).tolist() == [[[4, 5], [0, 1]], [[8, 9], [8, 9]]]


# --------------------------------------------------------------------------------------------------------
# Targets, sampling and losses
# --------------------------------------------------------------------------------------------------------


def test_rpn_targets_golden():
    """0.7 / 0.3 thresholds, ignored in between, and the best anchor of a gt is positive even below 0.7."""
    criterion = FasterRCNNCriterion(num_classes=NUM_CLASSES)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0],  # IoU 1 with gt 0 -> positive
                            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> ignored
                            [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> background
                            [100.0, 100.0, 110.0, 120.0]])  # IoU 0.5 with gt 1, its best anchor -> positive
    targets = [box_targets([[0, 0, 10, 10], [100, 100, 110, 110]], [0, 2])]
    labels, matched = criterion.rpn_targets(anchors, targets)
    assert labels.tolist() == [[1, -1, 0, 1]]
    assert torch.equal(matched[0, 3], targets[0]["boxes"][1])
    labels, _ = criterion.rpn_targets(anchors, [box_targets([], [])])
    assert labels.tolist() == [[0, 0, 0, 0]]


def test_sample_rois_counts_and_labels():
    criterion = FasterRCNNCriterion(num_classes=NUM_CLASSES)  # 512 RoIs per image, 25% positive
    gt = box_targets([[10, 10, 50, 50], [60, 60, 120, 100]], [2, 0])
    # 2000 proposals: jittered copies of the gt (many positives) and random boxes (many negatives).
    near = gt["boxes"].repeat(400, 1) + torch.randn(800, 4) * 3
    xy = torch.rand(1200, 2) * 100
    far = torch.cat([xy, xy + 5 + torch.rand(1200, 2) * 30], dim=1)
    sampled = criterion.sample_rois([torch.cat([near, far]), far[:10]], [gt, box_targets([[0, 0, 30, 30]], [1])])
    assert isinstance(sampled, SampledRoIs)
    labels, boxes = sampled.labels[0], sampled.boxes[0]
    assert boxes.shape == (512, 4) and labels.shape == (512,)
    positive = labels < NUM_CLASSES
    assert int(positive.sum()) == 128  # exactly a quarter: there are more positives than that
    iou = box_iou(boxes, gt["boxes"]).amax(dim=1)
    assert (iou[positive] >= 0.5).all() and (iou[~positive] < 0.5).all()
    assert set(labels[positive].tolist()) <= {0, 2} and (labels[~positive] == NUM_CLASSES).all()
    assert torch.equal(sampled.weights[0], torch.ones(512))
    # Regression targets encode each positive RoI's matched gt box (weights 10, 10, 5, 5).
    dx = (sampled.matched_gt_boxes[0][:, ::2].mean(1) - boxes[:, ::2].mean(1)) / (boxes[:, 2] - boxes[:, 0]) * 10
    assert torch.allclose(sampled.regression_targets[0][positive, 0], dx[positive], atol=1e-4)
    # Image 2: 10 proposals + 1 gt box, all kept (fewer candidates than 512); the gt box is a positive.
    assert sampled.boxes[1].shape[0] == 11 and int((sampled.labels[1] == 1).sum()) >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_boxes", [0, 1, 12])
def test_losses_finite_and_connected(num_boxes, dtype):
    detector = small_detector()
    model = detector.model.to(dtype).train()
    images = make_images(2, 128, 128, dtype=dtype)
    sizes = torch.tensor([[128, 128], [96, 112]])
    xy = torch.rand(num_boxes, 2, dtype=dtype) * 60
    boxes = torch.cat([xy, xy + 8 + torch.rand(num_boxes, 2, dtype=dtype) * 30], dim=1)
    targets = [{"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (num_boxes,)),
                "crowd": torch.zeros(0, 4, dtype=dtype)} for _ in range(2)]
    losses = detectors.supervised_losses(detector, images, sizes, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    for name, value in losses.items():
        assert value.dtype == dtype and value.dim() == 0 and torch.isfinite(value), name
        assert value.requires_grad, name
    if num_boxes == 0:
        assert losses["loss_box"] == 0 and losses["loss_rpn_box"] == 0
    else:
        assert losses["loss_box"] > 0 and losses["loss_rpn_box"] > 0
    sum(losses.values()).backward()
    assert model.box_predictor.bbox_pred.weight.grad is not None  # the box loss reaches the regressor
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_no_box_image_samples_only_background():
    criterion = FasterRCNNCriterion(num_classes=NUM_CLASSES, roi_batch_size_per_image=64)
    xy = torch.rand(300, 2) * 100
    proposals = torch.cat([xy, xy + 10], dim=1)
    sampled = criterion.sample_rois([proposals], [box_targets([], [])])
    assert sampled.labels[0].shape == (64,) and (sampled.labels[0] == NUM_CLASSES).all()
    assert torch.equal(sampled.matched_gt_boxes[0], torch.zeros(64, 4))


def test_roi_loss_weights():
    """Soft Teacher's weighted classification loss: sum(w * CE) / max(sum(w), 1)."""
    criterion = FasterRCNNCriterion(num_classes=2)
    logits = torch.randn(4, 3, requires_grad=True)
    deltas = torch.randn(4, 2, 4, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1])
    targets = torch.randn(4, 4)
    sampled = SampledRoIs(boxes=[torch.zeros(4, 4)], labels=[labels], matched_gt_boxes=[torch.zeros(4, 4)],
                          regression_targets=[targets], weights=[torch.ones(4)])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    plain = criterion.roi_losses(RoIOutput(logits, deltas), sampled)
    assert torch.allclose(plain["loss_cls"], ce.mean())
    pos = [0, 3]
    expected_box = torch.nn.functional.smooth_l1_loss(deltas[pos, labels[pos]], targets[pos], beta=1 / 9,
                                                      reduction="sum") / 4
    assert torch.allclose(plain["loss_box"], expected_box)
    w = torch.tensor([1.0, 0.3, 0.1, 1.0])
    weighted = criterion.roi_losses(RoIOutput(logits, deltas), sampled, cls_weights=w)
    assert torch.allclose(weighted["loss_cls"], (w * ce).sum() / w.sum())
    assert torch.allclose(weighted["loss_box"], plain["loss_box"])  # weights touch classification only
    small = torch.tensor([0.0, 0.2, 0.1, 0.0])  # sum < 1: the denominator is 1
    assert torch.allclose(criterion.roi_losses(RoIOutput(logits, deltas), sampled._replace(weights=[small]))
                          ["loss_cls"], (small * ce).sum())


def test_crowd_regions_are_ignored():
    criterion = FasterRCNNCriterion(num_classes=NUM_CLASSES, roi_batch_size_per_image=1000)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0],  # inside the crowd box -> ignored
                            [15.0, 15.0, 30.0, 30.0],  # half inside (ioa 0.11) -> background
                            [60.0, 60.0, 70.0, 70.0],  # positive, inside the crowd box -> stays positive
                            [90.0, 90.0, 99.0, 99.0]])  # far -> background
    target = box_targets([[60, 60, 70, 70]], [1], crowd=[[0, 0, 20, 20], [50, 50, 80, 80]])
    labels, _ = criterion.rpn_targets(anchors, [target])
    assert labels.tolist() == [[-1, 0, 1, 0]]
    sampled = criterion.sample_rois([anchors], [target])
    kept = {tuple(b.tolist()) for b in sampled.boxes[0]}
    assert tuple(anchors[0].tolist()) not in kept and tuple(anchors[1].tolist()) in kept
    assert tuple(anchors[2].tolist()) in kept


# --------------------------------------------------------------------------------------------------------
# Postprocessor
# --------------------------------------------------------------------------------------------------------


def test_postprocessor_golden():
    post = FasterRCNNPostprocessor(detections_per_image=2)
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [60.0, 0.0, 200.0, 40.0]]),
                 torch.zeros(0, 4)]
    # Class probabilities (C = 2, background last): RoI 0 class 1, RoI 1 the same object, RoI 2 class 0.
    probs = torch.tensor([[0.01, 0.9, 0.09], [0.02, 0.8, 0.18], [0.7, 0.04, 0.26]])
    roi = RoIOutput(class_logits=probs.log(), box_deltas=torch.zeros(3, 2, 4))
    results = post(roi, proposals, torch.tensor([[100, 100], [100, 100]]))
    assert len(results) == 2 and results[1]["boxes"].shape == (0, 4)
    alone = post(roi, proposals[:1], torch.tensor([[100, 100]]))[0]
    assert all(torch.equal(alone[key], results[0][key]) for key in ("boxes", "scores", "labels"))
    first = results[0]
    assert first["labels"].tolist() == [1, 0]  # RoI 1 suppressed by NMS, 0.04 below the threshold
    assert torch.allclose(first["scores"], torch.tensor([0.9, 0.7]))
    assert torch.allclose(first["boxes"], torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 0.0, 100.0, 40.0]]))


# --------------------------------------------------------------------------------------------------------
# torchvision equivalence
# --------------------------------------------------------------------------------------------------------


def torchvision_pair(num_classes):
    """torchvision's fasterrcnn_resnet50_fpn, randomly initialised, and our model with its weights."""
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                              num_classes=num_classes + 1)
    # Spread the random outputs so that scores, NMS and the top-k choices are not decided by ties.
    torch.nn.init.normal_(tv.roi_heads.box_predictor.cls_score.weight, std=0.005)
    torch.nn.init.normal_(tv.rpn.head.bbox_pred.weight, std=0.0005)  # moderate proposals: most survive NMS
    torch.nn.init.normal_(tv.roi_heads.box_predictor.bbox_pred.weight, std=0.002)
    tv.eval()
    ours, _, post = build_faster_rcnn(num_classes=num_classes, backbone="resnet50", fpn_channels=256)
    load_torchvision_state_dict(ours, tv.state_dict())
    ours.eval()
    return tv, ours, post


def sorted_rows(boxes):
    """(N, 4) -> the rows in lexicographic order (of values rounded to 1e-3, robust to float noise)."""
    keys = (boxes * 1000).round().tolist()
    return boxes[sorted(range(len(keys)), key=keys.__getitem__)]


@torch.no_grad()
def test_torchvision_equivalence():
    """Same weights, same preprocessed batch -> same RPN outputs, proposals, RoI outputs and detections.

    torchvision's GeneralizedRCNNTransform (resize to 800, normalise, pad) is bypassed: both models get the
    same [0, 1] batch, ours normalises inside `features`, torchvision's backbone gets the normalised batch.
    Canvas sizes are multiples of 64, where torchvision's P6 stride (canvas // map size) is exactly 64.
    """
    tv, ours, post = torchvision_pair(NUM_CLASSES)
    cases = [(torch.rand(1, 3, 128, 128), [(128, 128)]),
             (torch.rand(1, 3, 192, 256), [(192, 256)]),
             (torch.rand(2, 3, 192, 256), [(192, 256), (150, 200)])]
    for images, sizes in cases:
        for i, (h, w) in enumerate(sizes):  # zero padding outside each valid region, as collate does
            images[i, :, h:], images[i, :, :, w:] = 0, 0
        image_sizes = torch.tensor(sizes)
        normalised = (images - ours.pixel_mean) / ours.pixel_std
        tv_features = tv.backbone(normalised)
        features = ours.features(images)
        for a, b in zip(features, tv_features.values()):
            assert torch.allclose(a, b, atol=1e-4)

        # Raw RPN outputs, flattened the same way.
        tv_logits, tv_deltas = tv.rpn.head(list(tv_features.values()))
        rpn = ours.rpn(features)
        for ob, tv_ob, d, tv_d in zip(rpn.objectness, tv_logits, rpn.deltas, tv_deltas):
            B, A, H, W = tv_ob.shape
            assert torch.allclose(ob, tv_ob.permute(0, 2, 3, 1).reshape(B, -1, 1), atol=1e-4)
            assert torch.allclose(d, tv_d.view(B, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, 4), atol=1e-4)
        image_list = ImageList(normalised, sizes)
        tv_anchors = tv.rpn.anchor_generator(image_list, list(tv_features.values()))
        assert torch.allclose(torch.cat(rpn.anchors), tv_anchors[0])

        # Proposals (test settings: 1000 per level, 1000 per image). The padding of the smaller image gives
        # equal objectness to several anchors, and NMS may list such ties in either order: compare sets.
        tv_proposals, _ = tv.rpn(image_list, tv_features)
        proposals = ours.propose(rpn, image_sizes)
        for p, tv_p in zip(proposals, tv_proposals):
            assert p.shape == tv_p.shape and torch.allclose(sorted_rows(p), sorted_rows(tv_p), atol=1e-4)
            assert (p - tv_p).abs().amax(dim=1).le(1e-4).float().mean() > 0.99  # the order too, up to ties

        # The RoI head on the same proposals.
        roi = ours.roi_head(features, tv_proposals, image_sizes)
        tv_pooled = tv.roi_heads.box_roi_pool(tv_features, tv_proposals, sizes)
        tv_logits, tv_box = tv.roi_heads.box_predictor(tv.roi_heads.box_head(tv_pooled))
        K = tv_logits.shape[0]
        assert torch.allclose(roi.class_logits, tv_logits[:, [*range(1, NUM_CLASSES + 1), 0]], atol=1e-4)
        assert torch.allclose(roi.box_deltas, tv_box.view(K, NUM_CLASSES + 1, 4)[:, 1:], atol=1e-4)

        # Final detections; labels shift by one (torchvision's 0 is background).
        tv_detections, _ = tv.roi_heads(tv_features, tv_proposals, sizes)
        detections = post(roi, tv_proposals, image_sizes)
        for d, tv_d in zip(detections, tv_detections):
            assert d["boxes"].shape[0] > 0 and d["boxes"].shape == tv_d["boxes"].shape
            assert torch.allclose(d["boxes"], tv_d["boxes"], atol=1e-3)
            assert torch.allclose(d["scores"], tv_d["scores"], atol=1e-5)
            assert torch.equal(d["labels"] + 1, tv_d["labels"])

    # The key map checks what it is given.
    state = tv.state_dict()
    with pytest.raises(ValueError, match="classes"):
        wrong = torch.zeros(NUM_CLASSES + 2, 1024)  # a model with one more class
        load_torchvision_state_dict(ours, state | {"roi_heads.box_predictor.cls_score.weight": wrong})
    with pytest.raises(KeyError, match="roi_heads.mask_head"):
        load_torchvision_state_dict(ours, state | {"roi_heads.mask_head.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def test_overfit_one_image_lowers_the_loss():
    detector = small_detector(rpn_post_nms_train=100, roi_batch_size=64)
    model = detector.model.train()
    image = torch.zeros(1, 3, 128, 128)
    image[0, :, 20:60, 30:90] = 1.0  # a bright rectangle
    image[0, 0, 80:110, 70:100] = 1.0  # a red square
    targets = [box_targets([[30, 20, 90, 60], [70, 80, 100, 110]], [0, 2])]
    sizes = torch.tensor([[128, 128]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(25):
        losses = detectors.supervised_losses(detector, image, sizes, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
