"""bench/benchmark.py: rows over seeds, mean +- std, the gap closed, the 2-std rule, and what train.py quotes."""

import json
import math

import pytest

from bench import benchmark
from engine import config as config_module
from engine import results as results_module
from engine.config import parse_config
from tests.test_bench_compare import finished_run

MAX_ITER = 40


def fill(out, name, aps, teacher=None, max_iter=MAX_ITER, flags=()):
    """Finished runs of row `name`, one per AP, each with the config.json its command line (and `flags`) makes."""
    argv = benchmark.rows(10.0, max_iter, ablations=True)[name]
    for seed, ap in enumerate(aps):
        config = parse_config([*argv, *flags, "--seed", str(seed)]).to_dict()
        finished_run(out / name / f"seed{seed}", max_iter=max_iter, student_ap=ap,
                     teacher_ap=None if teacher is None else teacher[seed], config=config)


def test_every_row_is_listed_with_its_seed_and_the_methods_schedule(capsys):
    benchmark.main(["--list", "--max-iter", str(MAX_ITER), "--seeds", "2"])
    lines = capsys.readouterr().out.splitlines()
    names = {line.split(":")[0] for line in lines}
    for detector in ("faster_rcnn", "fcos", "retinanet"):
        assert f"supervised_{detector}_10pct/seed1" in names and f"supervised_{detector}_100pct/seed0" in names
    assert {"soft_teacher_faster_rcnn/seed0", "dense_teacher_fcos/seed0", "dense_teacher_retinanet/seed0",
            "sed_faster_rcnn/seed0", "sed_fcos/seed0", "sed_retinanet/seed0"} <= names
    assert len(lines) == 2 * (6 + 6)  # 6 supervised rows and 6 method rows, two seeds each
    sup = next(line for line in lines if line.startswith("supervised_faster_rcnn_10pct/seed1"))
    assert "--seed 1" in sup and "--milestones" in sup and f"--max-iter {MAX_ITER}" in sup


