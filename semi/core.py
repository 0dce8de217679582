"""What the three methods share: the method interface, loss bookkeeping, the unsupervised weight's ramp, and
BatchNorm statistics kept to the labeled view.

Loss bookkeeping (docs/METHODS.md, "Loss"): a detector's criterion and a method's `unsupervised_loss` return
unweighted terms with the same key names ("loss_cls", "loss_box", ...). The training loop prefixes them
(`sup_` / `unsup_`) and `weighted_total` is the one place where the weights are applied:

    losses = prefix(sup, "sup_") | prefix(unsup.losses, "unsup_")
    total = weighted_total(losses, weights)         # sum_k weights[k] * losses[k]

BatchNorm statistics: a detector trained from scratch keeps trainable BatchNorm, whose running statistics are
what the teacher and the evaluation normalise with. `frozen_norm_statistics` keeps them those of the labeled
weak view, the images a detector is tested on, while the student also sees strong views and X_hat.

Boxes move between views with `structures.carry_boxes`; the pseudo-label diagnostics against the hidden
annotations are `engine/pseudo_labels.py`.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from detectors import Detector
from structures import UnlabeledBatch


@dataclass
class UnsupOutput:
    """What `method.unsupervised_loss(...)` returns (ARCHITECTURE.md, "The training loop and the method interface").

    losses: unweighted scalar terms, keys without prefix ("loss_cls", ...); the same keys every iteration,
        finite even when there is no pseudo-label (then 0, connected to the graph).
    pseudo_boxes: B dicts {"boxes" float32 (K_i, 4) xyxy pixels of the WEAK view, "scores" (K_i,),
        "labels" int64 (K_i,)}: the pseudo-labels the method trained on, for diagnostics; None if the
        method has no hard pseudo-labels.
    stats: plain floats worth logging (number of pseudo-boxes, ...).
    """

    losses: dict[str, Tensor]
    pseudo_boxes: list[dict[str, Tensor]] | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Method(Protocol):
    """What the training loop reads of a method: every attribute train.py and bench/ use, and nothing else
    (ARCHITECTURE.md, "The training loop and the method interface"). Soft Teacher, Dense Teacher and SED
    implement it; "supervised" is no method (None)."""

    labeled_views: tuple[str, ...]  # ("weak",) or ("weak", "strong"): the views the supervised loss is taken on
    unlabeled_aligned: bool  # the strong view is pixel-aligned with the weak one (Dense Teacher, SED)
    teacher_init_iteration: int  # the teacher is (re)copied from the student at this iteration
    ema_include_buffers: bool  # the EMA averages floating-point buffers (BatchNorm statistics) too, or copies them

    def unsupervised_loss(self, *, student: Detector, teacher: Detector, unlabeled: UnlabeledBatch,
                          iteration: int) -> "UnsupOutput":
        """The unweighted unsupervised terms of one iteration (UnsupOutput)."""

    def loss_weights(self, iteration: int) -> dict[str, float]:
        """The weight of each "unsup_<key>" term at `iteration`, burn-in and ramp included."""

    def ema_momentum(self, iteration: int) -> float | None:
        """The teacher's EMA momentum after step `iteration`; None: no update."""


# ------------------------------------------------------------------------------------------------------------
# Loss bookkeeping
# ------------------------------------------------------------------------------------------------------------


def prefix(losses: dict[str, Tensor], p: str) -> dict[str, Tensor]:
    """{"loss_cls": x} -> {p + "loss_cls": x}."""
    return {p + key: value for key, value in losses.items()}


def weighted_total(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k weights[k] * losses[k]: the one place where loss weights are applied.

    losses: prefixed scalar terms. A `sup_` term without a weight weighs 1; an `unsup_` term (or any
    other key) without a weight is an error, since a silently unweighted unsupervised term would change
    the method. Terms of weight 0 are left out (so that a term nobody trains on cannot poison the total).
    Returns a scalar Tensor, connected to the graph of every term with a non-zero weight.
    """
    if not losses:
        raise ValueError("semi/core.py: weighted_total got no loss terms")
    total = None
    for key, value in losses.items():
        if key in weights:
            weight = float(weights[key])
        elif key.startswith("sup_"):
            weight = 1.0
        else:
            raise KeyError(f"semi/core.py: no weight for loss term {key!r}; weights given for {sorted(weights)}")
        if weight == 0.0:
            continue
        term = weight * value
        total = term if total is None else total + term
    return total if total is not None else zero_loss(next(iter(losses.values())))


def linear_ramp(iteration: int, *, start: int, length: int) -> float:
    """The unsupervised weight's factor: 0 during burn-in (t < start), then a linear ramp from 0 to 1 over
    `length` iterations, then 1. length = 0 is a step at `start`.

    Dense Teacher (COCO): start 5000, length 5000. Soft Teacher: start 0, length 0 (no burn-in).
    """
    if iteration < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (iteration - start) / length)


def zero_loss(like: Tensor) -> Tensor:
    """A scalar 0 connected to `like`'s graph (zero gradient), for a term with nothing to learn from.

    Summing an empty slice gives an exact 0 even when `like` holds inf or NaN (`like.sum() * 0` would not),
    and keeps the term in the loss dict so that every iteration (and every rank) has the same keys.
    """
    return like.reshape(-1)[:0].sum()


@contextmanager
def frozen_norm_statistics(model: nn.Module, *, enabled: bool = True):
    """Within the block, BatchNorm layers of `model` normalise by batch statistics as usual (in train mode) but
    leave their running statistics (mean, variance, batch count) as they were.

    The papers fine-tune an ImageNet backbone with frozen BatchNorm, so their unsupervised forward passes leave
    the normalisation alone. From scratch, every forward pass of the student in train mode moves the running
    statistics by momentum 0.1; the strong views and SED's downsampled X_hat would then make up most of them,
    and the teacher (an EMA of the student's buffers too) and the evaluation, both in eval mode, would
    normalise clean images by the statistics of other images. Momentum 0 makes each update
    `1 * running + 0 * batch`, exactly the old value; the buffers are not written over afterwards, because
    the backward of batch norm reads the very tensors the forward was given. enabled=False: a no-op.
    """
    if not enabled:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)  # an int64 counter that no backward reads
