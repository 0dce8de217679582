"""The hot path of the three methods: each op has a plain-PyTorch reference and a fused kernel.

"ghm" below is the gradient harmonizing mechanism (GHM; Li, Liu and Wang, AAAI 2019, arXiv:1811.05181), whose
histogram of gradient norms SED's Eq. 5 adopts; "frs" is the feature richness score (FRS; Du et al., NeurIPS
2021, arXiv:2111.00674), the teacher's maximum class score that Dense Teacher ranks locations by. The papers:
SED, Guo et al., CVPR 2022, arXiv:2203.12244; Soft Teacher, Xu et al., ICCV 2021, arXiv:2106.09018; Dense
Teacher, Zhou et al., ECCV 2022, arXiv:2207.02541 (docs/METHODS.md, "The fused ops").

    ghm_kl          SED's re-weighted KL (Eq. 5)                       -> torch.ops.ssod_ops.ghm_kl
    jitter_boxes    Soft Teacher's box jittering (Sec. 3.3, Eq. 7)    -> torch.ops.ssod_ops.jitter_apply
    refine_stats    Soft Teacher's box uncertainty (Eq. 8-9)          -> torch.ops.ssod_ops.refine_stats
    frs_topk_mask   Dense Teacher's learning region (Eq. 3-4)         -> torch.ops.ssod_ops.frs_topk_mask
    frs_qfl         Dense Teacher's QFL on that region (Eq. 2)        (the region from the fused op)
    kl_per_sample   the binary / softmax KL every KL of the methods uses (the reference of ghm_kl too)

Every public function picks the fused kernel of the C++ extension `semi._C` (built from `csrc/`, see
`csrc/README.md`) when it is importable and supports the tensors' device, and the `*_reference` function
next to it otherwise. The references are the specification: short, vectorised PyTorch, and the oracle of
`tests/test_ops.py`, which holds the kernels to them (float32 within 1e-5 relative, counts and masks equal).
Set `SSOD_DISABLE_EXT=1` to force the references.

Under mixed precision every public function runs in float32 (`detectors.precision.in_float32`): bfloat16 /
float16 inputs are cast up and autocast is off inside, so the kernels, which take float32 and float64 only,
see float32 and the results are float32.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detectors.box_ops import DEFAULT_XFORM_CLIP, BoxCoder
from detectors.faster_rcnn import ROI_BOX_WEIGHTS
from detectors.losses import quality_focal_loss
from detectors.precision import in_float32

# --------------------------------------------------------------------------------------------------------
# Loading the extension
# --------------------------------------------------------------------------------------------------------

_EXTENSION_ERROR: str | None = None
_HAS_EXTENSION = False
_EXTENSION_CUDA = False

if os.environ.get("SSOD_DISABLE_EXT", "0") == "1":
    _EXTENSION_ERROR = "disabled by SSOD_DISABLE_EXT=1"
else:
    try:
        from semi import _C  # noqa: F401  (importing registers torch.ops.ssod_ops.*)

        _HAS_EXTENSION = True
        _EXTENSION_CUDA = bool(torch.ops.ssod_ops.compiled_with_cuda())
    except (ImportError, OSError) as error:  # not built, or built against another torch
        _EXTENSION_ERROR = f"semi._C could not be loaded: {error}"


def extension_available() -> bool:
    """True when the fused kernels of `semi._C` are loaded (and not disabled by SSOD_DISABLE_EXT=1)."""
    return _HAS_EXTENSION


def extension_compiled_with_cuda() -> bool:
    """True when the loaded extension also holds the CUDA kernels."""
    return _HAS_EXTENSION and _EXTENSION_CUDA


def extension_error() -> str | None:
    """Why the extension is not in use (None when it is)."""
    return _EXTENSION_ERROR


def _use_extension(*tensors: Tensor) -> bool:
    if not _HAS_EXTENSION:
        return False
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        return False  # let the reference raise PyTorch's own device-mismatch error
    device = devices.pop()
    return device == "cpu" or (device == "cuda" and _EXTENSION_CUDA)


# Fake (meta) implementations of the registered ops, so that they work under torch.compile / FakeTensor. The
# kernels, and the autograd of ghm_kl (which keeps the gradient its forward pass writes out of sight, see
# csrc/ops.cpp), are registered in C++.
if _HAS_EXTENSION:

    @torch.library.register_fake("ssod_ops::ghm_kl")
    def _ghm_kl_fake(student: Tensor, teacher: Tensor, mode: str, bins: int):
        return student.new_empty(()), student.new_empty((bins,), dtype=torch.int64)

    @torch.library.register_fake("ssod_ops::ghm_kl_backward")
    def _ghm_kl_backward_fake(grad, student, teacher, counts, mode, bins):
        return torch.empty_like(student)

    @torch.library.register_fake("ssod_ops::ghm_kl_forward")
    def _ghm_kl_forward_fake(student: Tensor, teacher: Tensor, mode: str, bins: int):
        samples = 0 if mode == "sigmoid" else student.shape[0]
        return (
            student.new_empty(()),
            student.new_empty((bins,), dtype=torch.int64),
            torch.empty_like(student),
            student.new_empty((samples,), dtype=torch.int32),
        )

    @torch.library.register_fake("ssod_ops::ghm_kl_weight_")
    def _ghm_kl_weight_fake(dkl, sample_bins, grad, counts, kl_mode, bins):
        return None

    @torch.library.register_fake("ssod_ops::jitter_apply")
    def _jitter_apply_fake(boxes: Tensor, noise: Tensor, scale: float):
        return torch.empty_like(noise)

    @torch.library.register_fake("ssod_ops::refine_stats")
    def _refine_stats_fake(deltas, boxes, labels, weights, bbox_clip):
        n = labels.shape[0]
        return boxes.new_empty((n, 4)), boxes.new_empty((n,))

    @torch.library.register_fake("ssod_ops::frs_topk_mask")
    def _frs_topk_mask_fake(logits: Tensor, k: int):
        return logits.new_empty((logits.shape[0],), dtype=torch.bool), logits.new_empty(())


# --------------------------------------------------------------------------------------------------------
# ghm_kl: SED's re-weighted KL (Eq. 5), the gradient harmonizing mechanism applied to KL terms
# --------------------------------------------------------------------------------------------------------

GHM_MODES = ("sigmoid", "softmax")


class GHMKLOutput(NamedTuple):
    loss: Tensor  # () scalar, dtype of the logits, differentiable w.r.t. the student logits
    counts: Tensor  # (bins,) int64: samples per gradient-norm bin, R_j of Eq. 5


def _check_ghm_args(student_logits: Tensor, teacher_logits: Tensor, mode: str, bins: int) -> None:
    if mode not in GHM_MODES:
        raise ValueError(f"semi/ops.py ghm_kl: mode must be one of {GHM_MODES}, got {mode!r}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"semi/ops.py ghm_kl: bins must be a positive int, got {bins!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "semi/ops.py ghm_kl: student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dtype not in (torch.float32, torch.float64) or teacher_logits.dtype != student_logits.dtype:
        raise ValueError(
            "semi/ops.py ghm_kl: logits must both be float32 or both float64, got "
            f"{student_logits.dtype} and {teacher_logits.dtype}"
        )
    if mode == "softmax" and student_logits.dim() == 0:
        raise ValueError("semi/ops.py ghm_kl: softmax mode needs logits of shape (..., C)")


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, *, mode: str) -> Tensor:
    """KL(teacher || student) of every sample, in the logits' dtype; the gradient flows into whichever side
    is not detached (callers detach the target).

    mode "sigmoid": logits (...) -> (...), each element the Bernoulli pair (p, 1 - p), p = sigmoid(z):
        KL = p_t (log p_t - log p_s) + (1 - p_t) (log(1 - p_t) - log(1 - p_s))
    mode "softmax": logits (..., C) -> (...), each row one C-way distribution p = softmax(z):
        KL = sum_c p_t,c (log p_t,c - log p_s,c)
    Log-probabilities come from logsigmoid / log_softmax, finite for any finite logit; 1 - p_t is
    sigmoid(-t), exact where p_t rounds to 1.
    """
    s, t = student_logits, teacher_logits
    if mode == "sigmoid":
        # Each element is a Bernoulli pair (p, 1 - p); log p = logsigmoid(x), log(1 - p) = logsigmoid(-x).
        return torch.sigmoid(t) * (F.logsigmoid(t) - F.logsigmoid(s)) + torch.sigmoid(-t) * (
            F.logsigmoid(-t) - F.logsigmoid(-s))
    if mode == "softmax":
        log_p_s, log_p_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    raise ValueError(f"semi/ops.py: KL mode must be one of {GHM_MODES}, got {mode!r}")


def ghm_kl_reference(student_logits: Tensor, teacher_logits: Tensor, *, mode: str, bins: int) -> GHMKLOutput:
    """Plain-PyTorch `ghm_kl_with_counts`: the fallback and the test oracle (same arguments and outputs)."""
    _check_ghm_args(student_logits, teacher_logits, mode, bins)
    s, t = student_logits, teacher_logits.detach()
    kl = kl_per_sample(s, t, mode=mode)  # one value per element (sigmoid) or per row over the last dim (softmax)
    if mode == "sigmoid":
        g = (torch.sigmoid(s.detach()) - torch.sigmoid(t)).abs()  # |dKL/ds| = |p_s - p_t|
    else:
        p_s, p_t = F.log_softmax(s.detach(), dim=-1).exp(), F.log_softmax(t, dim=-1).exp()
        g = 0.5 * (p_s - p_t).abs().sum(dim=-1)  # total variation = ||dKL/ds||_1 / 2
    # M equal bins on [0, 1]; g = 1 (and rounding just above it) goes to the last bin, and a NaN g (NaN
    # logits) to the first, as in the kernels: the loss is then NaN, and the counts stay well defined.
    bin_index = (torch.nan_to_num(g, nan=0.0) * bins).floor().long().clamp_(max=bins - 1)  # same shape as kl
    counts = torch.bincount(bin_index.flatten(), minlength=bins)  # (bins,) R_j, integers: no gradient
    loss = (kl / counts[bin_index].to(kl.dtype)).sum() / bins  # Eq. 5: (1/M) sum_i KL_i / R_bin(g_i)
    return GHMKLOutput(loss, counts)


@in_float32
def ghm_kl_with_counts(student_logits: Tensor, teacher_logits: Tensor, *, mode: str, bins: int = 10) -> GHMKLOutput:
    """SED's re-weighted distillation loss (Eq. 5) and its bin counts.

    student_logits: float32 or float64, any shape in "sigmoid" mode (every element is the logit of a
        Bernoulli pair), (..., C) in "softmax" mode (every row over the last dim is a C-way distribution).
    teacher_logits: same shape and dtype; the target side, which never receives a gradient.
    mode: "sigmoid" or "softmax". bins: M, the number of equal bins of the gradient norm g on [0, 1].

    Per sample i (an element, or a row): KL_i = KL(teacher || student) and g_i = |p_s - p_t| (sigmoid) or
    0.5 * sum_c |p_s,c - p_t,c| (softmax), the norm of dKL_i / d logits. R_j counts the samples whose g
    falls in bin j (g = 1 in the last), and

        loss = (1 / M) * sum_i KL_i / R_bin(g_i)          () scalar, differentiable w.r.t. student_logits
        counts = R                                         (M,) int64

    The kernel computes KL from logits (log-sigmoid / log-softmax forms), finite for logits of +-100, and
    sums in a fixed order: the result is deterministic.
    """
    _check_ghm_args(student_logits, teacher_logits, mode, bins)
    if not _use_extension(student_logits, teacher_logits):
        return ghm_kl_reference(student_logits, teacher_logits, mode=mode, bins=bins)
    if mode == "sigmoid":
        s, t = student_logits.reshape(1, -1), teacher_logits.detach().reshape(1, -1)  # (...) -> (1, numel)
    else:
        num_classes = student_logits.shape[-1]
        s = student_logits.reshape(-1, num_classes)  # (..., C) -> (rows, C)
        t = teacher_logits.detach().reshape(-1, num_classes)
    loss, counts = torch.ops.ssod_ops.ghm_kl(s.contiguous(), t.contiguous(), mode, bins)
    return GHMKLOutput(loss, counts)


def ghm_kl(student_logits: Tensor, teacher_logits: Tensor, *, mode: str, bins: int = 10) -> Tensor:
    """SED's re-weighted KL, Eq. 5, as a () scalar; see `ghm_kl_with_counts` for the tensors."""
    return ghm_kl_with_counts(student_logits, teacher_logits, mode=mode, bins=bins).loss


