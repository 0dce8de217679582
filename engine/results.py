"""The published results table (docs/RESULTS.json, written by bench/benchmark.py), read back for a run.

    references = baseline_for(cfg)    # {"supervised" / "full" / "method": Reference} of the same recipe
    table = table_references(cfg)     # the same, and why each row of the table that exists is not quoted

A training run ends by printing its final AP next to the table's rows that measured the same recipe over
seeds, so that a user sees what the method gained: the supervised baseline at the run's label fraction, the
supervised model at 100% of the labels, and the run's own method. Each row of the table stores the
`train.py` arguments its runs were launched with (`argv`, without the seed that the benchmark adds per run;
the dataset's generator seed comes from the table's `dataset_seed`); the row's Config is rebuilt from them
with `engine.config.parse_config`, so from the same presets as the run's, and a row is quoted only when every
setting that changes what is trained equals the run's (RECIPE_EXEMPT lists the settings that do not). The
supervised rows are compared without the settings that only a method uses (METHOD_ONLY), and the 100% row
without the label fraction too; it is quoted only beside the baseline at the run's fraction, the other end of
the gap that the method closes. A row that records no `argv` (a table
written before rows stored them), or whose `argv` no longer parses, is not quoted; so is every row of a run
that differs from the benchmark in its recipe, and `table_references` says where (e.g. "lr: 0.05 vs 0.02").

The argv pins the flags, not the presets they apply to, so each row also records the recipe its runs trained
(`config`: every setting of their Config outside RECIPE_EXEMPT), and a run is compared with that. A preset that
changes after the table was written therefore stops the row from being quoted, instead of quoting figures of
the old preset as the new one's. A row written before rows recorded their config is rebuilt from its argv
against today's presets.
"""

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import NamedTuple

from data.synthetic import BuiltinSpec
from engine.config import Config, parse_config
from engine.pretrain import PretrainSpec, weights_path

RESULTS_JSON = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.json"

# Config fields that do not change what a run trains, left out when a run is compared with a row. Every other
# field is part of the recipe (fold included: the table's seeds share one labeled split, so its spread does not
# cover another split; amp too: it changes the arithmetic of the forward passes).
RECIPE_EXEMPT = (
    "seed",  # the table's rows are a mean over seeds, which bench/benchmark.py adds per run
    # where files are read from or written to, not what they hold
    "output_dir", "builtin_dir", "voc_cache", "split_dir",
    # how the same computation is carried out
    "device", "threads", "num_workers",
    # what is evaluated, logged and kept along the way (the final evaluation uses every validation image)
    "eval_period", "eval_max_images", "checkpoint_period", "keep_checkpoints", "log_period", "draw_period",
    "tensorboard",
    # continuing or replacing an earlier run in output_dir
    "resume", "overwrite",
    # what to do about missing image files; the built-in dataset has none
    "skip_missing",
)

# Config fields that only a semi-supervised method uses: a supervised run reads none of them, so the supervised
# rows are compared with a method's run without them.
METHOD_ONLY = ("method", "method_args", "unlabeled_batch", "norm_stats", "unlabeled_json", "unlabeled_images",
               "unlabeled_coco_root")


class Reference(NamedTuple):
    row: str  # the row's name in docs/RESULTS.md
    mean: float  # AP (%), mean over the seeds
    std: float  # sample std over the seeds (nan for one seed)
    seeds: int


class TableReferences(NamedTuple):
    references: dict[str, Reference]  # "supervised", "full", "method": the rows quoted
    not_quoted: dict[str, str]  # the same keys: why a row of the table that has results is not quoted


def _row(results: dict, name: str, model: str) -> Reference | None:
    row = results.get("rows", {}).get(name)
    if not row or f"{model}_mean" not in row:
        return None
    return Reference(name, row[f"{model}_mean"], row.get(f"{model}_std", math.nan), len(row.get("seeds", [])))


def load_results(path: str | Path = RESULTS_JSON) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def recipe_dict(cfg: Config) -> dict:
    """cfg's settings that change what is trained (every field outside RECIPE_EXEMPT): what a table row records
    as `config`, and `Config.from_dict` rebuilds (the exempt fields at their defaults)."""
    return {name: value for name, value in cfg.to_dict().items() if name not in RECIPE_EXEMPT}


def recorded_config(values) -> Config | str:
    """The Config of recorded settings (a row's `config`, a run's config.json), or why they no longer make one."""
    try:
        return Config.from_dict(values)
    except (ValueError, TypeError, AttributeError) as error:  # unknown or mistyped settings, or not a dict
        return f"the recorded settings no longer make a Config ({error})"


