"""Distributed training on the CPU: train.py under torchrun with 2 gloo processes (engine/distributed.py).

The claim under test: two processes with a global batch of B end with the weights that one process reaches
with the same B and seed. Rank r takes draws r, r + 2, ... of each sample stream, so the two ranks' batches
of an iteration are one process's batch split in two (same images, same views); DDP averages the ranks'
gradients, and FCOS's num_pos divisor is counted over the global batch (`detectors.losses.positive_normalizer`),
so the averaged gradient is the one-process gradient up to float rounding.

What would break that exactness, and how these runs avoid it:
  - BatchNorm trained from scratch normalises with batch statistics, and on the CPU each rank sees only its
    own images (torch's SyncBatchNorm needs a GPU). The runs load "pretrained" (random) ResNet weights, which
    freezes the backbone's BatchNorm; FCOS's head uses GroupNorm, per image. (With trainable BatchNorm the
    two runs drift apart; `test_every_rank_ends_with_...` checks what must hold anyway: every rank ends with
    the same student and teacher, through `average_buffers`.)
  - A batch is padded to its largest image: every image here is 64 x 64, so both ranks pad like one process.
  - The methods' own draws on torch's global generator (RoI sampling, Soft Teacher's jitter) are seeded per
    rank and so differ from one process's: FCOS draws nothing; SED draws s from {1} (max_scale_exp 1). Soft
    Teacher on Faster R-CNN can therefore match one process only in distribution.
  - A term normalised by a count of its rank's own batch that is not proportional to the rank's images: SED's
    re-weighting (Eq. 5) counts the samples per gradient-norm bin of one rank (off here, reweight=false),
    Dense Teacher picks its top-k region and its divisor fg among one rank's rows (as the authors' per-GPU
    code does). Those follow one process only approximately (Dense Teacher: weights about 1e-3 apart after
    4 iterations here, against 1e-8 for the runs below).

One run goes through torchrun and train.py's command line; the others start their 2 ranks from a fork
server that imported torch once (`launch`), since importing it takes a process most of its time here.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision

import train
from engine import distributed
from engine.checkpoint import checkpoint_name, load_checkpoint, point_last
from engine.config import resolve_config
from engine.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SPEC = dict(num_train=40, num_val=8, image_size=64, min_size=8, max_size=40, max_objects=3, clutter=1.0)




@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory):
    """A torchvision ResNet-18 state dict (random): given as pretrained weights it freezes the BatchNorm."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def settings(builtin_dir, output_dir, **overrides) -> dict:
    """FCOS with a ResNet-18 / 32-channel FPN and one conv per head tower, 64 px images, global batch 4 (+ 4)."""
    return dict(builtin_dir=str(builtin_dir), backbone_pretrain="", builtin_spec=SPEC, output_dir=str(output_dir), detector="fcos",
                percent=50.0, train_sizes=[64], train_max_size=64, test_size=64, test_max_size=64,
                fpn_channels=32, head_convs=1, labeled_batch=4, lr=0.01, warmup_iters=1, milestones=[0.75],
                max_iter=4, eval_period=1000, checkpoint_period=2, keep_checkpoints=0, log_period=1, threads=1,
                seed=0) | overrides


def as_flags(values: dict) -> list[str]:
    """{"max_iter": 4, "train_sizes": [64], "method_args": {"a": 1}} -> ["--max-iter", "4", "--train-sizes", "64",
    "--method-args", "a=1"]; a bool -> "--flag" / "--no-flag"."""
    flags = []
    for key, value in values.items():
        flags.append(f"--{key.replace('_', '-')}")
        if isinstance(value, dict):
            flags += [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, list):
            flags += [str(v) for v in value]
        elif isinstance(value, bool):
            flags[-1] = flags[-1] if value else f"--no-{key.replace('_', '-')}"
        else:
            flags.append(str(value))
    return flags


