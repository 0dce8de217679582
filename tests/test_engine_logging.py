"""engine/logger.py and engine/visualize.py."""

import math

import torch
from PIL import Image

from engine.logger import MetricsLog, format_losses, read_metrics
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
