"""What the bench scripts share: batches built in memory with random boxes, and a timer of repeated steps.

    batch = random_batch(8, 128, generator=g, num_classes=6)                 # a labeled Batch
    views = two_views(4, 128, aligned=True, generator=g, num_classes=6)    # an UnlabeledBatch
    seconds = time_steps(step, steps=5, warmup=2)                          # wall-clock of each timed call
"""

import time

import torch

from data.transforms import hflip_matrix, scale_matrix
from structures import Batch, UnlabeledBatch


def random_batch(batch_size: int, size: int, *, generator: torch.Generator, num_classes: int,
                 matrices: torch.Tensor | None = None, images: torch.Tensor | None = None,
                 max_boxes: int = 5) -> Batch:
    """B images of size x size (random unless given) with 1..max_boxes random boxes each (labels in
    0..num_classes-1). matrices: float64 (B, 3, 3) original -> view (None: identities)."""
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, max_boxes + 1, (), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.7
        wh = 8 + torch.rand(n, 2, generator=generator) * size * 0.3
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], dim=1),  # (n, 4) xyxy
                        "labels": torch.randint(0, num_classes, (n,), generator=generator),
                        "crowd": torch.zeros(0, 4)})
    if images is None:
        images = torch.rand(batch_size, 3, size, size, generator=generator)
    if matrices is None:
        matrices = torch.eye(3, dtype=torch.float64).expand(batch_size, 3, 3).clone()
    return Batch(images=images, image_sizes=torch.tensor([[size, size]] * batch_size), targets=targets,
                 matrices=matrices, image_ids=list(range(batch_size)), orig_sizes=[(size, size)] * batch_size)


def two_views(batch_size: int, size: int, *, aligned: bool, generator: torch.Generator,
              num_classes: int) -> UnlabeledBatch:
    """Weak and strong views: the same geometry with other pixels (aligned: Dense Teacher, SED), or a
    rescaled, every other image mirrored, strong view (Soft Teacher's own geometry)."""
    weak = random_batch(batch_size, size, generator=generator, num_classes=num_classes)
    strong_images = (weak.images + 0.1 * torch.randn(weak.images.shape, generator=generator)).clamp(0, 1)
    matrices = None
    if not aligned:
        matrices = torch.stack([hflip_matrix(size) @ scale_matrix(0.9, 0.9) if i % 2 else scale_matrix(0.9, 0.9)
                                for i in range(batch_size)])
    strong = random_batch(batch_size, size, generator=generator, num_classes=num_classes, images=strong_images,
                          matrices=matrices)
    return UnlabeledBatch(weak=weak, strong=strong)


def time_steps(step, *, steps: int, warmup: int) -> list[float]:
    """Call `step()` warmup + steps times; the wall-clock seconds of the last `steps` calls."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times
