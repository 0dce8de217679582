"""train.py and evaluate.py end to end on a tiny built-in dataset with a tiny FCOS (CPU, a few iterations).

Covered: the loss goes down; a resumed run continues at the same iteration and learning rate and ends with
the very weights of an uninterrupted run; a non-finite loss stops the run naming the iteration and every
term; checkpoints of another class count or detector fail with the file named; evaluate.py rebuilds the
model from the checkpoint alone, writes COCO results and drawings.
"""

import json
import math

import pytest
import torch

import evaluate
import train
from data.synthetic import CLASS_NAMES
from engine.checkpoint import atomic_save, last_checkpoint, load_checkpoint, point_last
from engine.config import Config, resolve_config
from engine.logger import read_metrics

SPEC = dict(num_train=16, num_val=4, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)




def tiny_config(builtin_dir, output_dir, **overrides) -> Config:
    """Supervised FCOS, ResNet-18 with a 32-channel FPN and one conv per head tower, 64 px images."""
    settings = dict(builtin_dir=str(builtin_dir), backbone_pretrain="", builtin_spec=SPEC, output_dir=str(output_dir),
                    percent=50.0, train_sizes=[64], train_max_size=64, test_size=64, test_max_size=64, fpn_channels=32,
                    head_convs=1, labeled_batch=2, lr=0.01, warmup_iters=2, milestones=[0.75], max_iter=4,
                    eval_period=1000, checkpoint_period=2, log_period=1, threads=1, seed=0)
    return resolve_config(settings | overrides)