# --------------------------------------------------------------------------------------------------------
# jitter_boxes / refine_stats: Soft Teacher's box jittering and regression uncertainty (Sec. 3.3)
# --------------------------------------------------------------------------------------------------------

# Faster R-CNN's RoI box-delta weights and the clamp of dw, dh (boxes at most 1000/16 times their anchor).
DEFAULT_DELTA_WEIGHTS = ROI_BOX_WEIGHTS
DEFAULT_BBOX_CLIP = DEFAULT_XFORM_CLIP


class RefineStats(NamedTuple):
    mean_boxes: Tensor  # (N, 4) xyxy absolute pixels: the mean refined box over the jitters
    uncertainty: Tensor  # (N,) mean over the 4 coordinates of std / side of the mean box (Eq. 8-9)


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"semi/ops.py {name}: boxes must be (N, 4) xyxy, got {tuple(boxes.shape)}")
    if boxes.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"semi/ops.py {name}: boxes must be float32 or float64, got {boxes.dtype}")


def _box_sides(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) the side each coordinate moves along: (w, h, w, h), each clamped >= 1."""
    w = (boxes[..., 2] - boxes[..., 0]).clamp(min=1)
    h = (boxes[..., 3] - boxes[..., 1]).clamp(min=1)
    return torch.stack([w, h, w, h], dim=-1)


def _jitter_noise(boxes: Tensor, times: int, generator: torch.Generator | None) -> Tensor:
    # One draw for all boxes of all images, shared by the reference and the kernel.
    return torch.randn((times, boxes.shape[0], 4), generator=generator, dtype=boxes.dtype, device=boxes.device)


def jitter_boxes_reference(
    boxes: Tensor, *, times: int, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Plain-PyTorch `jitter_boxes` (same arguments, same random numbers, same output)."""
    _check_boxes(boxes, "jitter_boxes")
    noise = _jitter_noise(boxes, times, generator)  # (times, N, 4)
    return boxes + noise * scale * _box_sides(boxes)  # (N, 4) broadcast over times -> (times, N, 4)


