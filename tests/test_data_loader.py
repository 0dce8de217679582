"""Loaders: padding and image sizes, infinite sampling across ranks, reproducible augmentation, val sharding."""

import itertools
import json

import numpy as np
import torch
from PIL import Image

from data.coco import CocoDetection, load_unlabeled, unreadable_sample
from data.loader import (InfiniteSampler, build_train_loader, build_train_loaders, build_val_loader, collate,
                         collate_unlabeled, draw_generator)
from data.transforms import TwoViewTransform, build_labeled_transform
from structures import Batch, UnlabeledBatch, warp_boxes


def _sample(height, width, num_boxes, image_id=0):
    return {"image": torch.rand(3, height, width), "boxes": torch.rand(num_boxes, 4) * 10,
            "labels": torch.arange(num_boxes), "crowd": torch.zeros(0, 4),
            "matrix": torch.eye(3, dtype=torch.float64) * (image_id + 1), "image_id": image_id,
            "orig_size": (height * 2, width * 2)}


class RandomImages(torch.utils.data.Dataset):
    """Each sample's pixels come from the generator it is given: the loader's seeding is visible in them."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def get(self, index, *, generator):
        sample = _sample(8, 8, 1, image_id=index)
        sample["image"] = torch.rand(3, 8, 8, generator=generator)
        return sample


def test_collate_pads_to_a_multiple_and_records_sizes():
    samples = [_sample(50, 70, 2, image_id=3), _sample(64, 33, 0, image_id=9)]
    batch = collate(samples, size_divisible=32)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.float32
    assert batch.image_sizes.tolist() == [[50, 70], [64, 33]] and batch.image_sizes.dtype == torch.int64
    assert torch.equal(batch.images[0, :, :50, :70], samples[0]["image"])
    assert batch.images[0, :, 50:].abs().sum() == 0 and batch.images[0, :, :, 70:].abs().sum() == 0
    assert batch.images[1, :, :, 33:].abs().sum() == 0
    assert batch.matrices.shape == (2, 3, 3) and batch.matrices.dtype == torch.float64
    assert batch.matrices[1, 0, 0] == 10
    assert batch.image_ids == [3, 9] and batch.orig_sizes == [(100, 140), (128, 66)]
    assert batch.targets[0]["boxes"].shape == (2, 4) and batch.targets[1]["boxes"].shape == (0, 4)
    assert set(batch.targets[0]) == {"boxes", "labels", "crowd"}

    exact = collate(samples, size_divisible=1)
    assert exact.images.shape == (2, 3, 64, 70)
    one = collate([_sample(32, 32, 1)], size_divisible=32)
    assert one.images.shape == (1, 3, 32, 32)


def test_collate_leaves_unreadable_samples_out_and_names_them():
    samples = [unreadable_sample(4), _sample(40, 40, 1, image_id=5), unreadable_sample(6)]
    batch = collate(samples, size_divisible=32)
    assert batch.image_ids == [5] and batch.skipped_ids == [4, 6] and batch.images.shape == (1, 3, 64, 64)
    assert batch.to("cpu").skipped_ids == [4, 6]
    empty = collate([unreadable_sample(7)], size_divisible=32)
    assert len(empty) == 0 and empty.skipped_ids == [7] and empty.images.shape[0] == 0


def test_collate_unlabeled_and_to():
    pairs = [{"weak": _sample(40, 40, 1), "strong": _sample(30, 50, 1)} for _ in range(3)]
    batch = collate_unlabeled(pairs, size_divisible=16)
    assert isinstance(batch, UnlabeledBatch) and len(batch) == 3
    assert batch.weak.images.shape == (3, 3, 48, 48) and batch.strong.images.shape == (3, 3, 32, 64)
    moved = batch.to("cpu")
    assert torch.equal(moved.weak.images, batch.weak.images) and moved.strong.image_ids == batch.strong.image_ids


def test_infinite_sampler_is_disjoint_across_ranks_and_covers_each_epoch():
    size, world = 10, 2
    streams = [list(itertools.islice(InfiniteSampler(size, seed=3, rank=r, world_size=world), 15))
               for r in range(world)]
    for epoch in range(3):  # each global permutation of 10 is split 5 / 5 between the ranks
        chunk = [s[epoch * 5:(epoch + 1) * 5] for s in streams]
        assert not set(chunk[0]) & set(chunk[1])
        assert sorted(chunk[0] + chunk[1]) == list(range(size))
    assert streams[0][:5] != streams[0][5:10]  # a fresh permutation each epoch
    again = list(itertools.islice(InfiniteSampler(size, seed=3, rank=0, world_size=world), 15))
    assert again == streams[0]
    other = list(itertools.islice(InfiniteSampler(size, seed=4, rank=0, world_size=world), 15))
    assert other != streams[0]
    ordered = list(itertools.islice(InfiniteSampler(4, seed=0, shuffle=False), 6))
    assert ordered == [0, 1, 2, 3, 0, 1]
    resumed = list(itertools.islice(InfiniteSampler(size, seed=3, rank=1, world_size=world, start=4), 11))
    assert resumed == streams[1][4:15]
    draws = list(itertools.islice(InfiniteSampler(size, seed=3, rank=1, world_size=world).draws(), 3))
    assert [p for p, _ in draws] == [1, 3, 5] and [i for _, i in draws] == streams[1][:3]


def test_train_loader_is_reproducible_and_resumable():
    dataset = RandomImages(7)
    first = build_train_loader(dataset, batch_size=3, seed=11, size_divisible=8)
    batches = [next(first) for _ in range(4)]
    assert all(b.images.shape == (3, 3, 8, 8) for b in batches)
    same = build_train_loader(dataset, batch_size=3, seed=11, size_divisible=8)
    for a, b in zip(batches, (next(same) for _ in range(4))):
        assert torch.equal(a.images, b.images) and a.image_ids == b.image_ids
    resumed = build_train_loader(dataset, batch_size=3, seed=11, size_divisible=8, start_batch=2)
    assert torch.equal(next(resumed).images, batches[2].images)
    other = build_train_loader(dataset, batch_size=3, seed=12, size_divisible=8)
    assert not torch.equal(next(other).images, batches[0].images)
    # The same image drawn twice gets two different augmentations (draws are keyed by position, not index).
    assert draw_generator(11, 0, 0).initial_seed() != draw_generator(11, 0, 7).initial_seed()
    assert draw_generator(11, 0, 0).initial_seed() != draw_generator(11, 1, 0).initial_seed()  # streams differ


def test_train_loader_does_not_depend_on_workers():
    dataset = RandomImages(9)
    serial = build_train_loader(dataset, batch_size=2, seed=5, num_workers=0)
    parallel = build_train_loader(dataset, batch_size=2, seed=5, num_workers=2)
    for _ in range(3):
        a, b = next(serial), next(parallel)
        assert torch.equal(a.images, b.images) and a.image_ids == b.image_ids


def test_val_loader_splits_across_ranks_without_duplicates():
    samples = [_sample(8, 8, 1, image_id=i) for i in range(11)]

    class Fixed(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, index):
            return samples[index]

    seen = []
    for rank in range(3):
        ids = [i for batch in build_val_loader(Fixed(), batch_size=2, rank=rank, world_size=3) for i in batch.image_ids]
        seen.append(ids)
    assert sorted(sum(seen, [])) == list(range(11))
    assert seen[0] == [0, 3, 6, 9]
    assert [len(b) for b in build_val_loader(Fixed(), batch_size=4)] == [4, 4, 3]


def _tiny_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    entries, annotations = [], []
    for i in range(6):
        Image.fromarray(np.full((24 + 4 * i, 32, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
        entries.append({"id": 100 + i, "file_name": f"{i}.png", "width": 32, "height": 24 + 4 * i})
        annotations.append({"id": i + 1, "image_id": 100 + i, "category_id": 1 + i % 2, "bbox": [4, 4, 10, 8],
                            "iscrowd": 0})
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path, images


def test_train_loaders_on_coco_files(tmp_path):
    path, images = _tiny_coco(tmp_path)
    labeled = CocoDetection(path, images, transform=build_labeled_transform(short_sides=[32, 48], max_size=100))
    views = TwoViewTransform(short_sides=[32, 48], max_size=100, aligned=False)
    unlabeled = load_unlabeled(path, images, transform=views)
    loaders = build_train_loaders(labeled, unlabeled, labeled_batch=2, unlabeled_batch=3, seed=0)
    batch = next(loaders.labeled)
    assert isinstance(batch, Batch) and batch.images.shape[0] == 2 and batch.images.shape[-1] % 32 == 0
    for target, matrix in zip(batch.targets, batch.matrices):
        torch.testing.assert_close(target["boxes"], warp_boxes(torch.tensor([[4.0, 4.0, 14.0, 12.0]]), matrix))
    pair = next(loaders.unlabeled)
    assert isinstance(pair, UnlabeledBatch) and len(pair) == 3
    assert pair.weak.image_ids == pair.strong.image_ids
    assert build_train_loaders(labeled, None, labeled_batch=2, seed=0).unlabeled is None
