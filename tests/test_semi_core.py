"""semi/ema.py, semi/core.py, structures.py and engine/pseudo_labels.py: the pieces every method shares.

Covered: EMA arithmetic over parameters and buffers in float64, the teacher's frozen state, copy and state
dict; the three momentum schedules; loss prefixing and the one weighted sum (missing weights, zero weights,
gradients); the burn-in ramp; a zero loss that stays finite next to NaN; boxes carried between views through a
known flip, scale and rotation and back, and against the data pipeline's own views; pseudo-label precision and
recall on hand-built cases (duplicates, wrong class, greedy order, empty sides); the diagnostic drawing;
build_method.
"""

import copy
import math

import pytest
import torch
from PIL import Image
from torch import nn

from data.transforms import TwoViewTransform, hflip_matrix, rotation_matrix, scale_matrix, translation_matrix
from engine.config import build_method, resolve_config
from engine.pseudo_labels import draw_pseudo_labels, match_pseudo_labels, pseudo_label_quality
from semi.core import UnsupOutput, frozen_norm_statistics, linear_ramp, prefix, weighted_total, zero_loss
from semi.dense_teacher import DenseTeacherEMA
from semi.ema import EMATeacher
from semi.sed import sed_momentum
from semi.soft_teacher import soft_teacher_momentum
from structures import Batch, UnlabeledBatch, carry_boxes, view_transform


# --------------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------------


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