@in_float32
def jitter_boxes(boxes: Tensor, *, times: int, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """Soft Teacher's box jittering (Sec. 3.3, Eq. 7): `times` randomly shifted copies of every box.

    boxes: (N, 4) float32/float64 xyxy absolute pixels, the kept pseudo-boxes of ALL images of the batch
        concatenated (one call, not a loop over images).
    times: copies per box (10 in the paper). scale: the std of the offsets as a fraction of the box side
        (0.06). generator: torch.Generator for the normal draws (None: the global one).
    Returns (times, N, 4), same dtype: boxes + randn(times, N, 4) * scale * (w, h, w, h), with w, h clamped
    to >= 1 and no clipping to the image. The normal numbers come from one torch.randn call in both the
    kernel and the reference, so a seeded generator gives the same boxes either way.
    """
    _check_boxes(boxes, "jitter_boxes")
    if times < 0:
        raise ValueError(f"semi/ops.py jitter_boxes: times must be >= 0, got {times}")
    if not _use_extension(boxes):
        return jitter_boxes_reference(boxes, times=times, scale=scale, generator=generator)
    noise = _jitter_noise(boxes, times, generator)  # (times, N, 4)
    return torch.ops.ssod_ops.jitter_apply(boxes.detach().contiguous(), noise, float(scale))


def _check_refine_args(refined_deltas: Tensor, jittered_boxes: Tensor, labels: Tensor) -> tuple[Tensor, int, int]:
    if jittered_boxes.dim() != 3 or jittered_boxes.shape[-1] != 4:
        raise ValueError(
            f"semi/ops.py refine_stats: jittered_boxes must be (times, N, 4), got {tuple(jittered_boxes.shape)}"
        )
    times, n = jittered_boxes.shape[:2]
    if times < 2:
        raise ValueError(f"semi/ops.py refine_stats: the std over jitters needs times >= 2, got {times}")
    if refined_deltas.dim() == 3:
        refined_deltas = refined_deltas.reshape(times, n, *refined_deltas.shape[1:])  # (T*N, C, 4) -> (T, N, C, 4)
    if refined_deltas.dim() != 4 or refined_deltas.shape[:2] != (times, n) or refined_deltas.shape[-1] != 4:
        raise ValueError(
            "semi/ops.py refine_stats: refined_deltas must be (times * N, C, 4) or (times, N, C, 4) for "
            f"jittered_boxes {tuple(jittered_boxes.shape)}, got {tuple(refined_deltas.shape)}"
        )
    if labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(
            f"semi/ops.py refine_stats: labels must be int64 (N,) = ({n},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if refined_deltas.dtype != jittered_boxes.dtype or refined_deltas.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "semi/ops.py refine_stats: deltas and boxes must both be float32 or both float64, got "
            f"{refined_deltas.dtype} and {jittered_boxes.dtype}"
        )
    num_classes = refined_deltas.shape[2]
    # Checked on every device (on CUDA at the cost of one wait): the CUDA kernel cannot raise, and would give
    # such a box NaN.
    if n > 0 and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"semi/ops.py refine_stats: labels must lie in [0, {num_classes}), got {labels.tolist()}")
    return refined_deltas, times, n


