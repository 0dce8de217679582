"""semi/soft_teacher.py: Soft Teacher on a tiny Faster R-CNN (CPU, float32 and float64).

Covered: the box-jitter uncertainty by hand with a teacher whose refinement returns its input (Eq. 7-9), and
against the real RoI head image by image; BG-T weights of a hand-built case, with the RoIs carried into the
teacher's frame, and the Eq. 4-5 normalisation above and below a weight sum of 1; the pseudo-boxes carried
weak -> strong into each student loss, with the three thresholds; batches with no pseudo-box (one image,
every image, and no proposal at all) giving finite terms, exact zeros for regression and finite gradients;
the config's paper defaults and checks; the method interface; a short end-to-end run through train.py.
"""

import math

import pytest
import torch

import detectors
from structures import Batch, UnlabeledBatch
from data.transforms import hflip_matrix, scale_matrix, translation_matrix
from detectors.faster_rcnn import FasterRCNNCriterion, RoIOutput, SampledRoIs
from semi.ema import EMATeacher
from semi.soft_teacher import (LOSS_KEYS, SoftTeacher, SoftTeacherConfig, TeacherOutput, background_weights,
                               box_uncertainty, build_soft_teacher, carry_pseudo_boxes)

NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_detector(seed: int = 0) -> detectors.Detector:
    torch.manual_seed(seed)
    return detectors.build_detector("faster_rcnn", num_classes=NUM_CLASSES, backbone="resnet18", fpn_channels=16,
                                    representation_size=32, anchor_sizes=[8, 16, 32, 64, 128],
                                    rpn_pre_nms_train=100, rpn_post_nms_train=50, rpn_pre_nms_test=100,
                                    rpn_post_nms_test=50, roi_batch_size=32, roi_canonical_scale=56)


def no_targets(B: int) -> list[dict]:
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "crowd": torch.zeros(0, 4)}
            for _ in range(B)]


def view(matrices: list[torch.Tensor], sizes: list[list[int]], *, seed: int, canvas=(64, 64)) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    B = len(matrices)
    return Batch(images=torch.rand(B, 3, *canvas, generator=generator), image_sizes=torch.tensor(sizes),
                 targets=no_targets(B), matrices=torch.stack(matrices), image_ids=list(range(B)),
                 orig_sizes=[(64, 64)] * B)


def unlabeled_pair() -> UnlabeledBatch:
    """Two images; weak = original frame, strong = flipped (image 0) and shifted + scaled (image 1)."""
    eye = torch.eye(3, dtype=torch.float64)
    weak = view([eye, eye], [[64, 64], [64, 56]], seed=1)
    strong = view([hflip_matrix(64), translation_matrix(-4, 2) @ scale_matrix(0.75, 0.75)], [[64, 64], [48, 42]],
                  seed=2)
    return UnlabeledBatch(weak=weak, strong=strong)


def student_and_teacher():
    student = tiny_detector()
    student.model.train()
    ema = EMATeacher(student.model)
    return student, student._replace(model=ema.model)


def pseudo(boxes, labels, scores, uncertainty=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor(scores, dtype=torch.float32)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "scores": scores,
            "uncertainty": torch.tensor(uncertainty if uncertainty is not None else [0.0] * len(scores))}


class FakeRoIHead:
    """A stand-in teacher model: `roi_head` records the boxes it is given and returns fixed outputs.

    deltas = 0 makes the refinement the identity (decode(0, box) = box); `logits` (rows in order) are returned
    as the class logits when given, zeros otherwise.
    """

    def __init__(self, *, logits: torch.Tensor | None = None, dtype=torch.float64):
        self.seen: list[list[torch.Tensor]] = []
        self.logits = logits
        self.dtype = dtype
        self.roi_box_coder = tiny_detector().model.roi_box_coder

    def roi_head(self, features, boxes, image_sizes) -> RoIOutput:
        self.seen.append([b.clone() for b in boxes])
        K = sum(len(b) for b in boxes)
        logits = self.logits if self.logits is not None else torch.zeros(K, NUM_CLASSES + 1, dtype=self.dtype)
        return RoIOutput(class_logits=logits, box_deltas=torch.zeros(K, NUM_CLASSES, 4, dtype=self.dtype))


