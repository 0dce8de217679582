"""Training logs: one JSON object per line in `metrics.jsonl`, and a tqdm progress bar with the loss and ETA.

A line of metrics.jsonl looks like

    {"iteration": 120, "lr": 0.0098, "loss": 1.73, "sup_loss_cls": 0.52, ..., "w_unsup_loss_cls": 4.0, "time": 0.41}
    {"iteration": 500, "eval": "teacher", "AP": 0.41, "AP50": 0.63, ..., "AP/circle": 0.52}

where "iteration" counts the iterations completed when the record was written; `read_metrics(path)` (or
`pandas.read_json(path, lines=True)`) gives every curve of a run.
"""

import json
import math
import sys
from pathlib import Path

from torch import Tensor
from tqdm import tqdm


def _plain(value):
    """Tensors and numpy scalars -> Python numbers; non-finite floats -> strings JSON can hold."""
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": json.dumps would write invalid JSON otherwise
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to a file, flushed at once so that a crash loses nothing.

    Resuming a run appends to the same file; `drop_after(iteration)` first removes the lines a crashed run
    wrote after its last checkpoint, so that each iteration appears once.
    Records carry "iteration" = the number of iterations completed when they were written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")

    def drop_after(self, iteration: int) -> None:
        """Keep only the records with "iteration" <= iteration (and records without an iteration)."""
        self.file.close()
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(_plain(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_losses(losses: dict, *, digits: int = 3) -> str:
    """{"sup_loss_cls": tensor(0.5123), ...} -> "sup_loss_cls 0.512 ..." (scalars, tensors or floats)."""
    parts = []
    for key, value in losses.items():
        value = value.item() if isinstance(value, Tensor) else float(value)
        parts.append(f"{key} {value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{key} {value:.{digits}f}")
    return " ".join(parts)


def progress_bar(*, start: int, total: int, desc: str = "train") -> tqdm:
    """A tqdm bar over iterations [start, total) that shows the rate and the ETA.

    When stderr is not a terminal (a log file), the bar refreshes at most every 30 s to keep the file short.
    """
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5 if interactive else 30.0,
                smoothing=0.1)