def test_ablations_and_dataset_seed_reach_the_command_lines(capsys):
    benchmark.main(["--list", "--ablations", "--rows", "soft_teacher", "--dataset-seed", "3", "--seeds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert any("no_bg_weighting" in line and "soft_background=false" in line for line in lines)
    assert all("--builtin-spec seed=3" in line for line in lines)


def test_table_reports_mean_std_gap_and_the_two_std_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_all", lambda *a, **k: pytest.fail("--report-only ran something"))
    out, doc = tmp_path / "runs", tmp_path / "docs" / "RESULTS"
    fill(out, "supervised_faster_rcnn_10pct", [0.30, 0.32, 0.34])
    fill(out, "supervised_faster_rcnn_100pct", [0.50, 0.50, 0.50])
    fill(out, "soft_teacher_faster_rcnn", [0.38, 0.40, 0.42], teacher=[0.40, 0.42, 0.44])
    benchmark.main(["--report-only", "--rows", "faster_rcnn", "--max-iter", str(MAX_ITER), "--out", str(out),
                    "--doc", str(doc)])
    table = json.loads(doc.with_suffix(".json").read_text())
    rows = table["rows"]
    sup = rows["supervised_faster_rcnn_10pct"]
    assert sup["student_mean"] == pytest.approx(32.0) and sup["student_std"] == pytest.approx(2.0)
    st = rows["soft_teacher_faster_rcnn"]
    assert st["teacher_mean"] == pytest.approx(42.0) and st["teacher_gain"] == pytest.approx(10.0)
    assert st["teacher_gap_closed"] == pytest.approx(10 / 18)
    assert st["teacher_significant"] is True  # 10 > 2 * 2
    assert "sed_faster_rcnn" in rows and not rows["sed_faster_rcnn"]["seeds"]  # listed, not run
    text = doc.with_suffix(".md").read_text()
    assert "42.0 ± 2.0" in text and "+10.0 (counts)" in text and "56%" in text
    assert "Incomplete: 1 of 4 rows have fewer than 3 seeds" in text  # the SED row has not run


def method_against_supervised(tmp_path, detector: str, method: str, supervised: list, aps: list):
    """Report a method's row (teacher = student = `aps`) against a supervised row at 10%, with no 100% row
    -> (the method's row of RESULTS.json, the text of RESULTS.md)."""
    out, doc = tmp_path / "runs", tmp_path / "RESULTS"
    fill(out, f"supervised_{detector}_10pct", supervised)
    fill(out, f"{method}_{detector}", aps, teacher=aps)
    benchmark.main(["--report-only", "--rows", detector, "--max-iter", str(MAX_ITER), "--out", str(out),
                    "--doc", str(doc)])
    return json.loads(doc.with_suffix(".json").read_text())["rows"][f"{method}_{detector}"], \
        doc.with_suffix(".md").read_text()


def test_a_gain_within_twice_the_pooled_std_does_not_count(tmp_path):
    row, text = method_against_supervised(tmp_path, "fcos", "dense_teacher", [0.30, 0.34, 0.38], [0.33, 0.37, 0.41])
    assert row["teacher_gain"] == pytest.approx(3.0) and row["teacher_significant"] is False
    assert "teacher_gap_closed" not in row  # no 100% run: no gap
    assert row["teacher_worse"] is False and "+3.0 (within noise)" in text


def test_a_loss_beyond_twice_the_pooled_std_is_named_as_one(tmp_path):
    row, text = method_against_supervised(tmp_path, "faster_rcnn", "sed", [0.11, 0.12, 0.13], [0.08, 0.09, 0.10])
    assert row["teacher_gain"] == pytest.approx(-3.0) and row["teacher_significant"] is False
    assert row["teacher_worse"] is True  # -3 < -2 * 1
    assert "-3.0 (below supervised, beyond noise)" in text


def test_an_ablation_is_reported_against_its_full_method(tmp_path):
    out, doc = tmp_path / "runs", tmp_path / "RESULTS"
    fill(out, "supervised_faster_rcnn_10pct", [0.30, 0.31, 0.32])
    fill(out, "supervised_faster_rcnn_100pct", [0.50, 0.50, 0.50])
    fill(out, "soft_teacher_faster_rcnn", [0.38, 0.40, 0.42], teacher=[0.40, 0.41, 0.42])
    fill(out, "soft_teacher_faster_rcnn_no_bg_weighting", [0.33, 0.34, 0.35], teacher=[0.34, 0.35, 0.36])
    fill(out, "soft_teacher_faster_rcnn_no_box_jitter", [0.38, 0.40, 0.42], teacher=[0.39, 0.41, 0.43])
    benchmark.main(["--report-only", "--ablations", "--rows", "faster_rcnn", "--max-iter", str(MAX_ITER),
                    "--out", str(out), "--doc", str(doc)])
    rows = json.loads(doc.with_suffix(".json").read_text())["rows"]
    bg, jitter = rows["soft_teacher_faster_rcnn_no_bg_weighting"], rows["soft_teacher_faster_rcnn_no_box_jitter"]
    assert bg["ablation_of"] == jitter["ablation_of"] == "soft_teacher_faster_rcnn"
    assert bg["ablation_change"] == pytest.approx(-6.0) and bg["ablation_counts"] is True  # 2 x pooled 1.0 = 2.0
    assert jitter["ablation_change"] == pytest.approx(0.0) and jitter["ablation_counts"] is False
    assert "ablation_of" not in rows["soft_teacher_faster_rcnn"]
    assert "ablation_of" not in rows["supervised_faster_rcnn_10pct"]
    text = doc.with_suffix(".md").read_text()
    assert "| soft_teacher_faster_rcnn_no_bg_weighting | soft_teacher_faster_rcnn | 3 | 35.0 ± 1.0 | 41.0 ± 1.0 | " \
           "-6.0 (counts) |" in text
    assert "+0.0 (within noise)" in text


def results_table(path, max_iter: int = 800, *, argv: bool = True):
    """A RESULTS.json at `path` as bench/benchmark.py writes it: three Faster R-CNN rows with their `argv`."""
    commands = benchmark.rows(10.0, max_iter, ablations=False)
    means = {"supervised_faster_rcnn_10pct": ("student", 30.0, 1.5),
             "supervised_faster_rcnn_100pct": ("student", 50.0, 0.5),
             "soft_teacher_faster_rcnn": ("teacher", 40.0, 1.0)}
    rows = {}
    for name, (model, mean, std) in means.items():
        command = commands[name]
        rows[name] = {"method": command[command.index("--method") + 1],
                      "detector": command[command.index("--detector") + 1],
                      "percent": float(command[command.index("--percent") + 1]), "seeds": [0, 1, 2],
                      f"{model}_mean": mean, f"{model}_std": std} | ({"argv": command} if argv else {})
    path.write_text(json.dumps({"percent": 10.0, "max_iter": max_iter, "dataset_seed": 0, "rows": rows}))
    return path


def quoted(argv: list[str], path) -> set[str]:
    return set(results_module.baseline_for(parse_config(argv), path))


def test_train_quotes_the_baseline_of_the_same_preset_only(tmp_path):
    path = results_table(tmp_path / "RESULTS.json")
    cfg = parse_config(["--method", "soft_teacher", "--max-iter", "800"])
    found = results_module.baseline_for(cfg, path)
    assert found["supervised"].mean == 30.0 and found["full"].mean == 50.0 and found["method"].mean == 40.0
    assert results_module.format_reference(found["supervised"]) == "30.0 ± 1.5 AP over 3 seed(s)"
    # Another schedule, fraction or drawing of the data is not comparable.
    assert results_module.baseline_for(parse_config(["--method", "soft_teacher", "--max-iter", "400"]), path) == {}
    assert results_module.baseline_for(parse_config(["--method", "soft_teacher", "--max-iter", "800",
                                                     "--percent", "5"]), path) == {}
    assert results_module.baseline_for(parse_config(["--method", "soft_teacher", "--max-iter", "800",
                                                     "--builtin-spec", "seed=2"]), path) == {}
    assert results_module.baseline_for(cfg, tmp_path / "missing.json") == {}
    one_seed = results_module.Reference("x", 30.0, math.nan, 1)
    assert results_module.format_reference(one_seed) == "30.0 AP over 1 seed(s)"


def test_train_quotes_a_row_only_for_the_same_recipe(tmp_path):
    path = results_table(tmp_path / "RESULTS.json")
    method = ["--method", "soft_teacher", "--max-iter", "800"]
    # Another learning rate changes every row's recipe, and the reason names the first differing setting.
    assert quoted([*method, "--lr", "0.05"], path) == set()
    table = results_module.table_references(parse_config([*method, "--lr", "0.05"]), path)
    assert "lr: 0.05 vs 0.02" in table.not_quoted["supervised"] and "lr: 0.05 vs 0.02" in table.not_quoted["method"]
    assert quoted([*method, "--labeled-batch", "4"], path) == set()
    assert quoted([*method, "--train-sizes", "128"], path) == set()
    # A method setting changes the method's row only: the supervised rows do not read it.
    assert quoted([*method, "--method-args", "cls_score_thr=0.5"], path) == {"supervised", "full"}
    table = results_module.table_references(parse_config([*method, "--method-args", "cls_score_thr=0.5"]), path)
    assert "method_args.cls_score_thr: 0.5 vs 0.7" in table.not_quoted["method"]
    # What does not change the training: the seed, the evaluations along the way, threads, the output folder.
    assert quoted([*method, "--seed", "7", "--eval-period", "50", "--eval-max-images", "20", "--threads", "1",
                   "--output-dir", str(tmp_path / "run"), "--builtin-spec", "seed=0"], path) == {
        "supervised", "full", "method"}
    # A supervised run with its detector's preset gets the supervised rows, at 100% as well.
    assert quoted(["--method", "supervised", "--detector", "faster_rcnn", "--max-iter", "800"], path) == {
        "supervised", "full"}
    assert quoted(["--method", "supervised", "--detector", "faster_rcnn", "--max-iter", "800", "--percent", "100"],
                  path) == {"supervised", "full"}
    assert quoted(["--method", "supervised", "--detector", "faster_rcnn", "--max-iter", "800", "--lr", "0.01"],
                  path) == set()


def test_a_run_with_the_generated_pretraining_filled_in_is_the_same_recipe(tmp_path):
    # train.py fills backbone_weights in with the cached glyph pretraining (wherever SSOD_CACHE puts it); the
    # rows' command lines leave it empty. Other weights remain another recipe.
    from engine.pretrain import PretrainSpec, weights_path
    path = results_table(tmp_path / "RESULTS.json")
    cfg = parse_config(["--method", "soft_teacher", "--max-iter", "800"])
    cfg.backbone_weights = str(weights_path(PretrainSpec(arch=cfg.backbone), tmp_path / "elsewhere"))
    assert set(results_module.baseline_for(cfg, path)) == {"supervised", "full", "method"}
    cfg.backbone_weights = str(tmp_path / "imagenet_resnet18.pth")
    table = results_module.table_references(cfg, path)
    assert table.references == {} and "backbone_weights" in table.not_quoted["supervised"]


def test_rows_without_a_readable_command_line_are_not_quoted(tmp_path):
    cfg = parse_config(["--method", "soft_teacher", "--max-iter", "800"])
    old = results_table(tmp_path / "old.json", argv=False)  # a table from before the rows stored their argv
    assert results_module.baseline_for(cfg, old) == {}
    assert "command line" in results_module.table_references(cfg, old).not_quoted["supervised"]
    broken = results_table(tmp_path / "broken.json")
    table = json.loads(broken.read_text())
    table["rows"]["soft_teacher_faster_rcnn"]["argv"] += ["--no-such-flag", "1"]
    table["rows"]["supervised_faster_rcnn_10pct"]["argv"] = "--method supervised"
    broken.write_text(json.dumps(table))
    assert results_module.baseline_for(cfg, broken) == {}  # no 10% baseline: the 100% row is not quoted alone


def test_the_main_job_quotes_every_row_of_the_repository_table():
    found = results_module.baseline_for(parse_config(["--method", "soft_teacher", "--percent", "10"]))
    assert set(found) == {"supervised", "full", "method"}
    assert found["method"].row == "soft_teacher_faster_rcnn" and found["full"].row == "supervised_faster_rcnn_100pct"


def test_the_table_records_extra_flags_and_split_folds(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_all", lambda *a, **k: pytest.fail("--report-only ran something"))
    out, doc = tmp_path / "runs", tmp_path / "docs" / "RESULTS"
    fill(out, "supervised_faster_rcnn_10pct", [0.30, 0.32, 0.34], max_iter=800, flags=["--lr", "0.05"])
    fill(out, "supervised_faster_rcnn_100pct", [0.50, 0.50, 0.50], max_iter=800, flags=["--lr", "0.05"])
    benchmark.main(["--report-only", "--rows", "supervised_faster_rcnn", "--max-iter", "800", "--out", str(out),
                    "--doc", str(doc), "--extra", "--lr 0.05"])
    path = doc.with_suffix(".json")
    assert json.loads(path.read_text())["rows"]["supervised_faster_rcnn_10pct"]["argv"][-2:] == ["--lr", "0.05"]
    # A run of the preset's lr is not the recipe that table measured; one at 0.05 is.
    supervised = ["--method", "supervised", "--detector", "faster_rcnn", "--max-iter", "800"]
    assert quoted(supervised, path) == set()
    assert quoted([*supervised, "--lr", "0.05"], path) == {"supervised", "full"}
    # With --vary-fold every seed trained on another labeled split: no single run's split matches the rows.
    benchmark.main(["--report-only", "--rows", "supervised_faster_rcnn", "--max-iter", "800", "--out", str(out),
                    "--doc", str(doc), "--extra", "--lr 0.05", "--vary-fold"])
    assert json.loads(path.read_text())["vary_fold"] is True
    assert quoted([*supervised, "--lr", "0.05"], path) == set()


def test_rows_whose_runs_are_gone_keep_their_seeds_from_the_previous_table(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_all", lambda *a, **k: pytest.fail("--report-only ran something"))
    first, later, doc = tmp_path / "first", tmp_path / "later", tmp_path / "RESULTS"
    fill(first, "supervised_faster_rcnn_10pct", [0.30, 0.32, 0.34])
    fill(first, "supervised_faster_rcnn_100pct", [0.50, 0.50, 0.50])
    benchmark.main(["--report-only", "--rows", "supervised_faster_rcnn", "--max-iter", str(MAX_ITER),
                    "--out", str(first), "--doc", str(doc)])
    # Another folder holds the method's runs and one more run of the 10% row (seed 2, now at 36).
    fill(later, "soft_teacher_faster_rcnn", [0.38, 0.40, 0.42], teacher=[0.40, 0.42, 0.44])
    fill(later, "supervised_faster_rcnn_10pct", [0.36])
    (later / "supervised_faster_rcnn_10pct" / "seed0").rename(later / "supervised_faster_rcnn_10pct" / "seed2")
    benchmark.main(["--report-only", "--rows", "soft_teacher_faster_rcnn", "--max-iter", str(MAX_ITER),
                    "--out", str(later), "--doc", str(doc)])
    rows = json.loads(doc.with_suffix(".json").read_text())["rows"]
    sup = rows["supervised_faster_rcnn_10pct"]
    assert sup["seeds"] == [0, 1, 2] and sup["carried"] == [0, 1]  # seed 2's run is on disk: it wins
    assert sup["student"] == pytest.approx([30.0, 32.0, 36.0])
    assert rows["supervised_faster_rcnn_100pct"]["carried"] == [0, 1, 2]
    st = rows["soft_teacher_faster_rcnn"]
    assert st["carried"] == [] and st["teacher_gain"] == pytest.approx(42.0 - sup["student_mean"])
    assert "teacher_gap_closed" in st  # against the carried 100% row
    text = doc.with_suffix(".md").read_text()
    assert "| supervised_faster_rcnn_100pct | faster_rcnn | 100% | 3* |" in text
    assert "| soft_teacher_faster_rcnn | faster_rcnn | 10% | 3 |" in text and "carried over" in text
    # Carried again from a table written elsewhere, a seed keeps the machine that measured it.
    written = json.loads(doc.with_suffix(".json").read_text())
    written["machine"] = "another machine"
    doc.with_suffix(".json").write_text(json.dumps(written))
    benchmark.main(["--report-only", "--rows", "soft_teacher_faster_rcnn", "--max-iter", str(MAX_ITER),
                    "--out", str(tmp_path / "empty"), "--doc", str(doc)])
    rows = json.loads(doc.with_suffix(".json").read_text())["rows"]
    first_machine = sup["carried_from"][0]
    assert rows["supervised_faster_rcnn_10pct"]["carried_from"] == [first_machine, first_machine, "another machine"]
    assert rows["supervised_faster_rcnn_100pct"]["carried_from"] == [first_machine] * 3
    assert rows["soft_teacher_faster_rcnn"]["carried_from"] == ["another machine"] * 3
    # A row measured with other flags is another recipe: not carried into a table run without them.
    benchmark.main(["--report-only", "--rows", "soft_teacher_faster_rcnn", "--max-iter", str(MAX_ITER),
                    "--out", str(later), "--doc", str(doc), "--extra", "--lr 0.05"])
    rows = json.loads(doc.with_suffix(".json").read_text())["rows"]
    assert "supervised_faster_rcnn_100pct" not in rows and "carried over" not in doc.with_suffix(".md").read_text()
    # Nor is a table of another schedule.
    benchmark.main(["--report-only", "--rows", "soft_teacher_faster_rcnn", "--max-iter", str(MAX_ITER + 1),
                    "--out", str(later), "--doc", str(doc)])
    assert set(json.loads(doc.with_suffix(".json").read_text())["rows"]) == {"soft_teacher_faster_rcnn"}


def test_a_preset_changed_since_a_run_or_a_table_is_another_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_all", lambda *a, **k: pytest.fail("--report-only ran something"))
    out, doc = tmp_path / "runs", tmp_path / "RESULTS"
    fill(out, "supervised_fcos_10pct", [0.30, 0.32, 0.34])
    fill(out, "supervised_fcos_100pct", [0.50, 0.50, 0.50])
    benchmark.main(["--report-only", "--rows", "supervised_fcos", "--max-iter", str(MAX_ITER), "--out", str(out),
                    "--doc", str(doc)])
    rows = json.loads(doc.with_suffix(".json").read_text())["rows"]
    recorded = rows["supervised_fcos_10pct"]["config"]
    assert recorded["train_sizes"] == parse_config(rows["supervised_fcos_10pct"]["argv"]).train_sizes
    assert "seed" not in recorded and "output_dir" not in recorded  # the recipe only
    # train.py quotes the row for a run of that recipe.
    supervised = ["--method", "supervised", "--detector", "fcos", "--max-iter", str(MAX_ITER)]
    assert quoted(supervised, doc.with_suffix(".json")) == {"supervised", "full"}

    # The preset changes afterwards (here: one training scale for FCOS), so the same command lines make another
    # recipe: neither the runs on disk nor the figures the table recorded count for it any more.
    real_preset = config_module.builtin_preset

    def one_scale(method, detector, max_iter):
        cfg = real_preset(method, detector, max_iter)
        if detector == "fcos":
            cfg.train_sizes = [128]
        return cfg
    monkeypatch.setattr(config_module, "builtin_preset", one_scale)
    benchmark.main(["--report-only", "--rows", "supervised_fcos", "--max-iter", str(MAX_ITER), "--out", str(out),
                    "--doc", str(doc)])
    rows = json.loads(doc.with_suffix(".json").read_text())["rows"]
    assert rows["supervised_fcos_10pct"]["seeds"] == [] and rows["supervised_fcos_100pct"]["seeds"] == []
    assert rows["supervised_fcos_10pct"]["config"]["train_sizes"] == [128]
    benchmark.main(["--report-only", "--rows", "supervised_fcos", "--max-iter", str(MAX_ITER), "--out",
                    str(tmp_path / "empty"), "--doc", str(doc)])
    assert json.loads(doc.with_suffix(".json").read_text())["rows"]["supervised_fcos_10pct"]["seeds"] == []

    # A table written before the change is not quoted for a run of the new preset: the row's recorded recipe
    # is compared, not its command line parsed against today's presets.
    monkeypatch.undo()
    fill(tmp_path / "old", "supervised_fcos_10pct", [0.30, 0.32, 0.34])
    fill(tmp_path / "old", "supervised_fcos_100pct", [0.50, 0.50, 0.50])
    old_doc = tmp_path / "OLD"
    benchmark.main(["--report-only", "--rows", "supervised_fcos", "--max-iter", str(MAX_ITER), "--out",
                    str(tmp_path / "old"), "--doc", str(old_doc)])
    monkeypatch.setattr(config_module, "builtin_preset", one_scale)
    table = results_module.table_references(parse_config(supervised), old_doc.with_suffix(".json"))
    assert table.references == {} and "train_sizes: [128] vs [96, 112, 128, 144, 160]" in table.not_quoted["supervised"]