def refine_stats_reference(
    refined_deltas: Tensor,
    jittered_boxes: Tensor,
    labels: Tensor,
    *,
    weights: tuple[float, ...] = DEFAULT_DELTA_WEIGHTS,
    bbox_clip: float = DEFAULT_BBOX_CLIP,
) -> RefineStats:
    """Plain-PyTorch `refine_stats` (same arguments and outputs)."""
    refined_deltas, times, n = _check_refine_args(refined_deltas, jittered_boxes, labels)
    if n == 0:
        return RefineStats(jittered_boxes.new_zeros((0, 4)), jittered_boxes.new_zeros((0,)))
    index = labels.view(1, n, 1, 1).expand(times, n, 1, 4)
    deltas = refined_deltas.gather(2, index).squeeze(2)  # (T, N, C, 4) -> (T, N, 1, 4) -> (T, N, 4)
    refined = BoxCoder(weights, bbox_clip).decode(deltas, jittered_boxes)  # (T, N, 4)
    mean_boxes = refined.mean(dim=0)  # (N, 4)
    std = refined.std(dim=0)  # (N, 4), unbiased (divides by times - 1), as torch.std and the authors' code
    uncertainty = (std / _box_sides(mean_boxes)).mean(dim=-1)  # Eq. 9 normalised by (w, h, w, h) -> (N,)
    return RefineStats(mean_boxes, uncertainty)


