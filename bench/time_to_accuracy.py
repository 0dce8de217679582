"""AP against wall time for the built-in preset and for each alternative recipe tried.

    python bench/time_to_accuracy.py                             # the preset and every alternative below
    python bench/time_to_accuracy.py --variants preset scratch   # some of them
    python bench/time_to_accuracy.py --percent 10 --jobs 2 --threads 1

Each variant is one supervised `train.py` run (Faster R-CNN unless --detector, 100% of the labels unless
--percent) that evaluates every --eval-period iterations on --eval-images validation images, and on all of
them at the end. The table lists, per variant, the AP of each evaluation against the wall time since the run
started (`elapsed` in metrics.jsonl: data loading, pretraining and evaluations included, so a cached
pretrained backbone or dataset makes a run look faster; the first run pays for them). The runs live in
--out/<variant>/ and are reused when finished, so the table can be printed again for free.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare import final_metrics, run_all  # noqa: E402
from engine.config import BENCHMARK_ITERATIONS  # noqa: E402

# The alternatives to the preset: train.py flags added to the preset's.
VARIANTS = {
    "preset": [],
    "scratch": ["--backbone-pretrain", ""],  # no pretrained backbone: BatchNorm trains, nothing frozen
    "cosine": ["--schedule", "cosine"],
    "batch4": ["--labeled-batch", "4"],  # the lr follows the batch linearly (engine.config.resolve_config)
    "size96-128": ["--train-sizes", "96", "112", "128"],
    "size128": ["--train-sizes", "128"],  # one training scale, the test size: no multi-scale augmentation
}


def curve(run_dir: Path, model: str = "student") -> list[tuple[int, float, float, int]]:
    """[(iteration, elapsed seconds, AP %, images scored)] of a run's evaluations of `model`."""
    log = run_dir / "metrics.jsonl"
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [(r["iteration"], r.get("elapsed", float("nan")), 100 * r["AP"], r.get("images", 0))
            for r in rows if r.get("eval") == model]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--detector", default="faster_rcnn")
    parser.add_argument("--percent", type=float, default=100.0)
    parser.add_argument("--max-iter", type=int, default=BENCHMARK_ITERATIONS)
    parser.add_argument("--eval-period", type=int, default=100)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/time_to_accuracy")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0: cores / jobs")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    out = Path(args.out) / f"{args.detector}_{args.percent:g}pct_{args.max_iter}it"
    common = ["--method", "supervised", "--detector", args.detector, "--percent", f"{args.percent:g}",
              "--max-iter", str(args.max_iter), "--eval-period", str(args.eval_period), "--eval-max-images",
              str(args.eval_images), "--checkpoint-period", str(args.max_iter), "--seed", str(args.seed)]
    runs = {name: [*common, *VARIANTS[name]] for name in args.variants}
    dirs = {name: out / name for name in runs}
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        run_all(runs, dirs=dirs, jobs=args.jobs, threads=threads)
    print(f"\nsupervised {args.detector}, {args.percent:g}% of the labels, {args.max_iter} iterations, "
          f"{args.jobs} run(s) at a time with {threads} thread(s) each; AP (%) at wall time since the start\n")
    for name in runs:
        points = curve(dirs[name])
        done = "" if final_metrics(dirs[name]) else "  (not finished)"
        cells = "  ".join(f"{it}it {sec / 60:.1f}min {ap:.1f}" for it, sec, ap, _ in points)
        print(f"{name:<12} {cells}{done}")


if __name__ == "__main__":
    main()
