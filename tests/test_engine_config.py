"""engine/config.py: presets, command-line overrides, plain-value round trips."""

import json

import pytest
import torch

from engine.config import PAPER_DETECTOR, Config, parse_config


def test_builtin_preset_is_default_and_paper_detector_follows_method():
    cfg = parse_config([])
    assert cfg.dataset == "builtin" and cfg.method == "supervised"
    assert cfg.backbone == "resnet18" and cfg.fpn_channels == 64 and cfg.test_size == 128
    assert cfg.unlabeled_batch == 0
    for method, detector in PAPER_DETECTOR.items():
        semi = parse_config(["--method", method])
        assert semi.detector == detector
        assert (semi.unlabeled_batch >= 1) == (method != "supervised")


def test_builtin_schedules_scale_with_max_iter():
    # The main job is the benchmark's schedule; the methods' burn-in, ramp and teacher start are fractions of the
    # run, so that any --max-iter scales them.
    from engine.config import BENCHMARK_ITERATIONS, BUILTIN_ITERATIONS

    assert BUILTIN_ITERATIONS == BENCHMARK_ITERATIONS == 1200
    main = parse_config(["--method", "soft_teacher"])
    assert main.max_iter == BUILTIN_ITERATIONS and main.backbone_pretrain == "glyphs"
    assert main.method_args["burn_in"] == round(BUILTIN_ITERATIONS / 4)
    long = parse_config(["--method", "soft_teacher", "--max-iter", "2000"])
    assert (long.method_args["burn_in"], long.method_args["ramp"]) == (500, 100)
    dense = parse_config(["--method", "dense_teacher", "--max-iter", "2000"]).method_args
    assert (dense["teacher_init"], dense["burn_in"], dense["ramp"]) == (1000, 1000, 100)  # half the run
    # A setting given on the command line wins over the scaled one.
    mine = parse_config(["--method", "soft_teacher", "--max-iter", "2000", "--method-args", "burn_in=10"])
    assert mine.method_args["burn_in"] == 10 and mine.method_args["ramp"] == 100


def test_data_root_switches_to_coco_preset():
    cfg = parse_config(["--data-root", "/data/coco", "--method", "soft_teacher"])
    assert cfg.dataset == "coco" and cfg.backbone == "resnet50" and cfg.max_iter == 180_000
    assert cfg.milestone_iters() == [120_000, 160_000]
    assert (cfg.labeled_batch, cfg.unlabeled_batch, cfg.warmup_iters) == (8, 32, 500)
    assert min(cfg.train_sizes) == 400 and max(cfg.train_sizes) == 1200 and cfg.test_size == 800
    dense = parse_config(["--data-root", "/data/coco", "--method", "dense_teacher"])
    assert (dense.labeled_batch, dense.unlabeled_batch, dense.warmup_iters) == (16, 16, 1000)
    assert dense.milestone_iters() == []


def test_every_kind_of_flag_overrides_the_preset():
    cfg = parse_config(["--max-iter", "30", "--lr", "0.5", "--train-sizes", "64", "96", "--detector", "retinanet",
                        "--milestones", "--no-resume", "--resume", "--method-args", "unsup_weight=2",
                        "jitter_times=5", "name=abc", "flag=false", "--output-dir", "somewhere"])
    assert cfg.max_iter == 30 and cfg.lr == 0.5 and cfg.train_sizes == [64, 96]
    assert cfg.detector == "retinanet" and cfg.milestones == [] and cfg.resume is True
    assert cfg.method_args == {"unsup_weight": 2, "jitter_times": 5, "name": "abc", "flag": False}
    assert cfg.output_dir == "somewhere"
    assert parse_config([]).output_dir == "runs/supervised_fcos_10pct"
    assert parse_config(["--method", "soft_teacher"]).output_dir == "runs/soft_teacher_faster_rcnn_10pct"  # README
    coco = parse_config(["--data-root", "/c", "--fold", "2", "--percent", "1"])
    assert coco.output_dir == "runs/coco_supervised_fcos_1pct_fold2"


@pytest.mark.parametrize("argv, message", [
    (["--method", "mean_teacher"], "method"),
    (["--detector", "yolo"], "detector"),
    (["--percent", "0"], "percent"),
    (["--dataset", "custom"], "custom"),
    (["--method", "sed", "--unlabeled-batch", "0"], "--unlabeled-batch must be >= 1"),
    (["--milestones", "2"], "--milestones"),
    (["--eval-period", "0"], r"--eval-period must be >= 1.*got 0"),
    (["--checkpoint-period", "0"], "--checkpoint-period must be >= 1"),
    (["--log-period", "-1"], "--log-period must be >= 1"),
    (["--fold", "0"], r"--fold must be 1\.\.5, got 0"),
    (["--fold", "6"], r"--fold must be 1\.\.5, got 6"),
    (["--split-file", "s.json", "--fold", "-1"], r"--fold must be >= 0"),
    (["--resume", "--overwrite"], "--overwrite deletes the run that --resume would continue"),
])
def test_bad_settings_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_dict_flags_update_the_presets_entries_key_by_key(capsys):
    preset = parse_config(["--method", "soft_teacher"]).method_args
    assert parse_config(["--method", "soft_teacher", "--method-args"]).method_args == preset
    changed = parse_config(["--method", "soft_teacher", "--method-args", "soft_background=false"]).method_args
    assert changed == preset | {"soft_background": False}
    assert parse_config(["--builtin-spec", "num_train=20"]).builtin_spec == {"num_train": 20}
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "share of the training images that keep their labels" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "share of the training images that keep their labels" in capsys.readouterr().out


def test_bad_flag_value_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse_config(["--max-iter", "many"])


def test_round_trip_through_json_and_weights_only_load(tmp_path):
    cfg = parse_config(["--method", "dense_teacher", "--method-args", "burn_in=7", "--seed", "3"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(json.loads(cfg.save(tmp_path / "config.json").read_text())) == cfg
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)["config"]
    assert Config.from_dict(loaded) == cfg


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown settings.*bogus"):
        Config.from_dict({**Config().to_dict(), "bogus": 1})
