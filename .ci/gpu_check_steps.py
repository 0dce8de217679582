"""The Python steps of .ci/gpu_check (run from the checkout being checked; see that script).

    python .ci/gpu_check_steps.py deps                      # install what requirements.txt lists and is missing
    python .ci/gpu_check_steps.py arch                      # the GPU's compute capability, e.g. "9.0"
    python .ci/gpu_check_steps.py registered --device cuda  # semi._C loads and holds a kernel of every op there
    python .ci/gpu_check_steps.py train --device cuda --iters 20 --work DIR --rows FILE
    python -m torch.distributed.run --standalone --nproc_per_node 1 \
        .ci/gpu_check_steps.py ddp --device cuda --iters 4 --work DIR --rows FILE

`train` and `ddp` append one line per check to FILE (tab-separated: check, PASS or FAIL, seconds, detail),
which the script prints as its summary, and exit non-zero when a check failed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The module each requirement is imported as, where the names differ.
MODULE_OF = {"pillow": "PIL"}

# Each method on its paper's detector, and the fused ops (semi/ops.py entry points) it must call.
METHODS = {
    "soft_teacher": ("faster_rcnn", {"jitter_boxes", "refine_stats"}),
    "dense_teacher": ("fcos", {"frs_topk_mask"}),
    "sed": ("faster_rcnn", {"ghm_kl_with_counts"}),
}
PRECISIONS = {"fp32": "", "bf16": "bf16", "fp16": "fp16"}  # label -> Config.amp

# The unsupervised losses from the first iteration (no burn-in, no ramp, the teacher from the start), and
# Soft Teacher's thresholds low enough that a teacher fresh from its initialisation gives pseudo-boxes, so
# that every fused op runs within a few iterations.
METHOD_ARGS = {
    "soft_teacher": {"burn_in": 0, "ramp": 0, "initial_score_thr": 0.05, "rpn_score_thr": 0.05,
                     "cls_score_thr": 0.05},
    "dense_teacher": {"burn_in": 0, "ramp": 0, "teacher_init": 0},
    "sed": {"burn_in": 0, "ramp": 0},
}

# A small built-in dataset (the preset's 128 px images, no extra unlabeled pool): generated in seconds.
BUILTIN_SPEC = {"num_train": 64, "num_val": 8, "unlabeled_per_train": 0.0}

# --small (the CPU dry run): the model and the batches of the tests' tiny runs, so that an iteration takes
# seconds on a CPU, not minutes.
SMALL = {"labeled_batch": 2, "unlabeled_batch": 2, "train_sizes": [96], "train_max_size": 96, "test_size": 96,
         "test_max_size": 96, "fpn_channels": 32, "head_convs": 1, "box_head_dim": 32, "rpn_pre_nms_train": 100,
         "rpn_pre_nms_test": 100, "rpn_post_nms_train": 50, "rpn_post_nms_test": 50, "roi_batch_size": 32}


# --------------------------------------------------------------------------------------------------------
# deps, arch, registered
# --------------------------------------------------------------------------------------------------------


def missing_requirements(path: Path) -> list[str]:
    """The lines of a requirements file whose package cannot be imported here (an installed torch counts,
    whatever its version: a GPU machine's own CUDA build of torch must not be replaced)."""
    missing = []
    for line in path.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if not requirement:
            continue
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        module = MODULE_OF.get(name.lower(), name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(requirement)
    return missing


def deps(_args) -> int:
    missing = missing_requirements(ROOT / "requirements.txt")
    if shutil.which("ninja") is None and "ninja" not in missing:
        missing.append("ninja")  # the build runs the ninja executable
    if not missing:
        print("requirements.txt: everything is installed")
        return 0
    print(f"requirements.txt: installing {' '.join(missing)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", *missing])


def arch(_args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: nvidia-smi sees a GPU but torch does not (a CPU-only torch, or a driver it cannot use): "
              f"torch {torch.__version__}, built for CUDA {torch.version.cuda}", file=sys.stderr)
        return 1
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{major}.{minor}")
    return 0


def registered(args) -> int:
    import torch

    from semi import ops

    if not ops.extension_available():
        print(f"semi._C is not in use: {ops.extension_error()}", file=sys.stderr)
        return 1
    key = "CUDA" if args.device == "cuda" else "CPU"
    if key == "CUDA" and not ops.extension_compiled_with_cuda():
        print("semi._C was built without its CUDA kernels (compiled_with_cuda() is False)", file=sys.stderr)
        return 1
    names = ["ghm_kl", "ghm_kl_forward", "ghm_kl_weight_", "ghm_kl_backward", "jitter_apply", "refine_stats",
             "frs_topk_mask"]
    absent = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ssod_ops::{n}", key)]
    if absent:
        print(f"no {key} kernel registered for: {', '.join(absent)}", file=sys.stderr)
        return 1
    print(f"semi._C: {ops._C.__file__}\n{key} kernels of {', '.join(names)}")
    return 0


# --------------------------------------------------------------------------------------------------------
# train, ddp
# --------------------------------------------------------------------------------------------------------


class Rows:
    """The checks' lines, appended to the summary file as they finish."""

    def __init__(self, path: str):
        self.path = path
        self.failed = 0

    def add(self, check: str, ok: bool, seconds: float, detail: str) -> None:
        self.failed += not ok
        detail = " ".join(detail.split())[:160]
        print(f"{'PASS' if ok else 'FAIL'}  {check}  ({seconds:.0f} s)  {detail}", flush=True)
        with open(self.path, "a") as f:
            f.write(f"{check}\t{'PASS' if ok else 'FAIL'}\t{seconds:.0f}\t{detail}\n")


def count_fused_calls():
    """Wrap semi.ops._use_extension (which every entry point asks) to count, per entry point and device,
    the calls that took the fused kernel. Returns the Counter {(entry point, device type): calls}."""
    from semi import ops

    calls = collections.Counter()
    ask = ops._use_extension

    def counting(*tensors):
        used = ask(*tensors)
        if used:
            calls[(sys._getframe(1).f_code.co_name, tensors[0].device.type)] += 1
        return used

    ops._use_extension = counting
    return calls


def run_config(method: str, amp: str, *, device: str, iters: int, work: Path, small: bool, **overrides):
    from engine.config import resolve_config

    detector = METHODS[method][0]
    method_args = METHOD_ARGS[method] | ({"jitter_times": 2} if small and method == "soft_teacher" else {})
    return resolve_config({
        # From scratch (no generated pretraining: minutes of CPU), so that BatchNorm trains and SyncBatchNorm
        # has layers to convert.
        "method": method, "detector": detector, "device": device, "amp": amp, "max_iter": iters, "seed": 0,
        "backbone_pretrain": "",
        "builtin_dir": str(work / "builtin"), "builtin_spec": BUILTIN_SPEC, "percent": 50.0,
        "output_dir": str(work / "runs" / f"{method}_{detector}_{amp or 'fp32'}"), "log_period": 1,
        "eval_period": 10**6, "checkpoint_period": iters, "draw_period": 0, "num_workers": 0,
        "method_args": method_args,
    } | (SMALL if small else {}) | overrides)


def check_finished_run(cfg) -> str:
    """Raises unless every logged loss and every weight of the final checkpoint is finite; returns a summary."""
    import torch

    from engine.checkpoint import last_checkpoint, load_checkpoint
    from engine.logger import read_metrics

    records = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if "loss" in r]
    if not records or records[-1]["iteration"] != cfg.max_iter:
        raise RuntimeError(f"metrics.jsonl ends at {records[-1]['iteration'] if records else 0}, not {cfg.max_iter}")
    for r in records:
        terms = {k: v for k, v in r.items() if k == "loss" or k.startswith(("sup_", "unsup_"))}
        if not all(isinstance(v, float) and math.isfinite(v) for v in terms.values()):
            raise FloatingPointError(f"iteration {r['iteration']}: a loss that is not a finite number: {terms}")
    state = load_checkpoint(last_checkpoint(cfg.output_dir))
    for part in ("model", "teacher"):
        for name, value in (state.get(part) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                raise FloatingPointError(f"{part} weight {name} is not finite after {cfg.max_iter} iterations")
    last = records[-1]
    unsup = sum(v for k, v in last.items() if k.startswith("unsup_"))
    detail = f"loss {last['loss']:.3f} (unsup terms {unsup:.3f})"
    if "loss_scale" in last:
        detail += f", loss scale {last['loss_scale']:g}"
    return detail


def train(args) -> int:
    import torch

    import train as train_script

    rows = Rows(args.rows)
    work = Path(args.work)
    calls = count_fused_calls()
    precisions = args.precisions.split(",")
    for method in args.methods.split(","):
        for label in precisions:
            check = f"train {method}/{METHODS[method][0]} {label}"
            start = time.perf_counter()
            calls.clear()
            try:
                cfg = run_config(method, PRECISIONS[label], device=args.device, iters=args.iters, work=work,
                                 small=args.small)
                shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a run of an earlier check in the same folder
                train_script.train(cfg)
                detail = check_finished_run(cfg)
                missing = {op for op in METHODS[method][1] if calls[(op, args.device)] == 0}
                if missing:
                    raise RuntimeError(f"the fused ops {sorted(missing)} never ran on {args.device}")
                used = ", ".join(f"{op} x{n}" for (op, dev), n in sorted(calls.items()) if dev == args.device)
                rows.add(check, True, time.perf_counter() - start, f"{args.iters} it, {detail}; fused: {used}")
            except Exception as error:  # noqa: BLE001  (every failure is reported, then the next run goes on)
                traceback.print_exc()
                rows.add(check, False, time.perf_counter() - start, f"{type(error).__name__}: {error}")
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return 1 if rows.failed else 0


def check_sync_batchnorm_kernels(device: str) -> str:
    """torch's synchronised BatchNorm (per-rank statistics, their all-gather over the process group, the
    merged statistics; in backward an all-reduce) against plain BatchNorm. With one rank, SyncBatchNorm
    layers skip that path and normalise locally, so it is called directly here."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 6, 6, generator=gen) * 3 + 1).to(device)
    weight, bias = torch.rand(8, generator=gen).to(device), torch.randn(8, generator=gen).to(device)
    grad_out = torch.randn(4, 8, 6, 6, generator=gen).to(device)
    results = []
    for synced in (True, False):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        mean, var = torch.zeros(8, device=device), torch.ones(8, device=device)
        if synced:
            out = SyncBatchNormFunction.apply(*inputs, mean, var, 1e-5, 0.1, dist.group.WORLD, dist.get_world_size())
        else:
            out = F.batch_norm(inputs[0], mean, var, inputs[1], inputs[2], training=True, momentum=0.1, eps=1e-5)
        out.backward(grad_out)
        results.append([out, mean, var, *(t.grad for t in inputs)])
    worst = max(float((a - b).abs().max()) for a, b in zip(*results))
    if worst > 1e-4:
        raise RuntimeError(f"synchronised BatchNorm differs from plain BatchNorm by {worst:.3g}")
    return f"synchronised BatchNorm forward/backward within {worst:.1e} of plain"


def ddp(args) -> int:
    import torch
    import torch.nn as nn

    import train as train_script
    from engine import distributed

    rows = Rows(args.rows) if os.environ.get("RANK", "0") == "0" else None  # rank 0 writes the line
    converted = []
    sync_batchnorm = distributed.sync_batchnorm

    def spy(model, *, device):
        model = sync_batchnorm(model, device=device)
        converted.append(sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()))
        return model

    distributed.sync_batchnorm = spy
    start = time.perf_counter()
    world = os.environ.get("WORLD_SIZE", "?")
    check = f"torchrun {world} process(es), dense_teacher/fcos"
    try:
        work = Path(args.work)
        cfg = run_config("dense_teacher", "", device=args.device, iters=args.iters, work=work, small=args.small,
                         output_dir=str(work / "runs" / "torchrun_dense_teacher_fcos"))
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        train_script.train(cfg)
        expected = "nccl" if args.device == "cuda" else "gloo"
        if distributed.backend() != expected:
            raise RuntimeError(f"the run's process group is {distributed.backend()}, not {expected}")
        if args.device == "cuda" and not (converted and converted[0] > 0):
            raise RuntimeError("no BatchNorm layer became a SyncBatchNorm")
        detail = f"{distributed.backend()}, {converted[0] if converted else 0} SyncBatchNorm layers, "
        detail += check_finished_run(cfg) if distributed.is_main() else ""
        if args.device == "cuda":
            detail += "; " + check_sync_batchnorm_kernels(args.device)
        if rows:
            rows.add(check, True, time.perf_counter() - start, detail)
        return 0
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        if rows:
            rows.add(check, False, time.perf_counter() - start, f"{type(error).__name__}: {error}")
        return 1
    finally:
        distributed.cleanup()
        if args.device == "cuda":
            torch.cuda.synchronize()


def bench_rows(args) -> int:
    """The rows of bench/ops.py --json as summary lines (one per op: plain / fused time)."""
    rows = Rows(args.rows)
    for r in json.loads(Path(args.json).read_text()):
        rows.add(f"bench {r['op']} {r['size']}", True, 0,
                 f"plain {r['plain_ms']:.3f} ms, fused {r['fused_ms']:.3f} ms: {r['speedup']:.1f}x on {r['device']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("deps")
    sub.add_parser("arch")
    for name in ("registered", "train", "ddp", "bench-rows"):
        p = sub.add_parser(name)
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        p.add_argument("--iters", type=int, default=20)
        p.add_argument("--work", default="")
        p.add_argument("--rows", default="/dev/null")
        p.add_argument("--methods", default=",".join(METHODS))
        p.add_argument("--precisions", default=",".join(PRECISIONS))
        p.add_argument("--json", default="")
        p.add_argument("--small", action="store_true", help="tiny model and batches (the CPU dry run)")
    args = parser.parse_args()
    steps = {"deps": deps, "arch": arch, "registered": registered, "train": train, "ddp": ddp,
             "bench-rows": bench_rows}
    return steps[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
