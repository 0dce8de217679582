"""Tests of semi/sed.py: views and level pairing, the KL / L2 terms of Eq. 2, 3 and 5, and SED end to end."""

import math

import pytest
import torch

from semi.ops import ghm_kl_with_counts, kl_per_sample
from semi.sed import (
    SED,
    HARD_LOGIT,
    LevelPair,
    Rows,
    SEDConfig,
    box_l2,
    check_pairing,
    classification_kl,
    hard_target_logits,
    make_views,
    pair_levels,
    quality_kl,
    scale_consistency,
    self_distillation,
)

torch.set_num_threads(1)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def binary_kl(q: float, p: float) -> float:
    """KL((q, 1-q) || (p, 1-p)) by hand, with 0 log 0 = 0."""
    return sum(a * math.log(a / b) for a, b in ((q, p), (1 - q, 1 - p)) if a > 0)


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > -30 else z - math.log1p(math.exp(z))


def binary_kl_of_logits(student: float, target: float) -> float:
    """The same KL from logits, in log space: finite even where p rounds to exactly 1."""
    q = sigmoid(target)
    return (q * (log_sigmoid(target) - log_sigmoid(student))
            + (1 - q) * (log_sigmoid(-target) - log_sigmoid(-student)))


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------------------------------------
# Views and level pairing
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_exp", [1, 2])
def test_views_pad_then_downsample_block_for_block(scale_exp):
    torch.manual_seed(0)
    weak, strong = torch.rand(2, 2, 3, 96, 64).unbind(0)
    sizes = torch.tensor([[96, 64], [81, 50]])
    views = make_views(weak=weak, strong=strong, image_sizes=sizes, scale_exp=scale_exp, pad_stride=32)
    factor = 2 ** scale_exp
    H, W = views.student.shape[-2:]
    assert (H, W) == ((128, 64) if factor == 2 else (128, 128))  # the next multiples of 2^s * 32
    assert views.teacher.shape == views.student.shape
    assert torch.equal(views.student[..., :96, :64], strong) and views.student[..., 96:, :].abs().sum() == 0
    assert torch.equal(views.teacher[..., :96, :64], weak)
    assert views.student_small.shape == (2, 3, H // factor, W // factor)
    # Pixel (r, c) of X_hat is the mean of the factor x factor block of X at (factor r, factor c).
    r, c = 5, 7
    block = views.student[:, :, factor * r:factor * (r + 1), factor * c:factor * (c + 1)]
    torch.testing.assert_close(views.student_small[:, :, r, c], block.mean(dim=(-2, -1)))
    expected_sizes = torch.tensor([[math.ceil(96 / factor), math.ceil(64 / factor)],
                                   [math.ceil(81 / factor), math.ceil(50 / factor)]])
    assert torch.equal(views.image_sizes_small, expected_sizes)


def test_views_bilinear_keeps_the_geometry():
    images = torch.rand(1, 3, 64, 64)
    views = make_views(weak=images, strong=images, image_sizes=torch.tensor([[64, 64]]), scale_exp=1,
                       pad_stride=32, mode="bilinear")
    assert views.student_small.shape == (1, 3, 32, 32)
    # A constant image stays constant: the resize has no shift.
    flat = make_views(weak=torch.full_like(images, 0.3), strong=torch.full_like(images, 0.3),
                      image_sizes=torch.tensor([[64, 64]]), scale_exp=1, pad_stride=32, mode="bilinear")
    torch.testing.assert_close(flat.student_small, torch.full((1, 3, 32, 32), 0.3))


def test_views_reject_misaligned_batches():
    with pytest.raises(ValueError, match="pixel-aligned"):
        make_views(weak=torch.rand(1, 3, 64, 64), strong=torch.rand(1, 3, 64, 96),
                   image_sizes=torch.tensor([[64, 64]]), scale_exp=1, pad_stride=32)


def test_pair_levels():
    # P3..P7 (5 levels), s = 1: (P4, P3), (P5, P4), (P6, P5), (P7, P6).
    assert pair_levels(5, 1) == [LevelPair(1, 0), LevelPair(2, 1), LevelPair(3, 2), LevelPair(4, 3)]
    assert pair_levels(5, 2) == [LevelPair(2, 0), LevelPair(3, 1), LevelPair(4, 2)]
    assert pair_levels(2, 1) == [LevelPair(1, 0)]
    with pytest.raises(ValueError, match="no pair"):
        pair_levels(3, 3)


def grid_anchors(H: int, W: int, stride: int, size: float) -> torch.Tensor:
    """Square anchors centred at (c * stride, r * stride), the torchvision placement: (H*W, 4) xyxy."""
    ys, xs = torch.meshgrid(torch.arange(H) * stride, torch.arange(W) * stride, indexing="ij")
    centres = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 4).float()
    return centres + torch.tensor([-size, -size, size, size]) / 2