def argv_config(argv: list[str], dataset_seed: int = 0) -> Config | str:
    """The Config that train.py builds today from a row's arguments (the benchmark adds the dataset's generator
    seed to every run besides them), or why they no longer parse."""
    extra = ["--builtin-spec", f"seed={dataset_seed}"] if dataset_seed else []
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text
            return parse_config([*argv, *extra])
    except (ValueError, TypeError, SystemExit) as error:  # argparse exits on a flag it does not know
        detail = "arguments train.py does not take" if isinstance(error, SystemExit) else error
        return f"a row's command line no longer parses ({detail})"


def row_config(results: dict, row: dict) -> Config | str:
    """The Config a row's runs trained with (their seed aside), or why it cannot be rebuilt: the recipe the row
    recorded (`config`), or for a row written before rows recorded it, its argv parsed against today's presets."""
    if results.get("vary_fold"):
        return "the table's seeds each trained on another labeled split (bench/benchmark.py --vary-fold)"
    if "config" in row:
        return recorded_config(row["config"])
    argv = row.get("argv")
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        return "the table's rows do not record their command line (written before bench/benchmark.py stored it)"
    return argv_config(argv, results.get("dataset_seed", 0))


def _recipe_value(cfg: Config, name: str):
    """cfg's value of a setting, as the recipe it stands for. {} and {"seed": 0} are the same built-in dataset. A
    run fills backbone_weights in with the generated pretraining's cached file (wherever SSOD_CACHE puts it)
    where a row's command line leaves it empty: that file, named by the pretraining's fingerprint, stands for the
    preset's own pretraining; other weights stay a setting."""
    value = getattr(cfg, name)
    if name == "builtin_spec":
        with contextlib.suppress(TypeError):
            return dataclasses.asdict(BuiltinSpec(**value))
    if name == "backbone_weights" and cfg.backbone_pretrain and value \
            and Path(value).name == weights_path(PretrainSpec(arch=cfg.backbone)).name:
        return ""
    return value


def _same(a, b) -> bool:
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)]
    if all(numbers):  # 10 and 10.0 are the same percent; a float that went through text may lose its last bit
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return a == b


def recipe_difference(cfg: Config, other: Config, ignore: tuple[str, ...] = ()) -> str | None:
    """The first setting that changes what is trained where cfg differs from other, as "lr: 0.05 vs 0.02"
    (cfg's value first; a dict setting names its first differing key), or None when the recipes are the same.
    RECIPE_EXEMPT and `ignore` are left out."""
    for f in dataclasses.fields(Config):
        if f.name in RECIPE_EXEMPT or f.name in ignore:
            continue
        mine, theirs = (_recipe_value(c, f.name) for c in (cfg, other))
        if _same(mine, theirs):
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            key = next(k for k in sorted({*mine, *theirs})
                       if (k in mine) != (k in theirs) or not _same(mine[k], theirs[k]))
            unset = "(not set)"
            return f"{f.name}.{key}: {mine.get(key, unset)!r} vs {theirs.get(key, unset)!r}"
        return f"{f.name}: {mine!r} vs {theirs!r}"
    return None


def table_references(cfg: Config, path: str | Path = RESULTS_JSON) -> TableReferences:
    """The table's rows of run `cfg`'s recipe: {"supervised": the supervised row of cfg's detector and fraction,
    "full": supervised at 100% (only alongside "supervised": the other end of its gap), "method": cfg's own row
    (teacher AP)}, each present only if the table has it and its recipe is cfg's; and for each row with results
    that is not quoted, why."""
    results = load_results(path)
    if results is None:
        return TableReferences({}, {})
    candidates = {"supervised": (f"supervised_{cfg.detector}_{cfg.percent:g}pct", "student", METHOD_ONLY),
                  "full": (f"supervised_{cfg.detector}_100pct", "student", (*METHOD_ONLY, "percent"))}
    if cfg.method != "supervised":
        candidates["method"] = (f"{cfg.method}_{cfg.detector}", "teacher", ())
    references, not_quoted = {}, {}
    for key, (name, model, ignore) in candidates.items():
        reference = _row(results, name, model)
        if reference is None:
            continue
        other = row_config(results, results["rows"][name])
        difference = other if isinstance(other, str) else recipe_difference(cfg, other, ignore)
        if difference is None:
            references[key] = reference
        elif isinstance(other, str):
            not_quoted[key] = other
        else:
            not_quoted[key] = f"this run's recipe differs from the benchmark's ({difference})"
    if "supervised" not in references:
        references.pop("full", None)
    return TableReferences(references, not_quoted)


def baseline_for(cfg: Config, path: str | Path = RESULTS_JSON) -> dict[str, Reference]:
    """`table_references(cfg, path).references`: the rows of cfg's recipe, by "supervised", "full", "method"."""
    return table_references(cfg, path).references


def format_reference(reference: Reference) -> str:
    spread = f" ± {reference.std:.1f}" if not math.isnan(reference.std) else ""
    return f"{reference.mean:.1f}{spread} AP over {reference.seeds} seed(s)"
