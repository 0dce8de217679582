"""Tests of semi/dense_teacher.py: rows and padding, the region of Eq. 3-4, QFL (Eq. 2), the box and quality
terms, the ablation regions (Table 1, 5), the schedule, and Dense Teacher end to end on FCOS and RetinaNet."""

import copy
import math

import pytest
import torch

import semi.dense_teacher as dense_teacher_module
from detectors.box_ops import BoxCoder, LinearBoxCoder
from detectors.dense import DenseOutput
from engine.config import dense_teacher_config
from semi.dense_teacher import (
    DenseTeacher,
    DenseTeacherConfig,
    box_consistency,
    build_dense_teacher,
    flatten_rows,
    quality_consistency,
    valid_rows,
)
from semi.dense_teacher_ablations import Region, ablation_region, region_qfl
from semi.ops import frs_qfl, frs_qfl_reference, frs_topk_mask, frs_topk_mask_reference

torch.set_num_threads(1)
DTYPES = [torch.float32, torch.float64]


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def qfl(student_logit: float, target: float) -> float:
    """Eq. 2 for one element by hand: BCE(p_s, y) * |y - p_s|^2."""
    p = sigmoid(student_logit)
    return bce(p, target) * (target - p) ** 2


def square_anchors(centres: list[tuple[float, float]], side: float) -> torch.Tensor:
    return torch.tensor([[x - side / 2, y - side / 2, x + side / 2, y + side / 2] for x, y in centres])


def tiny_output(cls_logits: list[torch.Tensor], *, dtype=torch.float64) -> DenseOutput:
    """A hand-built FCOS-like DenseOutput of two levels: a 2x2 grid of stride 8 and a 1x1 grid of stride 16.

    cls_logits: per level (B, N_l, C) with N_0 = 4, N_1 = 1. Box and quality outputs are filled with the row's
    index, so that flattening can be followed.
    """
    B = cls_logits[0].shape[0]
    anchors = [square_anchors([(0, 0), (8, 0), (0, 8), (8, 8)], 8).to(dtype), square_anchors([(0, 0)], 16).to(dtype)]
    counter = iter(range(1000))
    box_reg = [torch.tensor([[[float(next(counter))] * 4 for _ in range(a.shape[0])] for _ in range(B)], dtype=dtype)
               for a in anchors]  # (B, N_l, 4), rows numbered image-major within each level
    quality = [b[..., :1].clone() for b in box_reg]
    return DenseOutput(cls_logits=[c.to(dtype) for c in cls_logits], box_reg=box_reg, quality=quality,
                       anchors=anchors, strides=[8, 16], shapes=[(2, 2), (1, 1)], num_anchors_per_location=1)


# ----------------------------------------------------------------------------------------------------------
# Rows and padding
# ----------------------------------------------------------------------------------------------------------


def test_valid_rows_drop_locations_in_the_padding():
    out = tiny_output([torch.zeros(2, 4, 3), torch.zeros(2, 1, 3)])
    # Image 0 fills the 16 x 16 canvas; image 1 is 16 high and 8 wide: the locations at x = 8 lie in padding.
    valid = valid_rows(out.anchors, torch.tensor([[16, 16], [16, 8]]))
    assert valid.shape == (2, 5) and valid.dtype == torch.bool
    assert valid.tolist() == [[True, True, True, True, True], [True, False, True, False, True]]


def test_flatten_rows_orders_images_then_levels_and_removes_padding():
    out = tiny_output([torch.zeros(2, 4, 3), torch.zeros(2, 1, 3)])
    valid = valid_rows(out.anchors, torch.tensor([[16, 16], [16, 8]]))
    rows = flatten_rows(out, valid)
    assert rows.logits.shape == (8, 3) and rows.box_reg.shape == (8, 4) and rows.quality.shape == (8,)
    assert rows.anchors.shape == (8, 4)
    # Level 0 numbered 0..3 (image 0), 4..7 (image 1); level 1: 8 (image 0), 9 (image 1).
    assert rows.box_reg[:, 0].tolist() == [0, 1, 2, 3, 8, 4, 6, 9]
    assert rows.quality.tolist() == [0, 1, 2, 3, 8, 4, 6, 9]
    torch.testing.assert_close(rows.anchors[4], torch.tensor([-8.0, -8.0, 8.0, 8.0], dtype=torch.float64))