def test_check_pairing_accepts_doubling_anchors_and_rejects_others():
    strides, sizes = [8, 16, 32], [32.0, 64.0, 128.0]
    anchors = [grid_anchors(64 // t, 64 // t, t, a) for t, a in zip(strides, sizes)]  # on X, 64 x 64
    small = [grid_anchors(32 // t, 32 // t, t, a) for t, a in zip(strides, sizes)]  # on X_hat, 32 x 32
    check_pairing(anchors, small, pair_levels(3, 1), scale_exp=1)
    wrong = [grid_anchors(32 // t, 32 // t, t, a) for t, a in zip(strides, [32.0, 40.0, 128.0])]
    with pytest.raises(ValueError, match="double per level"):
        check_pairing(anchors, wrong, pair_levels(3, 1), scale_exp=1)
    with pytest.raises(ValueError, match="do not pair"):
        check_pairing(anchors, small[1:] + small[:1], pair_levels(3, 1), scale_exp=1)


# ----------------------------------------------------------------------------------------------------------
# KL, L2 and re-weighting (Eq. 2, 3, 5) against float64 hand computations
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_kl_by_hand(dtype):
    pairs = [(0.3, 0.3), (0.9, 0.2), (0.01, 0.7), (0.5, 0.999)]  # (student p, target q)
    logits = torch.tensor([[logit(p) for p, _ in pairs]], dtype=dtype)
    targets = torch.tensor([[logit(q) for _, q in pairs]], dtype=dtype)
    kl = kl_per_sample(logits, targets, mode="sigmoid")
    assert kl.shape == (1, 4) and kl.dtype == dtype
    expected = torch.tensor([[binary_kl(q, p) for p, q in pairs]], dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(kl.double(), expected, atol=tol, rtol=tol)
    assert kl[0, 0] == 0
    # Saturated logits stay finite.
    assert torch.isfinite(kl_per_sample(torch.tensor([[80.0, -80.0]], dtype=dtype),
                                        torch.tensor([[-80.0, 80.0]], dtype=dtype), mode="sigmoid")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_kl_by_hand(dtype):
    logits = [[0.0, 1.0, -1.0], [2.0, 2.0, 2.0], [-3.0, 0.5, 4.0]]
    targets = [[1.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 3.0, -2.0]]
    kl = kl_per_sample(torch.tensor(logits, dtype=dtype), torch.tensor(targets, dtype=dtype), mode="softmax")
    assert kl.shape == (3,)
    expected = []
    for z, t in zip(logits, targets):
        p, q = softmax(z), softmax(t)
        expected.append(sum(qc * math.log(qc / pc) for pc, qc in zip(p, q)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(kl.double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)
    assert kl[1] == 0


def test_plain_mean_when_reweighting_is_off():
    torch.manual_seed(0)
    z, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for mode in ("sigmoid", "softmax"):
        plain = classification_kl(z, t, mode=mode, reweight=False, bins=10)
        torch.testing.assert_close(plain, kl_per_sample(z, t, mode=mode).mean())


# Hand-built Bernoulli elements (student p, target q) with g = |p - q| in known bins of M = 10:
# bin 0: g = 0, 0, 0.05; bin 2: g = 0.25; bin 3: g = 0.35; bin 9: g = 0.95 and g = 1 exactly (the last bin).
SIGMOID_CASE = [(0.5, 0.5), (0.2, 0.2), (0.5, 0.45), (0.6, 0.35), (0.9, 0.55), (0.98, 0.03)]
SIGMOID_BINS = [0, 0, 0, 2, 3, 9, 9]
SIGMOID_COUNTS = {0: 3, 2: 1, 3: 1, 9: 2}


def sigmoid_case(dtype):
    student = [logit(p) for p, _ in SIGMOID_CASE] + [40.0]  # p = 1 in float64
    target = [logit(q) for _, q in SIGMOID_CASE] + [-40.0]  # q = 4e-18, so g = 1 - 4e-18 = 1 exactly
    return (torch.tensor(student, dtype=dtype).reshape(7, 1), torch.tensor(target, dtype=dtype).reshape(7, 1))


def test_reweighted_sigmoid_kl_by_hand():
    z, t = sigmoid_case(torch.float64)
    g = (torch.sigmoid(z) - torch.sigmoid(t)).abs().flatten()
    assert g[0] == 0 and g[-1] == 1  # the edge cases the binning must handle
    kls = [binary_kl_of_logits(a, b) for a, b in zip(z.flatten().tolist(), t.flatten().tolist())]
    expected = sum(kl / SIGMOID_COUNTS[b] for kl, b in zip(kls, SIGMOID_BINS)) / 10  # Eq. 5
    z.requires_grad_(True)
    loss = classification_kl(z, t, mode="sigmoid", reweight=True, bins=10)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # The op's own counts R_j, and dL/dz_i = (p_i - q_i) / (M R_bin(i)): the gradient sees the same counts.
    counts = ghm_kl_with_counts(z.detach(), t, mode="sigmoid", bins=10).counts
    assert counts.tolist() == [SIGMOID_COUNTS.get(j, 0) for j in range(10)]
    loss.backward()
    diff = (torch.sigmoid(z) - torch.sigmoid(t)).detach().flatten()
    for i in range(2, 7):
        count = (diff[i] / (10 * z.grad.flatten()[i])).item()
        assert count == pytest.approx(SIGMOID_COUNTS[SIGMOID_BINS[i]], rel=1e-9)
    assert z.grad[0] == 0 and z.grad[1] == 0


def test_reweighted_softmax_kl_by_hand():
    # Rows of 3-way logits; g = 0.5 * sum |p - q|: 0 (identical rows), 1 (disjoint one-hots), and two in between.
    student = [[1.0, 2.0, 0.0], [40.0, -40.0, -40.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.1, 0.0, 0.0]]
    target = [[1.0, 2.0, 0.0], [-40.0, 40.0, -40.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.1, 0.0]]
    g, kls = [], []
    for z, t in zip(student, target):
        p, q = softmax(z), softmax(t)
        g.append(0.5 * sum(abs(a - b) for a, b in zip(p, q)))
        kls.append(sum(b * math.log(b / a) for a, b in zip(p, q)))
    assert g[0] == 0 and g[1] == 1
    bins = [min(int(v * 10), 9) for v in g]
    counts = {b: bins.count(b) for b in bins}
    expected = sum(kl / counts[b] for kl, b in zip(kls, bins)) / 10
    z, t = torch.tensor(student, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    loss = classification_kl(z, t, mode="softmax", reweight=True, bins=10)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert ghm_kl_with_counts(z, t, mode="softmax", bins=10).counts.tolist() == [bins.count(j) for j in range(10)]


def test_reweighted_kl_float32_matches_float64():
    z, t = sigmoid_case(torch.float64)
    loss64 = classification_kl(z, t, mode="sigmoid", reweight=True, bins=10)
    loss32 = classification_kl(z.float(), t.float(), mode="sigmoid", reweight=True, bins=10)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-7)


def test_box_l2_by_hand():
    a = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    # Per sample sqrt(|a - b|^2 + eps): sqrt(eps) and sqrt(1 + 4 + 4 + 16 + eps) = 5; mean of the two.
    torch.testing.assert_close(box_l2(a, b, eps=1e-6), torch.tensor((1e-3 + math.sqrt(25 + 1e-6)) / 2,
                                                                    dtype=torch.float64))
    a.requires_grad_(True)
    box_l2(a, b, eps=1e-6).backward()
    assert torch.isfinite(a.grad).all() and a.grad[0].abs().sum() == 0  # finite, zero where the two agree


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("reweight", [True, False])
def test_gradcheck_classification_kl(mode, reweight):
    torch.manual_seed(1)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: classification_kl(x, t, mode=mode, reweight=reweight, bins=10), (z,))


def test_gradcheck_box_l2_and_quality_kl():
    torch.manual_seed(2)
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: box_l2(x, y, eps=1e-6), (a, b))
    q = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: quality_kl(x, r), (q,))


def test_hard_targets():
    t = torch.tensor([[logit(0.7), logit(0.3)], [logit(0.5), logit(0.49)]])
    hard = hard_target_logits(t, mode="sigmoid", threshold=0.5)
    assert torch.equal(hard, torch.tensor([[HARD_LOGIT, -HARD_LOGIT], [HARD_LOGIT, -HARD_LOGIT]]))
    # Softmax rows, background last: the best foreground class if its probability >= 0.5, else background.
    rows = torch.log(torch.tensor([[0.6, 0.1, 0.3], [0.3, 0.4, 0.3], [0.05, 0.05, 0.9]]))
    hard = hard_target_logits(rows, mode="softmax", threshold=0.5)
    assert torch.equal(hard.argmax(dim=-1), torch.tensor([0, 2, 2]))
    assert torch.softmax(hard.double(), dim=-1).max(dim=-1).values.min() > 1 - 1e-12
    # KL against a hard target is the cross-entropy of the student.
    z = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64)
    kl = kl_per_sample(z, hard_target_logits(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), mode="softmax",
                                             threshold=0.5), mode="softmax")
    torch.testing.assert_close(kl, -torch.log_softmax(z, dim=-1)[:, 0], atol=1e-10, rtol=0)


def test_stop_gradient_sides():
    torch.manual_seed(3)
    cfg = SEDConfig()
    big = Rows(torch.randn(8, 3, requires_grad=True), torch.randn(8, 4, requires_grad=True))
    small = Rows(torch.randn(8, 3, requires_grad=True), torch.randn(8, 4, requires_grad=True))
    terms = scale_consistency(big, small, mode="sigmoid", cfg=cfg)
    (terms.cls + terms.box).backward()
    # Eq. 2 is symmetric: each side is a target once (no gradient) and a student once (gradient).
    assert all(x.grad is not None and x.grad.abs().sum() > 0
               for x in (big.logits, big.deltas, small.logits, small.deltas))

    student = Rows(torch.randn(8, 3, requires_grad=True), torch.randn(8, 4, requires_grad=True))
    teacher = Rows(torch.randn(8, 3, requires_grad=True), torch.randn(8, 4, requires_grad=True))
    terms = self_distillation(student, teacher, mode="sigmoid", cfg=cfg)
    (terms.cls + terms.box).backward()
    assert student.logits.grad.abs().sum() > 0 and student.deltas.grad.abs().sum() > 0
    assert teacher.logits.grad is None and teacher.deltas.grad is None  # Eq. 3: sg on the teacher


def test_all_background_rows_give_finite_losses():
    # Every anchor confidently background on both sides: all g in bin 0, all KL ~ 0; nothing divides by zero.
    cfg = SEDConfig()
    rows = Rows(torch.full((50, 4), -20.0, requires_grad=True), torch.zeros(50, 4, requires_grad=True))
    terms = scale_consistency(rows, Rows(torch.full((50, 4), -20.0), torch.zeros(50, 4)), mode="sigmoid", cfg=cfg)
    (terms.cls + terms.box).backward()
    assert torch.isfinite(terms.cls) and torch.isfinite(terms.box) and torch.isfinite(rows.logits.grad).all()
    empty = Rows(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 4, requires_grad=True))
    for mode in ("sigmoid", "softmax"):
        terms = self_distillation(empty, empty, mode=mode, cfg=cfg)
        assert terms.cls.item() == 0 and terms.box.item() == 0


def test_config_validation():
    with pytest.raises(ValueError, match="distill"):
        SEDConfig(distill="medium")
    with pytest.raises(ValueError, match="max_scale_exp"):
        SEDConfig(max_scale_exp=0)
    with pytest.raises(ValueError, match="both"):
        SEDConfig(scale_consistency=False, distill="off")
    with pytest.raises(ValueError, match="detector"):
        SED(SEDConfig(), detector_name="yolo")


def test_loss_weights_follow_eq1():
    sed = SED(SEDConfig(num_unlabeled=4, num_labeled=2, lambda_scale=0.5, lambda_distill=3.0),
              detector_name="faster_rcnn")
    weights = sed.loss_weights(0)
    assert weights["unsup_loss_scale_rpn_cls"] == 1.0 and weights["unsup_loss_scale_roi_box"] == 1.0
    assert weights["unsup_loss_distill_roi_cls"] == 6.0 and len(weights) == 8
    # The optional burn-in: 0 before it, then a linear ramp to Eq. 1's weights.
    ramped = SED(SEDConfig(num_unlabeled=4, num_labeled=2, burn_in=10, ramp=4), detector_name="retinanet")
    assert [ramped.loss_weights(t)["unsup_loss_distill_cls"] for t in (0, 9, 10, 11, 14, 100)] == [
        0.0, 0.0, 0.0, 0.5, 2.0, 2.0]
    with pytest.raises(ValueError, match="burn_in"):
        SEDConfig(burn_in=-1)
    fcos = SED(SEDConfig(distill="off"), detector_name="fcos")
    assert fcos.loss_keys() == ["loss_scale_cls", "loss_scale_box", "loss_scale_quality"]


# ----------------------------------------------------------------------------------------------------------
# The real detectors: level pairing, and SED end to end
# ----------------------------------------------------------------------------------------------------------

DETECTOR_NAMES = ["retinanet", "fcos", "faster_rcnn"]
NUM_CLASSES = 3


def cpu_detector(name: str, **kwargs):
    """The CPU preset's detector: ResNet-18, 64-channel FPN, anchors COCO's / 4, from scratch."""
    import detectors

    if name != "fcos":
        kwargs.setdefault("anchor_sizes", [8, 16, 32, 64, 128])
    if name == "faster_rcnn":
        kwargs.update(representation_size=64, rpn_pre_nms_train=200, rpn_post_nms_train=50, roi_batch_size=32)
    return detectors.build_detector(name, num_classes=NUM_CLASSES, backbone="resnet18", fpn_channels=64, **kwargs)


def level_outputs(detector, images):
    """(per-level anchors, per-level strides) of the detector's raw outputs on `images`."""
    model = detector.model
    if hasattr(model, "rpn"):
        with torch.no_grad():
            rpn = model.rpn(model.features(images))
        return rpn, rpn.anchors, list(model.anchor_generator.strides)
    with torch.no_grad():
        out = model(images, None)
    return out, out.anchors, out.strides


@pytest.mark.parametrize("name", DETECTOR_NAMES)
@pytest.mark.parametrize("scale_exp", [1, 2])
@pytest.mark.parametrize("pad_stride", [None, 32])
def test_real_detector_levels_pair_cell_for_cell(name, scale_exp, pad_stride):
    """Level f of X and level f - s of X_hat: same grid, and cell (r, c) holds the same anchors up to 2^s."""
    from semi.sed import largest_stride

    torch.manual_seed(0)
    detector = cpu_detector(name)
    detector.model.eval()
    images = torch.rand(1, 3, 96, 160)  # a collated batch: multiples of 32 only
    views = make_views(weak=images, strong=images, image_sizes=torch.tensor([[90, 150]]), scale_exp=scale_exp,
                       pad_stride=pad_stride or largest_stride(detector.model))
    out, anchors, strides = level_outputs(detector, views.student)
    out_small, anchors_small, strides_small = level_outputs(detector, views.student_small)
    factor = 2 ** scale_exp
    pairs = pair_levels(len(anchors), scale_exp)
    check_pairing(anchors, anchors_small, pairs, scale_exp=scale_exp)
    rows = out.cls_logits if hasattr(out, "cls_logits") else out.objectness
    rows_small = out_small.cls_logits if hasattr(out_small, "cls_logits") else out_small.objectness
    H, W = views.student.shape[-2:]
    if pad_stride is None:  # padded to 2^s * the coarsest stride: every level has an exact size
        assert H % (factor * max(strides)) == 0 and W % (factor * max(strides)) == 0
    for f, f_small in pairs:
        assert strides[f] == strides_small[f_small] * factor
        assert rows[f].shape == rows_small[f_small].shape  # (B, H_l * W_l * A, K): the same grid
        # Cell (r, c) of level f sits at (c, r) * stride in X; of level f - s at (c, r) * stride / 2^s in X_hat.
        num_anchors = anchors[f].shape[0] // (math.ceil(H / strides[f]) * math.ceil(W / strides[f]))
        grid = anchors[f].view(math.ceil(H / strides[f]), math.ceil(W / strides[f]), num_anchors, 4)
        grid_small = anchors_small[f_small].view(*grid.shape)
        r, c = grid.shape[0] - 1, grid.shape[1] - 1
        centre = (grid[r, c, :, :2] + grid[r, c, :, 2:]) / 2  # (A, 2)
        centre_small = (grid_small[r, c, :, :2] + grid_small[r, c, :, 2:]) / 2
        torch.testing.assert_close(centre_small * factor, centre, atol=0.5 * (factor + 1), rtol=0)
        assert abs(centre[0, 0].item() - c * strides[f]) <= 0.5 and abs(centre[0, 1].item() - r * strides[f]) <= 0.5


def test_check_pairing_rejects_the_real_detector_with_non_doubling_anchors():
    torch.manual_seed(0)
    detector = cpu_detector("retinanet", anchor_sizes=[8, 12, 32, 64, 128])
    detector.model.eval()
    images = torch.rand(1, 3, 128, 128)
    views = make_views(weak=images, strong=images, image_sizes=torch.tensor([[128, 128]]), scale_exp=1,
                       pad_stride=128)
    _, anchors, _ = level_outputs(detector, views.student)
    _, anchors_small, _ = level_outputs(detector, views.student_small)
    with pytest.raises(ValueError, match="double per level"):
        check_pairing(anchors, anchors_small, pair_levels(5, 1), scale_exp=1)


def unlabeled_batch(B: int, H: int, W: int, *, blank: bool = False):
    """An UnlabeledBatch of B pixel-aligned views: bright squares on noise (or blank images)."""
    from structures import Batch, UnlabeledBatch

    images = torch.zeros(B, 3, H, W) if blank else torch.rand(B, 3, H, W) * 0.3
    if not blank:
        images[:, :, 8:40, 10:30] = 0.9
    sizes = torch.tensor([[H, W]] * B)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "crowd": torch.zeros(0, 4)} for _ in range(B)]

    def view(pixels):
        return Batch(images=pixels, image_sizes=sizes, targets=targets, matrices=torch.eye(3, dtype=torch.float64)
                     .expand(B, 3, 3).clone(), image_ids=list(range(B)), orig_sizes=[(H, W)] * B)

    strong = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)  # colour noise only: still aligned
    return UnlabeledBatch(weak=view(images), strong=view(strong))


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_sed_end_to_end(name):
    """A few iterations of the training loop of ARCHITECTURE.md with SED on each detector."""
    import detectors
    from semi.core import prefix, weighted_total
    from semi.ema import EMATeacher

    torch.manual_seed(0)
    student = cpu_detector(name)
    ema = EMATeacher(student.model)
    teacher = detectors.Detector(ema.model, student.criterion, student.postprocessor)
    sed = SED(SEDConfig(num_unlabeled=2, num_labeled=1, roi_topk=16, pre_nms_top_n=100, ema_milestone=2),
              detector_name=name)
    optimizer = torch.optim.SGD(student.model.parameters(), lr=1e-3)
    labeled_images = torch.rand(1, 3, 64, 64)
    labeled_targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([1]),
                        "crowd": torch.zeros(0, 4)}]
    student.model.train()
    for iteration in range(3):
        unsup = sed.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch(2, 64, 64),
                                      iteration=iteration)
        assert sorted(unsup.losses) == sorted(sed.loss_keys())
        assert all(v.dim() == 0 and torch.isfinite(v) for v in unsup.losses.values()), unsup.losses
        assert len(unsup.pseudo_boxes) == 2 and all((d["scores"] > 0.5).all() for d in unsup.pseudo_boxes)
        sup = detectors.supervised_losses(student, labeled_images, torch.tensor([[64, 64]]), labeled_targets)
        losses = prefix(sup, "sup_") | prefix(unsup.losses, "unsup_")
        total = weighted_total(losses, sed.loss_weights(iteration))
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.model.parameters())
        assert all(p.grad is None for p in teacher.model.parameters())
        optimizer.step()
        ema.update(student.model, momentum=sed.ema_momentum(iteration))
    assert [sed.ema_momentum(t) for t in (0, 1, 2, 3)] == [0.99, 0.99, 0.9, 0.9]  # Table 9: a step at the milestone


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_unsupervised_terms_reach_the_student(name):
    """Each unsupervised term alone has a gradient for the student's head (and none for the teacher)."""
    import copy

    import detectors

    torch.manual_seed(0)
    student = cpu_detector(name)
    teacher = detectors.Detector(copy.deepcopy(student.model).eval(), student.criterion, student.postprocessor)
    sed = SED(SEDConfig(roi_topk=8, pre_nms_top_n=50, ema_milestone=10, pad_stride=32), detector_name=name)
    unsup = sed.unsupervised_loss(student=student, teacher=teacher, unlabeled=unlabeled_batch(2, 64, 64),
                                  iteration=0)
    params = [p for p in student.model.parameters() if p.requires_grad]
    for key, value in unsup.losses.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), key
    assert all(p.grad is None for p in teacher.model.parameters())


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_all_background_batch_is_finite(name):
    """Blank unlabeled images (nothing to detect): every term finite, hard targets and no re-weighting too."""
    import copy

    import detectors

    torch.manual_seed(0)
    student = cpu_detector(name)
    teacher = detectors.Detector(copy.deepcopy(student.model).eval(), student.criterion, student.postprocessor)
    for cfg in (SEDConfig(roi_topk=8, pre_nms_top_n=50, pad_stride=32),
                SEDConfig(roi_topk=8, pre_nms_top_n=50, distill="hard", reweight=False, max_scale_exp=2,
                          pad_stride=32)):
        sed = SED(cfg, detector_name=name)
        blank = unlabeled_batch(2, 64, 64, blank=True)
        unsup = sed.unsupervised_loss(student=student, teacher=teacher, unlabeled=blank, iteration=0)
        total = sum(unsup.losses.values())
        total.backward()
        assert torch.isfinite(total)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.model.parameters())
        student.model.zero_grad()


