"""engine/plot.py: training curves and final AP of several runs drawn from synthetic metrics.jsonl files."""

import json
import sys

import pytest
from PIL import Image

from engine.plot import ap_table, final_metrics, load_run, loss_keys, main


def write_run(run_dir, *, method: bool, final_ap: float):
    """A metrics.jsonl as train.py writes it: training records every 10 iterations, evaluations at 20 and 40."""
    run_dir.mkdir(parents=True)
    lines = []
    for iteration in range(10, 41, 10):
        record = {"iteration": iteration, "lr": 0.01, "loss": 2.0 / iteration ** 0.5, "sup_loss_cls": 1.0 / iteration,
                  "sup_loss_box": 0.5, "w_sup_loss_cls": 1.0, "w_sup_loss_box": 1.0, "time": 0.3, "data_time": 0.01}
        if method:
            record |= {"unsup_loss_cls": 0.1, "w_unsup_loss_cls": 4.0, "pseudo_precision": 0.5,
                       "pseudo_recall": "nan", "ema_momentum": 0.999}
        lines.append(record)
        if iteration in (20, 40):
            models = ("student", "teacher") if method else ("student",)
            lines += [{"iteration": iteration, "eval": model, "AP": final_ap * iteration / 40, "AP50": 0.5,
                       "AP75": 0.2, "APl": "nan", "AP/circle": 0.1} for model in models]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 5')


def test_runs_load_with_their_loss_terms_and_final_evaluation(tmp_path):
    write_run(tmp_path / "sup", method=False, final_ap=0.2)
    write_run(tmp_path / "semi", method=True, final_ap=0.3)
    runs = [load_run(tmp_path / "sup"), load_run(tmp_path / "semi" / "metrics.jsonl")]
    assert [run.name for run in runs] == ["sup", "semi"]
    assert [len(run.train) for run in runs] == [4, 4]  # the cut line is skipped
    assert loss_keys(runs) == ["sup_loss_cls", "sup_loss_box", "unsup_loss_cls"]
    assert final_metrics(runs[0])[0] == "student" and final_metrics(runs[1])[0] == "teacher"
    assert final_metrics(runs[1])[1]["AP"] == pytest.approx(0.3)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "sup", method=False, final_ap=0.2)
    write_run(tmp_path / "semi", method=True, final_ap=0.3)
    out = main([str(tmp_path / "sup"), str(tmp_path / "semi"), "--out", str(tmp_path / "plots" / "curves.png"),
                "--smooth", "2"])
    with Image.open(out) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 600
        assert len(image.convert("RGB").getcolors(1 << 24)) > 10  # something is drawn


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    write_run(tmp_path / "sup", method=False, final_ap=0.2)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        main([str(tmp_path / "sup"), "--out", str(tmp_path / "curves.png")])


def test_the_ap_table_puts_teacher_and_student_of_every_evaluation_side_by_side(tmp_path, capsys):
    write_run(tmp_path / "sup", method=False, final_ap=0.2)
    write_run(tmp_path / "semi", method=True, final_ap=0.3)
    text = ap_table([load_run(tmp_path / "sup"), load_run(tmp_path / "semi")], labels=["a", "b"])
    assert text.splitlines() == ["| run | model | 20 | 40 |", "| --- | --- | --- | --- |",
                                 "| a | student | 10.0 | 20.0 |", "| b | teacher | 15.0 | 30.0 |",
                                 "| b | student | 15.0 | 30.0 |"]
    # A run that evaluated at other iterations gets "-" where it has none; --table draws nothing.
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "metrics.jsonl").write_text(json.dumps({"iteration": 60, "eval": "student", "AP": 0.5}))
    assert main([str(tmp_path / "sup"), str(tmp_path / "late"), "--table", "--out", str(tmp_path / "x.png")]) is None
    out = capsys.readouterr().out
    assert f"| {tmp_path / 'late'} | student | - | - | 50.0 |" in out and not (tmp_path / "x.png").exists()