def train_losses(run_dir) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(builtin_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    results = train.train(tiny_config(builtin_dir, run_dir))
    return run_dir, results


def test_glyph_pretrained_backbone_is_taken_from_the_cache(builtin_dir, tmp_path, monkeypatch):
    """--backbone-pretrain glyphs uses the cached weights of engine.pretrain's spec (pretrained once, not here):
    the run records their path, and the student starts from them with the stem and layer1 frozen."""
    import torchvision

    from engine.pretrain import PretrainSpec, weights_path

    monkeypatch.setenv("SSOD_CACHE", str(tmp_path / "cache"))
    path = weights_path(PretrainSpec(arch="resnet18"))
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(state, path)
    run_dir = tmp_path / "run"
    train.train(tiny_config(builtin_dir, run_dir, backbone_pretrain="glyphs", max_iter=1, checkpoint_period=1))
    assert json.loads((run_dir / "config.json").read_text())["backbone_weights"] == str(path)
    model = load_checkpoint(run_dir / "last.pth")["model"]
    stem = next(v for k, v in model.items() if k.endswith("conv1.weight") and "layer" not in k)
    assert torch.equal(stem, state["conv1.weight"])  # frozen: still the cached weights after a step


def test_lr_schedule():
    cfg = Config(lr=1.0, warmup_iters=10, warmup_factor=0.001, milestones=[0.5, 0.75], max_iter=100, gamma=0.1)
    assert train.lr_factor(0, cfg=cfg) == pytest.approx(0.001)
    assert train.lr_factor(5, cfg=cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [train.lr_factor(i, cfg=cfg) for i in (10, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = Config(schedule="cosine", warmup_iters=0, max_iter=100)
    assert [train.lr_factor(i, cfg=cosine) for i in (0, 50, 100)] == pytest.approx([1, 0.5, 0])


def test_run_writes_config_metrics_checkpoints_and_evaluation(uninterrupted):
    run_dir, results = uninterrupted
    assert set(results) == {"student"} and 0.0 <= results["student"]["AP"] <= 1.0
    assert Config.from_dict(json.loads((run_dir / "config.json").read_text())).max_iter == 4
    assert last_checkpoint(run_dir).name == "checkpoint_0000004.pth"
    state = load_checkpoint(last_checkpoint(run_dir))
    assert state["iteration"] == 4 and state["teacher"] is None
    classes = len(CLASS_NAMES)
    assert state["meta"]["num_classes"] == classes and state["meta"]["category_ids"] == list(range(1, classes + 1))
    assert Config.from_dict(state["config"]) == Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["eval"] for r in records if "eval" in r] == ["student"]
    assert all(key in records[0] for key in ("sup_loss_cls", "sup_loss_box", "sup_loss_quality", "w_sup_loss_cls"))
    cfg = Config.from_dict(state["config"])  # each line logs the learning rate its iteration used
    expected = [0.01 * train.lr_factor(i, cfg=cfg) for i in range(4)]
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(expected)


def test_resume_continues_exactly_where_an_uninterrupted_run_goes(uninterrupted, builtin_dir, tmp_path, monkeypatch):
    run_a, _ = uninterrupted
    run_b = tmp_path / "run_b"

    # Crash in iteration 3 (index 2), after the checkpoint of iteration 2 was written.
    calls = {"n": 0}
    real_losses = train.detectors.supervised_losses

    def crashing_losses(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_losses(*args)

    monkeypatch.setattr(train.detectors, "supervised_losses", crashing_losses)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_config(builtin_dir, run_b))
    monkeypatch.setattr(train.detectors, "supervised_losses", real_losses)
    checkpoint = load_checkpoint(last_checkpoint(run_b))
    assert checkpoint["iteration"] == 2
    lr_at_resume = checkpoint["optimizer"]["param_groups"][0]["lr"]
    assert lr_at_resume == pytest.approx(0.01 * train.lr_factor(2, cfg=tiny_config(builtin_dir, run_b)))

    train.train(tiny_config(builtin_dir, run_b, resume=True))
    assert train_losses(run_b) == train_losses(run_a)  # the same losses at iterations 1..4, each logged once
    final_a = load_checkpoint(last_checkpoint(run_a))
    final_b = load_checkpoint(last_checkpoint(run_b))
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key
    assert final_a["optimizer"]["param_groups"][0]["lr"] == final_b["optimizer"]["param_groups"][0]["lr"]


def test_a_few_iterations_lower_the_loss(builtin_dir, tmp_path):
    cfg = tiny_config(builtin_dir, tmp_path, percent=25.0, labeled_batch=4, max_iter=20, warmup_iters=0,
                      milestones=[], lr=0.01, checkpoint_period=1000, eval_period=1000, eval_max_images=1)
    train.train(cfg)
    losses = train_losses(tmp_path)
    first, last = [losses[i] for i in (1, 2, 3)], [losses[i] for i in (18, 19, 20)]
    assert sum(last) < 0.8 * sum(first), losses


def test_non_finite_loss_names_the_iteration_and_every_term(builtin_dir, tmp_path, monkeypatch):
    real_losses = train.detectors.supervised_losses
    calls = {"n": 0}

    def exploding_losses(*args):
        losses = real_losses(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            losses["loss_box"] = losses["loss_box"] * math.inf
        return losses

    monkeypatch.setattr(train.detectors, "supervised_losses", exploding_losses)
    # The second iteration: "it 2" in the log, and "iteration 2" in the message.
    with pytest.raises(FloatingPointError, match=r"in iteration 2 \(counted from 1, as the log's 'it N'\); terms: "
                                                 r"sup_loss_cls=[0-9.]+.*sup_loss_box=inf"):
        train.train(tiny_config(builtin_dir, tmp_path))


def test_checkpoints_of_another_model_fail_naming_the_file(uninterrupted, builtin_dir, tmp_path):
    run_a, _ = uninterrupted
    state = load_checkpoint(last_checkpoint(run_a))

    # Another class count in the checkpoint's record: resuming stops before touching the weights.
    state["meta"]["num_classes"] = 3
    atomic_save(state, tmp_path / "checkpoint_0000002.pth")
    point_last(tmp_path / "checkpoint_0000002.pth")
    with pytest.raises(ValueError, match=rf"checkpoint_0000002\.pth was trained on 3 classes.*has {len(CLASS_NAMES)}"):
        train.train(tiny_config(builtin_dir, tmp_path, resume=True))

    # Weights of another class count: the error names the file and the mismatching tensor.
    state["meta"]["num_classes"] = 8
    state["model"] = {k: (v[:3] if "cls_logits" in k else v) for k, v in state["model"].items()}
    atomic_save(state, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth(.|\n)*cls_logits"):
        evaluate.main([str(tmp_path / "wrong.pth")])


def test_evaluate_rebuilds_from_the_checkpoint_alone(uninterrupted, tmp_path):
    run_a, results = uninterrupted
    checkpoint = run_a / "last.pth"  # the link train.py prints
    metrics = evaluate.main([str(checkpoint), "--out", str(tmp_path / "results.json"), "--vis", "2",
                             "--vis-dir", str(tmp_path / "vis")])
    assert metrics["AP"] == pytest.approx(results["student"]["AP"])  # the same model, the same numbers
    detections = json.loads((tmp_path / "results.json").read_text())
    assert all(1 <= d["category_id"] <= len(CLASS_NAMES) and len(d["bbox"]) == 4 for d in detections)
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2
    with pytest.raises(ValueError, match="no teacher"):
        evaluate.main([str(checkpoint), "--which", "teacher"])
