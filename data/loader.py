"""Batches, samplers and loaders.

    labeled = build_train_loader(dataset, batch_size=8, seed=0)          # an endless iterator of Batch
    batch = next(labeled).to(device)                                     # images (B, 3, H, W), targets, ...

Reproducible augmentation: the training loader pairs every index its sampler yields with the position p of
that draw in the global sample stream, and the sample is built with `dataset.get(index, generator=g)`
where g is seeded from (seed, stream, p). The views of draw p therefore depend on the seed and p only: not
on the number of workers, nor on which worker or rank builds them, and a resumed run that skips the
batches it already consumed (`start_batch`) sees exactly the views it would have seen.
"""

import functools
import itertools
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from structures import Batch, UnlabeledBatch


def collate(samples: Sequence[dict], *, size_divisible: int = 32) -> Batch:
    """Stack sample dicts into a Batch, zero-padding images at the bottom / right.

    The padded size is the largest height and width in the batch, each rounded up to a multiple of
    `size_divisible` (1: no rounding), so that every FPN level divides it. Unreadable samples
    (`data.coco.unreadable_sample`) are left out and their ids listed in `skipped_ids`.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    skipped_ids = [int(s["image_id"]) for s in samples if s.get("unreadable")]
    samples = [s for s in samples if not s.get("unreadable")]
    if not samples:  # every image of the batch unreadable: an empty batch that says which
        return Batch(images=torch.zeros(0, 3, max(1, size_divisible), max(1, size_divisible)),
                     image_sizes=torch.zeros(0, 2, dtype=torch.int64), targets=[],
                     matrices=torch.zeros(0, 3, 3, dtype=torch.float64), image_ids=[], orig_sizes=[],
                     skipped_ids=skipped_ids)
    heights = [s["image"].shape[-2] for s in samples]
    widths = [s["image"].shape[-1] for s in samples]
    stride = max(1, size_divisible)
    height = -(-max(heights) // stride) * stride
    width = -(-max(widths) // stride) * stride
    images = samples[0]["image"].new_zeros((len(samples), 3, height, width))  # (B, 3, H, W)
    for i, sample in enumerate(samples):
        images[i, :, :heights[i], :widths[i]].copy_(sample["image"])
    return Batch(
        images=images,
        image_sizes=torch.tensor(list(zip(heights, widths)), dtype=torch.int64).reshape(-1, 2),  # (B, 2)
        targets=[{"boxes": s["boxes"], "labels": s["labels"], "crowd": s["crowd"]} for s in samples],
        matrices=torch.stack([torch.as_tensor(s["matrix"], dtype=torch.float64) for s in samples]),  # (B, 3, 3)
        image_ids=[int(s["image_id"]) for s in samples],
        orig_sizes=[tuple(int(v) for v in s["orig_size"]) for s in samples],
        skipped_ids=skipped_ids,
    )


def collate_unlabeled(samples: Sequence[dict], *, size_divisible: int = 32) -> UnlabeledBatch:
    """Collate {"weak": sample, "strong": sample} dicts view by view."""
    return UnlabeledBatch(weak=collate([s["weak"] for s in samples], size_divisible=size_divisible),
                          strong=collate([s["strong"] for s in samples], size_divisible=size_divisible))


def _collate_any(samples: Sequence[dict], *, size_divisible: int) -> Batch | UnlabeledBatch:
    if any("weak" in s for s in samples):
        return collate_unlabeled(samples, size_divisible=size_divisible)
    return collate(samples, size_divisible=size_divisible)


class InfiniteSampler(torch.utils.data.Sampler):
    """An endless stream of dataset indices: shuffled permutations one after another (detectron2-style).

    Every rank computes the same global stream (a torch.Generator seeded with `seed`) and keeps the items
    rank, rank + world_size, rank + 2 * world_size, ...: the ranks' streams are disjoint slices of one
    stream, and within each permutation every index is drawn once overall. `start` skips this rank's first
    `start` items (resume). `draws()` yields (global position, index) pairs instead of bare indices.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start: int = 0):
        if size <= 0:
            raise ValueError(f"InfiniteSampler: the dataset is empty (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"InfiniteSampler: rank {rank} not in [0, {world_size})")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle, self.start = shuffle, start

    def _global_stream(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield from torch.randperm(self.size, generator=generator).tolist()
            else:
                yield from range(self.size)

    def draws(self) -> Iterator[tuple[int, int]]:
        """(position in the global stream, dataset index) for this rank's items."""
        first = self.rank + self.start * self.world_size
        positions = itertools.count(first, self.world_size)
        return zip(positions, itertools.islice(self._global_stream(), first, None, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return (index for _, index in self.draws())


class _DrawSampler(torch.utils.data.Sampler):
    """Yields (position, index) pairs of an InfiniteSampler, for _SeededDraws."""

    def __init__(self, sampler: InfiniteSampler):
        self.sampler = sampler

    def __iter__(self):
        return self.sampler.draws()


class _SeededDraws(torch.utils.data.Dataset):
    """dataset.get(index, generator=g) with g seeded from (seed, stream, position) for a (position, index) key."""

    def __init__(self, dataset, *, seed: int, stream: int):
        self.dataset, self.seed, self.stream = dataset, seed, stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, index = key
        return self.dataset.get(index, generator=draw_generator(self.seed, self.stream, position))


def draw_generator(seed: int, stream: int, position: int) -> torch.Generator:
    """A torch.Generator for draw `position` of sample stream `stream` (0 labeled, 1 unlabeled) under `seed`."""
    state = np.random.SeedSequence([seed, stream, position]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _worker_init(worker_id: int) -> None:
    # Workers share the 2..N cores with the main process: one intra-op thread each.
    torch.set_num_threads(1)


def build_train_loader(dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, size_divisible: int = 32, stream: int = 0,
                       start_batch: int = 0, pin_memory: bool = False) -> Iterator[Batch | UnlabeledBatch]:
    """An endless iterator of batches of `dataset` for this rank.

    dataset: needs `len()` and `get(index, *, generator)` (data.coco.CocoDetection); samples are single-view
    dicts (-> Batch) or {"weak", "strong"} dicts (-> UnlabeledBatch). stream: separates the random draws of
    two loaders sharing a seed (labeled 0, unlabeled 1). start_batch: batches this rank already consumed.
    With num_workers > 0 the workers build the next batches (two each) while the model trains on this one;
    pin_memory (for CUDA) puts them in page-locked memory, so that `batch.to(device, non_blocking=True)` does
    not block the training process.
    """
    # The order of the images is seeded by (seed, stream) too, so two streams never walk in step.
    order_seed = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    sampler = InfiniteSampler(len(dataset), seed=order_seed, rank=rank, world_size=world_size,
                              start=start_batch * batch_size)
    loader = torch.utils.data.DataLoader(
        _SeededDraws(dataset, seed=seed, stream=stream), batch_size=batch_size, sampler=_DrawSampler(sampler),
        num_workers=num_workers, collate_fn=functools.partial(_collate_any, size_divisible=size_divisible),
        worker_init_fn=_worker_init, persistent_workers=num_workers > 0, drop_last=True, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed))  # keeps the DataLoader off torch's global generator
    return iter(loader)


class TrainLoaders(NamedTuple):
    labeled: Iterator[Batch]
    unlabeled: Iterator[UnlabeledBatch] | None


def build_train_loaders(labeled, unlabeled=None, *, labeled_batch: int, unlabeled_batch: int = 0, seed: int,
                        rank: int = 0, world_size: int = 1, num_workers: int = 0, size_divisible: int = 32,
                        start_batch: int = 0, pin_memory: bool = False) -> TrainLoaders:
    """The labeled loader (stream 0) and, when `unlabeled` is given and unlabeled_batch >= 1, the unlabeled one
    (stream 1). Each has its own num_workers processes."""
    common = dict(seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                  size_divisible=size_divisible, start_batch=start_batch, pin_memory=pin_memory)
    labeled_iter = build_train_loader(labeled, batch_size=labeled_batch, stream=0, **common)
    unlabeled_iter = None
    if unlabeled is not None and unlabeled_batch >= 1:
        unlabeled_iter = build_train_loader(unlabeled, batch_size=unlabeled_batch, stream=1, **common)
    return TrainLoaders(labeled=labeled_iter, unlabeled=unlabeled_iter)


def build_val_loader(dataset, *, batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     size_divisible: int = 32) -> torch.utils.data.DataLoader:
    """One pass over this rank's share of `dataset` (indices rank, rank + world_size, ...): every image is
    seen by exactly one rank, none twice. Batches may be smaller at the end."""
    if not 0 <= rank < world_size:
        raise ValueError(f"build_val_loader: rank {rank} not in [0, {world_size})")
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=list(range(rank, len(dataset), world_size)), num_workers=num_workers,
        collate_fn=functools.partial(_collate_any, size_divisible=size_divisible), worker_init_fn=_worker_init)
