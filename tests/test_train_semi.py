"""train.py with the semi-supervised methods: the loop wiring on a tiny built-in dataset (CPU, 2-4 iterations).

Covered: every method's unsupervised terms reach the total with the method's weights; burn-in skips them;
the teacher follows the student by EMA, is saved in the checkpoint and evaluated next to the student; a
resumed semi-supervised run (teacher, RNG draws of the method) ends exactly where an uninterrupted one does.
"""

import copy

import pytest
import torch

import detectors
import train
from engine.checkpoint import last_checkpoint, load_checkpoint
from engine.config import build_method, detector_kwargs, resolve_config
from engine.logger import read_metrics
from semi.ema import EMATeacher
from structures import Batch, UnlabeledBatch

SPEC = dict(num_train=16, num_val=4, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)
PAPER_DETECTOR = {"soft_teacher": "faster_rcnn", "dense_teacher": "fcos", "sed": "fcos"}
TINY_FASTER_RCNN = dict(box_head_dim=32, rpn_pre_nms_train=100, rpn_pre_nms_test=100, rpn_post_nms_train=50,
                        rpn_post_nms_test=50, roi_batch_size=32)




def tiny_semi_config(builtin_dir, output_dir, method, **overrides):
    settings = dict(method=method, detector=PAPER_DETECTOR[method], builtin_dir=str(builtin_dir), backbone_pretrain="", builtin_spec=SPEC,
                    output_dir=str(output_dir), percent=50.0, train_sizes=[64], train_max_size=64, test_size=64,
                    test_max_size=64, fpn_channels=32, head_convs=1, labeled_batch=2, unlabeled_batch=2, lr=0.01,
                    warmup_iters=1, milestones=[0.5], max_iter=3, eval_period=1000, checkpoint_period=1000,
                    log_period=1, threads=1, seed=0)
    if method == "soft_teacher":
        settings |= TINY_FASTER_RCNN | {"method_args": {"jitter_times": 2, "burn_in": 0, "ramp": 0}}  # unsup from step 0
    if method == "dense_teacher":  # burn-in for iteration 0, teacher copied at 1, full weight from 2
        settings |= {"method_args": {"burn_in": 1, "ramp": 1, "teacher_init": 1, "report_pseudo_boxes": True}}
    if method == "sed":  # the paper's schedule: the unsupervised loss from the first iteration
        settings |= {"method_args": {"burn_in": 0, "ramp": 0}}
    return resolve_config(settings | overrides)


