"""Several processes training one model: the torch.distributed plumbing of train.py.

    torchrun --nproc_per_node 8 train.py ...     # one process (rank) per GPU; torchrun sets RANK, WORLD_SIZE, ...
    torchrun --nproc_per_node 1 train.py ...     # one rank, but in a process group: the code path of N ranks
    python train.py ...                          # none of those variables: one process, no process group

    device = init("cuda")                        # joins the process group (NCCL on CUDA, gloo on CPU)
    run_losses = loss_runner(model, device=device)
    total, ... = run_losses(compute)             # compute() is the whole loss of an iteration; DDP under torchrun
    total.backward()                             # gradients averaged over the ranks here

Who does what in a run of N ranks (train.py):
  every rank  builds the same student (DDP broadcasts rank 0's weights), takes its disjoint 1/N of each global
              batch, computes its losses; backward averages the gradients, so that the optimizer step, the
              BatchNorm statistics (`average_buffers`) and hence the EMA teacher are the same on every rank.
  rank 0      prints, logs, draws, writes config.json and checkpoints, and scores the gathered detections.

Without a process group every helper here degrades to the one-process answer (rank 0 of 1, gather -> [x],
barrier -> nothing), so train.py has one code path.
"""

import contextlib
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# --------------------------------------------------------------------------------------------------------
# The process group
# --------------------------------------------------------------------------------------------------------


def launched() -> bool:
    """True when a launcher (torchrun) started this process: RANK and WORLD_SIZE are in the env. One process
    under torchrun joins a process group of one rank too, so that it runs what N ranks run (DDP, NCCL,
    SyncBatchNorm), which is how a single GPU can check that path."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str) -> torch.device:
    """Join the process group torchrun describes and return this rank's device.

    device: the config's "cpu" or "cuda" (a "cuda:K" index is ignored under torchrun: rank r of a node takes
    GPU LOCAL_RANK). Backend: NCCL for CUDA, gloo for the CPU. torchrun's env (MASTER_ADDR, MASTER_PORT,
    RANK, WORLD_SIZE, LOCAL_RANK) says where to meet; without it nothing is joined and `torch.device(device)`
    comes back. Calling it again once joined only returns the device.
    """
    if not launched():
        return torch.device(device)
    cuda = device.split(":")[0] == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("engine/distributed.py: device 'cuda' asked for, but CUDA is not available")
        torch.cuda.set_device(local_rank())
        device = f"cuda:{local_rank()}"
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at once (and lets barriers know the device).
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                                device_id=torch.device(device) if cuda else None)
    return torch.device(device)


def is_distributed() -> bool:
    """True inside a process group (one rank or more): the helpers below then talk through it."""
    return dist.is_available() and dist.is_initialized()


def backend() -> str | None:
    """The process group's backend ("nccl", "gloo"), None without one."""
    return dist.get_backend() if is_distributed() else None


def rank() -> int:
    """This process's index among all processes of the run, 0 .. world_size() - 1."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): which GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its CPU cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the one process that prints, logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank got here (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a run; harmless without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others: for work that fills a cache once (generating the
    built-in dataset, writing split files), which the other ranks then only read."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# --------------------------------------------------------------------------------------------------------
# Python objects across ranks (pickled; small things only: detections, statistics, RNG states)
# --------------------------------------------------------------------------------------------------------


def all_gather(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in one process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather(obj: Any) -> list[Any] | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others; [obj] in one process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Each key's mean over the ranks that report it, ignoring nan (e.g. a precision with nothing to
    measure on one rank); nan where no rank has a number. For logging: the loss of the global batch is the
    mean of the ranks' losses (their terms are normalised so that DDP's mean gradient is the global one)."""
    values = {key: float(value.detach()) if torch.is_tensor(value) else float(value) for key, value in values.items()}
    if not is_distributed():
        return values
    merged: dict[str, list[float]] = {}
    for per_rank in all_gather(values):
        for key, value in per_rank.items():
            merged.setdefault(key, []).append(value)
    return {key: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for key, v in merged.items()}


# --------------------------------------------------------------------------------------------------------
# The model under DistributedDataParallel
# --------------------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """`forward(compute)` returns `compute()`; the student model is the only submodule, so DDP wrapped
    around this registers (and averages the gradients of) exactly the student's parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[], Any]) -> Any:
        return compute()


def loss_runner(model: nn.Module, *, device: torch.device) -> Callable[[Callable[[], Any]], Any]:
    """`run(compute) -> compute()`, inside one forward of DistributedDataParallel under torchrun.

    Why the whole loss goes through one call: DDP arms its gradient all-reduce in its own forward, but an
    iteration calls the student several times (supervised batch, unlabeled views) and through its parts
    (Faster R-CNN's features / rpn / roi_head), never through one `model(...)`. Running all of it inside one
    DDP forward, followed by one backward, makes each parameter's gradient (summed over every use) reach
    the all-reduce exactly once, and the student and the methods stay unaware of DDP.

    compute: takes no argument and calls the student (`model`, unwrapped) as usual. Every trainable
    parameter must get a gradient each iteration (DDP's find_unused_parameters is off; the supervised loss
    uses them all). Without a process group `run(compute)` is just `compute()`.
    """
    if not is_distributed():
        return lambda compute: compute()
    module = _LossModule(model)
    # The constructor broadcasts rank 0's parameters and buffers: every rank starts from the same student.
    # No buffer broadcast at each forward: it would overwrite the other ranks' BatchNorm statistics with rank
    # 0's, where `average_buffers` averages them.
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)


def sync_batchnorm(model: nn.Module, *, device: torch.device) -> nn.Module:
    """Under DDP on CUDA: BatchNorm2d -> SyncBatchNorm, so that training BatchNorm from scratch normalises
    with the statistics of the global batch rather than of one rank's few images. Returns the model.

    On the CPU (gloo) torch's SyncBatchNorm refuses to run (it supports GPU-like devices only), so each rank
    normalises with its own images' statistics and `average_buffers` averages the running statistics after
    every step. FrozenBatchNorm2d (pretrained backbones) has nothing to synchronise and is left alone.
    """
    if is_distributed() and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running mean / var) by its mean over the ranks.

    With SyncBatchNorm the ranks' buffers are already equal and stay so (N equal float32 values sum exactly
    in float64). With per-rank BatchNorm (CPU) the mean of the ranks' running means is the running mean of
    the global batch (the update is linear and the ranks hold equally many images), while the mean of their
    running variances leaves out the spread between the ranks' means. Integer buffers (num_batches_tracked)
    advance identically everywhere. One all-reduce for all buffers.
    """
    if not is_distributed():
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])  # (total,)
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def rank_seed(seed: int) -> int:
    """A seed for this rank's own random draws (Soft Teacher's jitter, RoI sampling, SED's scale), derived
    from (seed, rank) so that the ranks draw differently and a rerun draws the same."""
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0])