@in_float32
def refine_stats(
    refined_deltas: Tensor,
    jittered_boxes: Tensor,
    labels: Tensor,
    *,
    weights: tuple[float, ...] = DEFAULT_DELTA_WEIGHTS,
    bbox_clip: float = DEFAULT_BBOX_CLIP,
) -> RefineStats:
    """Soft Teacher's regression uncertainty of each pseudo-box (Eq. 8-9).

    refined_deltas: (times * N, C, 4) or (times, N, C, 4) float32/float64, the teacher RoI head's
        class-specific deltas (dx, dy, dw, dh) for every jittered box, rows in the order of
        `jittered_boxes.reshape(times * N, 4)` (jitter-major: all N boxes of copy 0, then copy 1, ...).
    jittered_boxes: (times, N, 4) same dtype, xyxy absolute pixels (the output of `jitter_boxes`); times >= 2.
    labels: (N,) int64 in [0, C), the predicted class of each pseudo-box; only its deltas are decoded.
    weights: the box coder's (wx, wy, ww, wh). bbox_clip: the clamp of dw, dh before exp.
    Returns RefineStats(mean_boxes (N, 4) xyxy, uncertainty (N,)): per coordinate the std over the `times`
    refined copies (unbiased, as torch.std), divided by the matching side (w for x, h for y) of the mean
    refined box clamped to >= 1, then averaged over the 4 coordinates. No gradient (teacher side).
    """
    refined_deltas, times, n = _check_refine_args(refined_deltas, jittered_boxes, labels)
    if not _use_extension(refined_deltas, jittered_boxes, labels):
        return refine_stats_reference(refined_deltas, jittered_boxes, labels, weights=weights, bbox_clip=bbox_clip)
    if len(weights) != 4:
        raise ValueError(f"semi/ops.py refine_stats: weights must be 4 numbers, got {weights}")
    mean_boxes, uncertainty = torch.ops.ssod_ops.refine_stats(
        refined_deltas.detach().contiguous(),
        jittered_boxes.detach().contiguous(),
        labels.contiguous(),
        [float(w) for w in weights],
        float(bbox_clip),
    )
    return RefineStats(mean_boxes, uncertainty)


