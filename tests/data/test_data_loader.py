"""Batching: aspect-ratio groups, distributed shares, determinism, the padding collate and build_loader."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from res2det.data import AspectRatioBatchSampler, CocoDataset, build_loader, collate, shapes_splits
from res2det.structures import Preprocess

RNG = np.random.default_rng(0)
GROUPS = RNG.integers(0, 2, 37).tolist()  # 37 images, wide (0) and tall (1) mixed


def shares(groups, batch_size, world_size, *, train, seed=0, epoch=0):
    out = []
    for rank in range(world_size):
        s = AspectRatioBatchSampler(groups, batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        out.append(batches)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_training_batches_never_mix_groups_and_ranks_are_even(world_size, batch_size):
    per_rank = shares(GROUPS, batch_size, world_size, train=True)
    for batches in per_rank:
        assert len(batches) == len(per_rank[0])  # same number of steps on every rank (DDP)
        for batch in batches:
            assert len(batch) == batch_size and len({GROUPS[i] for i, _ in batch}) == 1
    seen = Counter(i for batches in per_rank for batch in batches for i, _ in batch)
    assert set(seen) == set(range(len(GROUPS)))  # every image each epoch
    # repeats only fill the last batch of each group and the batch list up to a multiple of world_size
    assert sum(seen.values()) - len(GROUPS) < 2 * batch_size + (world_size - 1) * batch_size


def test_ranks_are_disjoint_when_nothing_needs_padding():
    groups = [0] * 16 + [1] * 8  # 4 + 2 batches of 4, 3 per rank
    per_rank = shares(groups, 4, 2, train=True)
    flat = [[i for batch in batches for i, _ in batch] for batches in per_rank]
    assert len(flat[0]) == len(flat[1]) == 12 and not set(flat[0]) & set(flat[1])
    assert sorted(flat[0] + flat[1]) == list(range(24))


def test_shuffle_is_deterministic_per_seed_and_epoch():
    a = shares(GROUPS, 4, 2, train=True, seed=3, epoch=5)
    assert a == shares(GROUPS, 4, 2, train=True, seed=3, epoch=5)  # indices and augmentation seeds
    assert a != shares(GROUPS, 4, 2, train=True, seed=3, epoch=6)
    assert a != shares(GROUPS, 4, 2, train=True, seed=4, epoch=5)
    seeds = [seed for batches in a for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_eval_sees_every_image_exactly_once(world_size):
    per_rank = shares(GROUPS, 4, world_size, train=False)
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(GROUPS)))  # no padding duplicates
    assert all(len({GROUPS[i] for i in batch}) == 1 for batches in per_rank for batch in batches)
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        AspectRatioBatchSampler(GROUPS, 0, train=True)
    with pytest.raises(ValueError):
        AspectRatioBatchSampler(GROUPS, 2, train=True, rank=2, world_size=2)


def test_collate_pads_images_and_targets():
    samples = []
    for h, w in [(50, 70), (64, 33)]:
        samples.append({"image": torch.randn(3, h, w), "boxes": torch.tensor([[1.0, 2.0, 10.0, 20.0]]),
                        "labels": torch.tensor([1]), "masks": torch.ones(1, h, w, dtype=torch.uint8),
                        "semantic": torch.full((h, w), 4, dtype=torch.int64), "image_id": h, "file": f"{h}.png",
                        "orig_size": (2 * h, 2 * w), "scale_factor": (0.5, 0.5), "flipped": False})
    images, targets, sizes, metas = collate(samples)
    assert images.shape == (2, 3, 64, 96) and sizes == [(50, 70), (64, 33)]
    assert torch.equal(images[0, :, :50, :70], samples[0]["image"]) and images[0, :, 50:].abs().sum() == 0
    t = targets[1]
    assert t["masks"].shape == (1, 64, 96) and t["masks"][:, :, :33].all() and not t["masks"][:, :, 33:].any()
    assert (t["semantic"][:, :33] == 4).all() and (t["semantic"][:, 33:] == 255).all()
    assert metas[0] == {"image_id": 50, "file": "50.png", "orig_size": (100, 140), "scale_factor": (0.5, 0.5),
                        "flipped": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_splits(tmp_path_factory.mktemp("shapes"), num_train=10, num_val=4, image_size=96)


def test_build_loader_batches_and_reproducibility(shapes):
    pre = Preprocess(input_size=(64, 64), crop_pct=None)
    ds = CocoDataset(shapes.train_ann, shapes.train_dir, train=True, preprocess=pre, scale_range=(40, 64))
    loader = build_loader(ds, batch_size=3, train=True, seed=1)
    loader.batch_sampler.set_epoch(2)
    first = list(loader)
    assert len(first) == len(loader) == 4
    for images, targets, sizes, metas in first:
        assert images.shape[0] == 3 and images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
        for t, (h, w) in zip(targets, sizes):
            assert t["masks"].shape[-2:] == images.shape[-2:] and len(t["labels"]) == len(t["boxes"]) > 0
            assert h == w and 40 <= h <= 64  # square images: the drawn short side decides
    assert len({size for _, _, sizes, _ in first for size in sizes}) > 3  # a scale drawn per image
    again = list(build_loader(ds, batch_size=3, train=True, seed=1, num_workers=2).batch_sampler)
    loader.batch_sampler.set_epoch(2)
    assert again != list(loader.batch_sampler)  # epoch 0 vs epoch 2
    workers = build_loader(ds, batch_size=3, train=True, seed=1, num_workers=2)
    workers.batch_sampler.set_epoch(2)
    for (a, ta, sa, ma), (b, tb, sb, mb) in zip(first, workers):  # same draws with worker processes
        assert torch.equal(a, b) and sa == sb and ma == mb and torch.equal(ta[0]["boxes"], tb[0]["boxes"])


def test_eval_loader_covers_the_split(shapes):
    ds = CocoDataset(shapes.val_ann, shapes.val_dir, train=False, preprocess=Preprocess(input_size=(96, 96),
                                                                                        crop_pct=None))
    ids = [m["image_id"] for rank in range(2)
           for _, _, _, metas in build_loader(ds, batch_size=3, train=False, rank=rank, world_size=2)
           for m in metas]
    assert sorted(ids) == sorted(ds.image_ids)


@pytest.mark.parametrize("world_size", [1, 2])
def test_unshuffled_batches_follow_the_dataset_order_every_epoch(world_size):
    """``shuffle=False`` (replaying a reference run): consecutive indices, no aspect grouping, the same batches
    every epoch; the last batch completed from the start; the augmentation seeds still differ per epoch."""
    def epoch_batches(epoch):
        out = []
        for rank in range(world_size):
            s = AspectRatioBatchSampler(GROUPS, 4, train=True, rank=rank, world_size=world_size, shuffle=False)
            s.set_epoch(epoch)
            assert len(list(s)) == len(s)
            out.append(list(s))
        return out

    first, second = epoch_batches(0), epoch_batches(1)
    indices = [[i for i, _ in b] for b in first[0]]
    assert indices[0] == [0, 1, 2, 3] and indices[1] == ([4, 5, 6, 7] if world_size == 1 else [8, 9, 10, 11])
    dealt = sorted((b for rank in first for b in rank), key=lambda b: b[0][0])
    flat = [i for b in dealt for i, _ in b]
    assert flat[:len(GROUPS)] == list(range(len(GROUPS))) and flat[len(GROUPS):len(GROUPS) + 3] == [0, 1, 2]
    assert [[i for i, _ in b] for b in second[0]] == indices
    assert [s for _, s in first[0][0]] != [s for _, s in second[0][0]]
