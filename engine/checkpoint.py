"""Checkpoints that survive a crash mid-write and load with `torch.load(path, weights_only=True)`.

A checkpoint is one dict of plain types (tensors, ints, floats, strings, lists, dicts, None):

    format       int, CHECKPOINT_FORMAT
    iteration    int, the next iteration to run (a run resumed from it continues there)
    config       dict, the resolved `engine.config.Config` as plain values
    meta         dict: num_classes, detector, class_names (list[str]), category_ids (list[int])
    model        the student's state_dict
    teacher      the teacher's state_dict, or None for supervised runs
    optimizer    optimizer.state_dict()
    scheduler    scheduler.state_dict()
    scaler       the gradient scaler's state_dict() of a float16 run (--amp fp16), else None
    rng          capture_rng_state(): python, numpy, torch CPU and CUDA generators
    extra        dict of anything else the caller restores itself (e.g. the loaders' sampler states)

Writes go to a temporary file in the same directory, are fsync'ed, and replace the target with
`os.replace`, which is atomic on POSIX: a crash leaves either the old file or the new one, never half of one.
`last.pth` in a run directory is a symbolic link to its newest checkpoint (replaced atomically too);
`--resume` and `python evaluate.py <run>/last.pth` follow it.
"""

import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = 1
LAST = "last.pth"  # symbolic link to the newest checkpoint of a run directory