# --------------------------------------------------------------------------------------------------------
# frs_topk_mask / frs_qfl: Dense Teacher's learning region by feature richness score, and its QFL (Eq. 2-4)
# --------------------------------------------------------------------------------------------------------


QFL_BETA = 2.0  # the exponent of Eq. 2's |y - p_s|, 2 in all of Dense Teacher's experiments (Sec. 4.1)


class RegionSelection(NamedTuple):
    mask: Tensor  # (R,) bool: the k selected rows
    fg: Tensor  # () dtype of the logits: sum over the selected rows of max_c sigmoid(logit), no gradient


class QFLOutput(NamedTuple):
    loss: Tensor  # () scalar, differentiable w.r.t. the student logits
    mask: Tensor  # (R,) bool, the region
    fg: Tensor  # () the normaliser


def _check_frs_args(teacher_logits: Tensor, ratio: float) -> int:
    if teacher_logits.dim() != 2:
        raise ValueError(f"semi/ops.py frs_topk_mask: logits must be (R, C), got {tuple(teacher_logits.shape)}")
    if teacher_logits.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"semi/ops.py frs_topk_mask: logits must be float32 or float64, got {teacher_logits.dtype}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"semi/ops.py frs_topk_mask: ratio must lie in [0, 1], got {ratio}")
    rows, num_classes = teacher_logits.shape
    if rows > 0 and num_classes == 0:
        raise ValueError("semi/ops.py frs_topk_mask: logits need at least one class")
    return int(rows * ratio)


