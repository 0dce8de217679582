"""Training curves of one or several runs, and their final AP side by side, as one PNG (needs matplotlib).

    python -m engine.plot runs/soft_teacher_faster_rcnn_10pct --out curves.png
    python -m engine.plot runs/supervised_fcos_10pct runs/dense_teacher_fcos_10pct runs/sed_fcos_10pct --out cmp.png
    python -m engine.plot runs/supervised_fcos_10pct runs/dense_teacher_fcos_10pct --table   # AP per evaluation

Each RUN_DIR holds the run's metrics.jsonl (engine/logger.py). The figure has one panel per curve, each run in
its own colour: the total loss and every loss term (unweighted, as logged), the learning rate, the pseudo-labels'
precision and recall against the hidden annotations (methods that make pseudo-boxes), the AP of the teacher
(solid) and the student (dashed) at every evaluation, and a bar chart of the last evaluation's AP, AP50 and AP75
of each run (its teacher when it has one). `--table` prints the AP of every evaluation instead, teacher and student
side by side (no matplotlib needed): whether a teacher leads its student, and when a method parts from its
baseline, read off one table. Detections and pseudo-labels are drawn as pictures elsewhere:
`python evaluate.py RUN/last.pth --vis 8` and train.py's `--draw-period`.
"""

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple


class Run(NamedTuple):
    name: str
    train: list[dict]  # the training records of metrics.jsonl, by iteration
    evals: list[dict]  # the evaluation records ({"eval": "teacher" | "student", "AP": ...}), by iteration


def load_run(path: str | Path) -> Run:
    """A run directory (or its metrics.jsonl) -> Run; "nan" / "inf" strings become floats."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"engine/plot.py: no metrics.jsonl in {path}")
    records = []
    for line in file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        records.append({key: _number(value) for key, value in record.items()})
    name = file.parent.name if file.name == "metrics.jsonl" else file.stem
    return Run(name=name, train=[r for r in records if "eval" not in r and "iteration" in r],
               evals=[r for r in records if "eval" in r])


def _number(value):
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1: unchanged); NaNs are skipped."""
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def loss_keys(runs: list[Run]) -> list[str]:
    """Every loss term any run logged: "sup_*" first, then "unsup_*", each in the order first seen."""
    keys = []
    for run in runs:
        for record in run.train:
            keys += [k for k in record if k.startswith(("sup_", "unsup_")) and k not in keys]
    return sorted(keys, key=lambda k: not k.startswith("sup_"))


def final_metrics(run: Run) -> tuple[str, dict] | None:
    """(model, record) of the run's last evaluation: the teacher's if it has one, else the student's."""
    if not run.evals:
        return None
    last = max(r["iteration"] for r in run.evals)
    at_last = {r["eval"]: r for r in run.evals if r["iteration"] == last}
    model = "teacher" if "teacher" in at_last else next(iter(at_last))
    return model, at_last[model]


def _figure_classes():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("engine/plot.py draws with matplotlib: pip install matplotlib "
                          "(or pip install -e .[plot])") from error
    return Figure, FigureCanvasAgg


def plot_runs(runs: list[Run], out: str | Path, *, smooth: int = 1, columns: int = 3) -> Path:
    """Draw the curves and the final-AP bars of `runs` (see the module docstring) into the PNG `out`."""
    Figure, FigureCanvasAgg = _figure_classes()
    panels = [("loss", "total loss (weighted)")] + [(key, key) for key in loss_keys(runs)] + [("lr", "learning rate")]
    if any("pseudo_precision" in r for run in runs for r in run.train):
        panels.append(("pseudo", "pseudo-labels vs hidden boxes"))
    panels += [("AP", "AP (teacher solid, student dashed)"), ("final", "last evaluation")]
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.2 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]

    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        if key == "final":
            _final_bars(ax, runs, colours)
            continue
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        for run, colour in zip(runs, colours):
            if key == "AP":
                for model, style in (("teacher", "-"), ("student", "--")):
                    x, y = _series([r for r in run.evals if r["eval"] == model], "AP")
                    if x:
                        ax.plot(x, [100 * v for v in y], style, marker="o", markersize=3, color=colour,
                                label=f"{run.name} {model}")
            elif key == "pseudo":
                for name, style in (("pseudo_precision", "-"), ("pseudo_recall", ":")):
                    x, y = _series(run.train, name)
                    if x:
                        ax.plot(x, _smooth(y, smooth), style, color=colour, label=f"{run.name} {name[7:]}")
            else:
                x, y = _series(run.train, key)
                if x:
                    ax.plot(x, _smooth(y, smooth), color=colour, linewidth=1.2, label=run.name)
        if key in ("loss", "AP", "pseudo") and ax.has_data():
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def _final_bars(ax, runs: list[Run], colours: list[str]) -> None:
    """Grouped bars: AP, AP50, AP75 (in %) of each run's last evaluation."""
    metrics = ("AP", "AP50", "AP75")
    finals = [(run, colour, final_metrics(run)) for run, colour in zip(runs, colours)]
    finals = [(run, colour, f) for run, colour, f in finals if f is not None]
    if not finals:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(finals)
    for i, (run, colour, (model, record)) in enumerate(finals):
        values = [100 * float(record.get(m, math.nan)) for m in metrics]
        positions = [j + (i - (len(finals) - 1) / 2) * width for j in range(len(metrics))]
        bars = ax.bar(positions, values, width=width, color=colour, label=f"{run.name} ({model})")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)


def ap_table(runs: list[Run], labels: list[str] | None = None) -> str:
    """AP (%) of every evaluation of each run, as a markdown table: a row per run and model (teacher first), a
    column per evaluated iteration, "-" where that run and model has no evaluation. `labels` name the runs
    (default: their names)."""
    labels = labels or [run.name for run in runs]
    iterations = sorted({int(record["iteration"]) for run in runs for record in run.evals})
    lines = ["| run | model | " + " | ".join(str(i) for i in iterations) + " |",
             "| --- | --- |" + " --- |" * len(iterations)]
    for run, label in zip(runs, labels):
        for model in ("teacher", "student"):
            ap = {int(r["iteration"]): 100 * float(r["AP"]) for r in run.evals if r["eval"] == model and "AP" in r}
            if ap:
                cells = [f"{ap[i]:.1f}" if i in ap else "-" for i in iterations]
                lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over this many logged points")
    parser.add_argument("--table", action="store_true",
                        help="print the AP of every evaluation as a markdown table instead of drawing")
    args = parser.parse_args(argv)
    if args.table:
        print(ap_table([load_run(path) for path in args.runs], labels=args.runs))
        return None
    out = plot_runs([load_run(path) for path in args.runs], args.out, smooth=args.smooth)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
