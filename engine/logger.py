"""Training logs: one JSON object per line in `metrics.jsonl`, and a tqdm progress bar with the loss and ETA.

A line of metrics.jsonl looks like

    {"iteration": 120, "lr": 0.0098, "loss": 1.73, "sup_loss_cls": 0.52, ..., "w_unsup_loss_cls": 4.0, "time": 0.41}
    {"iteration": 500, "eval": "teacher", "AP": 0.41, "AP50": 0.63, ..., "AP/circle": 0.52}

where "iteration" counts the iterations completed when the record was written; `read_metrics(path)` (or
`pandas.read_json(path, lines=True)`) gives every curve of a run, and `python -m engine.plot RUN_DIR` draws them.

With `MetricsLog(path, tensorboard=True)` (train.py --tensorboard) every record also goes to TensorBoard event
files in the same folder (`TensorBoardLog`; `tensorboard --logdir runs` shows every run).
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
    tensorboard: also pass every record to a `TensorBoardLog` of the file's folder (needs the tensorboard
    package; an ImportError that says so otherwise).
    """

    def __init__(self, path: str | Path, *, tensorboard: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = TensorBoardLog(self.path.parent) if tensorboard else None
        self.file = open(self.path, "a")

    def drop_after(self, iteration: int) -> None:
        """Keep only the records with "iteration" <= iteration (and records without an iteration), here and in
        the folder's TensorBoard event files (`truncate_event_files`), whether or not this run writes any."""
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
        truncate_event_files(self.path.parent, iteration)
        if self.tensorboard is not None:
            self.tensorboard.purge_after(iteration)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(_plain(record)) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class TensorBoardLog:
    """The records of `MetricsLog` as TensorBoard scalars, at step = the record's "iteration".

    A training record gives
        loss/total                   the weighted total ("loss")
        loss/<term>                  every term, unweighted, e.g. loss/sup_loss_cls, loss/unsup_loss_box
        loss_weighted/<term>         weight x term, the term's share of the total
        weight/<term>                its weight (burn-in and ramp included)
        train/lr, train/ema_momentum, train/<other number>   (grad_norm, the methods' statistics, ...)
        pseudo/<name>                pseudo-label counts, precision and recall against the hidden annotations
        time/time, time/data_time    seconds per iteration, and of it waiting for data
    an evaluation record ({"eval": "teacher" | "student", ...})
        eval/<metric>/<model>        eval/AP/teacher next to eval/AP/student (AP, AP50, AP75, APs, ..., AR)
        eval_per_class/<model>/<class>
    Event files go to `log_dir`; the writer opens at the first record (the tensorboard package is checked
    at once, so a missing one fails before training starts).
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("--tensorboard writes TensorBoard event files and needs the tensorboard package: "
                              "pip install tensorboard (or pip install -e .[tb])") from error
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer = None
        self.purge_step = None

    def purge_after(self, iteration: int) -> None:
        """Hide the events an earlier (crashed) run wrote after `iteration`: TensorBoard's purge_step."""
        self.close()
        self.purge_step = iteration + 1

    def write(self, record: dict) -> None:
        if "iteration" not in record:
            return
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=self.purge_step, flush_secs=30)
        step = int(record["iteration"])
        for tag, value in self.scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    @staticmethod
    def scalars(record: dict) -> dict[str, float]:
        """{tag: value} of one record (see the class docstring); non-numeric entries are left out."""
        numbers = {}
        for key, value in record.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = float(value)
        numbers.pop("iteration", None)
        if "eval" in record:
            model = record["eval"]
            return {(f"eval_per_class/{model}/{key[3:]}" if key.startswith("AP/") else f"eval/{key}/{model}"): value
                    for key, value in numbers.items()}
        tags = {}
        for key, value in numbers.items():
            if key == "loss":
                tags["loss/total"] = value
            elif key.startswith(("sup_", "unsup_")):
                tags[f"loss/{key}"] = value
                if f"w_{key}" in numbers:
                    tags[f"loss_weighted/{key}"] = numbers[f"w_{key}"] * value
            elif key.startswith("w_"):
                tags[f"weight/{key[2:]}"] = value
            elif key.startswith("pseudo_"):
                tags[f"pseudo/{key[7:]}"] = value
            elif key in ("time", "data_time"):
                tags[f"time/{key}"] = value
            else:
                tags[f"train/{key}"] = value
        return tags

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def truncate_event_files(log_dir: str | Path, iteration: int) -> int:
    """Drop the events of steps after `iteration` from every TensorBoard event file in log_dir (a record cut
    short by a crash goes too); returns how many events were dropped. Each file is rewritten atomically.

    An event file is a sequence of TFRecords: uint64 length, uint32 masked CRC of it, `length` bytes of an
    `Event` protobuf, uint32 masked CRC of them (all little-endian). Records are copied byte for byte, so
    their CRCs stay valid; only the Event's step (field 2, a varint) is read.
    """
    dropped = 0
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        kept, position, count = [], 0, 0
        while position + 12 <= len(data):
            length = int.from_bytes(data[position:position + 8], "little")
            end = position + 12 + length + 4
            if end > len(data):
                break
            if _event_step(data[position + 12:end - 4]) <= iteration:
                kept.append(data[position:end])
            else:
                count += 1
            position = end
        count += position < len(data)  # a partial record at the end
        if count:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(b"".join(kept))
            tmp.replace(path)
            dropped += count
    return dropped


def _event_step(event: bytes) -> int:
    """The `step` (field 2, varint) of a serialised tensorboard Event; 0 when absent or unparsable."""
    position = 0
    try:
        while position < len(event):
            key, position = _varint(event, position)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, position = _varint(event, position)
                if field == 2:
                    return value - (1 << 64) if value >= 1 << 63 else value  # int64
            elif wire == 1:
                position += 8
            elif wire == 2:
                size, position = _varint(event, position)
                position += size
            elif wire == 5:
                position += 4
            else:
                return 0
    except IndexError:
        return 0
    return 0


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


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