def frs_topk_mask_reference(teacher_logits: Tensor, *, ratio: float) -> RegionSelection:
    """Plain-PyTorch `frs_topk_mask` (same arguments and outputs); a stable sort makes the tie-break explicit."""
    k = _check_frs_args(teacher_logits, ratio)
    logits = teacher_logits.detach()
    rows = logits.shape[0]
    row_max = logits.amax(dim=1) if rows > 0 else logits.new_empty((0,))  # (R, C) -> (R,)
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = torch.sort(row_max, descending=True, stable=True).indices[:k]  # (k,)
    mask = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    mask[order] = True
    fg = torch.sigmoid(row_max[mask]).sum()  # sigmoid only of the selected rows: it is monotone
    return RegionSelection(mask, fg)


@in_float32
def frs_topk_mask(teacher_logits: Tensor, *, ratio: float) -> RegionSelection:
    """Dense Teacher's learning region (Eq. 3-4): the top k = int(R * ratio) rows by score.

    teacher_logits: (R, C) float32/float64, the teacher's class logits of every location of every level of
        every unlabeled image, flattened into rows. ratio: the fraction selected (0.01 in the paper).
    Row i's score is S_i = max_c sigmoid(logit_ic). Rows are ranked by the maximum logit, which orders them as
    S does (sigmoid is monotone) without the ties that float rounding makes among saturated scores; equal
    scores go to the lower index. Returns RegionSelection(mask (R,) bool with exactly k True,
    fg () = sum of S over the selected rows). k = 0 gives an empty mask and fg = 0. No gradient. Logits must
    be free of NaN. The kernel finds the k-th score by a radix select (no sort).
    """
    k = _check_frs_args(teacher_logits, ratio)
    if not _use_extension(teacher_logits):
        return frs_topk_mask_reference(teacher_logits, ratio=ratio)
    mask, fg = torch.ops.ssod_ops.frs_topk_mask(teacher_logits.detach().contiguous(), k)
    return RegionSelection(mask, fg)


def _qfl_sum(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    # Targets: the teacher's probabilities on the region, 0 elsewhere (then BCE(p_s, 0) * p_s^2 of Eq. 2).
    targets = torch.sigmoid(teacher_logits.detach()) * mask.unsqueeze(1).to(student_logits.dtype)  # (R, C)
    return quality_focal_loss(student_logits, targets, beta=QFL_BETA, reduction="sum")


def _qfl_normalise(total: Tensor, fg: Tensor) -> Tensor:
    # fg = 0 (k = 0 or fully saturated negatives): a zero that stays connected to the graph.
    return total / fg if bool(fg > 0) else total * 0.0


def frs_qfl_reference(student_logits: Tensor, teacher_logits: Tensor, *, ratio: float) -> QFLOutput:
    """Plain-PyTorch `frs_qfl` (region by `frs_topk_mask_reference`)."""
    region = frs_topk_mask_reference(teacher_logits, ratio=ratio)
    loss = _qfl_normalise(_qfl_sum(student_logits, teacher_logits, region.mask), region.fg)
    return QFLOutput(loss, region.mask, region.fg)


@in_float32
def frs_qfl(student_logits: Tensor, teacher_logits: Tensor, *, ratio: float) -> QFLOutput:
    """Dense Teacher's classification loss (Eq. 2) on its learning region (Eq. 3-4).

    student_logits, teacher_logits: (R, C) float32/float64 class logits of the same locations (all levels of
        all unlabeled images). ratio: the region's fraction of rows. Every element gets the quality focal
        loss BCE(p_s, y) * |y - p_s|^2 with y = sigmoid(teacher) on the region's rows and y = 0 elsewhere
        (rows outside are pushed to 0, not ignored); the sum is divided by fg.
    Returns QFLOutput(loss () differentiable w.r.t. the student, mask (R,) bool, fg ()); loss = 0, still in the
    graph, when fg = 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "semi/ops.py frs_qfl: student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    region = frs_topk_mask(teacher_logits, ratio=ratio)
    loss = _qfl_normalise(_qfl_sum(student_logits, teacher_logits, region.mask), region.fg)
    return QFLOutput(loss, region.mask, region.fg)