def test_flatten_rows_rejects_a_mask_of_the_wrong_shape():
    out = tiny_output([torch.zeros(2, 4, 3), torch.zeros(2, 1, 3)])
    with pytest.raises(ValueError, match="validity mask"):
        flatten_rows(out, torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# The learning region (Eq. 3-4)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("select", [frs_topk_mask, frs_topk_mask_reference])
@pytest.mark.parametrize("dtype", DTYPES)
def test_region_is_the_top_k_rows_by_max_score(select, dtype):
    logits = torch.tensor([[-3.0, -1.0],  # S = sigmoid(-1)
                           [2.0, -4.0],  # S = sigmoid(2): first
                           [-2.0, -2.5],  # S = sigmoid(-2)
                           [0.0, 1.5],  # S = sigmoid(1.5): second
                           [-5.0, -6.0]], dtype=dtype)
    region = select(logits, ratio=0.5)  # k = int(5 * 0.5) = 2
    assert region.mask.tolist() == [False, True, False, True, False]
    torch.testing.assert_close(region.fg, torch.tensor(sigmoid(2.0) + sigmoid(1.5), dtype=dtype))


@pytest.mark.parametrize("select", [frs_topk_mask, frs_topk_mask_reference])
def test_region_ties_go_to_the_lower_index(select):
    logits = torch.tensor([[0.0, -1.0], [-1.0, 0.0], [0.0, 0.0], [-2.0, -2.0], [0.0, -3.0]])
    assert select(logits, ratio=0.4).mask.tolist() == [True, True, False, False, False]  # k = 2 of 4 tied
    assert select(logits, ratio=0.6).mask.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("select", [frs_topk_mask, frs_topk_mask_reference])
def test_region_k_rounding_to_zero_is_empty(select):
    region = select(torch.randn(99, 4), ratio=0.01)  # int(0.99) = 0
    assert not region.mask.any() and region.fg.item() == 0.0


def test_fused_region_matches_the_reference_with_many_ties():
    torch.manual_seed(0)
    logits = torch.randint(-4, 3, (5000, 7)).float() * 0.5  # few distinct values: ties everywhere
    for ratio in (0.0, 0.001, 0.01, 0.3, 1.0):
        fused, reference = frs_topk_mask(logits, ratio=ratio), frs_topk_mask_reference(logits, ratio=ratio)
        assert torch.equal(fused.mask, reference.mask)
        assert int(fused.mask.sum()) == int(5000 * ratio)
        torch.testing.assert_close(fused.fg, reference.fg)


def test_region_is_taken_over_the_whole_batch_not_per_image():
    """Eq. 3-4 rank all rows of all images together: the image with the confident teacher takes the whole region,
    and a very high score in the padding of the other image is never selected."""
    level0 = torch.full((2, 4, 2), -6.0)
    level0[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 0.5])  # image 0: four confident locations
    level0[1, 1, 1] = 9.0  # image 1, x = 8: padding
    out = tiny_output([level0, torch.full((2, 1, 2), -6.0)], dtype=torch.float32)
    valid = valid_rows(out.anchors, torch.tensor([[16, 16], [16, 8]]))
    rows = flatten_rows(out, valid)  # R = 8
    region = frs_topk_mask(rows.logits, ratio=0.5)  # k = 4
    assert region.mask.tolist() == [True, True, True, True, False, False, False, False]
    torch.testing.assert_close(region.fg, torch.tensor(sum(sigmoid(v) for v in (1.0, 2.0, 3.0, 0.5))))


# ----------------------------------------------------------------------------------------------------------
# Classification: QFL (Eq. 2)
# ----------------------------------------------------------------------------------------------------------

TEACHER = [[2.0, -1.0], [0.0, 0.5], [-3.0, -2.0]]
STUDENT = [[1.0, 0.0], [-1.0, 2.0], [0.5, -0.5]]