# --------------------------------------------------------------------------------------------------------
# Box jittering (Sec. 3.3, Eq. 7-9)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jitter_uncertainty_with_an_identity_refinement_is_the_normalised_std_of_the_jitter(dtype):
    """With deltas 0 the refined copies are the jittered ones, so the uncertainty is computed by hand from the
    same normal draws: per coordinate std over the copies / side of the mean box, averaged over 4."""
    times, scale = 10, 0.06
    per_image = [pseudo([[10, 20, 50, 40], [5, 5, 5.5, 9]], [0, 2], [0.9, 0.8]),  # the second box: w < 1
                 pseudo([], [], []),
                 pseudo([[30, 8, 60, 60]], [1], [0.7])]
    per_image = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in p.items()} for p in per_image]
    head = FakeRoIHead(dtype=dtype)
    got = box_uncertainty(head, features=[], pseudo=per_image, image_sizes=torch.tensor([[64, 64]] * 3),
                          times=times, scale=scale, generator=torch.Generator().manual_seed(0))
    assert [u.shape for u in got] == [(2,), (0,), (1,)]
    assert all(u.dtype == dtype for u in got)

    # By hand in float64, from the same draw: randn(times, N, 4) for the N = 3 boxes of the batch.
    noise = torch.randn((times, 3, 4), generator=torch.Generator().manual_seed(0), dtype=dtype).double()
    boxes = [[10, 20, 50, 40], [5, 5, 5.5, 9], [30, 8, 60, 60]]
    expected = []
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        sides = [max(x2 - x1, 1), max(y2 - y1, 1)] * 2
        copies = [[(x1, y1, x2, y2)[k] + float(noise[t, n, k]) * scale * sides[k] for k in range(4)]
                  for t in range(times)]
        mean = [sum(c[k] for c in copies) / times for k in range(4)]
        std = [math.sqrt(sum((c[k] - mean[k]) ** 2 for c in copies) / (times - 1)) for k in range(4)]
        mean_sides = [max(mean[2] - mean[0], 1), max(mean[3] - mean[1], 1)] * 2
        expected.append(sum(std[k] / mean_sides[k] for k in range(4)) / 4)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat(got).double(), torch.tensor(expected, dtype=torch.float64), **tol)
    # A jitter of 6% of the side gives an uncertainty of about 0.06: far above the 0.02 threshold.
    assert 0.02 < expected[0] < 0.15

    # One RoI-head call: image 0 gets its 2 boxes x 10 copies (copy-major), image 1 none, image 2 ten.
    (call,) = head.seen
    assert [len(b) for b in call] == [20, 0, 10]
    jittered_0 = call[0].view(times, 2, 4)  # (T*K_0, 4) -> (T, K_0, 4)
    torch.testing.assert_close(jittered_0.mean(0)[0].double(), torch.tensor(boxes[0], dtype=torch.float64),
                               atol=0.06 * 40, rtol=0)


