"""Single-scale against multi-scale test AP of several checkpoints: the SED paper's Table 7 claim, in one table.

    python bench/multiscale.py sup=runs/sup10/last.pth sed=runs/sed/last.pth:teacher --sizes 77 128 192

Every checkpoint is evaluated by evaluate.py at each short side of --sizes alone, then at all of them with the
passes merged by class-wise NMS (evaluate.py --test-sizes). The table has one row per checkpoint: AP at each
size, AP of the merged passes, and the gain of the merged passes over the checkpoint's own test size (the
single-scale result). A model that is already consistent across scales gains less from the merge (SED,
Sec. 4.2 and Table 7). Each evaluation writes its results JSON next to the checkpoint, as evaluate.py does.

Sizes for the built-in preset (test size 128): 77 128 192, the proportions of the paper's 480 / 800 / 1200
around 800.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402


def parse_entry(entry: str) -> tuple[str, str, str]:
    """'NAME=PATH[:which]' -> (name, path, which); which is 'auto' unless given as teacher or student."""
    name, sep, rest = entry.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"bench/multiscale.py: expected NAME=CHECKPOINT[:teacher|:student], got {entry!r}")
    path, which = rest, "auto"
    for option in ("teacher", "student"):
        if rest.endswith(f":{option}"):
            path, which = rest[: -len(option) - 1], option
    if not Path(path).exists():
        raise SystemExit(f"bench/multiscale.py: checkpoint {path} (of {name!r}) does not exist")
    return name, path, which


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="NAME=CKPT[:which]")
    parser.add_argument("--sizes", type=int, nargs="+", default=[77, 128, 192], help="short sides of the test")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate the first N val images only (0: all)")
    args = parser.parse_args(argv)
    entries = [parse_entry(entry) for entry in args.checkpoints]
    if len(set(args.sizes)) != len(args.sizes) or len(args.sizes) < 2:
        raise SystemExit(f"bench/multiscale.py: --sizes needs two or more distinct sizes, got {args.sizes}")

    common = ["--threads", str(args.threads or os.cpu_count()), "--max-images", str(args.max_images)]
    table: dict[str, dict[str, float]] = {}
    for name, path, which in entries:
        test_size = load_checkpoint(path)["config"]["test_size"]
        row = {}
        for size in args.sizes:
            row[str(size)] = evaluate.main([path, "--which", which, "--test-sizes", str(size), *common])["AP"]
        row["merged"] = evaluate.main([path, "--which", which, "--test-sizes", *map(str, args.sizes), *common])["AP"]
        # The checkpoint's own test size is the single-scale result; without it in --sizes, no gain is shown.
        row["gain"] = row["merged"] - row[str(test_size)] if str(test_size) in row else float("nan")
        table[name] = row

    columns = [*map(str, args.sizes), "merged", "gain"]
    width = max(8, *(len(name) for name in table))
    print(f"\nAP (%) at each short side alone, the passes merged by NMS, and the merge's gain over the test size")
    print(f"{'':<{width}} " + " ".join(f"{c:>8}" for c in columns))
    for name, row in table.items():
        print(f"{name:<{width}} " + " ".join(f"{100 * row[c]:8.2f}" for c in columns))
    return table


if __name__ == "__main__":
    main()
