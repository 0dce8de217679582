"""Method against supervised baselines on equal terms: same preset, iterations and labeled images.

    python bench/compare.py --method soft_teacher                          # sup 10%, sup 100%, Soft Teacher 10%
    python bench/compare.py --method soft_teacher --ablation no_bgt:soft_background=false
    python bench/compare.py --method dense_teacher --detector retinanet --max-iter 1000 --jobs 2
    python bench/compare.py --method supervised --detector fcos      # only the baselines: sup 10%, sup 100%

Every row is one `train.py` run in its own folder under --out (a finished run is not run again, so the
table can be printed again, or extended, for free; an interrupted one resumes from its last checkpoint).
The supervised baselines of a detector and schedule live in one folder, out/supervised_<detector>_<iterations>it/,
shared by every method that trains that detector; the method's runs go to
out/<method>_<detector>_<P>pct_<iterations>it/ (give runs with other --extra flags their own --out). Each
folder's runs.json lists the command lines of every run made there, so a later call with other ablations adds
to the table instead of replacing it. Runs go --jobs at a time, each with --threads torch threads.
Each method run uses the preset's labeled batch and schedule; the supervised runs use the same labeled batch,
so "same iterations" also means the same labeled images seen. The table reports the final COCO AP of every
run (teacher and student for the method) and the share of the supervised gap the method closes:

    gap closed = (AP_method - AP_sup@P) / (AP_sup@100 - AP_sup@P)
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def final_metrics(run_dir: Path) -> dict[str, dict] | None:
    """{"student": metrics, "teacher": metrics} of a run's final evaluation, or None if it has not finished."""
    config_path, log_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not (config_path.exists() and log_path.exists()):
        return None
    max_iter = json.loads(config_path.read_text())["max_iter"]
    found = {}
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if row.get("iteration") == max_iter and "eval" in row:
            found[row["eval"]] = row
    return found or None