@pytest.mark.parametrize("method", ["soft_teacher", "dense_teacher", "sed"])
def test_semi_run_trains_student_and_teacher(method, builtin_dir, tmp_path):
    results = train.train(tiny_semi_config(builtin_dir, tmp_path, method, draw_period=1))
    assert set(results) == {"student", "teacher"}
    # Every iteration that computed pseudo-boxes drew them (weak view and strong view) to a PNG.
    drawn = sorted(p.name for p in (tmp_path / "pseudo_labels").glob("*.png"))
    with_pseudo = [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl") if "pseudo_precision" in r]
    assert with_pseudo and drawn == [f"{i:07d}.png" for i in with_pseudo]

    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    last = records[-1]
    unsup = [key for key in last if key.startswith("unsup_")]
    assert unsup, last
    for key in unsup:  # every unsupervised term comes with its weight, and the total is their weighted sum
        assert f"w_{key}" in last
    total = sum(last[f"w_{key}"] * last[key] for key in last if key.startswith(("sup_", "unsup_")))
    assert last["loss"] == pytest.approx(total, rel=1e-5)
    if method == "dense_teacher":  # burn-in: the first iteration is supervised only
        assert not any(key.startswith("unsup_") for key in records[0])

    state = load_checkpoint(last_checkpoint(tmp_path))
    assert state["teacher"] is not None
    differs = [not torch.equal(state["teacher"][k], v) for k, v in state["model"].items() if v.is_floating_point()]
    assert any(differs)  # an EMA of the student, not the student itself
    assert [r["eval"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval" in r] == ["student", "teacher"]


def test_semi_resume_matches_an_uninterrupted_run(builtin_dir, tmp_path, monkeypatch):
    make = lambda run_dir, **kw: tiny_semi_config(builtin_dir, run_dir, "sed", max_iter=4, checkpoint_period=2, **kw)
    train.train(make(tmp_path / "a"))

    calls = {"n": 0}
    real = train.detectors.supervised_losses

    def crash_in_iteration_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args)

    monkeypatch.setattr(train.detectors, "supervised_losses", crash_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        train.train(make(tmp_path / "b"))
    monkeypatch.setattr(train.detectors, "supervised_losses", real)
    train.train(make(tmp_path / "b", resume=True))

    final_a, final_b = (load_checkpoint(last_checkpoint(tmp_path / run)) for run in ("a", "b"))
    for part in ("model", "teacher"):
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)
    losses = lambda run: [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
    assert losses("a") == losses("b")


def labeled_pair(batch_size: int, size: int, generator: torch.Generator):
    """A labeled batch and its pixel-aligned strong view: the same boxes, other pixels."""
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([0, 3]), "crowd": torch.zeros(0, 4)} for _ in range(batch_size)]
    weak = torch.rand(batch_size, 3, size, size, generator=generator)
    strong = (1 - weak) * 0.5  # another image distribution: what the running statistics must not see

    def batch(images):
        return Batch(images=images, image_sizes=torch.tensor([[size, size]] * batch_size), targets=targets,
                     matrices=torch.eye(3, dtype=torch.float64).expand(batch_size, 3, 3).clone(),
                     image_ids=list(range(batch_size)), orig_sizes=[(size, size)] * batch_size)

    return batch(weak), batch(strong)


def norm_buffers(model) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1].startswith(("running_", "num_"))]


@pytest.mark.parametrize("method", ["dense_teacher", "sed"])
@pytest.mark.parametrize("norm_stats", ["labeled", "all"])
def test_batchnorm_statistics_follow_the_labeled_weak_view(method, norm_stats):
    """norm_stats="labeled": after every forward pass of an iteration (Dense Teacher's strong labeled view, the
    unlabeled views, SED's X_hat) the student's running statistics are those the labeled weak batch alone
    gives; "all": the other passes move them too."""
    torch.manual_seed(0)
    method_args = {"burn_in": 0, "ramp": 0} | ({"teacher_init": 0} if method == "dense_teacher" else {})
    cfg = resolve_config(dict(method=method, detector="fcos", fpn_channels=32, head_convs=1, labeled_batch=2,
                              unlabeled_batch=2, norm_stats=norm_stats, method_args=method_args))
    student = detectors.build_detector("fcos", num_classes=6, **detector_kwargs(cfg))
    student.model.train()
    teacher = student._replace(model=EMATeacher(student.model).model)
    sed_or_dt = build_method(method, cfg=cfg, detector_name="fcos")
    generator = torch.Generator().manual_seed(0)
    labeled, labeled_strong = labeled_pair(2, 64, generator)
    unlabeled = UnlabeledBatch(*labeled_pair(2, 64, generator))

    reference = copy.deepcopy(student)  # the labeled weak batch alone
    detectors.supervised_losses(reference, labeled.images, labeled.image_sizes, labeled.targets)
    before = norm_buffers(student.model)
    out = train.iteration_losses(student=student, teacher=teacher, method=sed_or_dt, labeled=labeled,
                                 labeled_strong=labeled_strong if method == "dense_teacher" else None,
                                 unlabeled=unlabeled, iteration=0, norm_stats=norm_stats)
    assert any(key.startswith("unsup_") for key in out.losses)
    after, expected = norm_buffers(student.model), norm_buffers(reference.model)
    assert len(after) > 0 and not all(torch.equal(a, b) for a, b in zip(after, before))  # the labeled pass moved them
    same = all(torch.equal(a, b) for a, b in zip(after, expected))
    assert same == (norm_stats == "labeled")