def qfl_by_hand(selected_rows: set[int], ignored_rows: set[int] = frozenset()) -> float:
    total = 0.0
    for i, (t_row, s_row) in enumerate(zip(TEACHER, STUDENT)):
        if i in ignored_rows:
            continue
        for t, s in zip(t_row, s_row):
            total += qfl(s, sigmoid(t) if i in selected_rows else 0.0)
    fg = sum(sigmoid(max(TEACHER[i])) for i in selected_rows)
    return total / fg


@pytest.mark.parametrize("dtype", DTYPES)
def test_qfl_by_hand(dtype):
    teacher, student = torch.tensor(TEACHER, dtype=dtype), torch.tensor(STUDENT, dtype=dtype)
    expected = qfl_by_hand({0})  # k = int(3 * 0.34) = 1: row 0 (S = sigmoid(2))
    for op in (frs_qfl, frs_qfl_reference):
        out = op(student, teacher, ratio=0.34)
        assert out.mask.tolist() == [True, False, False]
        assert out.loss.dtype == dtype
        torch.testing.assert_close(out.loss.item(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    region = Region(selected=torch.tensor([True, False, False]), ignored=torch.zeros(3, dtype=torch.bool),
                    fg=torch.tensor(sigmoid(2.0), dtype=dtype))
    torch.testing.assert_close(region_qfl(student, teacher, region=region).item(), expected,
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_qfl_ignored_rows_leave_the_sum_and_outside_rows_are_pushed_to_zero():
    teacher, student = torch.tensor(TEACHER, dtype=torch.float64), torch.tensor(STUDENT, dtype=torch.float64)
    selected = torch.tensor([True, True, False])
    fg = torch.sigmoid(teacher.amax(dim=1))[selected].sum()
    ignored = torch.tensor([False, False, True])
    loss = region_qfl(student, teacher, region=Region(selected, ignored, fg))
    torch.testing.assert_close(loss.item(), qfl_by_hand({0, 1}, {2}), rtol=1e-12, atol=0)
    # Row 2 outside the region and not ignored: its elements are pushed to 0 and add BCE(p, 0) * p^2.
    loss = region_qfl(student, teacher, region=Region(selected, torch.zeros(3, dtype=torch.bool), fg))
    torch.testing.assert_close(loss.item(), qfl_by_hand({0, 1}), rtol=1e-12, atol=0)


def test_region_qfl_matches_frs_qfl_on_the_plain_region():
    """The ablation path (region_qfl on frs_topk_mask) and the method's path (frs_qfl) agree."""
    torch.manual_seed(0)
    teacher, student = torch.randn(3000, 8) * 3 - 4, torch.randn(3000, 8) * 3 - 4
    fused = frs_qfl(student, teacher, ratio=0.01)
    region = frs_topk_mask(teacher, ratio=0.01)
    loss = region_qfl(student, teacher, region=Region(region.mask, torch.zeros_like(region.mask), region.fg))
    torch.testing.assert_close(loss, fused.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.loss, frs_qfl_reference(student, teacher, ratio=0.01).loss, rtol=1e-5, atol=0)


def test_qfl_gradient_reaches_only_the_student():
    teacher = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=True)
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    region = frs_topk_mask(teacher, ratio=0.34)
    region = Region(region.mask, torch.zeros(3, dtype=torch.bool), region.fg)
    torch.autograd.gradcheck(lambda s: region_qfl(s, teacher, region=region), (student,))
    region_qfl(student, teacher, region=region).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_qfl_with_an_empty_region_is_zero_and_finite(dtype):
    student = torch.randn(50, 3, dtype=dtype, requires_grad=True)
    teacher = torch.randn(50, 3, dtype=dtype)
    for loss in (frs_qfl(student, teacher, ratio=0.01).loss,  # k = int(0.5) = 0
                 region_qfl(student, teacher, region=Region(torch.zeros(50, dtype=torch.bool),
                                                     torch.zeros(50, dtype=torch.bool), torch.zeros((), dtype=dtype)))):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------------
# Regression and quality on the region
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_fcos_box_term_is_giou_of_the_decoded_distances(dtype):
    # One location at (16, 16) of stride 8. Student: 8 px to each side -> [8, 8, 24, 24]; teacher reaches 24 px
    # to the right -> [8, 8, 40, 24]. IoU = 256 / 512, the hull is the teacher's box: GIoU = 0.5, loss 0.5.
    # Second row: identical boxes, loss 0. Mean over the two rows: 0.25.
    anchors = square_anchors([(16, 16), (16, 16)], 8).to(dtype)
    student = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 1.5]], dtype=dtype, requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0, 3.0, 1.0], [0.5, 2.0, 1.0, 1.5]], dtype=dtype)
    coder = LinearBoxCoder(normalize_by_size=True)
    loss = box_consistency(student, teacher, anchors=anchors, coder=coder, loss="giou")
    torch.testing.assert_close(loss.item(), 0.25, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert student.grad[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_retinanet_box_term_compares_deltas(dtype):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2, dtype=dtype)
    student = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]], dtype=dtype)
    teacher = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.5]], dtype=dtype)
    loss = box_consistency(student, teacher, anchors=anchors, coder=BoxCoder((1, 1, 1, 1)), loss="l1")
    torch.testing.assert_close(loss.item(), (1.0 + 0.5) / 2, rtol=1e-6, atol=1e-6)
    # "giou": the student doubles the width around the same centre, [-5, 0, 15, 10] vs [0, 0, 10, 10]: loss 0.5.
    student = torch.tensor([[0.0, 0.0, math.log(2.0), 0.0]], dtype=dtype)
    loss = box_consistency(student, torch.zeros(1, 4, dtype=dtype), anchors=anchors[:1],
                           coder=BoxCoder((1, 1, 1, 1)), loss="giou")
    torch.testing.assert_close(loss.item(), 0.5, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quality_term_by_hand(dtype):
    student = torch.tensor([0.0, 1.0], dtype=dtype)
    teacher = torch.tensor([2.0, -1.0], dtype=dtype)
    expected = (bce(sigmoid(0.0), sigmoid(2.0)) + bce(sigmoid(1.0), sigmoid(-1.0))) / 2
    torch.testing.assert_close(quality_consistency(student, teacher).item(), expected, rtol=1e-6, atol=0)


def test_box_and_quality_terms_of_an_empty_region_are_zero():
    empty = torch.zeros(0, 4, requires_grad=True)
    for loss in ("giou", "l1"):
        value = box_consistency(empty, empty.detach(), anchors=empty.detach(), coder=LinearBoxCoder(), loss=loss)
        assert value.item() == 0.0 and value.requires_grad
    assert quality_consistency(torch.zeros(0, requires_grad=True), torch.zeros(0)).item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# Ablation regions (Table 1, Table 5)
# ----------------------------------------------------------------------------------------------------------


def ablation_case():
    teacher = torch.tensor([[3.0, 0.0], [2.0, 1.0], [1.0, -1.0], [-1.0, 0.0], [-2.0, -3.0], [-4.0, -4.0]])
    gt_foreground = torch.tensor([True, False, True, False, False, True])  # row 5: a positive the teacher misses
    predicted = torch.tensor([True, False, False, False, True, False])
    return teacher, gt_foreground, predicted


@pytest.mark.parametrize("region, hard, selected, ignored", [
    ("topk", "select", [1, 1, 1, 0, 0, 0], [0] * 6),  # k = int(6 * 0.5) = 3: rows 0, 1, 2
    ("topk", "suppress", [1, 0, 1, 0, 0, 0], [0] * 6),  # row 1 is a hard negative: target 0
    ("topk", "ignore", [1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]),  # row 1 leaves every term
    ("all", "select", [1] * 6, [0] * 6),
    ("positive", "select", [1, 0, 0, 0, 1, 0], [0] * 6),
    ("positive", "ignore", [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]),
])
def test_ablation_regions(region, hard, selected, ignored):
    teacher, gt_foreground, predicted = ablation_case()
    cfg = DenseTeacherConfig(ratio=0.5, region=region, hard_negatives=hard)
    out = ablation_region(teacher, cfg=cfg, predicted_positive=predicted, gt_foreground=gt_foreground)
    assert out.selected.tolist() == [bool(v) for v in selected]
    assert out.ignored.tolist() == [bool(v) for v in ignored]
    scores = torch.sigmoid(teacher.amax(dim=1))
    torch.testing.assert_close(out.fg, scores[out.selected].sum())


# ----------------------------------------------------------------------------------------------------------
# Configuration and schedule
# ----------------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    cfg = DenseTeacherConfig()
    assert (cfg.ratio, cfg.region, cfg.hard_negatives) == (0.01, "topk", "select")
    assert (cfg.weight_cls, cfg.weight_box, cfg.weight_quality) == (4.0, 1.0, 1.0)
    assert (cfg.burn_in, cfg.ramp, cfg.teacher_init, cfg.ema_momentum) == (5000, 5000, 3000, 0.9996)
    short = cfg.scaled(0.1)
    assert (short.burn_in, short.ramp, short.teacher_init) == (500, 500, 300) and short.ratio == cfg.ratio


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.5), "ratio"), (dict(region="box"), "region"), (dict(hard_negatives="drop"), "hard_negatives"),
    (dict(anchor_box_loss="l2"), "anchor_box_loss"), (dict(burn_in=-1), "burn_in"), (dict(ema_momentum=2.0), "ema"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseTeacherConfig(**kwargs)


def test_method_rejects_faster_rcnn():
    with pytest.raises(ValueError, match="dense detectors"):
        DenseTeacher(DenseTeacherConfig(), detector_name="faster_rcnn")


def test_burn_in_ramp_and_ema_schedule():
    method = DenseTeacher(DenseTeacherConfig(burn_in=10, ramp=4, teacher_init=6), detector_name="fcos")
    assert method.labeled_views == ("weak", "strong") and method.unlabeled_aligned
    assert method.teacher_init_iteration == 6
    assert method.loss_weights(9) == {"unsup_loss_cls": 0.0, "unsup_loss_box": 0.0, "unsup_loss_quality": 0.0}
    assert method.loss_weights(10)["unsup_loss_cls"] == 0.0
    assert method.loss_weights(12) == {"unsup_loss_cls": 2.0, "unsup_loss_box": 0.5, "unsup_loss_quality": 0.5}
    assert method.loss_weights(14) == method.loss_weights(10_000) == {
        "unsup_loss_cls": 4.0, "unsup_loss_box": 1.0, "unsup_loss_quality": 1.0}
    assert method.ema_momentum(5) is None and method.ema_momentum(6) == 0.9996
    retina = DenseTeacher(DenseTeacherConfig(burn_in=0, ramp=0), detector_name="retinanet")
    assert retina.loss_weights(0) == {"unsup_loss_cls": 4.0, "unsup_loss_box": 1.0}


def test_build_from_run_config():
    class RunConfig:
        method_args = {"ratio": 0.05, "burn_in": 300}

    method = build_dense_teacher(dense_teacher_config(RunConfig()), detector_name="retinanet")
    assert method.cfg.ratio == 0.05 and method.cfg.burn_in == 300 and method.cfg.ramp == 5000
    RunConfig.method_args = {"ratios": 0.05}
    with pytest.raises(ValueError, match="unknown Dense Teacher settings"):
        build_dense_teacher(dense_teacher_config(RunConfig()), detector_name="fcos")


# ----------------------------------------------------------------------------------------------------------
# End to end on the two dense detectors
# ----------------------------------------------------------------------------------------------------------

NUM_CLASSES = 3


def cpu_detector(name: str):
    """The CPU preset's detector: ResNet-18, 64-channel FPN, anchors and FCOS ranges COCO's / 4."""
    import detectors

    kwargs = dict(range_multiplier=0.25) if name == "fcos" else dict(anchor_sizes=[8, 16, 32, 64, 128])
    return detectors.build_detector(name, num_classes=NUM_CLASSES, backbone="resnet18", fpn_channels=64, **kwargs)


def student_and_teacher(name: str):
    import detectors

    student = cpu_detector(name)
    student.model.train()
    teacher = detectors.Detector(copy.deepcopy(student.model).eval().requires_grad_(False), student.criterion,
                                 student.postprocessor)
    return student, teacher


def unlabeled_batch(*, blank: bool = False):
    """Two pixel-aligned 64 x 96 views of 2 images; the second image is 44 x 60 inside the padded canvas.
    The hidden ground truth (one bright box per image) is only read by diagnostics and Table 5's ablation."""
    from structures import Batch, UnlabeledBatch

    B, H, W = 2, 64, 96
    images = torch.zeros(B, 3, H, W) if blank else torch.rand(B, 3, H, W) * 0.3
    if not blank:
        images[:, :, 8:40, 10:30] = 0.9
    images[1, :, 44:, :] = 0.0
    images[1, :, :, 60:] = 0.0
    sizes = torch.tensor([[H, W], [44, 60]])
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0]]) if not blank else torch.zeros(0, 4),
                "labels": torch.tensor([1]) if not blank else torch.zeros(0, dtype=torch.int64),
                "crowd": torch.zeros(0, 4)} for _ in range(B)]

    def view(pixels):
        return Batch(images=pixels, image_sizes=sizes, targets=targets,
                     matrices=torch.eye(3, dtype=torch.float64).expand(B, 3, 3).clone(), image_ids=list(range(B)),
                     orig_sizes=[(H, W)] * B)

    strong = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)  # colour noise only: still aligned
    return UnlabeledBatch(weak=view(images), strong=view(strong))


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_dense_teacher_end_to_end(name):
    """A few SGD steps: supervised loss on both views, Dense Teacher's terms, EMA update of the teacher."""
    import detectors
    from semi.core import prefix, weighted_total
    from semi.ema import EMATeacher

    torch.manual_seed(0)
    student = cpu_detector(name)
    student.model.train()
    ema = EMATeacher(student.model)
    teacher = student._replace(model=ema.model)
    method = DenseTeacher(DenseTeacherConfig(ratio=0.05, burn_in=1, ramp=2, teacher_init=0, report_pseudo_boxes=True),
                          detector_name=name)
    optimizer = torch.optim.SGD(student.model.parameters(), lr=1e-3)
    labeled = unlabeled_batch()
    both_views = torch.cat([labeled.weak.images, labeled.strong.images])
    for iteration in range(3):
        if iteration == method.teacher_init_iteration:
            ema.copy_from(student.model)
        sup = detectors.supervised_losses(student, both_views, torch.cat([labeled.weak.image_sizes] * 2),
                                          labeled.weak.targets * 2)
        losses, weights = prefix(sup, "sup_"), {}
        unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch(),
                                         iteration=iteration)
        assert sorted(unsup.losses) == sorted(method.loss_keys())
        assert all(v.dim() == 0 and torch.isfinite(v) for v in unsup.losses.values()), unsup.losses
        assert len(unsup.pseudo_boxes) == 2
        assert all((d["scores"] > 0.5).all() and d["boxes"].shape[1:] == (4,) for d in unsup.pseudo_boxes)
        rows = 2 * sum(a.shape[0] for a in student.model(labeled.weak.images[:1]).anchors)  # an upper bound on R
        assert 0 < unsup.stats["region_rows_per_image"] * 2 <= 0.05 * rows
        losses |= prefix(unsup.losses, "unsup_")
        total = weighted_total(losses, method.loss_weights(iteration))
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.model.parameters())
        optimizer.step()
        momentum = method.ema_momentum(iteration)
        if momentum is not None:
            ema.update(student.model, momentum=momentum)
    assert all(p.grad is None for p in teacher.model.parameters())


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_every_term_reaches_the_student_head(name):
    torch.manual_seed(0)
    student, teacher = student_and_teacher(name)
    with torch.no_grad():  # a teacher that disagrees with the student, so that every term has a gradient
        for p in teacher.model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method = DenseTeacher(DenseTeacherConfig(ratio=0.05), detector_name=name)
    unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch(), iteration=0)
    head = [p for p in student.model.head.parameters()]
    for key, value in unsup.losses.items():
        grads = torch.autograd.grad(value, head, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), key


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_fused_and_reference_paths_give_the_same_losses(name, monkeypatch):
    torch.manual_seed(0)
    student, teacher = student_and_teacher(name)
    method = DenseTeacher(DenseTeacherConfig(ratio=0.05), detector_name=name)
    batch = unlabeled_batch()
    regions = []

    def recording(op):
        def run(student_logits, teacher_logits, *, ratio):
            out = op(student_logits, teacher_logits, ratio=ratio)
            regions.append(out)
            return out
        return run

    monkeypatch.setattr(dense_teacher_module, "frs_qfl", recording(frs_qfl))
    fused = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=batch, iteration=0)
    monkeypatch.setattr(dense_teacher_module, "frs_qfl", recording(frs_qfl_reference))
    reference = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=batch, iteration=0)
    assert torch.equal(regions[0].mask, regions[1].mask)  # the same region, row for row
    torch.testing.assert_close(regions[0].fg, regions[1].fg, rtol=1e-5, atol=0)
    for key in fused.losses:
        torch.testing.assert_close(fused.losses[key], reference.losses[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_region_never_selects_padding(name, monkeypatch):
    """A teacher that is most confident in the padding: the region stays inside the images."""
    torch.manual_seed(0)
    student, teacher = student_and_teacher(name)
    batch = unlabeled_batch()
    seen = {}

    def spy(student_logits, teacher_logits, *, ratio):
        seen["rows"] = teacher_logits.shape[0]
        return frs_qfl(student_logits, teacher_logits, ratio=ratio)

    monkeypatch.setattr(dense_teacher_module, "frs_qfl", spy)
    method = DenseTeacher(DenseTeacherConfig(ratio=0.05), detector_name=name)
    method.unsupervised_loss(student=student, teacher=teacher, unlabeled=batch, iteration=0)
    with torch.no_grad():
        out = student.model(batch.weak.images)
    assert seen["rows"] == int(valid_rows(out.anchors, batch.weak.image_sizes).sum())
    assert seen["rows"] < 2 * sum(a.shape[0] for a in out.anchors)


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_all_background_batch_is_finite(name):
    """Blank images and a teacher whose scores are all ~0 (fg tiny), and a region that rounds to 0 rows."""
    torch.manual_seed(0)
    student, teacher = student_and_teacher(name)
    with torch.no_grad():
        teacher.model.head.cls_logits.bias.fill_(-20.0)  # every teacher score ~2e-9
    for cfg in (DenseTeacherConfig(report_pseudo_boxes=True), DenseTeacherConfig(ratio=1e-5, report_pseudo_boxes=True),
                DenseTeacherConfig(hard_negatives="suppress", report_pseudo_boxes=True),
                DenseTeacherConfig(hard_negatives="ignore", report_pseudo_boxes=True),
                DenseTeacherConfig(region="positive", report_pseudo_boxes=True),
                DenseTeacherConfig(region="all", report_pseudo_boxes=True)):
        method = DenseTeacher(cfg, detector_name=name)
        unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch(blank=True),
                                         iteration=0)
        total = sum(unsup.losses.values())
        assert torch.isfinite(total), (cfg, unsup.losses)
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.model.parameters())
        assert all(len(d["boxes"]) == 0 for d in unsup.pseudo_boxes)
        if cfg.ratio == 1e-5 or cfg.hard_negatives != "select" or cfg.region == "positive":  # empty region
            assert all(v.item() == 0.0 for v in unsup.losses.values()), unsup.losses
        student.model.zero_grad()


def test_misaligned_views_are_rejected():
    from structures import UnlabeledBatch

    student, teacher = student_and_teacher("fcos")
    batch = unlabeled_batch()
    strong = copy.copy(batch.strong)
    strong.image_sizes = torch.tensor([[64, 96], [40, 60]])
    with pytest.raises(ValueError, match="pixel-aligned"):
        DenseTeacher(DenseTeacherConfig(), detector_name="fcos").unsupervised_loss(
            student=student, teacher=teacher, unlabeled=UnlabeledBatch(weak=batch.weak, strong=strong), iteration=0)


def test_pseudo_boxes_can_be_turned_off():
    torch.manual_seed(0)
    student, teacher = student_and_teacher("fcos")
    method = DenseTeacher(DenseTeacherConfig(report_pseudo_boxes=False, region_diagnostics=False),
                          detector_name="fcos")
    unsup = method.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch(), iteration=0)
    assert unsup.pseudo_boxes is None and "region_gt_recall" not in unsup.stats
