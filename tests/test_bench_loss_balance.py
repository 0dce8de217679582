"""bench/loss_balance.py: gradient norms per term and parameter group, from a tiny SED run's checkpoint."""

import pytest
import torch

import train
from bench import loss_balance
from engine.checkpoint import last_checkpoint, load_checkpoint
from engine.config import builtin_preset, resolve_config

SPEC = dict(num_train=16, num_val=4, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_norms_per_group_and_in_all(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)).to(dtype)
    groups = loss_balance.parameter_groups(model)
    assert list(groups) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    first = model[0].weight
    value = (first ** 2).sum() + 3 * model[1].bias.sum()  # d/dW = 2W, d/db = 3
    norms = loss_balance.gradient_norms(value, groups)
    assert norms["0.weight"] == pytest.approx(2 * first.norm().item())
    assert norms["1.bias"] == pytest.approx(3.0)
    assert norms["0.bias"] == 0.0 and norms["1.weight"] == 0.0  # unused: no gradient
    assert norms["all"] == pytest.approx((4 * first.norm().item() ** 2 + 9) ** 0.5)


def run_table(checkpoint, capsys, *extra) -> dict[str, dict[str, float]]:
    """{term: {parameter group or "all": gradient norm}} from the printed table."""
    capsys.readouterr()
    loss_balance.main([str(checkpoint), "--batches", "1", *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("term"))
    columns = lines[header].split()[1:]
    return {line.split()[0]: dict(zip(columns, map(float, line.split()[1:]))) for line in lines[header + 1:]
            if not line.startswith(("sup (", "unsup ("))}


def test_sed_terms_scale_with_their_lambda(builtin_dir, tmp_path, capsys):
    cfg = resolve_config(dict(method="sed", detector="fcos", builtin_dir=str(builtin_dir), backbone_pretrain="", builtin_spec=SPEC,
                              output_dir=str(tmp_path), percent=50.0, train_sizes=[64], train_max_size=64,
                              test_size=64, test_max_size=64, fpn_channels=32, head_convs=1, labeled_batch=2,
                              unlabeled_batch=2, lr=0.01, warmup_iters=1, milestones=[0.5], max_iter=2,
                              eval_period=1000, checkpoint_period=1000, log_period=1, threads=1, seed=0,
                              method_args={"burn_in": 1, "ramp": 0, "lambda_scale": 1.0, "lambda_distill": 1.0}))
    train.train(cfg)
    checkpoint = last_checkpoint(tmp_path)
    full = run_table(checkpoint, capsys)
    assert {"sup_loss_cls", "unsup_loss_scale_cls", "unsup_loss_distill_box"} <= set(full)
    box = full["unsup_loss_scale_box"]  # the box branch and the backbone, not the classification branch
    assert box["backbone.body"] > 0 and box["head.box_reg"] > 0 and box["head.cls_logits"] == 0
    half = run_table(checkpoint, capsys, "--method-args", "lambda_scale=0.5")
    # The same batches: the scale terms pull half as hard, the distillation and the supervised terms as before.
    for term, factor in (("unsup_loss_scale_cls", 0.5), ("unsup_loss_distill_cls", 1.0), ("sup_loss_cls", 1.0)):
        for group, norm in full[term].items():
            assert half[term][group] == pytest.approx(factor * norm, rel=1e-3, abs=1e-6), (term, group)


def test_a_supervised_checkpoint_needs_a_method_and_gets_the_student_as_teacher(builtin_dir, tmp_path, capsys):
    cfg = resolve_config(dict(method="supervised", detector="fcos", builtin_dir=str(builtin_dir), backbone_pretrain="", builtin_spec=SPEC,
                              output_dir=str(tmp_path), percent=50.0, train_sizes=[64], train_max_size=64,
                              test_size=64, test_max_size=64, fpn_channels=32, head_convs=1, labeled_batch=2,
                              max_iter=1, eval_period=1000, checkpoint_period=1000, threads=1))
    train.train(cfg)
    checkpoint = last_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="--method"):
        loss_balance.main([str(checkpoint)])

    # By hand, what --method sed must do: the SED preset's settings for this detector, the student as teacher.
    state = load_checkpoint(checkpoint)
    preset = builtin_preset("sed", "fcos", cfg.max_iter)
    config = state["config"] | {"method": "sed", "method_args": preset.method_args,
                                "unlabeled_batch": preset.unlabeled_batch}
    converted = tmp_path / "as_sed.pth"
    torch.save(state | {"config": config, "teacher": state["model"]}, converted)

    bench = run_table(checkpoint, capsys, "--method", "sed")
    by_hand = run_table(converted, capsys)
    assert bench["unsup_loss_scale_cls"]["all"] > 0 and bench["unsup_loss_distill_box"]["all"] > 0
    assert set(bench) == set(by_hand)
    for term, row in bench.items():
        for group, norm in row.items():
            assert by_hand[term][group] == pytest.approx(norm, rel=1e-4, abs=1e-7), (term, group)
    with pytest.raises(SystemExit, match="not dense_teacher"):  # a method's checkpoint read as another method
        loss_balance.main([str(converted), "--method", "dense_teacher"])


def test_a_checkpoint_before_the_teachers_start_gets_the_student_as_teacher(builtin_dir, tmp_path, capsys):
    # Dense Teacher copies the student into the teacher at iteration teacher_init, after the checkpoint of that
    # iteration was written: the bench must do the same, or it measures an untrained teacher's targets.
    cfg = resolve_config(dict(method="dense_teacher", detector="fcos", builtin_dir=str(builtin_dir), backbone_pretrain="",
                              builtin_spec=SPEC, output_dir=str(tmp_path), percent=50.0, train_sizes=[64],
                              train_max_size=64, test_size=64, test_max_size=64, fpn_channels=32, head_convs=1,
                              labeled_batch=2, unlabeled_batch=2, lr=0.01, warmup_iters=1, milestones=[0.5],
                              max_iter=2, eval_period=1000, checkpoint_period=1000, log_period=1, threads=1,
                              seed=0, method_args={"teacher_init": 2, "burn_in": 0, "ramp": 0, "ratio": 0.5}))
    train.train(cfg)
    checkpoint = last_checkpoint(tmp_path)
    state = load_checkpoint(checkpoint)
    assert state["iteration"] == 2
    copied = tmp_path / "teacher_copied.pth"
    torch.save(state | {"teacher": state["model"]}, copied)

    bench_copy = run_table(checkpoint, capsys)  # iteration 2 <= teacher_init 2: the bench copies
    by_hand = run_table(copied, capsys, "--method-args", "teacher_init=0")  # the copy made by hand
    untrained = run_table(checkpoint, capsys, "--method-args", "teacher_init=0")  # the checkpoint's own teacher
    for group, norm in bench_copy["unsup_loss_cls"].items():
        assert by_hand["unsup_loss_cls"][group] == pytest.approx(norm, rel=1e-4, abs=1e-7), group
    assert untrained["unsup_loss_cls"]["all"] != pytest.approx(bench_copy["unsup_loss_cls"]["all"], rel=1e-3)
