"""Pretrain a ResNet on the generated glyph set (data/glyphs.py), once, and cache its weights.

    path = ensure_pretrained_backbone(PretrainSpec(arch="resnet18"))   # ~/.cache/ssod/backbones/<arch>_glyphs_<hash>.pth
    python -m engine.pretrain --arch resnet18                          # the same, from the command line

The papers' detectors start from ImageNet weights; the built-in benchmark starts from these instead
(`--backbone-pretrain glyphs`, its preset's default). The file is a torchvision ResNet state dict without
the classifier (`fc.*`), so it loads like an ImageNet checkpoint (`detectors.backbone.load_backbone_weights`)
and the detector freezes the stem and layer1 and uses frozen BatchNorm, as the papers do.

The recipe: SGD with Nesterov momentum, a one-cycle learning rate (linear rise over the first 20% of the
steps, cosine to 0), label smoothing 0.1, on a fixed set of generated images held in memory. Inputs are
normalised with ImageNet's mean and std, as the detectors normalise theirs. The cache folder is named after
a hash of the whole spec: another spec is another file. Writing is atomic (temporary file, then rename).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from data.glyphs import GlyphSpec, glyph_batch

# Bump when the training code changes what a given spec produces: cached weights of other versions are not reused.
PRETRAIN_VERSION = 1

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class PretrainSpec:
    """Everything the pretrained weights depend on."""

    arch: str = "resnet18"  # torchvision ResNet name
    glyphs: GlyphSpec = field(default_factory=GlyphSpec)
    num_images: int = 32_000  # the training set: glyph images 0..num_images-1
    num_val: int = 2_000  # held-out images num_images.. for the reported accuracy
    steps: int = 1_000
    batch_size: int = 128
    lr: float = 0.1  # the one-cycle peak
    weight_decay: float = 5e-5
    seed: int = 0


def default_cache_dir() -> Path:
    """$SSOD_CACHE/backbones when SSOD_CACHE is set, else ~/.cache/ssod/backbones."""
    base = os.environ.get("SSOD_CACHE")
    return Path(base) / "backbones" if base else Path.home() / ".cache" / "ssod" / "backbones"


def weights_path(spec: PretrainSpec, cache_dir: str | Path | None = None) -> Path:
    fingerprint = {"version": PRETRAIN_VERSION, "spec": dataclasses.asdict(spec)}
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / f"{spec.arch}_glyphs_{digest}.pth"


def ensure_pretrained_backbone(spec: PretrainSpec = PretrainSpec(), cache_dir: str | Path | None = None, *,
                               threads: int = 0, workers: int = 2, verbose: bool = True) -> Path:
    """The path of the weights `spec` describes, pretraining them first if they are not cached yet."""
    path = weights_path(spec, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    state, report = pretrain(spec, threads=threads, workers=workers, verbose=verbose)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(report | {"spec": dataclasses.asdict(spec)}, indent=2) + "\n")
    if verbose:
        print(f"engine/pretrain.py: saved {path}", flush=True)
    return path


def _generate(spec: GlyphSpec, start: int, count: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    chunks = np.array_split(np.arange(start, start + count), max(1, workers * 8))
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(glyph_batch, [(spec, chunk) for chunk in chunks])
    else:
        parts = [glyph_batch(spec, chunk) for chunk in chunks]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> normalised float (N, 3, S, S)."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (images - _MEAN) / _STD


def one_cycle(step: int, steps: int, peak: float) -> float:
    """Linear rise to `peak` over the first 20% of the steps, then a cosine to 0."""
    rise = max(1, round(0.2 * steps))
    if step < rise:
        return peak * (step + 1) / rise
    return peak * 0.5 * (1 + math.cos(math.pi * (step - rise) / max(1, steps - rise)))


def pretrain(spec: PretrainSpec, *, threads: int = 0, workers: int = 2, verbose: bool = True) -> tuple[dict, dict]:
    """Train `spec.arch` on the glyph set. Returns (state dict without fc.*, report {accuracy, seconds})."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if verbose:
        print(f"engine/pretrain.py: pretraining {spec.arch} on {spec.num_images} generated glyph images "
              f"({spec.glyphs.num_classes} classes), {spec.steps} steps; cached for later runs", flush=True)
    train_x, train_y = _generate(spec.glyphs, 0, spec.num_images, workers)
    val_x, val_y = _generate(spec.glyphs, spec.num_images, spec.num_val, workers)
    generated = time.perf_counter() - start

    torch.manual_seed(spec.seed)
    model = getattr(torchvision.models, spec.arch)(weights=None, num_classes=spec.glyphs.num_classes)
    model = model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, nesterov=True,
                                weight_decay=spec.weight_decay)
    order = np.random.default_rng(spec.seed).permutation(spec.num_images)
    for step in range(spec.steps):
        begin = (step * spec.batch_size) % spec.num_images
        if begin + spec.batch_size > spec.num_images:  # a new epoch: a new order
            order = np.random.default_rng([spec.seed, step]).permutation(spec.num_images)
        index = order[np.arange(begin, begin + spec.batch_size) % spec.num_images]
        images = _to_input(train_x[index])
        for group in optimizer.param_groups:
            group["lr"] = one_cycle(step, spec.steps, spec.lr)
        loss = F.cross_entropy(model(images), torch.from_numpy(train_y[index]), label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if verbose and (step + 1) % 50 == 0:
            print(f"engine/pretrain.py: step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    model.eval()
    correct = 0
    with torch.no_grad():
        for begin in range(0, spec.num_val, 500):
            images = _to_input(val_x[begin:begin + 500])
            correct += int((model(images).argmax(1) == torch.from_numpy(val_y[begin:begin + 500])).sum())
    report = {"val_accuracy": correct / spec.num_val, "chance": 1 / spec.glyphs.num_classes,
              "generate_seconds": round(generated, 1), "seconds": round(time.perf_counter() - start, 1)}
    if verbose:
        print(f"engine/pretrain.py: held-out accuracy {report['val_accuracy']:.3f} over "
              f"{spec.glyphs.num_classes} classes, {report['seconds']:.0f} s", flush=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return state, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain a ResNet on the generated glyph set and cache it.")
    parser.add_argument("--arch", default=PretrainSpec.arch)
    parser.add_argument("--steps", type=int, default=PretrainSpec.steps)
    parser.add_argument("--num-images", type=int, default=PretrainSpec.num_images)
    parser.add_argument("--cache-dir", default=None, help=f"default {default_cache_dir()}")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    spec = PretrainSpec(arch=args.arch, steps=args.steps, num_images=args.num_images)
    print(ensure_pretrained_backbone(spec, args.cache_dir, threads=args.threads))


if __name__ == "__main__":
    main()