def perturb(model: nn.Module, seed: int) -> None:
    """Give every parameter and floating buffer new random values, and num_batches_tracked a new count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in list(model.parameters()) + list(model.buffers()):
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator, dtype=value.dtype) + 0.5)
            else:
                value.fill_(seed)


def test_teacher_is_a_frozen_copy_in_eval_mode():
    student = small_net().train()
    ema = EMATeacher(student)
    assert not ema.model.training and all(not m.training for m in ema.model.modules())
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in student.parameters()) and student.training
    for (name, t), s in zip(ema.model.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr(), f"{name} is shared, not copied"


@pytest.mark.parametrize("include_buffers", [True, False])
def test_ema_update_arithmetic(include_buffers):
    student = small_net()
    ema = EMATeacher(student)
    perturb(ema.model, seed=1)
    perturb(student, seed=7)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    m = 0.9
    ema.update(student, momentum=m, include_buffers=include_buffers)

    for name, s in student.named_parameters():
        expected = m * before[name] + (1 - m) * s.detach()
        torch.testing.assert_close(dict(ema.model.named_parameters())[name], expected, rtol=0, atol=1e-15)
    for name, s in student.named_buffers():
        t = dict(ema.model.named_buffers())[name]
        if not s.is_floating_point():  # num_batches_tracked: always the student's
            assert torch.equal(t, s), name
        elif include_buffers:  # Dense Teacher: the whole state is averaged
            torch.testing.assert_close(t, m * before[name] + (1 - m) * s, rtol=0, atol=1e-15)
        else:  # Soft Teacher: parameters only, BatchNorm statistics follow the student
            assert torch.equal(t, s), name
    assert not ema.model.training and all(not p.requires_grad for p in ema.model.parameters())


def test_ema_extreme_momenta_copy_from_and_state_dict():
    student = small_net()
    ema = EMATeacher(student)
    perturb(student, seed=3)
    frozen = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.update(student, momentum=1.0)
    assert all(torch.equal(v, frozen[k]) or not v.is_floating_point() for k, v in ema.model.state_dict().items())
    ema.update(student, momentum=0.0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in ema.model.state_dict().items())

    perturb(student, seed=5)
    ema.copy_from(student)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in ema.model.state_dict().items())
    assert not ema.model.training

    other = EMATeacher(small_net())
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in other.state_dict().items())


def test_ema_update_leaves_the_student_and_its_gradients_alone():
    student = small_net()
    ema = EMATeacher(student)
    student(torch.rand(5, 3, dtype=torch.float64)).sum().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    values = {k: v.clone() for k, v in student.state_dict().items()}
    perturb(ema.model, seed=2)
    ema.update(student, momentum=0.5)
    assert all(torch.equal(v, values[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in student.named_parameters())
    assert all(p.grad is None for p in ema.model.parameters())


def test_ema_rejects_bad_momentum_and_other_architectures():
    ema = EMATeacher(small_net())
    with pytest.raises(ValueError, match="momentum"):
        ema.update(small_net(), momentum=1.5)
    with pytest.raises(ValueError, match="differ"):
        ema.update(nn.Sequential(nn.Linear(3, 4)).double(), momentum=0.5)


def test_soft_teacher_momentum():
    assert soft_teacher_momentum(0) == 0.0  # the first update makes the teacher the student
    assert soft_teacher_momentum(1) == 0.5
    assert soft_teacher_momentum(9) == pytest.approx(0.9)
    assert soft_teacher_momentum(998) == pytest.approx(1 - 1 / 999)
    assert soft_teacher_momentum(999) == 0.999 and soft_teacher_momentum(10**6) == 0.999
    assert soft_teacher_momentum(10**6, 0.99) == 0.99
    values = [soft_teacher_momentum(t) for t in range(2000)]
    assert values == sorted(values)


def test_dense_teacher_ema():
    schedule = DenseTeacherEMA(start_iter=3000)
    assert schedule(0) is None and schedule(2999) is None
    assert schedule(3000) == 0.9996 and schedule(179_999) == 0.9996
    assert DenseTeacherEMA(start_iter=0, momentum=0.99)(0) == 0.99


def test_sed_momentum_step_and_cosine():
    assert sed_momentum(0, policy="step", milestone=100) == 0.99
    assert sed_momentum(99, policy="step", milestone=100) == 0.99
    assert sed_momentum(100, policy="step", milestone=100) == 0.9
    assert sed_momentum(10**6, policy="step", milestone=None) == 0.99
    assert sed_momentum(5, policy="step", milestone=3, start=0.999, end=0.5) == 0.5

    assert sed_momentum(0, policy="cosine", max_iter=1000) == pytest.approx(0.996)
    assert sed_momentum(500, policy="cosine", max_iter=1000) == pytest.approx((0.996 + 0.9) / 2)
    assert sed_momentum(1000, policy="cosine", max_iter=1000) == pytest.approx(0.9)
    assert sed_momentum(250, policy="cosine", max_iter=1000) == pytest.approx(
        0.9 + 0.096 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert sed_momentum(2000, policy="cosine", max_iter=1000) == pytest.approx(0.9)  # clamped past the end
    with pytest.raises(ValueError, match="max_iter"):
        sed_momentum(0, policy="cosine")
    with pytest.raises(ValueError, match="policy"):
        sed_momentum(0, policy="linear")


# --------------------------------------------------------------------------------------------------------
# Loss bookkeeping
# --------------------------------------------------------------------------------------------------------


def test_prefix_and_weighted_total():
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    losses = prefix({"loss_cls": a, "loss_box": b}, "sup_") | prefix({"loss_cls": c}, "unsup_")
    assert list(losses) == ["sup_loss_cls", "sup_loss_box", "unsup_loss_cls"]

    total = weighted_total(losses, {"sup_loss_box": 0.5, "unsup_loss_cls": 4.0})  # sup_loss_cls: default 1
    assert total.item() == 2.0 + 0.5 * 3.0 + 4.0 * 5.0
    total.backward()
    assert (a.grad.item(), b.grad.item(), c.grad.item()) == (1.0, 0.5, 4.0)

    with pytest.raises(KeyError, match="unsup_loss_cls"):
        weighted_total(losses, {})


def test_weighted_total_leaves_out_zero_weights_even_when_not_finite():
    losses = {"sup_loss_cls": torch.tensor(1.5, requires_grad=True),
              "unsup_loss_cls": torch.tensor(float("nan"), requires_grad=True)}
    total = weighted_total(losses, {"unsup_loss_cls": 0.0})
    assert total.item() == 1.5
    only_zero = weighted_total({"unsup_loss_box": torch.tensor(7.0, requires_grad=True)}, {"unsup_loss_box": 0.0})
    assert only_zero.item() == 0.0 and only_zero.requires_grad


def test_linear_ramp():
    ramp = [linear_ramp(t, start=5, length=10) for t in (0, 4, 5, 10, 14, 15, 100)]
    assert ramp == [0.0, 0.0, 0.0, 0.5, 0.9, 1.0, 1.0]
    assert [linear_ramp(t, start=0, length=0) for t in (0, 1)] == [1.0, 1.0]
    assert [linear_ramp(t, start=3, length=0) for t in (2, 3)] == [0.0, 1.0]


def test_zero_loss_is_finite_and_connected():
    like = torch.tensor([1.0, float("nan"), float("inf")], requires_grad=True)
    zero = zero_loss(like * 2)
    assert zero.item() == 0.0 and zero.dim() == 0
    zero.backward()
    assert torch.equal(like.grad, torch.zeros(3))
    assert zero_loss(torch.zeros(0, 4)).item() == 0.0


def test_unsup_output_defaults():
    out = UnsupOutput(losses={"loss_cls": torch.tensor(1.0)})
    assert out.pseudo_boxes is None and out.stats == {}


# --------------------------------------------------------------------------------------------------------
# Boxes between views
# --------------------------------------------------------------------------------------------------------


def test_carry_through_flip_scale_and_rotation_and_back():
    """Weak view: original scaled by 0.5 and flipped in a 50 px wide image; strong view: original scaled by 2
    and turned by 90 degrees about (100, 100). Every step maps boxes to boxes, so the trip is exact."""
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]], dtype=torch.float64)  # original image, 100 x 100
    t_weak = hflip_matrix(50) @ scale_matrix(0.5, 0.5)
    t_strong = rotation_matrix(90, (100, 100)) @ scale_matrix(2, 2)

    weak_box = carry_boxes(box, torch.eye(3, dtype=torch.float64), t_weak)
    # x: 10..30 -> 5..15 -> flipped in 50 px: 35..45; y: 20..60 -> 10..30.
    torch.testing.assert_close(weak_box, torch.tensor([[35.0, 10.0, 45.0, 30.0]], dtype=torch.float64))

    strong_box = carry_boxes(weak_box, t_weak, t_strong)
    # Scaled: (20, 40, 60, 120); a quarter turn about (100, 100) sends (x, y) to (200 - y, x).
    torch.testing.assert_close(strong_box, torch.tensor([[80.0, 20.0, 160.0, 60.0]], dtype=torch.float64))

    back = carry_boxes(strong_box, t_strong, t_weak)
    torch.testing.assert_close(back, weak_box)
    torch.testing.assert_close(view_transform(t_weak, t_strong) @ view_transform(t_strong, t_weak),
                               torch.eye(3, dtype=torch.float64))


def test_carry_under_a_general_rotation_encloses_the_corners_and_clips():
    box = torch.tensor([[40.0, 40.0, 80.0, 60.0]])
    t_src = translation_matrix(5, -3)
    t_dst = rotation_matrix(30, (64, 64))
    carried = carry_boxes(box, t_src, t_dst)
    # By hand: undo the translation, then rotate the four corners and take their extent.
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    xs, ys = [], []
    for x, y in [(40, 40), (80, 40), (80, 60), (40, 60)]:
        x, y = x - 5 - 64, y + 3 - 64
        xs.append(c * x - s * y + 64)
        ys.append(s * x + c * y + 64)
    expected = torch.tensor([[min(xs), min(ys), max(xs), max(ys)]])
    torch.testing.assert_close(carried, expected)
    assert carried.dtype == torch.float32

    clipped = carry_boxes(box, t_src, t_dst, dst_size=(70, 60))  # (h, w)
    torch.testing.assert_close(clipped, torch.stack([expected[:, 0].clamp(0, 60), expected[:, 1].clamp(0, 70),
                                                     expected[:, 2].clamp(0, 60), expected[:, 3].clamp(0, 70)], -1))
    assert carry_boxes(torch.zeros(0, 4), t_src, t_dst).shape == (0, 4)


def test_carry_agrees_with_the_data_pipelines_views():
    """The strong view's own (hidden) boxes equal the weak view's boxes carried by the matrices."""
    transform = TwoViewTransform(short_sides=[48, 64, 80], max_size=120, aligned=False)
    sample = {"image": torch.rand(3, 64, 96), "boxes": torch.tensor([[40.0, 24.0, 56.0, 40.0], [30.0, 20.0, 66.0, 44.0]]),
              "labels": torch.tensor([0, 1]), "crowd": torch.zeros(0, 4), "matrix": torch.eye(3, dtype=torch.float64),
              "image_id": 1, "orig_size": (64, 96)}
    checked = 0
    for seed in range(12):
        views = transform(sample, torch.Generator().manual_seed(seed))
        weak, strong = views["weak"], views["strong"]
        if len(strong["boxes"]) != 2:
            continue
        carried = carry_boxes(weak["boxes"], weak["matrix"], strong["matrix"], dst_size=strong["image"].shape[-2:])
        torch.testing.assert_close(carried, strong["boxes"], rtol=0, atol=1e-4)
        checked += 1
    assert checked >= 8


# --------------------------------------------------------------------------------------------------------
# Pseudo-label diagnostics
# --------------------------------------------------------------------------------------------------------


def boxes_dict(boxes, labels, scores=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    out = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64)}
    if scores is not None:
        out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


def test_match_is_greedy_by_score_class_aware_and_one_to_one():
    gt = boxes_dict([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])
    pseudo = boxes_dict([[0, 0, 10, 9],     # IoU 0.9 with gt 0, but the lower score
                         [0, 0, 10, 7],     # IoU 0.7 with gt 0, the higher score: takes it first
                         [20, 20, 30, 30],  # exact box of gt 1 but the wrong class
                         [21, 20, 30, 30],  # IoU 0.9 with gt 1, right class
                         [50, 50, 60, 60]],  # nothing there
                        [0, 0, 0, 1, 1], [0.6, 0.8, 0.99, 0.7, 0.95])
    hit = match_pseudo_labels(pseudo["boxes"], pseudo["scores"], pseudo["labels"], gt["boxes"], gt["labels"])
    assert hit.tolist() == [False, True, False, True, False]

    quality = pseudo_label_quality([pseudo], [gt])
    assert quality == {"pseudo_precision": 2 / 5, "pseudo_recall": 2 / 2, "pseudo_num": 5.0, "pseudo_num_gt": 2.0}


def test_match_threshold_and_ties():
    gt = boxes_dict([[0, 0, 10, 10]], [2])
    below = boxes_dict([[0, 0, 10, 4.9]], [2], [0.9])  # IoU 0.49
    at = boxes_dict([[0, 0, 10, 5]], [2], [0.9])  # IoU exactly 0.5 counts
    assert pseudo_label_quality([below], [gt])["pseudo_precision"] == 0.0
    assert pseudo_label_quality([at], [gt])["pseudo_precision"] == 1.0
    tie = boxes_dict([[0, 0, 10, 10], [0, 0, 10, 10]], [2, 2], [0.7, 0.7])
    hit = match_pseudo_labels(tie["boxes"], tie["scores"], tie["labels"], gt["boxes"], gt["labels"])
    assert hit.tolist() == [True, False]  # equal scores: the lower index first


def test_quality_over_a_batch_with_empty_images():
    gt = [boxes_dict([[0, 0, 10, 10]], [0]), boxes_dict([], []), boxes_dict([[5, 5, 20, 20], [30, 30, 40, 40]], [1, 1])]
    pseudo = [boxes_dict([], [], []), boxes_dict([[0, 0, 5, 5]], [0], [0.9]), boxes_dict([[5, 5, 20, 20]], [1], [0.9])]
    quality = pseudo_label_quality(pseudo, gt)
    assert quality == {"pseudo_precision": 1 / 2, "pseudo_recall": 1 / 3, "pseudo_num": 2 / 3, "pseudo_num_gt": 1.0}
    nothing = pseudo_label_quality([boxes_dict([], [], [])], [boxes_dict([], [])])
    assert math.isnan(nothing["pseudo_precision"]) and math.isnan(nothing["pseudo_recall"])
    assert nothing["pseudo_num"] == 0.0 and nothing["pseudo_num_gt"] == 0.0
    none_proposed = pseudo_label_quality([boxes_dict([], [], [])], gt[:1])
    assert math.isnan(none_proposed["pseudo_precision"]) and none_proposed["pseudo_recall"] == 0.0
    with pytest.raises(ValueError, match="2 pseudo-label dicts for 3 images"):
        pseudo_label_quality(pseudo[:2], gt)


def make_view(matrices, sizes, canvas=(64, 64)):
    B = len(matrices)
    return Batch(images=torch.rand(B, 3, *canvas), image_sizes=torch.tensor(sizes),
                 targets=[boxes_dict([[8, 8, 24, 30]], [1]) | {"crowd": torch.zeros(0, 4)} for _ in range(B)],
                 matrices=torch.stack(matrices), image_ids=list(range(B)), orig_sizes=[(64, 64)] * B)


def test_draw_pseudo_labels_writes_both_views_side_by_side(tmp_path):
    weak = make_view([torch.eye(3, dtype=torch.float64)], [[64, 48]])
    strong = make_view([hflip_matrix(48) @ scale_matrix(1.0, 1.0)], [[64, 48]])
    pseudo = [boxes_dict([[8, 8, 24, 30], [30, 40, 40, 50]], [1, 0], [0.95, 0.6])]
    path = draw_pseudo_labels(UnlabeledBatch(weak, strong), pseudo, tmp_path / "pseudo" / "it_10.png", min_size=96)
    image = Image.open(path)
    # Each 48 x 64 panel is enlarged by 2 (short side >= 96), with an 8 px gap between them.
    assert image.size == (2 * 96 + 8, 128)
    pixels = image.load()
    assert pixels[48 * 2 + 4, 64] == (40, 40, 40)  # the gap


# --------------------------------------------------------------------------------------------------------
# build_method
# --------------------------------------------------------------------------------------------------------


def test_build_method():
    assert build_method("supervised", cfg=None, detector_name="fcos") is None
    with pytest.raises(ValueError, match="unknown method 'mean_teacher'"):
        build_method("mean_teacher", cfg=None, detector_name="fcos")

    cfg = resolve_config(dict(method="soft_teacher", rpn_pre_nms_train=600, rpn_post_nms_test=200,
                              method_args={"jitter_times": 5}))
    method = build_method("soft_teacher", cfg=cfg, detector_name="faster_rcnn")
    assert (method.cfg.teacher_rpn_pre_nms, method.cfg.teacher_rpn_post_nms) == (600, 200)
    # method_args update the preset's key by key: jitter_times from the override, unsup_weight from the built-in
    # preset (1, not the paper's 4), burn_in too (a quarter of the run).
    assert method.cfg.jitter_times == 5 and method.cfg.unsup_weight == 1.0
    assert method.cfg.burn_in == round(cfg.max_iter / 4)
    with pytest.raises(ValueError, match="faster_rcnn"):
        build_method("soft_teacher", cfg=cfg, detector_name="fcos")
    cfg.method_args = {"jitter_time": 5}
    with pytest.raises(ValueError, match="jitter_time"):
        build_method("soft_teacher", cfg=cfg, detector_name="faster_rcnn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_norm_statistics_normalises_by_the_batch_and_restores_the_running_statistics(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(4)).to(dtype).train()
    x = torch.randn(2, 3, 8, 8, dtype=dtype) * 3 + 1
    free = copy.deepcopy(model)
    expected = free(x)  # train mode: batch statistics, and the running ones move
    before = [b.clone() for b in model.buffers()]
    with frozen_norm_statistics(model):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same normalisation inside the block
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    assert not all(torch.equal(a, b) for a, b in zip(free.buffers(), before))

    with pytest.raises(RuntimeError), frozen_norm_statistics(model):  # restored on the way out of an error too
        model(x)
        raise RuntimeError("stop")
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))

    with frozen_norm_statistics(model, enabled=False):
        model(x)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), free.buffers()))