def torchrun(values: dict, *, nproc: int = 2) -> None:
    """train.py under `python -m torch.distributed.run --standalone` (torchrun), `nproc` gloo processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *as_flags(values)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _worker(rank: int, world: int, port: int, values: dict, record: str) -> None:
    """One rank: torchrun's variables, then train.train. With `record`, saves the student and the teacher
    this rank ends with (the checkpoint shows rank 0's only) as <record>/rank<r>.pth."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    built = {}

    class RecordingTeacher(train.EMATeacher):
        def __init__(self, student_model):
            super().__init__(student_model)
            built.update(student=student_model, teacher=self.model)

    train.EMATeacher = RecordingTeacher
    try:
        train.train(resolve_config(values))
        if record:
            torch.save({name: model.state_dict() for name, model in built.items()}, Path(record) / f"rank{rank}.pth")
    finally:
        distributed.cleanup()


# What the fork server imports once, before it forks any rank: torch and the project's packages (the server
# does not see the test's sys.path, so train.py and this file are imported by each rank; they are light).
PRELOAD = ["torch", "torchvision", "pycocotools.coco", "pycocotools.cocoeval", "detectors", "semi.sed",
           "semi.dense_teacher", "semi.soft_teacher", "data.coco", "engine.evaluation", "engine.config"]


def launch(values: dict, *, nproc: int = 2, record: Path | None = None, timeout: float = 300.0) -> None:
    """train.train in `nproc` processes forked from a fork server (a process that imported torch and never ran
    an op, so forking it is safe) instead of started afresh: the imports would take most of each run."""
    mp.set_forkserver_preload(PRELOAD)  # read by the server's first start only
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_worker, args=(nproc, port, values, str(record or "")), nprocs=nproc, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nproc} ranks did not finish within {timeout:g} s")


def max_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over the floating-point tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


def final_state(run_dir: Path, iteration: int = 4) -> dict:
    return load_checkpoint(run_dir / checkpoint_name(iteration))


# ------------------------------------------------------------------------------------------------------------
# Two processes against one
# ------------------------------------------------------------------------------------------------------------