def test_jitter_uncertainty_matches_the_real_roi_head_image_by_image():
    """The batched call (one jitter draw, one RoI-head call, regrouped copy-major) equals a loop over images
    that decodes the RoI head's deltas for the box's class with the model's own decoder."""
    detector = tiny_detector(seed=3)
    model = detector.model.eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    sizes = torch.tensor([[64, 64]] * 3)
    per_image = [pseudo([[10, 12, 40, 44], [2, 30, 20, 60]], [2, 0], [0.9, 0.9]), pseudo([], [], []),
                 pseudo([[20, 5, 50, 25]], [1], [0.9])]
    with torch.no_grad():
        features = model.features(images)
        got = box_uncertainty(model, features, per_image, sizes, times=6, scale=0.1,
                              generator=torch.Generator().manual_seed(7))
        jittered = (torch.cat([p["boxes"] for p in per_image])
                    + torch.randn((6, 3, 4), generator=torch.Generator().manual_seed(7)) * 0.1
                    * torch.tensor([[30, 32, 30, 32], [18, 30, 18, 30], [30, 20, 30, 20]], dtype=torch.float32))
        index = [(0, 0), (0, 1), (2, 0)]  # (image, row) of each of the 3 boxes
        expected = []
        for n, (image, row) in enumerate(index):
            boxes = [jittered[:, n] if i == image else torch.zeros(0, 4) for i in range(3)]
            roi_out = model.roi_head(features, boxes, sizes)
            label = int(per_image[image]["labels"][row])
            refined = model.decode_roi_boxes(roi_out, boxes)[:, label].double()  # (6, C, 4) -> (6, 4)
            mean = refined.mean(0)
            sides = torch.stack([mean[2] - mean[0], mean[3] - mean[1]]).clamp(min=1).repeat(2)  # (w, h, w, h)
            expected.append((refined.std(0) / sides).mean())
    torch.testing.assert_close(torch.cat(got).double(), torch.stack(expected), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# BG-T (Sec. 3.2, Eq. 4-5)
# --------------------------------------------------------------------------------------------------------


def sampled_rois(boxes, labels) -> SampledRoIs:
    boxes = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    return SampledRoIs(boxes=[boxes], labels=[labels], matched_gt_boxes=[torch.zeros_like(boxes)],
                       regression_targets=[torch.zeros_like(boxes)], weights=[torch.ones(len(labels), dtype=boxes.dtype)])


def test_background_weights_on_a_hand_built_case():
    """One foreground RoI and two background ones in the strong (flipped) view: the teacher sees them flipped
    back into its frame; the negatives weigh its background probability, the positive 1."""
    probs = torch.tensor([[0.1, 0.6, 0.1, 0.2],    # foreground RoI: its weight stays 1 whatever the teacher says
                          [0.1, 0.1, 0.1, 0.7],    # background RoI, teacher: background 0.7
                          [0.3, 0.4, 0.25, 0.05]], dtype=torch.float64)  # background RoI the teacher finds an object
    head = FakeRoIHead(logits=probs.log())
    sampled = sampled_rois([[4, 8, 20, 30], [40, 0, 64, 10], [10, 10, 12, 12]], [1, NUM_CLASSES, NUM_CLASSES])
    strong = view([hflip_matrix(64)], [[64, 64]], seed=0)
    weak = view([torch.eye(3, dtype=torch.float64)], [[64, 64]], seed=0)
    weights = background_weights(head, [], sampled, src=strong, dst=weak)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.7, 0.05], dtype=torch.float64))
    (seen,) = head.seen
    torch.testing.assert_close(seen[0], torch.tensor([[44, 8, 60, 30], [0, 0, 24, 10], [52, 10, 54, 12]],
                                                     dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_classification_loss_normalisation(dtype):
    """loss_cls = sum_k w_k CE_k / max(sum_k w_k, 1) (Eq. 4-5 as the authors normalise), by hand."""
    criterion = FasterRCNNCriterion(num_classes=NUM_CLASSES)
    logits = torch.tensor([[2.0, 0.1, -1.0, 0.3], [0.2, 0.4, -0.3, 1.5], [1.0, 1.0, 0.0, -2.0]], dtype=dtype,
                          requires_grad=True)
    roi_out = RoIOutput(class_logits=logits, box_deltas=torch.zeros(3, NUM_CLASSES, 4, dtype=dtype))
    sampled = sampled_rois([[0, 0, 5, 5]] * 3, [0, NUM_CLASSES, NUM_CLASSES])
    sampled = sampled._replace(regression_targets=[t.to(dtype) for t in sampled.regression_targets])
    ce = [-math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
          for row, label in zip(logits.tolist(), [0, NUM_CLASSES, NUM_CLASSES])]

    weights = torch.tensor([1.0, 0.7, 0.05], dtype=dtype)  # sum 1.75 > 1: a weighted mean
    loss = criterion.roi_losses(roi_out, sampled, cls_weights=weights)["loss_cls"]
    assert loss.item() == pytest.approx((ce[0] + 0.7 * ce[1] + 0.05 * ce[2]) / 1.75, rel=1e-6)

    only_background = sampled._replace(labels=[torch.tensor([NUM_CLASSES] * 3)])
    ce_bg = [-math.log(math.exp(row[NUM_CLASSES]) / sum(math.exp(v) for v in row)) for row in logits.tolist()]
    small = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)  # sum 0.6 < 1: divided by 1, not inflated
    loss = criterion.roi_losses(roi_out, only_background, cls_weights=small)["loss_cls"]
    assert loss.item() == pytest.approx(0.1 * ce_bg[0] + 0.2 * ce_bg[1] + 0.3 * ce_bg[2], rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_unsupervised_loss_feeds_the_teacher_background_probability_to_the_classification_loss(monkeypatch):
    student, teacher = student_and_teacher()
    unlabeled = unlabeled_pair()
    method = SoftTeacher(SoftTeacherConfig())
    fixed = [pseudo([[8, 8, 30, 40]], [1], [0.95], [0.01]), pseudo([[20, 10, 50, 30]], [2], [0.92], [0.05])]
    monkeypatch.setattr(method, "teacher_predict", lambda teacher, weak: TeacherOutput(
        features=teacher.model.features(weak.images), pseudo_boxes=fixed))
    calls = []
    roi_losses = student.criterion.roi_losses
    monkeypatch.setattr(student.criterion, "roi_losses", lambda roi_out, sampled, cls_weights=None: (
        calls.append((sampled, cls_weights)) or roi_losses(roi_out, sampled, cls_weights=cls_weights)))
    out = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled, iteration=0)

    (cls_sampled, cls_weights), (reg_sampled, reg_weights) = calls
    labels = torch.cat(cls_sampled.labels)
    background = labels == NUM_CLASSES
    assert background.any() and (~background).any()
    assert torch.equal(cls_weights[~background], torch.ones(int((~background).sum())))
    with torch.no_grad():
        expected = background_weights(teacher.model, teacher.model.features(unlabeled.weak.images), cls_sampled,
                                      src=unlabeled.strong, dst=unlabeled.weak)
    torch.testing.assert_close(cls_weights, expected)
    assert ((cls_weights[background] > 0) & (cls_weights[background] < 1)).all()
    assert reg_weights is None
    assert out.stats["roi_background_weight_mean"] == pytest.approx(float(cls_weights[background].mean()))

    # Without BG-T (Table 7, "w/o weight") every RoI weighs 1.
    calls.clear()
    method.cfg.soft_background = False
    method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled, iteration=0)
    assert torch.equal(calls[0][1], torch.ones(len(calls[0][1])))


