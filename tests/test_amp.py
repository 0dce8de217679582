"""Mixed precision (--amp): the networks in bfloat16 under CPU autocast, the losses, fused ops and
postprocessing in float32 (detectors/precision.py), and the float16 loss scale saved and resumed.

Covered: `in_float32` casts 16-bit tensors up through the detectors' containers and turns autocast off, so
each loss, fused op and method loss gives the float32 result of its upcast inputs, bit for bit, with
gradients back into the 16-bit inputs; the postprocessors score in float32; a few iterations of a dense
method (Dense Teacher, FCOS) and a two-stage one (Soft Teacher, Faster R-CNN) train with finite losses while
the convolutions run in bfloat16; a resumed float16 run continues with the checkpoint's loss scale.

The images are 96 px, not the 64 px of the other training tests: at 64 px FCOS's P6 map is 1x1, and the CPU's
bfloat16 convolution (oneDNN, torch 2.14) returns garbage weight gradients for a 1x1 input with stride 2 (its
P7 conv), now and then inf or NaN. Images of 65 px and more never give such a map.
"""

import pytest
import torch

import detectors
import train
from detectors.box_ops import LinearBoxCoder
from detectors.dense import DenseOutput
from detectors.losses import l1_loss, quality_focal_loss, sigmoid_focal_loss, smooth_l1_loss
from detectors.precision import in_float32, mixed_precision, to_float32
from engine.checkpoint import atomic_save, last_checkpoint, load_checkpoint
from engine.config import resolve_config
from engine.logger import read_metrics
from semi.dense_teacher import box_consistency, quality_consistency
from semi.ops import frs_qfl, frs_topk_mask, ghm_kl, jitter_boxes, refine_stats
from semi.sed import Rows, SEDConfig, scale_consistency

SPEC = dict(num_train=16, num_val=4, image_size=96, min_size=8, max_size=48, max_objects=3, clutter=1.0)
BF16 = torch.bfloat16




def tiny_config(builtin_dir, output_dir, method, **overrides):
    settings = dict(method=method, builtin_dir=str(builtin_dir), backbone_pretrain="", builtin_spec=SPEC, output_dir=str(output_dir),
                    percent=50.0, train_sizes=[96], train_max_size=96, test_size=96, test_max_size=96,
                    fpn_channels=32, head_convs=1, labeled_batch=2, unlabeled_batch=2, lr=0.01, warmup_iters=1,
                    milestones=[0.5], max_iter=3, eval_period=1000, checkpoint_period=1000, log_period=1, threads=1,
                    seed=0, amp="bf16")
    if method == "soft_teacher":  # Faster R-CNN, small; the unsupervised loss from the first iteration
        settings |= dict(box_head_dim=32, rpn_pre_nms_train=100, rpn_pre_nms_test=100, rpn_post_nms_train=50,
                         rpn_post_nms_test=50, roi_batch_size=32,
                         method_args={"jitter_times": 2, "burn_in": 0, "ramp": 0})
    if method == "dense_teacher":
        settings |= {"method_args": {"burn_in": 0, "ramp": 0, "teacher_init": 0}}
    return resolve_config(settings | overrides)


# ---- the helper ------------------------------------------------------------------------------------------------


def test_to_float32_casts_16_bit_tensors_through_containers_and_leaves_the_rest():
    out = DenseOutput(cls_logits=[torch.ones(1, 2, 3, dtype=BF16)], box_reg=[torch.ones(1, 2, 4, dtype=torch.float16)],
                      quality=None, anchors=[torch.zeros(2, 4, dtype=torch.float64)], strides=[8], shapes=[(1, 2)],
                      num_anchors_per_location=1)
    rows = Rows(logits=torch.ones(2, 3, dtype=BF16), deltas=torch.ones(2, 4))
    cast = to_float32({"out": out, "rows": rows, "labels": torch.tensor([1]), "n": 3})
    assert isinstance(cast["out"], DenseOutput) and isinstance(cast["rows"], Rows)
    assert cast["out"].cls_logits[0].dtype == cast["out"].box_reg[0].dtype == torch.float32
    assert cast["out"].anchors[0].dtype == torch.float64 and cast["labels"].dtype == torch.int64
    assert cast["rows"].logits.dtype == torch.float32 and cast["rows"].deltas is rows.deltas
    # Nothing to cast: the very same objects, no copy (and a config dataclass is never rebuilt).
    plain = {"rows": Rows(logits=torch.ones(2, 3), deltas=torch.ones(2, 4)), "cfg": SEDConfig()}
    assert to_float32(plain) is plain