def run_all(runs: dict[str, list[str]], *, dirs: dict[str, Path], jobs: int, threads: int) -> None:
    """Launch the unfinished runs, `jobs` at a time; run `name` writes dirs[name]/ and dirs[name].log."""
    pending = [name for name in runs if final_metrics(dirs[name]) is None]
    active: dict[str, subprocess.Popen] = {}
    while pending or active:
        while pending and len(active) < jobs:
            name = pending.pop(0)
            command = [sys.executable, str(ROOT / "train.py"), *runs[name], "--threads", str(threads),
                       "--output-dir", str(dirs[name]), "--resume"]  # an interrupted run continues
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: {shlex.join(command[1:])}", flush=True)
            log = open(dirs[name].with_suffix(".log"), "a")
            active[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        time.sleep(5)
        for name, process in list(active.items()):
            if process.poll() is not None:
                del active[name]
                status = ("done" if process.returncode == 0
                          else f"FAILED ({process.returncode}), see {dirs[name].with_suffix('.log')}")
                print(f"[{time.strftime('%H:%M:%S')}] {name} {status}", flush=True)


def table(runs: dict[str, list[str]], *, dirs: dict[str, Path], percent: float) -> str:
    results = {name: final_metrics(dirs[name]) for name in runs}
    base = results.get(f"sup{percent:g}"), results.get("sup100")
    low = base[0]["student"]["AP"] if base[0] else None
    high = base[1]["student"]["AP"] if base[1] else None
    lines = [f"{'run':<24} {'model':<8} {'AP':>6} {'AP50':>6} {'AP75':>6} {'gap closed':>10}"]
    for name, result in results.items():
        if result is None:
            lines.append(f"{name:<24} {'-':<8} {'not finished':>20}")
            continue
        for model in ("student", "teacher"):
            if model not in result:
                continue
            m = result[model]
            gap = ""
            if low is not None and high is not None and not name.startswith("sup") and high != low:
                gap = f"{100 * (m['AP'] - low) / (high - low):9.0f}%"
            lines.append(f"{name:<24} {model:<8} {100 * m['AP']:6.2f} {100 * m['AP50']:6.2f} {100 * m['AP75']:6.2f} "
                         f"{gap:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", required=True, choices=("supervised", "soft_teacher", "dense_teacher", "sed"),
                        help="supervised: the two baselines only")
    parser.add_argument("--detector", default="", help="default: the method's paper detector")
    parser.add_argument("--percent", type=float, default=10.0)
    parser.add_argument("--max-iter", type=int, default=0,
                        help="0: the built-in dataset's benchmark schedule, engine.config.BENCHMARK_ITERATIONS")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME:K=V[,K=V]",
                        help="an extra method run with these --method-args, e.g. no_bgt:soft_background=false")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="run only the method runs; the table still shows baselines found in --out")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0: cores / jobs")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, one string")
    args = parser.parse_args(argv)

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    # The method's preset fixes the detector (its paper's, unless given), the schedule and the labeled batch;
    # the baselines copy all three.
    sys.path.insert(0, str(ROOT))
    from engine.config import BENCHMARK_ITERATIONS, resolve_config
    extra = shlex.split(args.extra)
    max_iter = args.max_iter or BENCHMARK_ITERATIONS
    preset = resolve_config({"method": args.method, "detector": args.detector, "max_iter": max_iter})
    detector = preset.detector
    base_dir = Path(args.out) / f"supervised_{detector}_{max_iter}it"
    method_dir = Path(args.out) / f"{args.method}_{detector}_{args.percent:g}pct_{max_iter}it"
    shared = ["--detector", detector, "--max-iter", str(max_iter), "--labeled-batch", str(preset.labeled_batch),
              "--draw-period", "0", *extra]
    runs: dict[str, list[str]] = {}
    # The supervised runs take the method's schedule, so that "same iterations" holds.
    schedule = ["--lr", str(preset.lr), "--warmup-iters", str(preset.warmup_iters), "--schedule", preset.schedule,
                "--milestones", *[str(m) for m in preset.milestones]]
    runs[f"sup{args.percent:g}"] = ["--method", "supervised", "--percent", str(args.percent), *schedule, *shared]
    runs["sup100"] = ["--method", "supervised", "--percent", "100", *schedule, *shared]
    if args.method != "supervised":
        runs[args.method] = ["--method", args.method, "--percent", str(args.percent), *shared]
    for ablation in args.ablation:
        name, _, settings = ablation.partition(":")
        runs[f"{args.method}_{name}"] = ["--method", args.method, "--percent", str(args.percent), *shared,
                                         "--method-args", *settings.split(",")]
    dirs = {name: (base_dir if name.startswith("sup") else method_dir) / name for name in runs}
    # runs.json records every run of its folder: the runs of earlier calls (other ablations) stay in it and in
    # the table, and this call's command lines replace theirs where the names are the same.
    recorded: dict[str, list[str]] = {}
    for folder in sorted({d.parent for d in dirs.values()}):
        folder.mkdir(parents=True, exist_ok=True)
        index = folder / "runs.json"
        try:
            earlier = json.loads(index.read_text()) if index.exists() else {}
        except json.JSONDecodeError as error:
            raise SystemExit(f"bench/compare.py: {index} is not valid JSON ({error}); fix or delete it (it only "
                             f"lists the folder's runs)") from None
        mine = earlier | {name: argv for name, argv in runs.items() if dirs[name].parent == folder}
        index.write_text(json.dumps(mine, indent=1))
        recorded |= {name: argv for name, argv in earlier.items() if name not in runs}
        dirs |= {name: folder / name for name in earlier if name not in runs}
    to_run = {name: argv for name, argv in runs.items() if not (args.skip_baselines and name.startswith("sup"))}
    run_all(to_run, dirs=dirs, jobs=args.jobs, threads=threads)
    print(f"\n{args.method} on {detector}, {args.percent:g}% labels, {max_iter} iterations\n")
    print(table(runs | recorded, dirs=dirs, percent=args.percent))


if __name__ == "__main__":
    main()