# --------------------------------------------------------------------------------------------------------
# Pseudo-boxes: carried to the strong view, split by score and uncertainty
# --------------------------------------------------------------------------------------------------------


def test_pseudo_boxes_are_carried_weak_to_strong_and_split_by_the_thresholds(monkeypatch):
    student, teacher = student_and_teacher()
    unlabeled = unlabeled_pair()
    method = SoftTeacher(SoftTeacherConfig())
    fixed = [pseudo([[8, 8, 30, 40], [40, 40, 60, 60], [0, 0, 10, 10]], [1, 0, 2], [0.95, 0.6, 0.91],
                    [0.01, 0.015, 0.03]),
             pseudo([[10, 62, 30, 64]], [2], [0.99], [0.001])]  # y -> 0.75 y + 2 >= 48.5: out of the strong view
    monkeypatch.setattr(method, "teacher_predict", lambda teacher, weak: TeacherOutput(
        features=teacher.model.features(weak.images), pseudo_boxes=fixed))
    targets_seen = {}
    rpn_losses, sample_rois = student.criterion.rpn_losses, student.criterion.sample_rois
    monkeypatch.setattr(student.criterion, "rpn_losses", lambda rpn_out, targets: (
        targets_seen.setdefault("rpn", targets) and rpn_losses(rpn_out, targets)))
    monkeypatch.setattr(student.criterion, "sample_rois", lambda proposals, targets: (
        targets_seen.setdefault("cls" if "cls" not in targets_seen else "reg", targets)
        and sample_rois(proposals, targets)))
    out = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled, iteration=0)

    # Image 0 is flipped (x -> 64 - x): A = (34, 8, 56, 40), B = (4, 40, 24, 60), C = (54, 0, 64, 10).
    a, b, c = [34.0, 8, 56, 40], [4.0, 40, 24, 60], [54.0, 0, 64, 10]
    rpn, cls, reg = targets_seen["rpn"], targets_seen["cls"], targets_seen["reg"]
    torch.testing.assert_close(rpn[0]["boxes"], torch.tensor([a, c]))  # scores 0.95 and 0.91 > 0.9
    torch.testing.assert_close(cls[0]["boxes"], torch.tensor([a, c]))
    assert torch.equal(cls[0]["labels"], torch.tensor([1, 2]))
    # Regression takes the candidates of uncertainty < 0.02 whatever their score above 0.5 (Sec. 3.3).
    torch.testing.assert_close(reg[0]["boxes"], torch.tensor([a, b]))
    assert torch.equal(reg[0]["labels"], torch.tensor([1, 0]))
    assert all(len(t[1]["boxes"]) == 0 for t in (rpn, cls, reg))
    # Diagnostics: the classification pseudo-boxes, in the weak view's frame.
    torch.testing.assert_close(out.pseudo_boxes[0]["boxes"], fixed[0]["boxes"][[0, 2]])
    assert out.stats["pseudo_per_image_initial"] == 2.0 and out.stats["pseudo_per_image_cls"] == 1.0

    carried = carry_pseudo_boxes(fixed, src=unlabeled.weak, dst=unlabeled.strong)
    assert len(carried[1]["boxes"]) == 0 and len(carried[0]["boxes"]) == 3
    torch.testing.assert_close(carried[0]["boxes"][1], torch.tensor([4.0, 40, 24, 60]))


