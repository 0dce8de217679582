"""An output folder belongs to one run: locked while it trains, never mixed with an earlier run's files.

    with claim_run_dir("runs/x", resume=False, overwrite=False):   # train.py, rank 0, for the whole run
        ...

`claim_run_dir` does, in this order:

1. The folder: created if absent; a path that exists and is not a folder is an error naming --output-dir.
2. The lock: `run.lock` in the folder holds {"pid", "host", "started"} of the run using it, and that process
   holds an exclusive `flock` on the file, which the kernel releases when the process ends, however it ends.
   A second run finds the lock held and stops with a message naming the pid and host. A lock file whose
   process is gone is taken over. Where the file system has no flock, the record decides: a live pid on
   this host, or any pid on another host (which cannot be asked), refuses; the message says which file to
   delete once that run is known to be over.
3. An earlier run: a folder holding a run's results (EARLIER_RUN) refuses a fresh run, unless `resume`
   (continue it: train.py cuts its logs back to the checkpoint's iteration) or `overwrite` (its files,
   RUN_OUTPUTS, are deleted first, each kind named). The `splits/` cache is kept: it only depends on the data.
4. Stale temporary checkpoint files (`.checkpoint_*.pth.tmpPID`, `.last.pth.tmpPID`), left by a run killed
   while writing, are deleted: under the lock no other run can be writing them.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from engine.checkpoint import LAST

LOCK_NAME = "run.lock"
# Files whose presence means the folder holds an earlier run's results. A config.json alone (a run stopped by a
# bad setting or a missing file before its first iteration) holds none: a new run may replace it.
EARLIER_RUN = ("metrics.jsonl", "checkpoint_*.pth", "last.pth", "events.out.tfevents.*")
# What --overwrite deletes: everything train.py and evaluate.py write into a run folder, the splits cache aside.
RUN_OUTPUTS = EARLIER_RUN + ("config.json", "*.results.json", "pseudo_labels", "vis")
# What an interrupted engine.checkpoint.atomic_save / point_last leaves behind.
STALE_TEMPORARY = (".checkpoint_*.pth.tmp*", f".{LAST}.tmp*")


class RunDirError(RuntimeError):
    """The output folder cannot be used by this run (in use, holds an earlier run, or is not a folder)."""


@contextlib.contextmanager
def claim_run_dir(path: str | Path, *, resume: bool, overwrite: bool, verbose: bool = True) -> Iterator[Path]:
    """Own the run folder `path` for the block (module docstring); yields it as a Path."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --output-dir and --overwrite deletes it: give one of them")
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output-dir {run_dir} is a file, not a folder: choose another --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir / LOCK_NAME)
    lock.acquire()
    try:
        earlier = earlier_run_files(run_dir)
        if earlier and not (resume or overwrite):
            raise RunDirError(f"--output-dir {run_dir} holds an earlier run ({', '.join(earlier)}): give --resume "
                              f"to continue it, --overwrite to delete it and start afresh, or another --output-dir")
        if overwrite and earlier:
            removed = remove_run_outputs(run_dir)
            if verbose:
                print(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {run_dir}", flush=True)
        stale = remove_stale_temporaries(run_dir)
        if stale and verbose:
            print(f"deleted {len(stale)} temporary checkpoint files left by an interrupted write in {run_dir} "
                  f"({sum(size for _, size in stale) / 2**20:.1f} MB)", flush=True)
        yield run_dir
    finally:
        lock.release()


def earlier_run_files(run_dir: Path) -> list[str]:
    """The names of EARLIER_RUN files in run_dir, sorted."""
    return sorted({p.name for pattern in EARLIER_RUN for p in run_dir.glob(pattern)})


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Delete RUN_OUTPUTS in run_dir; returns the names deleted, sorted."""
    removed = set()
    for pattern in RUN_OUTPUTS:
        for p in run_dir.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.add(p.name + "/")
            else:
                p.unlink(missing_ok=True)
                removed.add(p.name)
    return sorted(removed)


def remove_stale_temporaries(run_dir: Path) -> list[tuple[str, int]]:
    """Delete STALE_TEMPORARY files in run_dir; returns (name, bytes) of each."""
    removed = []
    for pattern in STALE_TEMPORARY:
        for p in run_dir.glob(pattern):
            size = p.stat().st_size if p.is_file() else 0
            p.unlink(missing_ok=True)
            removed.append((p.name, size))
    return removed


class RunLock:
    """An exclusive lock on a run folder: a file holding the owner's pid and host, flock'ed while held."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming the run that holds it (module docstring, step 2)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._flock(fd):  # no flock on this file system: the record decides
                    holder = self.read()
                    if holder is not None and _may_be_alive(holder):
                        raise RunDirError(self._in_use(holder, checked=False))
                # The file may have been deleted and made anew by its releasing owner meanwhile: retry on that.
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Delete the lock file and let the lock go (deleted first, so that no one locks a deleted file)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def read(self) -> dict | None:
        """The lock file's record ({"pid", "host", "started"}), None when absent or unreadable."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _flock(self, fd: int) -> bool:
        """Take the flock; False where the file system cannot lock; RunDirError when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(self._in_use(self.read() or {}, checked=True)) from None
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True

    def _in_use(self, holder: dict, *, checked: bool) -> str:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
        text = (f"--output-dir {self.path.parent} is in use by another run ({who}; lock file {self.path}): wait for "
                f"it to end, or choose another --output-dir")
        if not checked:
            text += (f". This file system cannot lock files, so the lock file alone says so: if that run is over, "
                     f"delete {self.path}")
        return text


def _may_be_alive(holder: dict) -> bool:
    """Whether the run a lock record names may still run: its pid lives on this host, or it is on another."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
