"""A run folder belongs to one run: the lock, earlier runs, --overwrite, stale temporary checkpoint files."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.run_dir import LOCK_NAME, RunDirError, claim_run_dir

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_claim_is_refused_naming_the_pid_and_host(tmp_path):
    with claim_run_dir(tmp_path, resume=False, overwrite=False):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=rf"is in use by another run \(pid {os.getpid()} on host "
                                              rf"{socket.gethostname()}.*wait for it to end"):
            with claim_run_dir(tmp_path, resume=True, overwrite=False):
                pass
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with claim_run_dir(tmp_path, resume=False, overwrite=False):
        pass


def test_the_lock_of_another_live_process_is_respected_and_a_dead_ones_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from engine.run_dir import claim_run_dir
            with claim_run_dir({str(tmp_path)!r}, resume=False, overwrite=False):
                print("held", flush=True)
                sys.stdin.readline()
        """)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"pid {holder.pid} on host"):
            with claim_run_dir(tmp_path, resume=True, overwrite=False):
                pass
    finally:
        holder.kill()  # dies holding the lock: the kernel releases the flock, the file stays
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with claim_run_dir(tmp_path, resume=True, overwrite=False):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_an_earlier_run_needs_resume_or_overwrite(tmp_path, capsys):
    for name in ("config.json", "metrics.jsonl", "checkpoint_0000002.pth", "model.results.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "pseudo_labels").mkdir()
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.1@10.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds an earlier run \(checkpoint_0000002.pth, metrics.jsonl\): give "
                                          r"--resume to continue it, --overwrite"):
        with claim_run_dir(tmp_path, resume=False, overwrite=False):
            pass
    assert (tmp_path / "metrics.jsonl").exists()  # nothing touched
    with claim_run_dir(tmp_path, resume=True, overwrite=False):
        assert (tmp_path / "metrics.jsonl").exists()
    with claim_run_dir(tmp_path, resume=False, overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "splits"]  # the user's file, the cache
    assert "deleted the earlier run's checkpoint_0000002.pth, config.json, metrics.jsonl, model.results.json, " \
           "pseudo_labels/" in capsys.readouterr().out
    with pytest.raises(RunDirError, match="give one of them"):
        with claim_run_dir(tmp_path, resume=True, overwrite=True):
            pass


def test_stale_temporary_checkpoints_are_removed_and_a_file_is_no_folder(tmp_path, capsys):
    (tmp_path / ".checkpoint_0000004.pth.tmp1234").write_bytes(b"x" * 2**20)
    (tmp_path / ".last.pth.tmp99").symlink_to("checkpoint_0000004.pth")
    (tmp_path / ".hidden_notes").write_text("mine")
    with claim_run_dir(tmp_path, resume=True, overwrite=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_notes"]
    assert "deleted 2 temporary checkpoint files left by an interrupted write" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunDirError, match=r"--output-dir .*a_file is a file, not a folder"):
        with claim_run_dir(tmp_path / "a_file", resume=False, overwrite=False):
            pass


def test_without_flock_the_lock_record_decides(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    with claim_run_dir(tmp_path, resume=True, overwrite=False):  # its process is gone: taken over
        pass
    parent = os.getppid()  # alive
    lock.write_text(json.dumps({"pid": parent, "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(RunDirError, match=rf"pid {parent} .*cannot lock files.*if that run is over, delete .*run.lock"):
        with claim_run_dir(tmp_path, resume=True, overwrite=False):
            pass
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    with pytest.raises(RunDirError, match="on host elsewhere"):
        with claim_run_dir(tmp_path, resume=True, overwrite=False):
            pass