# --------------------------------------------------------------------------------------------------------
# No pseudo-boxes: finite zeros, never NaN
# --------------------------------------------------------------------------------------------------------


def check_finite_step(out, student):
    assert set(out.losses) == set(LOSS_KEYS)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values()), out.losses
    sum(out.losses.values()).backward()
    grads = [p.grad for p in student.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_batch_without_pseudo_boxes_gives_finite_terms_and_zero_regression():
    student, teacher = student_and_teacher()
    method = SoftTeacher(SoftTeacherConfig(initial_score_thr=1.0))  # no score exceeds 1: nothing is kept
    out = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_pair(), iteration=0)
    assert out.losses["loss_box"].item() == 0.0 and out.losses["loss_rpn_box"].item() == 0.0
    assert out.losses["loss_cls"].item() > 0 and out.losses["loss_rpn_cls"].item() > 0  # background still teaches
    assert [len(p["boxes"]) for p in out.pseudo_boxes] == [0, 0]
    assert out.stats["pseudo_per_image_initial"] == 0.0 and "pseudo_uncertainty_mean" not in out.stats
    check_finite_step(out, student)


def test_one_image_without_pseudo_boxes_and_no_reliable_box(monkeypatch):
    student, teacher = student_and_teacher()
    method = SoftTeacher(SoftTeacherConfig())
    fixed = [pseudo([[8, 8, 30, 40]], [1], [0.95], [0.5]), pseudo([], [], [])]  # image 1 empty; no box < 0.02
    monkeypatch.setattr(method, "teacher_predict", lambda teacher, weak: TeacherOutput(
        features=teacher.model.features(weak.images), pseudo_boxes=fixed))
    out = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_pair(), iteration=0)
    assert out.losses["loss_box"].item() == 0.0
    assert out.losses["loss_rpn_box"].item() > 0.0
    check_finite_step(out, student)


def test_no_pseudo_box_and_no_proposal_at_all(monkeypatch):
    """The degenerate end: nothing to sample from, so every RoI term is an exact, connected zero."""
    student, teacher = student_and_teacher()
    method = SoftTeacher(SoftTeacherConfig(initial_score_thr=1.0))
    propose = student.model.propose
    monkeypatch.setattr(student.model, "propose", lambda rpn_out, sizes, **kw: [
        p[:0] for p in propose(rpn_out, sizes, **kw)])
    out = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_pair(), iteration=0)
    assert out.losses["loss_cls"].item() == 0.0 and out.losses["loss_box"].item() == 0.0
    check_finite_step(out, student)


def test_teacher_with_jitter_on_real_detections_is_finite():
    """Every teacher detection kept (thresholds 0): jittering runs on hundreds of real boxes."""
    student, teacher = student_and_teacher()
    method = SoftTeacher(SoftTeacherConfig(initial_score_thr=0.0, rpn_score_thr=0.0, cls_score_thr=0.0,
                                           reg_uncertainty_thr=1.0, teacher_detections=20))
    out = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_pair(), iteration=0)
    assert out.stats["pseudo_per_image_initial"] > 0 and out.stats["pseudo_uncertainty_mean"] > 0
    assert out.losses["loss_box"].item() > 0
    check_finite_step(out, student)


# --------------------------------------------------------------------------------------------------------
# Config and interface
# --------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers_coco_settings():
    cfg = SoftTeacherConfig()
    assert (cfg.unsup_weight, cfg.initial_score_thr, cfg.rpn_score_thr, cfg.cls_score_thr) == (4.0, 0.5, 0.9, 0.9)
    assert (cfg.reg_uncertainty_thr, cfg.jitter_times, cfg.jitter_scale) == (0.02, 10, 0.06)
    assert (cfg.teacher_rpn_pre_nms, cfg.teacher_rpn_post_nms, cfg.teacher_score_thr, cfg.teacher_nms_thr,
            cfg.teacher_detections) == (2000, 1000, 0.05, 0.5, 100)
    assert cfg.soft_background and cfg.box_jittering and cfg.burn_in == 0
    for bad in (dict(jitter_times=1), dict(cls_score_thr=1.5), dict(unsup_weight=-1), dict(teacher_detections=0)):
        with pytest.raises(ValueError, match="SoftTeacherConfig"):
            SoftTeacherConfig(**bad)


