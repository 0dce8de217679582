""".ci/gpu_check on a machine without a GPU, and the parts of its Python steps that need none (the steps
themselves run on the CPU with SSOD_GPU_CHECK_DEVICE=cpu, too slow for this suite)."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_check"


def load_steps():
    spec = importlib.util.spec_from_file_location("gpu_check_steps", ROOT / ".ci" / "gpu_check_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, nvidia_smi: str | None, **env):
    """The script with a PATH of its own: the few tools it needs before it looks for a GPU, and a stand-in
    nvidia-smi (a shell body; None: no nvidia-smi at all, even on a machine that has one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!{shutil.which('sh')}\n{nvidia_smi}\n")
        fake.chmod(0o755)
    environment = dict(os.environ, PATH=str(bin_dir), SSOD_GPU_CHECK_DIR=str(tmp_path / "work")) | env
    return subprocess.run([shutil.which("bash"), str(SCRIPT)], capture_output=True, text=True, env=environment,
                          timeout=60)


@pytest.mark.parametrize("nvidia_smi", [None, "exit 9", "echo 'No devices were found'"])
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path, nvidia_smi):
    done = run_script(tmp_path, nvidia_smi)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to check"]
    assert not (tmp_path / "work").exists()  # it did nothing else


def test_an_unknown_device_is_refused(tmp_path):
    done = run_script(tmp_path, None, SSOD_GPU_CHECK_DEVICE="tpu")
    assert done.returncode == 2 and "SSOD_GPU_CHECK_DEVICE must be cuda or cpu, got 'tpu'" in done.stderr


def test_it_is_not_part_of_the_ci_run():
    assert "gpu_check" not in (ROOT / ".ci" / "run").read_text()


def test_only_missing_requirements_are_installed(tmp_path):
    steps = load_steps()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch==0.0.1  # another version than the one installed: kept\nnumpy\npillow\n\n"
                            "# a comment\nno-such-package-here>=1.0\n")
    assert steps.missing_requirements(requirements) == ["no-such-package-here>=1.0"]


def test_every_method_runs_on_its_papers_detector_with_its_fused_ops():
    steps = load_steps()
    from engine.config import PAPER_DETECTOR

    papers = {m: d for m, d in PAPER_DETECTOR.items() if m != "supervised"}
    assert {m: d for m, (d, _) in steps.METHODS.items()} == papers
    assert set(steps.PRECISIONS) == {"fp32", "bf16", "fp16"}


def test_the_step_rows_are_one_tab_separated_line_each(tmp_path):
    steps = load_steps()
    rows = steps.Rows(str(tmp_path / "rows.tsv"))
    rows.add("train sed/faster_rcnn fp16", False, 12.4, "FloatingPointError: non-finite\nloss\tat 3")
    rows.add("bench ghm_kl", True, 0, "2.0x")
    lines = (tmp_path / "rows.tsv").read_text().splitlines()
    assert [line.split("\t") for line in lines] == [
        ["train sed/faster_rcnn fp16", "FAIL", "12", "FloatingPointError: non-finite loss at 3"],
        ["bench ghm_kl", "PASS", "0", "2.0x"],
    ]
    assert rows.failed == 1
