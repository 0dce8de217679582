"""The built-in benchmark: every row of the results table over seeds, written to docs/RESULTS.md.

    python bench/benchmark.py --jobs 2                    # the main table: 3 seeds per row, resumable
    python bench/benchmark.py --rows supervised_fcos soft # only the rows whose name contains one of these
    python bench/benchmark.py --ablations --jobs 2        # the papers' ablations in miniature, on top
    python bench/benchmark.py --dataset-seed 1            # the same table on another drawing of the data
    python bench/benchmark.py --list                      # the rows and their command lines, nothing run

Rows (each one `train.py` run per seed, at the built-in preset's benchmark schedule):
  * supervised training at the headline label fraction and at 100%, for each detector; the supervised runs
    copy the learning-rate schedule and labeled batch of the methods' preset, so that a method and its
    baseline see the same labeled images for the same number of iterations;
  * each method on its paper's detector (Soft Teacher and SED on Faster R-CNN, Dense Teacher on FCOS) and on
    every other detector it supports.
What a seed changes: `--seed` (the heads' initialisation, the order and augmentation of the images, the
methods' random choices). The labeled split (fold 1) and the dataset stay the same, so that the spread
measures training noise; `--vary-fold` gives seed s the fold s as well, and `--dataset-seed` another drawing
of the whole dataset.

Every run lives in its own folder, <out>/<row>/seed<s>/; a finished run is not run again and an interrupted
one resumes from its last checkpoint, so the command can be repeated or extended at any time. A seed whose run
is not in <out> (another machine ran it, or its folder was deleted) keeps the figures that <doc>.json recorded
for it, when that file measured the same benchmark and the row the same command line and recipe; the table
marks such rows with a * and names the machine they were measured on. So `--rows` adds rows to the table, and
never drops the others. A row records the recipe its command line makes (`config`, the run's settings that
change what is trained): when a preset changes, a run on disk or a carried seed of the old recipe no longer
counts for the row, and train.py no longer quotes the old figures as the new preset's. The table reports, per
row, the mean +- sample std of the final AP over the seeds (student, and teacher for the methods), the share
of the gap between the supervised runs at the headline fraction and at 100% that the method closes, and
whether the gain over supervised training exceeds twice the pooled std (the bar a gain must pass to count). It
writes <doc>.md, <doc>.json (what `train.py` quotes as the baseline) and a bar chart with error bars,
<doc>.png (with matplotlib installed). With --ablations, a second table gives each ablation's teacher AP
against its method's full row, by the same two-std rule.
"""

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare import final_metrics, run_all  # noqa: E402
from engine.config import BENCHMARK_ITERATIONS, BUILTIN_PERCENT, Config, resolve_config  # noqa: E402
from engine.results import argv_config, recipe_dict, recipe_difference, recorded_config  # noqa: E402

# The detectors each method supports, its paper's first.
METHOD_DETECTORS = {"soft_teacher": ("faster_rcnn",), "dense_teacher": ("fcos", "retinanet"),
                    "sed": ("faster_rcnn", "fcos", "retinanet")}
DETECTORS = ("faster_rcnn", "fcos", "retinanet")

# The papers' ablations, each a method run with other --method-args (rows named <method>_<detector>_<name>).
# Dense Teacher's region sizes are multiples of the preset's own (`region_ablation`).
ABLATIONS = {
    ("soft_teacher", "faster_rcnn"): {
        "no_bg_weighting": ["soft_background=false"],  # Soft Teacher's Table 7: BG-T weighting off
        "no_box_jitter": ["box_jittering=false"],  # Table 6: regress on the classification pseudo-boxes
    },
    ("dense_teacher", "fcos"): {"all_locations": ["region=all"]},  # Dense Teacher's Table 1: top-k against all
    ("sed", "faster_rcnn"): {  # SED's Table 4: scale consistency, self-distillation and re-weighting
        "scale_only": ["distill=off", "reweight=false"],
        "scale_reweight": ["distill=off"],
        "distill_only": ["scale_consistency=false", "reweight=false"],
        "distill_reweight": ["scale_consistency=false"],
        "no_reweight": ["reweight=false"],
        "hard_distill": ["distill=hard"],
    },
}
REGION_MULTIPLES = (0.1, 0.5, 2.0)  # Dense Teacher's Table 5 in miniature: the region at these multiples