def test_method_interface():
    method = build_soft_teacher(SoftTeacherConfig(burn_in=10, ramp=10), detector_name="faster_rcnn")
    assert method.labeled_views == ("weak",) and method.unlabeled_aligned is False
    assert method.teacher_init_iteration == 10 and method.ema_include_buffers is False
    assert method.loss_weights(5) == {f"unsup_{k}": 0.0 for k in LOSS_KEYS}
    assert method.loss_weights(15) == {f"unsup_{k}": 2.0 for k in LOSS_KEYS}
    assert method.loss_weights(100) == {f"unsup_{k}": 4.0 for k in LOSS_KEYS}
    assert [method.ema_momentum(t) for t in (0, 10, 11, 2000)] == [0.0, 0.0, 0.5, 0.999]
    default = SoftTeacher()
    assert default.loss_weights(0) == {f"unsup_{k}": 4.0 for k in LOSS_KEYS} and default.ema_momentum(1) == 0.5

    student, teacher = student_and_teacher()
    teacher.model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        default.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_pair(), iteration=0)


def test_teacher_uses_its_own_test_settings(monkeypatch):
    student, teacher = student_and_teacher()
    method = SoftTeacher(SoftTeacherConfig(teacher_rpn_pre_nms=30, teacher_rpn_post_nms=7, teacher_detections=5,
                                           initial_score_thr=0.0))
    seen = {}
    propose = teacher.model.propose
    monkeypatch.setattr(teacher.model, "propose", lambda rpn_out, sizes, **kw: (
        seen.update(kw) or propose(rpn_out, sizes, **kw)))
    out = method.teacher_predict(teacher, unlabeled_pair().weak)
    assert seen == {"pre_nms_top_n": 30, "post_nms_top_n": 7}
    assert all(0 < len(p["boxes"]) <= 5 for p in out.pseudo_boxes)
    assert all(set(p) == {"boxes", "scores", "labels", "uncertainty"} for p in out.pseudo_boxes)
    assert all(not t.requires_grad for p in out.pseudo_boxes for t in p.values())


# --------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------


def test_short_soft_teacher_run_through_train_py(tmp_path):
    import train
    from data.synthetic import BuiltinSpec, ensure_builtin
    from engine.checkpoint import last_checkpoint, load_checkpoint
    from engine.config import resolve_config
    from engine.logger import read_metrics

    spec = dict(num_train=12, num_val=2, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)
    ensure_builtin(tmp_path / "data", spec=BuiltinSpec(**spec), num_workers=0, verbose=False)
    # Thresholds 0 so that the untrained teacher's boxes reach every loss term in 3 iterations.
    cfg = resolve_config(dict(
        method="soft_teacher", builtin_dir=str(tmp_path / "data"), backbone_pretrain="", builtin_spec=spec, output_dir=str(tmp_path / "run"),
        percent=25.0, train_sizes=[64], train_max_size=64, test_size=64, test_max_size=64, fpn_channels=16,
        box_head_dim=32, rpn_pre_nms_train=100, rpn_post_nms_train=50, rpn_pre_nms_test=100, rpn_post_nms_test=50,
        roi_batch_size=32, labeled_batch=1, unlabeled_batch=2, max_iter=3, warmup_iters=1, eval_period=1000,
        checkpoint_period=3, log_period=1, threads=1, seed=0,
        method_args=dict(initial_score_thr=0.0, rpn_score_thr=0.0, cls_score_thr=0.0, teacher_detections=10,
                         burn_in=0, ramp=0, unsup_weight=4.0)))
    results = train.train(cfg)
    torch.set_num_threads(1)

    assert set(results) == {"student", "teacher"}
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        for key in LOSS_KEYS:
            assert math.isfinite(r[f"sup_{key}"]) and math.isfinite(r[f"unsup_{key}"])
            assert r[f"w_unsup_{key}"] == 4.0
        assert 0.0 <= r["pseudo_precision"] <= 1.0 and r["pseudo_per_image_initial"] > 0
    state = load_checkpoint(last_checkpoint(tmp_path / "run"))
    assert state["teacher"] is not None and state["iteration"] == 3
