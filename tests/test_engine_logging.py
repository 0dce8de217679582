"""engine/logger.py and engine/visualize.py."""

import math
import sys

import pytest
import torch
from PIL import Image

from engine.logger import MetricsLog, TensorBoardLog, format_losses, read_metrics
from engine.visualize import draw_boxes, save_boxes


def test_metrics_log_writes_plain_json_lines_and_drops_lines_after_a_resume_point(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for iteration in range(5):
        log.write({"iteration": iteration, "loss": torch.tensor(1.0 / (iteration + 1)), "lr": 0.1, "bad": math.inf})
    log.write({"event": "eval", "AP": 0.5})  # records without an iteration are kept
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("iteration") for r in records] == [0, 1, 2, 3, 4, None]
    assert records[1]["loss"] == 0.5 and records[0]["bad"] == "inf"

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 9, "lo')  # a line cut short by a crash
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.drop_after(2)  # resumed from a checkpoint taken after 2 iterations
    log.write({"iteration": 3, "loss": 2.0})
    log.close()
    assert [r.get("iteration") for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, None, 3]


def training_record(iteration: int) -> dict:
    return {"iteration": iteration, "lr": 0.01, "loss": torch.tensor(3.0), "sup_loss_cls": torch.tensor(1.0),
            "unsup_loss_cls": torch.tensor(0.5), "w_sup_loss_cls": 1.0, "w_unsup_loss_cls": 4.0,
            "ema_momentum": 0.999, "pseudo_num": 2.5, "pseudo_precision": 0.75, "pseudo_recall": 0.5,
            "grad_norm": 7.0, "time": 0.4, "data_time": 0.01}


def test_tensorboard_event_files_hold_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    for iteration in (1, 2, 3):
        log.write(training_record(iteration))
    for model, ap in (("student", 0.25), ("teacher", 0.3)):
        log.write({"iteration": 3, "eval": model, "AP": ap, "AP50": 0.5, "AP/circle": 0.125, "APl": "nan"})
    log.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))  # next to metrics.jsonl

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    value = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    assert value("loss/total") == [(1, 3.0), (2, 3.0), (3, 3.0)]
    assert value("loss/unsup_loss_cls")[-1] == (3, 0.5)  # unweighted
    assert value("loss_weighted/unsup_loss_cls")[-1] == (3, 2.0)  # weight 4 x 0.5
    assert value("weight/unsup_loss_cls")[-1] == (3, 4.0)
    for tag, expected in (("train/lr", 0.01), ("train/ema_momentum", 0.999), ("pseudo/num", 2.5),
                          ("pseudo/precision", 0.75), ("pseudo/recall", 0.5), ("train/grad_norm", 7.0),
                          ("eval/AP/teacher", 0.3), ("eval/AP/student", 0.25), ("eval/AP50/teacher", 0.5),
                          ("eval_per_class/teacher/circle", 0.125)):
        assert value(tag)[-1] == (3, pytest.approx(expected)), tag
    assert "eval/APl/teacher" not in events.Tags()["scalars"]  # non-numeric entries are left out

    # A resumed run hides what the crashed one wrote after its checkpoint (TensorBoard's purge_step).
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.drop_after(1)
    log.write(training_record(2) | {"loss": 9.0})
    log.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == [(1, 3.0), (2, 9.0)]


def test_a_resume_truncates_the_event_files_too_even_without_tensorboard_this_time(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    for iteration in (1, 2, 3, 4):
        log.write(training_record(iteration))
    log.close()
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    with open(event_file, "ab") as f:
        f.write(b"\x30\x00\x00")  # a record cut short by a crash

    def steps() -> list[int]:
        return sorted({event.step for event in EventFileLoader(str(event_file)).Load() if event.summary.value})

    assert steps() == [1, 2, 3, 4]
    resumed = MetricsLog(tmp_path / "metrics.jsonl")  # this time without --tensorboard
    resumed.drop_after(2)
    resumed.close()
    assert steps() == [1, 2]
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    MetricsLog(tmp_path / "metrics.jsonl").drop_after(0)  # --resume without a checkpoint: nothing is kept
    assert steps() == [] and read_metrics(tmp_path / "metrics.jsonl") == []


def test_tensorboard_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLog("unused")


def test_format_losses():
    text = format_losses({"sup_loss_cls": torch.tensor(0.51234), "unsup_loss_box": 2.0, "tiny": 1e-5})
    assert text == "sup_loss_cls 0.512 unsup_loss_box 2.000 tiny 1e-05"


def test_draw_boxes_marks_predictions_and_ground_truth(tmp_path):
    image = torch.zeros(3, 64, 64)
    path = save_boxes(tmp_path / "vis.png", image, class_names=["a", "b"],
                      boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 4.0, 4.0]]), labels=torch.tensor([1, 0]),
                      scores=torch.tensor([0.9, 0.1]), gt_boxes=torch.tensor([[20.0, 20.0, 60.0, 60.0]]),
                      gt_labels=torch.tensor([0]), min_size=128)
    drawn = Image.open(path)
    assert drawn.size == (128, 128)  # enlarged 2x
    pixels = drawn.load()
    assert pixels[16, 60] != (0, 0, 0)  # left edge of the prediction (8 px * 2) is coloured
    assert pixels[120, 100] == (255, 255, 255)  # right edge of the ground truth (60 px * 2) is white
    assert pixels[100, 30] == (0, 0, 0)  # background untouched
    # The low-score prediction is skipped: nothing drawn in its corner.
    assert draw_boxes(image, class_names=["a", "b"], boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                      labels=torch.tensor([0]), scores=torch.tensor([0.1]), min_size=64).getbbox() is None
