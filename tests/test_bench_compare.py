"""bench/compare.py: the table and runs.json keep the runs of earlier calls; nothing finished is run again."""

import json
from pathlib import Path

import pytest

from bench import compare


def finished_run(folder: Path, *, max_iter: int, student_ap: float, teacher_ap: float | None = None,
                 config: dict | None = None) -> None:
    """A run folder whose metrics.jsonl holds its final evaluation, as train.py leaves it; its config.json holds
    `config` (a Config's to_dict()) or only max_iter."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"max_iter": max_iter}))
    rows = [{"iteration": max_iter, "loss": 1.0},
            {"iteration": max_iter, "eval": "student", "AP": student_ap, "AP50": 0.5, "AP75": 0.1}]
    if teacher_ap is not None:
        rows.append({"iteration": max_iter, "eval": "teacher", "AP": teacher_ap, "AP50": 0.5, "AP75": 0.1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_second_call_keeps_the_first_calls_ablations(tmp_path, capsys, monkeypatch):
    launched = []
    monkeypatch.setattr(compare.subprocess, "Popen", lambda *a, **k: launched.append(a) or pytest.fail("ran"))
    max_iter = 40
    base = tmp_path / f"supervised_fcos_{max_iter}it"
    method = tmp_path / f"dense_teacher_fcos_10pct_{max_iter}it"
    finished_run(base / "sup10", max_iter=max_iter, student_ap=0.20)
    finished_run(base / "sup100", max_iter=max_iter, student_ap=0.30)
    finished_run(method / "dense_teacher", max_iter=max_iter, student_ap=0.25, teacher_ap=0.26)
    finished_run(method / "dense_teacher_a", max_iter=max_iter, student_ap=0.22, teacher_ap=0.23)
    finished_run(method / "dense_teacher_b", max_iter=max_iter, student_ap=0.28, teacher_ap=0.27)
    common = ["--method", "dense_teacher", "--detector", "fcos", "--max-iter", str(max_iter), "--out", str(tmp_path)]

    compare.main(common + ["--ablation", "a:ratio=0.5"])
    compare.main(common + ["--ablation", "b:ratio=0.9"])
    table = capsys.readouterr().out.split("iterations\n")[-1]  # the second call's table

    assert not launched
    assert "dense_teacher_a " in table and "dense_teacher_b " in table
    rows = {tuple(line.split()[:2]): line.split() for line in table.splitlines()[1:] if line.strip()}
    assert rows[("dense_teacher_a", "student")][2] == "22.00"
    assert rows[("dense_teacher_b", "student")][-1] == "80%"  # (28 - 20) / (30 - 20)
    recorded = json.loads((method / "runs.json").read_text())
    assert set(recorded) == {"dense_teacher", "dense_teacher_a", "dense_teacher_b"}
    assert recorded["dense_teacher_a"][-1] == "ratio=0.5" and recorded["dense_teacher_b"][-1] == "ratio=0.9"
    assert set(json.loads((base / "runs.json").read_text())) == {"sup10", "sup100"}


def test_a_broken_runs_json_is_named(tmp_path):
    folder = tmp_path / "supervised_fcos_40it"
    folder.mkdir()
    (folder / "runs.json").write_text("{not json")
    with pytest.raises(SystemExit, match="runs.json is not valid JSON"):
        compare.main(["--method", "supervised", "--detector", "fcos", "--max-iter", "40", "--out", str(tmp_path)])
