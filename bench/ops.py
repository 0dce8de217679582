"""Time the fused ops of csrc/ against their plain-PyTorch formulations, on the CPU or a GPU.

    python bench/ops.py [--threads N] [--repeats R] [--only ghm_kl,frs_topk_mask,jitter]
    python bench/ops.py --device cuda --sizes coco [--json results.json]

For every op, at the sizes the methods meet on COCO and at the built-in CPU preset's sizes, prints the time
of the plain formulation, of the fused kernel, the speed-up, and the fraction of the memory-bandwidth
floor the kernel reaches: (bytes the op must read and write) / (bandwidth of a large copy measured in the
same run), divided by the kernel's time. 100% would be a kernel as fast as copying its data once. Set
THP_MEM_ALLOC_ENABLE=0 to see the cost of 4 KB page faults on fresh outputs included (CPU). On a GPU every
sample waits for the device (torch.cuda.synchronize) before its clock stops.

Byte counts of the floor:
    ghm_kl         5 R C elements for forward + backward. The weights of Eq. 5 need the counts of all bins,
                   so data larger than the caches takes two passes: the forward reads student + teacher
                   (2 R C); then either the backward reads them again and writes the gradient (3 R C), or
                   the forward also writes the unweighted gradient (R C) and the backward reads it and
                   writes the gradient over it (2 R C), as the fused op does
    frs_topk_mask  reads the logits once and writes the mask: R C + R bytes
    jitter         jitter: reads boxes and noise, writes the copies; refine: reads the predicted class's
                   deltas and the boxes of every copy, the labels, and writes the mean box and uncertainty
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

# Large outputs (a 64 MB gradient) would otherwise pay a page fault per 4 KB on every call, in the plain and the
# fused op alike, and that cost would hide both; torch then backs large allocations with 2 MB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from semi import ops  # noqa: E402


DEVICE = torch.device("cpu")  # set by --device


def wait() -> None:
    """Wait for the work queued on the device (nothing to wait for on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def measure(fn: Callable[[], object], *, repeats: int, min_time: float = 0.2) -> float:
    """Median seconds per call, after a warm-up; each sample runs enough calls to last ~min_time / repeats."""
    fn()
    wait()
    start = time.perf_counter()
    fn()
    wait()
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, int(min_time / repeats / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        wait()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def copy_bandwidth(*, repeats: int) -> float:
    """Bytes per second read plus written by a copy of 256 MB (beyond every cache)."""
    src = torch.randn(64 * 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), repeats=repeats)
    return 2 * src.numel() * src.element_size() / seconds


# --------------------------------------------------------------------------------------------------------
# The plain formulations
# --------------------------------------------------------------------------------------------------------


def frs_plain(logits: torch.Tensor, ratio: float):
    """The best plain formulation: max over classes, top-k, then the sigmoid of the k selected only."""
    k = int(logits.shape[0] * ratio)
    values, index = logits.amax(dim=1).topk(k)
    mask = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    mask[index] = True
    return mask, torch.sigmoid(values).sum()


def jitter_refine_per_image(boxes_per_image, deltas_per_image, labels_per_image, *, times, scale):
    """Soft Teacher's jittering as a loop over images (one draw, one decode, one std per image)."""
    out = []
    for boxes, deltas, labels in zip(boxes_per_image, deltas_per_image, labels_per_image):
        jittered = ops.jitter_boxes_reference(boxes, times=times, scale=scale)
        out.append(ops.refine_stats_reference(deltas, jittered, labels))
    return out


def jitter_refine_fused(boxes, deltas, labels, *, times, scale):
    jittered = ops.jitter_boxes(boxes, times=times, scale=scale)
    return ops.refine_stats(deltas, jittered, labels)


# --------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------


def bench_ghm(rows, classes, mode, *, repeats):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(rows, classes, generator=gen).to(DEVICE).requires_grad_()
    t = torch.randn(rows, classes, generator=gen).to(DEVICE)

    def plain():
        s.grad = None
        ops.ghm_kl_reference(s, t, mode=mode, bins=10).loss.backward()

    def fused():
        s.grad = None
        ops.ghm_kl(s, t, mode=mode, bins=10).backward()

    return measure(plain, repeats=repeats), measure(fused, repeats=repeats), 5 * s.numel() * s.element_size()


def bench_frs(rows, classes, *, repeats):
    logits = torch.randn(rows, classes, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    plain = measure(lambda: frs_plain(logits, 0.01), repeats=repeats)
    fused = measure(lambda: ops.frs_topk_mask(logits, ratio=0.01), repeats=repeats)
    return plain, fused, logits.numel() * logits.element_size() + rows


def bench_jitter(images, boxes_per_image, classes, *, times, repeats):
    gen = torch.Generator().manual_seed(0)
    boxes = [ops.jitter_boxes_reference(torch.tensor([[100.0, 100.0, 300.0, 250.0]]).expand(boxes_per_image, 4),
                                        times=1, scale=0.2, generator=gen)[0].to(DEVICE) for _ in range(images)]
    deltas = [torch.randn(times * boxes_per_image, classes, 4, generator=gen).to(DEVICE) for _ in range(images)]
    labels = [torch.randint(0, classes, (boxes_per_image,), generator=gen).to(DEVICE) for _ in range(images)]
    all_boxes = torch.cat(boxes)  # (N, 4)
    n = all_boxes.shape[0]
    # The fused op takes the deltas of all images jitter-major: (T, N, C, 4).
    all_deltas = torch.cat([d.reshape(times, boxes_per_image, classes, 4) for d in deltas], dim=1).contiguous()
    all_labels = torch.cat(labels)
    plain = measure(lambda: jitter_refine_per_image(boxes, deltas, labels, times=times, scale=0.06), repeats=repeats)
    fused = measure(lambda: jitter_refine_fused(all_boxes, all_deltas, all_labels, times=times, scale=0.06),
                    repeats=repeats)
    item = all_boxes.element_size()
    floor_bytes = item * (4 * n + 2 * 4 * times * n) + item * (2 * 4 * times * n) + 8 * n + item * 5 * n
    return plain, fused, floor_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default="ghm_kl,frs_topk_mask,jitter")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU and a CUDA build of semi._C)")
    parser.add_argument("--sizes", choices=("all", "coco", "preset"), default="all",
                        help="the COCO-sized cases, the built-in preset's, or both")
    parser.add_argument("--json", default="", help="also write the rows to this file (a list of objects)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if not ops.extension_available():
        sys.exit(f"bench/ops.py: the fused kernels are not available ({ops.extension_error()}); build them first")
    if DEVICE.type == "cuda" and not (torch.cuda.is_available() and ops.extension_compiled_with_cuda()):
        sys.exit("bench/ops.py: --device cuda needs a GPU and semi._C built with its CUDA kernels (FORCE_CUDA=1)")
    only = set(args.only.split(","))
    bandwidth = copy_bandwidth(repeats=args.repeats)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"threads {args.threads}"
    print(f"{where}, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}\n")

    cases = []
    if "ghm_kl" in only:
        # SED on RetinaNet, COCO 800x1333: ~200k anchors x 80 classes per image; preset: 128 px, 9 anchors
        # on P3-P7 (341 cells) x batch 8, 8 classes. Softmax: the RoI head's 512 sampled RoIs x 81 x 8 images.
        cases += [
            ("ghm_kl sigmoid fwd+bwd", "COCO 200k x 80", lambda: bench_ghm(200_000, 80, "sigmoid", repeats=args.repeats)),
            ("ghm_kl sigmoid fwd+bwd", "preset 24.5k x 8", lambda: bench_ghm(8 * 341 * 9, 8, "sigmoid", repeats=args.repeats)),
            ("ghm_kl softmax fwd+bwd", "COCO 4096 x 81", lambda: bench_ghm(4096, 81, "softmax", repeats=args.repeats)),
            ("ghm_kl softmax fwd+bwd", "preset 1024 x 9", lambda: bench_ghm(1024, 9, "softmax", repeats=args.repeats)),
        ]
    if "frs_topk_mask" in only:
        # Dense Teacher on FCOS, COCO: ~350k locations x 80 for 16 images; preset: 341 locations x 8 images.
        cases += [
            ("frs_topk_mask", "COCO 350k x 80", lambda: bench_frs(350_000, 80, repeats=args.repeats)),
            ("frs_topk_mask", "preset 2728 x 8", lambda: bench_frs(8 * 341, 8, repeats=args.repeats)),
        ]
    if "jitter" in only:
        # Soft Teacher, COCO: ~17 boxes x 10 jitters x 80 classes per image, 8 images; preset: 5 boxes, 8 classes.
        cases += [
            ("jitter_boxes+refine_stats", "COCO 8 x 17 x 10 x 80",
             lambda: bench_jitter(8, 17, 80, times=10, repeats=args.repeats)),
            ("jitter_boxes+refine_stats", "preset 8 x 5 x 10 x 8",
             lambda: bench_jitter(8, 5, 8, times=10, repeats=args.repeats)),
        ]

    if args.sizes != "all":
        prefix = {"coco": "COCO", "preset": "preset"}[args.sizes]
        cases = [case for case in cases if case[1].startswith(prefix)]
    header = f"{'op':<27}{'size':<24}{'plain ms':>10}{'fused ms':>10}{'speed-up':>10}{'of floor':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, size, run in cases:
        plain, fused, floor_bytes = run()
        floor = floor_bytes / bandwidth
        print(f"{name:<27}{size:<24}{plain * 1e3:>10.3f}{fused * 1e3:>10.3f}{plain / fused:>9.1f}x"
              f"{100 * floor / fused:>9.0f}%", flush=True)
        rows.append({"op": name, "size": size, "device": str(DEVICE), "plain_ms": plain * 1e3, "fused_ms": fused * 1e3,
                     "speedup": plain / fused, "of_floor": floor / fused})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