def test_two_processes_match_one_supervised(builtin_dir, backbone_weights, tmp_path):
    values = settings(builtin_dir, tmp_path / "one", backbone_weights=str(backbone_weights))
    train.train(resolve_config(values))
    torchrun(values | {"output_dir": str(tmp_path / "two")})

    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert max_difference(one["model"], final_state(tmp_path / "one", 2)["model"]) > 1e-4  # the weights do move
    assert max_difference(one["model"], two["model"]) < 1e-5
    assert two["extra"]["rng_per_rank"] and len(two["extra"]["rng_per_rank"]) == 2
    # The logged loss is the global batch's: the mean over the ranks of their normalised losses.
    loss = lambda run: [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
    assert loss("two") == pytest.approx(loss("one"), rel=1e-5)
    # Evaluation: each rank predicts half of the 8 val images, rank 0 scores all of them.
    evals = lambda run: [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r.get("eval") == "student"]
    assert evals("two")[-1]["AP50"] == pytest.approx(evals("one")[-1]["AP50"], abs=1e-6)


@pytest.fixture(scope="module")
def sed_runs(builtin_dir, backbone_weights, tmp_path_factory):
    """SED (soft self-distillation and scale consistency, no re-weighting), one process and two."""
    root = tmp_path_factory.mktemp("sed")
    values = settings(builtin_dir, root / "one", backbone_weights=str(backbone_weights), method="sed",
                      unlabeled_batch=4, method_args={"reweight": False, "pad_stride": 32, "burn_in": 0, "ramp": 0})
    train.train(resolve_config(values))
    launch(values | {"output_dir": str(root / "two")})
    return root, values


def test_two_processes_match_one_sed_student_and_teacher(sed_runs):
    root, _ = sed_runs
    one, two = final_state(root / "one"), final_state(root / "two")
    assert max_difference(one["model"], two["model"]) < 1e-5
    assert max_difference(one["teacher"], two["teacher"]) < 1e-5
    records = [r for r in read_metrics(root / "two" / "metrics.jsonl") if "loss" in r]
    assert any(key.startswith("unsup_") for key in records[-1])  # the unsupervised terms did train


def test_two_process_run_resumes_from_its_checkpoint(sed_runs, tmp_path):
    """A 2-process run restarted from its iteration-2 checkpoint ends where the uninterrupted one did."""
    root, values = sed_runs
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copy(root / "two" / checkpoint_name(2), run / checkpoint_name(2))
    point_last(run / checkpoint_name(2))
    launch(values | {"output_dir": str(run), "resume": True})

    uninterrupted, resumed = final_state(root / "two"), final_state(run)
    for part in ("model", "teacher"):
        assert max_difference(uninterrupted[part], resumed[part]) == 0.0, part
    assert resumed["optimizer"]["param_groups"][0]["lr"] == uninterrupted["optimizer"]["param_groups"][0]["lr"]


# ------------------------------------------------------------------------------------------------------------
# Trainable BatchNorm: not equal to one process, but equal on every rank
# ------------------------------------------------------------------------------------------------------------


def test_every_rank_ends_with_the_same_student_and_teacher_with_trainable_batchnorm(builtin_dir, tmp_path):
    # Dense Teacher averages the BatchNorm buffers into its teacher too; from scratch, BatchNorm trains.
    values = settings(builtin_dir, tmp_path / "run", method="dense_teacher", unlabeled_batch=4, max_iter=3,
                      checkpoint_period=1000, eval_period=1000,
                      method_args={"burn_in": 0, "ramp": 0, "teacher_init": 0, "ema_momentum": 0.5})
    launch(values, record=tmp_path)

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    for part in ("student", "teacher"):
        assert max_difference(rank0[part], rank1[part]) == 0.0, part
    running = [k for k in rank0["student"] if k.endswith("running_mean")]
    assert running  # BatchNorm did train: its statistics moved from their start (0)
    assert any(rank0["student"][k].abs().max() > 0 for k in running)


# ------------------------------------------------------------------------------------------------------------
# Batches and learning rate
# ------------------------------------------------------------------------------------------------------------


def test_global_batch_is_split_evenly_or_refused():
    cfg = resolve_config({"method": "soft_teacher", "labeled_batch": 8, "unlabeled_batch": 32})
    assert cfg.per_process_batch(1) == (8, 32)
    assert cfg.per_process_batch(8) == (1, 4)
    with pytest.raises(ValueError, match="labeled_batch 8 .* multiple of 16"):
        cfg.per_process_batch(16)
    with pytest.raises(ValueError, match="unlabeled_batch 32 .* multiple of 3"):
        resolve_config({"method": "soft_teacher", "labeled_batch": 9, "unlabeled_batch": 32}).per_process_batch(3)
    assert resolve_config({"labeled_batch": 6}).per_process_batch(3) == (2, 0)  # supervised: no unlabeled batch


def test_learning_rate_follows_the_global_batch_unless_given():
    preset = resolve_config({"method": "soft_teacher", "dataset": "coco", "data_root": "/coco"})
    assert (preset.labeled_batch, preset.unlabeled_batch, preset.lr) == (8, 32, 0.01)
    smaller = resolve_config({"method": "soft_teacher", "data_root": "/coco", "unlabeled_batch": 12})
    assert smaller.lr == pytest.approx(0.01 * (8 + 12) / (8 + 32))
    given = resolve_config({"method": "soft_teacher", "data_root": "/coco", "unlabeled_batch": 12, "lr": 0.03})
    assert given.lr == 0.03
    assert resolve_config({}).lr == 0.02  # the built-in preset's lr, for its 8 images
    assert resolve_config({"labeled_batch": 16}).lr == pytest.approx(0.04)


def test_torch_syncbatchnorm_refuses_the_cpu(tmp_path):
    """Why the CPU runs keep per-rank BatchNorm (engine/distributed.py, `sync_batchnorm`): torch's SyncBatchNorm
    raises on CPU tensors. Should a torch release lift that, this test fails and the CPU can sync too."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = torch.nn.SyncBatchNorm(3).train()
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            layer(torch.rand(2, 3, 4, 4))
    finally:
        torch.distributed.destroy_process_group()


def test_one_process_helpers_degrade_to_the_plain_answer():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather({"a": 1}) == [{"a": 1}] and distributed.gather(3) == [3]
    assert distributed.broadcast("x") == "x"
    assert distributed.mean_over_ranks({"loss": torch.tensor(2.0, requires_grad=True)}) == {"loss": 2.0}
    run = distributed.loss_runner(torch.nn.Linear(1, 1), device=torch.device("cpu"))
    assert run(lambda: 5) == 5
    with distributed.main_first():
        pass


def test_one_process_under_torchrun_joins_a_process_group(monkeypatch):
    """torchrun --nproc_per_node 1: a process group of one rank, so that one GPU runs what N run (DDP, NCCL,
    SyncBatchNorm); here on gloo. Without torchrun's variables nothing is joined."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and distributed.init("cpu") == torch.device("cpu")
    assert not distributed.is_distributed() and distributed.backend() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(name, value)
    assert distributed.launched()
    try:
        assert distributed.init("cpu") == torch.device("cpu")
        assert distributed.is_distributed() and distributed.backend() == "gloo"
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert distributed.all_gather({"a": 1}) == [{"a": 1}] and distributed.gather(3) == [3]
        assert distributed.broadcast("x") == "x"
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        run = distributed.loss_runner(model, device=torch.device("cpu"))
        assert isinstance(run, torch.nn.parallel.DistributedDataParallel)
        run(lambda: model(torch.randn(4, 2)).square().sum()).backward()
        assert all(p.grad is not None for p in model.parameters())
        running_mean = model[1].running_mean.clone()
        distributed.average_buffers(model)  # the mean over one rank: the same numbers
        assert torch.equal(model[1].running_mean, running_mean)
        assert distributed.mean_over_ranks({"loss": 2.0}) == {"loss": 2.0}
        assert distributed.sync_batchnorm(model, device=torch.device("cpu")) is model  # CPU: no SyncBatchNorm
    finally:
        distributed.cleanup()
    assert not distributed.is_distributed()
