"""The published results table (docs/RESULTS.json, written by bench/benchmark.py), read back for a run.

    reference = baseline_for(cfg)     # the supervised row of the same preset and schedule, or None

A training run on the built-in dataset ends by printing its final AP next to the supervised baseline of the
same preset, label fraction, detector and schedule, as measured over seeds by `bench/benchmark.py`, so that
a user sees what the method gained. A run that differs from the benchmark's rows in any of those (or in the
dataset's generator seed) gets no baseline: its figures would not be comparable.
"""

import json
import math
from pathlib import Path
from typing import NamedTuple

RESULTS_JSON = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.json"


class Reference(NamedTuple):
    row: str  # the row's name in docs/RESULTS.md
    mean: float  # AP (%), mean over the seeds
    std: float  # sample std over the seeds (nan for one seed)
    seeds: int


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


def comparable(cfg, results: dict) -> bool:
    """Whether run `cfg` has the benchmark's dataset, schedule and label fraction."""
    spec_seed = cfg.builtin_spec.get("seed", 0)
    other_spec = set(cfg.builtin_spec) - {"seed"}
    return (cfg.dataset == "builtin" and not other_spec and spec_seed == results.get("dataset_seed", 0)
            and cfg.max_iter == results.get("max_iter") and math.isclose(cfg.percent, results.get("percent", -1)))


def baseline_for(cfg, path: str | Path = RESULTS_JSON) -> dict[str, Reference]:
    """{"supervised": the supervised row of cfg's detector and fraction, "method": cfg's own row (teacher AP),
    "full": supervised at 100%}, each present only if the table has it and cfg matches the benchmark."""
    results = load_results(path)
    if results is None or not comparable(cfg, results):
        return {}
    found = {
        "supervised": _row(results, f"supervised_{cfg.detector}_{cfg.percent:g}pct", "student"),
        "full": _row(results, f"supervised_{cfg.detector}_100pct", "student"),
        "method": (_row(results, f"{cfg.method}_{cfg.detector}", "teacher") if cfg.method != "supervised"
                   else None),
    }
    return {key: value for key, value in found.items() if value is not None}


def format_reference(reference: Reference) -> str:
    spread = f" ± {reference.std:.1f}" if not math.isnan(reference.std) else ""
    return f"{reference.mean:.1f}{spread} AP over {reference.seeds} seed(s)"