def region_ablation(max_iter: int) -> dict[str, list[str]]:
    """Dense Teacher's region sizes around the preset's ratio (capped at every location)."""
    ratio = resolve_config({"method": "dense_teacher", "detector": "fcos", "max_iter": max_iter}).method_args["ratio"]
    return {f"region_x{m:g}": [f"ratio={min(1.0, ratio * m):.4g}"] for m in REGION_MULTIPLES}


def rows(percent: float, max_iter: int, *, ablations: bool) -> dict[str, list[str]]:
    """Every row's train.py arguments (without seed and output folder)."""
    table: dict[str, list[str]] = {}
    for detector in DETECTORS:
        # The supervised rows take the methods' schedule and labeled batch (the Soft Teacher preset's, which all
        # methods share on the built-in dataset).
        preset = resolve_config({"method": "soft_teacher", "detector": detector, "max_iter": max_iter})
        schedule = ["--lr", str(preset.lr), "--warmup-iters", str(preset.warmup_iters), "--schedule",
                    preset.schedule, "--milestones", *[str(m) for m in preset.milestones],
                    "--labeled-batch", str(preset.labeled_batch)]
        for p in (percent, 100.0):
            table[f"supervised_{detector}_{p:g}pct"] = ["--method", "supervised", "--detector", detector,
                                                        "--percent", f"{p:g}", *schedule]
    for method, detectors in METHOD_DETECTORS.items():
        for detector in detectors:
            table[f"{method}_{detector}"] = ["--method", method, "--detector", detector, "--percent", f"{percent:g}"]
            if ablations:
                extra = region_ablation(max_iter) if (method, detector) == ("dense_teacher", "fcos") else {}
                for name, settings in (ABLATIONS.get((method, detector), {}) | extra).items():
                    table[f"{method}_{detector}_{name}"] = [*table[f"{method}_{detector}"], "--method-args",
                                                            *settings]
    common = ["--max-iter", str(max_iter), "--draw-period", "0"]
    return {name: [*argv, *common] for name, argv in table.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def compare(mean: float, std: float, base_mean: float, base_std: float) -> tuple[float, bool | None, bool | None]:
    """(difference, a gain that counts, a loss that counts): beyond twice the pooled std of the two rows."""
    difference, pooled = mean - base_mean, math.sqrt((std ** 2 + base_std ** 2) / 2)
    if math.isnan(pooled):  # a row of one seed has no spread to judge by
        return difference, None, None
    return difference, difference > 2 * pooled, difference < -2 * pooled


def previous_table(path: Path, *, percent: float, max_iter: int, dataset_seed: int, vary_fold: bool) -> dict:
    """The table already written at `path` (a <doc>.json), if it measured the same benchmark (headline fraction,
    schedule, dataset seed and folds), else {}: its rows keep the per-seed figures of runs no longer on disk."""
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise SystemExit(f"bench/benchmark.py: cannot read the previous table {path}: {error}")
    same = (table.get("percent") == percent and table.get("max_iter") == max_iter
            and table.get("dataset_seed", 0) == dataset_seed and table.get("vary_fold", False) == vary_fold)
    return table if same and isinstance(table.get("rows"), dict) else {}


def carried_seed(previous: dict, argv: list[str], seed: int, machine: str,
                 recipe: Config | None = None) -> dict | None:
    """Seed `seed` of a previous table's row, if that row ran the same command line and, where it recorded the
    recipe its runs trained (`config`), the recipe that command line makes today (`recipe`; a preset may have
    changed since): {"student": AP or None, "teacher": AP or None, "minutes": float or None, "machine": where it
    ran}. `machine` is the previous table's; a seed that table had itself carried keeps its own."""
    if previous.get("argv") != argv or seed not in previous.get("seeds", []):
        return None
    if recipe is not None and "config" in previous:
        recorded = recorded_config(previous["config"])  # settings that no longer make a Config: another recipe
        if isinstance(recorded, str) or recipe_difference(recorded, recipe) is not None:
            return None
    i = previous["seeds"].index(seed)

    def at(key: str):
        values = previous.get(key, [])
        return values[i] if i < len(values) else None
    carried, sources = previous.get("carried", []), previous.get("carried_from", [])
    if seed in carried and carried.index(seed) < len(sources):
        machine = sources[carried.index(seed)]
    return {"student": at("student"), "teacher": at("teacher"), "minutes": at("minutes"), "machine": machine}


def run_recipe_difference(run_dir: Path, recipe: Config, ignore: tuple[str, ...] = ()) -> str | None:
    """How the run in `run_dir` (its config.json) trained another recipe than `recipe`, in `recipe_difference`'s
    words (the run's value first), or None when it trained the same one."""
    try:
        trained = recorded_config(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError) as error:  # unreadable, or not JSON
        return f"its config.json cannot be read ({error})"
    return trained if isinstance(trained, str) else recipe_difference(trained, recipe, ignore)


def summarise(runs: dict[str, list[str]], dirs: dict[tuple[str, int], Path], seeds: list[int],
              percent: float, previous: dict | None = None, recipes: dict[str, Config | str] | None = None,
              vary_fold: bool = False) -> dict[str, dict]:
    """Per row: {"detector", "method", "percent", "seeds", "student": [AP...], "teacher": [AP...], ...stats}.

    `recipes` holds the Config each row's command line makes today (`engine.results.argv_config`). A finished run
    that trained another one (its config.json; e.g. a preset changed since it ran) is not counted, and the
    row records the recipe as "config". A seed whose run is not under the output folder takes its figures
    from `previous` (the table written before, `previous_table`) when that row ran the same command line and
    recipe; its row lists it in "carried" and the machine that measured it at the same place of
    "carried_from"."""
    summary, previous, recipes = {}, previous or {}, recipes or {}
    previous_rows, previous_machine = previous.get("rows", {}), previous.get("machine", "unknown")
    for name, argv in runs.items():
        method, detector = argv[argv.index("--method") + 1], argv[argv.index("--detector") + 1]
        row_percent = float(argv[argv.index("--percent") + 1])
        recipe = recipes.get(name) if isinstance(recipes.get(name), Config) else None
        row = {"method": method, "detector": detector, "percent": row_percent, "argv": argv,
               "seeds": [], "student": [], "teacher": [], "minutes": [], "carried": [], "carried_from": []}
        if recipe is not None:
            row["config"] = recipe_dict(recipe)
        for seed in seeds:
            result = final_metrics(dirs[name, seed])
            if result and recipe is not None:  # with --vary-fold each seed trained its own fold
                difference = run_recipe_difference(dirs[name, seed], recipe, ("fold",) if vary_fold else ())
                if difference is not None:
                    print(f"bench/benchmark.py: {dirs[name, seed]} trained another recipe than row {name}'s "
                          f"command line makes now ({difference}); not counted")
                    result = None
            if not result:
                kept = carried_seed(previous_rows.get(name, {}), argv, seed, previous_machine, recipe)
                if kept is None or kept["student"] is None:
                    continue
                row["seeds"].append(seed)
                row["carried"].append(seed)
                row["carried_from"].append(kept["machine"])
                for model in ("student", "teacher"):
                    if kept[model] is not None:
                        row[model].append(kept[model])
                row["minutes"].append(kept["minutes"] if kept["minutes"] is not None else float("nan"))
                continue
            row["seeds"].append(seed)
            for model in ("student", "teacher"):
                if model in result:
                    row[model].append(100 * result[model]["AP"])
            # Wall time of the whole run: its last final evaluation ends it (evaluations included).
            row["minutes"].append(max(r.get("elapsed", float("nan")) for r in result.values()) / 60)
        for model in ("student", "teacher"):
            if row[model]:
                row[f"{model}_mean"], row[f"{model}_std"] = mean_std(row[model])
        summary[name] = row
    for name, row in summary.items():  # the gap closed and the gain's significance, against the baselines
        low = summary.get(f"supervised_{row['detector']}_{percent:g}pct", {})
        high = summary.get(f"supervised_{row['detector']}_100pct", {})
        if row["method"] == "supervised" or "student_mean" not in low:
            continue
        for model in ("student", "teacher"):
            if f"{model}_mean" not in row:
                continue
            gain, better, worse = compare(row[f"{model}_mean"], row[f"{model}_std"], low["student_mean"],
                                          low["student_std"])
            row[f"{model}_gain"], row[f"{model}_significant"], row[f"{model}_worse"] = gain, better, worse
            if "student_mean" in high and high["student_mean"] > low["student_mean"]:
                row[f"{model}_gap_closed"] = gain / (high["student_mean"] - low["student_mean"])
    for name, row in summary.items():  # an ablation against its method's full row, by the same two-std rule
        parent = f"{row['method']}_{row['detector']}"
        if row["method"] == "supervised" or name == parent:
            continue
        row["ablation_of"], full = parent, summary.get(parent, {})
        model = "teacher" if "teacher_mean" in row else "student"
        if f"{model}_mean" not in row or f"{model}_mean" not in full:
            continue
        change, better, worse = compare(row[f"{model}_mean"], row[f"{model}_std"], full[f"{model}_mean"],
                                        full[f"{model}_std"])
        row["ablation_change"] = change
        row["ablation_counts"] = None if better is None else better or worse
    return summary


def ablation_lines(summary: dict[str, dict]) -> list[str]:
    """The papers' ablations in miniature: each switched-off part against its method's full row (teacher AP)."""
    rows = [(name, row) for name, row in summary.items() if "ablation_of" in row]
    if not rows:
        return []
    lines = ["", "## Ablations", "",
             "Each row turns one part of a method off (or changes one setting); the change is its teacher's mean AP "
             "minus the full method's, and it counts where it exceeds twice their pooled std.", "",
             "| ablation | of | seeds | teacher AP | full method | change |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in rows:
        full = summary.get(row["ablation_of"], {})  # --rows may leave the full method out
        change = ""
        if "ablation_change" in row:
            verdict = {None: "", True: " (counts)", False: " (within noise)"}[row["ablation_counts"]]
            change = f"{row['ablation_change']:+.1f}{verdict}"
        star = "*" if row.get("carried") else ""
        lines.append(f"| {name} | {row['ablation_of']} | {len(row['seeds'])}{star} | {_cell(row, 'teacher')} | "
                     f"{_cell(full, 'teacher')} | {change} |")
    return lines


def _cell(row: dict, model: str) -> str:
    if f"{model}_mean" not in row:
        return "-"
    std = row[f"{model}_std"]
    return f"{row[f'{model}_mean']:.1f} ± {std:.1f}" if not math.isnan(std) else f"{row[f'{model}_mean']:.1f}"


def markdown(summary: dict[str, dict], *, percent: float, max_iter: int, machine: str, dataset_seed: int,
             seeds: int) -> str:
    lines = ["| row | detector | labels | seeds | student AP | teacher AP | gain over supervised | gap closed | "
             "minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        model = "teacher" if "teacher_mean" in row else "student"
        gain, gap = "", ""
        if f"{model}_gain" in row:
            if row[f"{model}_significant"] is None:
                mark = ""
            elif row[f"{model}_significant"]:
                mark = " (counts)"
            else:
                mark = " (below supervised, beyond noise)" if row[f"{model}_worse"] else " (within noise)"
            gain = f"{row[f'{model}_gain']:+.1f}{mark}"
        if f"{model}_gap_closed" in row:
            gap = f"{100 * row[f'{model}_gap_closed']:.0f}%"
        timed = [m for m in row.get("minutes", []) if not math.isnan(m)]
        minutes = f"{statistics.median(timed):.0f}" if timed else "-"
        star = "*" if row.get("carried") else ""
        lines.append(f"| {name} | {row['detector']} | {row['percent']:g}% | {len(row['seeds'])}{star} | "
                     f"{_cell(row, 'student')} | {_cell(row, 'teacher')} | {gain} | {gap} | {minutes} |")
    header = [
        "# Results on the built-in benchmark",
        "",
        f"Written by `python bench/benchmark.py` on {time.strftime('%Y-%m-%d')}: the built-in dataset (generator "
        f"seed {dataset_seed}), {percent:g}% of the labels as the headline fraction, {max_iter} iterations, COCO AP "
        f"(AP50:95, %) of the final model on all validation images. Each cell is the mean ± sample std over the "
        f"seeds; a gain counts where it exceeds twice the pooled std of the method and its supervised baseline, "
        f"and a loss where it falls below minus that. "
        f"The gap closed is (method - supervised at {percent:g}%) / (supervised at 100% - supervised at "
        f"{percent:g}%), on the teacher for the methods. Minutes: the median wall time of a run, its "
        f"evaluations included.",
        "",
        "A seed changes the heads' initialisation, the order and augmentation of the images and the methods' random "
        "choices; the labeled split (fold 1) and the dataset stay the same unless `--vary-fold` or `--dataset-seed` "
        "says otherwise, so the spread measures training noise.",
        "",
        f"Machine: {machine}.",
        "",
    ]
    carried = sorted({machine for row in summary.values() for machine in row.get("carried_from", [])})
    if carried:
        header += [f"Seeds marked * were measured for an earlier writing of this table and carried over, since "
                   f"their runs are not in the output folder (same command lines; measured on: "
                   f"{'; '.join(carried)}).", ""]
    short = [name for name, row in summary.items() if len(row["seeds"]) < seeds]
    if short:
        header += [f"Incomplete: {len(short)} of {len(summary)} rows have fewer than {seeds} seeds (a row without "
                   f"seeds has not run). A figure of such a row, and a gain against it, is not a claim.", ""]
    return "\n".join(header + lines + ablation_lines(summary)) + "\n"


def bar_chart(summary: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/benchmark.py: matplotlib is not installed; no bar chart (pip install matplotlib)")
        return False
    names = [n for n, r in summary.items() if "student_mean" in r]
    models = [("teacher" if "teacher_mean" in summary[n] else "student") for n in names]
    means = [summary[n][f"{m}_mean"] for n, m in zip(names, models)]
    stds = [0 if math.isnan(summary[n][f"{m}_std"]) else summary[n][f"{m}_std"] for n, m in zip(names, models)]
    colours = ["#999999" if summary[n]["method"] == "supervised" else "#3572b0" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)), 4.5))
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colours)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("COCO AP (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (0..N-1)")
    parser.add_argument("--percent", type=float, default=BUILTIN_PERCENT, help="the headline label fraction")
    parser.add_argument("--max-iter", type=int, default=BENCHMARK_ITERATIONS)
    parser.add_argument("--rows", nargs="*", default=[], help="only the rows whose name contains one of these texts")
    parser.add_argument("--ablations", action="store_true", help="add the papers' ablations in miniature")
    parser.add_argument("--dataset-seed", type=int, default=0, help="the built-in dataset's generator seed")
    parser.add_argument("--vary-fold", action="store_true", help="seed s also takes the labeled split's fold s+1")
    parser.add_argument("--out", default="", help="default: runs/benchmark[_data<N>]")
    parser.add_argument("--doc", default="", help="default: docs/RESULTS (seed 0) or docs/RESULTS_data<N>")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0: cores / jobs")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write the table from the finished runs")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, one string")
    args = parser.parse_args(argv)

    suffix = f"_data{args.dataset_seed}" if args.dataset_seed else ""
    out = Path(args.out or f"runs/benchmark{suffix}")
    doc = Path(args.doc or ROOT / "docs" / f"RESULTS{suffix}")
    seeds = list(range(args.seeds))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = {name: argv for name, argv in rows(args.percent, args.max_iter, ablations=args.ablations).items()
            if not args.rows or any(text in name for text in args.rows)}
    if not runs:
        raise SystemExit(f"bench/benchmark.py: no row name contains any of --rows {args.rows}")
    extra = [*shlex.split(args.extra), *(["--builtin-spec", f"seed={args.dataset_seed}"] if args.dataset_seed else [])]
    commands, dirs = {}, {}
    for name, row_argv in runs.items():
        for seed in seeds:
            fold = ["--fold", str(seed + 1)] if args.vary_fold else []
            commands[f"{name}/seed{seed}"] = [*row_argv, "--seed", str(seed), *fold, *extra]
            dirs[name, seed] = out / name / f"seed{seed}"
    if args.list:
        for key, command in commands.items():
            print(f"{key}: python train.py {shlex.join(command)}")
        return
    if not args.report_only:
        flat_dirs = {key: dirs[key.split("/seed")[0], int(key.split("/seed")[1])] for key in commands}
        for path in flat_dirs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        # Seed-major order: every row gets its first seed before any row gets its second.
        order = sorted(commands, key=lambda key: (int(key.split("/seed")[1]), list(runs).index(key.split("/")[0])))
        run_all({key: commands[key] for key in order}, dirs=flat_dirs, jobs=args.jobs, threads=threads)

    # A row records the train.py flags of its runs, --extra's included, so that a run can tell whether it
    # trained the same recipe (engine/results.py); the seed and the fold are per run, the dataset seed per table.
    # Rows measured before and not run by this call keep their place in the table (`previous_table`).
    previous = previous_table(doc.with_suffix(".json"), percent=args.percent, max_iter=args.max_iter,
                              dataset_seed=args.dataset_seed, vary_fold=args.vary_fold)
    every = {name: [*argv, *shlex.split(args.extra)] for name, argv in
             rows(args.percent, args.max_iter, ablations=True).items()}
    recorded = {name: argv for name, argv in every.items()
                if name in runs or previous.get("rows", {}).get(name, {}).get("argv") == argv}
    dirs = {(name, seed): out / name / f"seed{seed}" for name in recorded for seed in seeds}  # finished runs win
    recipes = {name: argv_config(argv, args.dataset_seed) for name, argv in recorded.items()}
    summary = summarise(recorded, dirs, seeds, args.percent, previous, recipes, args.vary_fold)
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, {args.jobs} run(s) at a time with {threads} torch "
               f"thread(s) each")
    text = markdown(summary, percent=args.percent, max_iter=args.max_iter, machine=machine,
                    dataset_seed=args.dataset_seed, seeds=args.seeds)
    doc.parent.mkdir(parents=True, exist_ok=True)
    if bar_chart(summary, doc.with_suffix(".png")):
        text += f"\n![results]({doc.with_suffix('.png').name})\n"
    doc.with_suffix(".md").write_text(text)
    doc.with_suffix(".json").write_text(json.dumps(
        {"percent": args.percent, "max_iter": args.max_iter, "dataset_seed": args.dataset_seed,
         "vary_fold": args.vary_fold, "machine": machine, "rows": summary}, indent=1) + "\n")
    print(text)
    print(f"bench/benchmark.py: wrote {doc.with_suffix('.md')}")


if __name__ == "__main__":
    main()