def test_in_float32_turns_autocast_off_inside():
    @in_float32
    def matmul(a, b):
        return a @ b

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with mixed_precision("cpu", "bf16"):
        assert (a @ b).dtype == BF16  # autocast is on ...
        assert matmul(a, b).dtype == torch.float32  # ... but not inside
        assert torch.is_autocast_enabled("cpu")  # and on again after
    assert torch.equal(matmul(a, b), a @ b)


# ---- every loss and fused op: float32 under autocast, the same numbers as float32 on the upcast inputs -------


def _boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 50
    return torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=generator) * 40], dim=1)  # (n, 4) xyxy


def _cases():
    g = torch.Generator().manual_seed(0)
    logits, soft = torch.randn(300, 6, generator=g) * 3, torch.rand(300, 6, generator=g)
    hard = (torch.rand(300, 6, generator=g) > 0.9).float()
    deltas, target = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    boxes = _boxes(20, g)
    jittered = boxes + torch.randn(3, 20, 4, generator=g)  # (T, N, 4)
    refined = torch.randn(3, 20, 6, 4, generator=g) * 0.1  # (T, N, C, 4)
    labels = torch.randint(0, 6, (20,), generator=g)
    distances = torch.rand(40, 4, generator=g) + 0.5
    anchors = torch.cat([torch.zeros(40, 2), torch.full((40, 2), 8.0)], dim=1)
    big, small = (Rows(logits=torch.randn(100, 6, generator=g), deltas=torch.randn(100, 4, generator=g),
                       quality=torch.randn(100, 1, generator=g)) for _ in range(2))
    return {
        "sigmoid_focal_loss": (lambda x, y: sigmoid_focal_loss(x, y, reduction="sum"), (logits, hard)),
        "quality_focal_loss": (lambda x, y: quality_focal_loss(x, y, reduction="sum"), (logits, soft)),
        "smooth_l1_loss": (lambda x, y: smooth_l1_loss(x, y, beta=1 / 9, reduction="sum"), (deltas, target)),
        "l1_loss": (lambda x, y: l1_loss(x, y, reduction="sum"), (deltas, target)),
        "ghm_kl sigmoid": (lambda s, t: ghm_kl(s, t, mode="sigmoid"), (logits, soft.logit())),
        "ghm_kl softmax": (lambda s, t: ghm_kl(s, t, mode="softmax"), (logits, soft.logit())),
        "frs_qfl": (lambda s, t: frs_qfl(s, t, ratio=0.05).loss, (logits, soft.logit())),
        "frs_topk_mask fg": (lambda t: frs_topk_mask(t, ratio=0.05).fg, (logits,)),
        "jitter_boxes": (lambda b: jitter_boxes(b, times=4, scale=0.06, generator=torch.Generator().manual_seed(1)),
                         (boxes,)),
        "refine_stats": (lambda d, j: refine_stats(d, j, labels).uncertainty, (refined, jittered)),
        "Dense Teacher box_consistency": (lambda s, t: box_consistency(s, t, anchors=anchors, coder=LinearBoxCoder(
            normalize_by_size=True), loss="giou"), (distances, distances.flip(0))),
        "Dense Teacher quality_consistency": (quality_consistency, (logits[:, 0], soft[:, 0].logit())),
        "SED scale_consistency": (lambda b, s: sum(scale_consistency(b, s, mode="sigmoid", cfg=SEDConfig())),
                                  (big, small)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_losses_and_fused_ops_run_in_float32_under_autocast(name):
    fn, inputs = _cases()[name]
    low = [Rows(*(t.to(BF16) for t in x)) if isinstance(x, Rows) else x.to(BF16) for x in inputs]
    leaf = (low[0].logits if isinstance(low[0], Rows) else low[0]).requires_grad_()  # the first input's (logits)
    with mixed_precision("cpu", "bf16"):
        result = fn(*low)
    assert result.dtype == torch.float32, name
    expected = fn(*to_float32(low))  # float32 on the same (bfloat16-rounded) values, without autocast
    assert torch.equal(result, expected), name
    if result.requires_grad:  # the gradient comes back into the bfloat16 input
        result.sum().backward()
        assert leaf.grad is not None and leaf.grad.dtype == BF16 and torch.isfinite(leaf.grad.float()).all()


@pytest.mark.parametrize("name", ["fcos", "retinanet", "faster_rcnn"])
def test_postprocessors_score_in_float32_under_autocast(name):
    torch.manual_seed(0)
    kwargs = dict(num_convs=1) if name != "faster_rcnn" else dict(representation_size=32, rpn_post_nms_test=50)
    if name != "fcos":
        kwargs |= dict(anchor_sizes=[8, 16, 32, 64, 128])
    detector = detectors.build_detector(name, num_classes=3, backbone="resnet18", fpn_channels=32, **kwargs)
    detector.model.eval()
    images, sizes = torch.rand(2, 3, 96, 96), torch.tensor([[96, 96], [96, 80]])
    with mixed_precision("cpu", "bf16"):
        detections = detectors.predict(detector, images, sizes)
        if name != "faster_rcnn":
            assert detector.model(images, sizes).cls_logits[0].dtype == BF16  # the network runs in bfloat16
    assert detections[0]["boxes"].dtype == detections[0]["scores"].dtype == torch.float32


def test_amp_values_are_checked():
    with pytest.raises(ValueError, match="amp"):
        resolve_config({"amp": "int8"})
    with pytest.raises(ValueError, match="amp"):
        mixed_precision("cpu", "fp8")


# ---- training ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dense_teacher", "soft_teacher"])
def test_a_bfloat16_run_trains_with_finite_float32_losses(method, builtin_dir, tmp_path, monkeypatch):
    conv_dtypes, loss_dtypes = set(), set()
    build, total = train.detectors.build_detector, train.weighted_total

    def spy_build(*args, **kwargs):  # records the output dtype of every convolution of the student
        detector = build(*args, **kwargs)
        for module in detector.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: conv_dtypes.add(out.dtype))
        return detector

    def spy_total(losses, weights):
        loss_dtypes.update(value.dtype for value in losses.values())
        return total(losses, weights)

    monkeypatch.setattr(train.detectors, "build_detector", spy_build)
    monkeypatch.setattr(train, "weighted_total", spy_total)
    train.train(tiny_config(builtin_dir, tmp_path, method))

    assert BF16 in conv_dtypes  # training ran under autocast (evaluation runs in float32)
    assert loss_dtypes == {torch.float32}
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for record in records:
        terms = {k: v for k, v in record.items() if k.startswith(("sup_", "unsup_"))}
        assert any(k.startswith("unsup_") for k in terms), record
        assert all(isinstance(v, float) and abs(v) < 1e4 for v in terms.values()), record
        assert isinstance(record["grad_norm"], float)  # "inf" / "nan" would be strings
    assert load_checkpoint(last_checkpoint(tmp_path))["scaler"] is None  # bfloat16 needs no loss scaling


def test_a_resumed_float16_run_continues_with_the_checkpoints_loss_scale(builtin_dir, tmp_path):
    # float16 on the CPU (slow, but it runs): GradScaler("cpu") scales the loss; its state is in the checkpoint.
    make = lambda **kw: tiny_config(builtin_dir, tmp_path, "supervised", amp="fp16", checkpoint_period=1, **kw)
    train.train(make(max_iter=1))
    path = last_checkpoint(tmp_path)
    state = load_checkpoint(path)
    assert state["scaler"]["scale"] == read_metrics(tmp_path / "metrics.jsonl")[0]["loss_scale"]
    state["scaler"]["scale"] = 1024.0  # a scale the run could have reached after a few overflows
    atomic_save(state, path)

    train.train(make(max_iter=2, resume=True))
    second = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    assert second["iteration"] == 2 and second["loss_scale"] in (1024.0, 512.0)  # not a fresh 65536
    assert load_checkpoint(last_checkpoint(tmp_path))["scaler"]["scale"] == second["loss_scale"]