def test_ablation_switches_select_the_terms():
    sed = SED(SEDConfig(scale_consistency=False, ema_milestone=1), detector_name="retinanet")
    assert sed.loss_keys() == ["loss_distill_cls", "loss_distill_box"]
    sed = SED(SEDConfig(distill="off", roi_terms=False, ema_milestone=1), detector_name="faster_rcnn")
    assert sed.loss_keys() == ["loss_scale_rpn_cls", "loss_scale_rpn_box"]


def test_predict_multiscale_merges_scales_by_nms():
    from engine.evaluation import predict_multiscale

    torch.manual_seed(0)
    detector = cpu_detector("fcos", score_thresh=0.0)
    detector.model.eval()
    images, sizes = unlabeled_batch(2, 64, 96).weak.images, torch.tensor([[64, 96], [50, 70]])
    single = predict_multiscale(detector, images, sizes, scales=(1.0,), max_detections=10_000)
    twice = predict_multiscale(detector, images, sizes, scales=(1.0, 1.0), max_detections=10_000)
    for a, b in zip(single, twice):  # the duplicate scale's boxes coincide (IoU 1) and are suppressed
        rows_a = torch.cat([a["boxes"], a["scores"][:, None], a["labels"][:, None].float()], dim=1)  # (K, 6)
        rows_b = torch.cat([b["boxes"], b["scores"][:, None], b["labels"][:, None].float()], dim=1)
        assert len(rows_a) > 0 and rows_a.shape == rows_b.shape
        distance = torch.cdist(rows_b, rows_a, compute_mode="donot_use_mm_for_euclid_dist")  # (K, K)
        assert distance.min(dim=1).values.max() < 1e-4  # the same set (ties may reorder)
    merged = predict_multiscale(detector, images, sizes, scales=(0.5, 1.0, 1.5), max_detections=50)
    for d, (h, w) in zip(merged, sizes.tolist()):
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) <= 50 and d["labels"].dtype == torch.int64
        assert (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all() and (d["boxes"] >= 0).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()


def test_build_sed_from_the_run_config():
    from engine.config import resolve_config
    from engine.config import build_method

    cfg = resolve_config({"method": "sed"})  # the built-in preset: Faster R-CNN, 8 + 4 images
    sed = build_method("sed", cfg=cfg, detector_name=cfg.detector)
    assert isinstance(sed, SED) and sed.detector_name == "faster_rcnn"
    assert (sed.cfg.num_labeled, sed.cfg.num_unlabeled) == (cfg.labeled_batch, cfg.unlabeled_batch)
    assert sed.cfg.ema_milestone == cfg.milestone_iters()[0] and sed.cfg.roi_topk == cfg.rpn_post_nms_train
    assert sed.ema_momentum(0) == 0.99 and sed.ema_momentum(cfg.milestone_iters()[0]) == 0.9
    cfg = resolve_config({"method": "sed", "detector": "retinanet",
                          "method_args": {"distill": "hard", "ema_policy": "cosine", "lambda_scale": 2.0}})
    sed = build_method("sed", cfg=cfg, detector_name=cfg.detector)
    assert sed.cfg.distill == "hard" and sed.ema_momentum(0) == pytest.approx(0.996)
    assert sed.ema_momentum(cfg.max_iter) == pytest.approx(0.9)
    assert sed.cfg.burn_in == round(cfg.max_iter / 4) and sed.loss_weights(0)["unsup_loss_scale_cls"] == 0.0
    assert sed.loss_weights(cfg.max_iter - 1)["unsup_loss_scale_cls"] == 2.0 * cfg.unlabeled_batch / cfg.labeled_batch
    with pytest.raises(ValueError, match="unknown SED settings"):
        build_method("sed", cfg=resolve_config({"method": "sed", "method_args": {"lambda_s": 1.0}}),
                     detector_name="faster_rcnn")