# --------------------------------------------------------------------------------------------------------
# Random number generator states as plain values
# --------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every global generator's state as plain values.

    python: {"version": int, "state": list[int] (625), "gauss_next": float | None}
    numpy:  {"keys": int64 tensor (624,), "pos": int, "has_gauss": int, "cached_gaussian": float}
            (numpy's MT19937 keys are uint32; int64 holds them exactly and survives `weights_only` loading)
    torch:  uint8 tensor, torch.get_rng_state();  cuda: list of uint8 tensors, one per device ([] without CUDA)
    """
    version, state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    assert name == "MT19937", name
    return {
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (torch's seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only when as many devices are present."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


def atomic_save(obj, path: str | Path) -> None:
    """`torch.save(obj, path)` that leaves either the old file or the complete new one, never a partial write.

    The object is written to a temporary file in the same directory (so that `os.replace` stays on one file
    system), flushed to disk with fsync, then renamed over the target; the directory is fsync'ed so that the
    rename itself survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def point_last(path: str | Path) -> Path:
    """Atomically make `last.pth` in the checkpoint's directory a relative symbolic link to it."""
    path = Path(path)
    link = path.parent / LAST
    tmp = path.parent / f".{LAST}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return link


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint_{iteration:07d}.pth"


def save_checkpoint(path: str | Path, *, iteration: int, config: dict, meta: dict, model: nn.Module,
                    teacher: nn.Module | None, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None = None,
                    extra: dict | None = None, keep: int = 0) -> Path:
    """Atomically write a checkpoint and point `last.pth` in its directory at it.

    iteration: the next iteration to run. config: plain values only (`Config.to_dict()`).
    scaler: the loss scaler of a float16 run; its scale and growth counter are saved so that a resumed run
    continues with them (None, or a disabled scaler, saves None).
    keep: how many `checkpoint_*.pth` files of the directory to keep, newest first (0 keeps all); the file
    just written is never removed.
    """
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "iteration": int(iteration),
        "config": config,
        "meta": meta,
        "model": model.state_dict(),
        "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    atomic_save(state, path)
    point_last(path)
    if keep > 0:
        older = sorted(p for p in path.parent.glob("checkpoint_*.pth") if p.name != path.name)
        for stale in older[: max(0, len(older) - (keep - 1))]:
            stale.unlink(missing_ok=True)
    return path


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `last.pth` in run_dir links to (e.g. run_dir/checkpoint_0001500.pth), or None when the
    run has none yet."""
    link = Path(run_dir) / LAST
    if not link.is_symlink() and not link.exists():
        return None
    if not link.exists():
        raise FileNotFoundError(f"{link} links to {os.readlink(link)}, which does not exist")
    return link.parent / os.readlink(link) if link.is_symlink() else link


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU with `weights_only=True` (no arbitrary code runs while loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT} expected)")
    return state


def check_compatible(checkpoint: dict, *, path: str | Path, detector: str, num_classes: int) -> None:
    """Raise a ValueError naming the file when the checkpoint holds another detector or class count."""
    meta = checkpoint["meta"]
    if meta["detector"] != detector:
        raise ValueError(f"checkpoint {path} holds a {meta['detector']!r} model, but the config builds {detector!r}")
    if meta["num_classes"] != num_classes:
        raise ValueError(f"checkpoint {path} was trained on {meta['num_classes']} classes, but the dataset has "
                         f"{num_classes}")


def load_model_state(module: nn.Module, state_dict: dict, *, path: str | Path, what: str = "model") -> None:
    """`module.load_state_dict(state_dict)` with an error that names the file and every mismatching tensor."""
    own = module.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    resized = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
               for key in own if key in state_dict and state_dict[key].shape != own[key].shape]
    if missing or unexpected or resized:
        lines = [f"the {what} weights in {path} do not fit the model built from the config:"]
        for title, keys in (("shape mismatch", resized), ("missing in checkpoint", missing),
                            ("not in model", unexpected)):
            if keys:
                shown = keys[:8] + ([f"... {len(keys) - 8} more"] if len(keys) > 8 else [])
                lines.append(f"  {title}: " + "; ".join(shown))
        raise ValueError("\n".join(lines))
    module.load_state_dict(state_dict)


# --------------------------------------------------------------------------------------------------------
# Resuming a run
# --------------------------------------------------------------------------------------------------------


class Resumed(NamedTuple):
    """What `resume_run` restored, and what the caller restores later itself."""

    path: Path  # the checkpoint
    iteration: int  # the next iteration to run
    rng: dict  # capture_rng_state() of the process that saved it (rank 0)
    rng_per_rank: list[dict]  # every rank's generators in a distributed run; [] in a single process
    changed: list[str]  # the settings of cfg that differ from the checkpoint's ("resume" and "overwrite" aside)


def resume_run(path: str | Path, *, cfg, model: nn.Module, ema, optimizer, scheduler, scaler,
               num_classes: int) -> Resumed:
    """Load a run's checkpoint into the objects of the run that continues it.

    cfg: the resolved `engine.config.Config` (its detector must match the checkpoint's); model: the student;
    ema: the `semi.ema.EMATeacher` of a method, or None (a supervised checkpoint continued by a method gets a
    teacher that starts as the student); scaler: the gradient scaler, restored when it is enabled and the
    checkpoint has its state (the loss scale a float16 run had reached). The generators are left alone: the
    caller restores them (`restore_run_rng`) once its loaders are built, since building them draws.
    """
    path = Path(path)
    state = load_checkpoint(path)
    check_compatible(state, path=path, detector=cfg.detector, num_classes=num_classes)
    load_model_state(model, state["model"], path=path)
    if ema is not None and state["teacher"] is not None:
        load_model_state(ema.model, state["teacher"], path=path, what="teacher")
    elif ema is not None:  # a supervised checkpoint continued by a method: the teacher starts as the student
        ema.copy_from(model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    changed = sorted(k for k, v in state["config"].items()
                     if k not in ("resume", "overwrite") and getattr(cfg, k, v) != v)
    return Resumed(path=path, iteration=state["iteration"], rng=state["rng"],
                   rng_per_rank=state["extra"].get("rng_per_rank") or [], changed=changed)


def restore_run_rng(resumed: Resumed, *, rank: int, world_size: int, fallback_seed: int) -> None:
    """The generators of a resumed run, so that the methods' own draws (jitter, sampling) continue in step:
    the saved ones of a single process, this rank's of a distributed run of as many ranks, or, from a
    checkpoint of another number of ranks, fresh ones seeded with `fallback_seed` (still reproducible)."""
    if world_size == 1:
        restore_rng_state(resumed.rng)
    elif len(resumed.rng_per_rank) == world_size:
        restore_rng_state(resumed.rng_per_rank[rank])
    else:
        seed_everything(fallback_seed)
