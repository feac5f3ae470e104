"""Batching: aspect-ratio grouped, distributed-aware batch sampling, padding collate, ``build_loader`` (a
``res2det.loading.Loader``: user errors from worker processes as themselves)."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..images import pad_batch
from ..loading import Loader


def _pad_to(x: Tensor, height: int, width: int, value: int) -> Tensor:
    out = x.new_full((*x.shape[:-2], height, width), value)
    out[..., : x.shape[-2], : x.shape[-1]] = x
    return out


def collate(batch: list[dict]) -> tuple[Tensor, list[dict], list[tuple[int, int]], list[dict]]:
    """Samples of ``CocoDataset`` -> ``(images, targets, image_sizes, metas)``: ``images [B, 3, Hp, Wp]``
    zero-padded bottom/right to a multiple of 32 (after normalisation, as mmdet); ``targets`` dicts of boxes,
    labels, and where present masks (padded with 0) and semantic (padded with 255, ignore) at ``(Hp, Wp)``;
    ``image_sizes`` the unpadded ``(h, w)``; ``metas`` dicts of image_id, file, orig_size, scale_factor, flipped."""
    images = pad_batch([s["image"] for s in batch])
    hp, wp = images.shape[-2:]
    targets, sizes, metas = [], [], []
    for s in batch:
        t = {"boxes": s["boxes"], "labels": s["labels"]}
        if "masks" in s:
            t["masks"] = _pad_to(s["masks"], hp, wp, 0)
        if "semantic" in s:
            t["semantic"] = _pad_to(s["semantic"], hp, wp, 255)
        targets.append(t)
        sizes.append((int(s["image"].shape[-2]), int(s["image"].shape[-1])))
        metas.append({k: s[k] for k in ("image_id", "file", "orig_size", "scale_factor", "flipped")})
    return images, targets, sizes, metas


class AspectRatioBatchSampler(Sampler[list]):
    """Batches of dataset indices in which every image has the same aspect group (``groups[i]``: 0 for
    width >= height, 1 for the others; mmdet's AspectRatioBatchSampler idea), split across ``world_size``
    ranks.

    Training (``train=True``): each epoch the indices are shuffled by a generator seeded with
    ``seed + epoch`` (``set_epoch``; the same on every rank), cut per group into batches, and the batches
    shuffled and dealt to the ranks round-robin. Every rank gets the same number of full batches: a group's
    last partial batch is completed with images of the same group from the start of its epoch order, and the
    batch list with its first batches when it does not divide by ``world_size`` (as DistributedSampler pads), so
    an epoch sees every image at least once and the ranks' shares are disjoint apart from that padding.
    Items are ``(index, seed)`` pairs: the seed of that sample's augmentation draw (scale, flip), so an epoch
    is reproducible whatever the number of workers.

    ``shuffle=False`` (training only): every epoch the same batches of consecutive indices in dataset order,
    with no aspect grouping, the last one completed from the start (a reference run replayed batch by batch);
    the augmentation seeds still change with the epoch.

    Evaluation (``train=False``): indices in order, batched per group (a group's last batch may be short),
    batches dealt round-robin to the ranks with no padding: every image is in exactly one rank's share
    (ranks may differ by one batch: gather results once at the end, not per batch). Items are plain indices.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if len(groups) == 0:
            raise ValueError("no images to sample from")
        self.groups = [int(g) for g in groups]
        self.batch_size, self.train, self.seed, self.shuffle = batch_size, train, seed, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_group(self, order: list[int]) -> dict[int, list[int]]:
        members: dict[int, list[int]] = {}
        for i in order:
            members.setdefault(self.groups[i], []).append(i)
        return members

    def _global_batches(self) -> list[list]:
        bs = self.batch_size
        if not self.train:
            batches = [m[k:k + bs] for m in self._per_group(range(len(self.groups))).values()
                       for k in range(0, len(m), bs)]
            return sorted(batches, key=lambda b: b[0])
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(len(self.groups), generator=g).tolist()
            groups = [members for _, members in sorted(self._per_group(order).items())]
        else:
            groups = [list(range(len(self.groups)))]
        batches = []
        for members in groups:
            for k in range(0, len(members), bs):
                batch = members[k:k + bs]
                batch += [members[j % len(members)] for j in range(bs - len(batch))]  # complete from the start
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        batches += [batches[j % len(batches)] for j in range(-len(batches) % self.world_size)]
        seeds = torch.randint(2**62, (len(batches), bs), generator=g).tolist()
        return [list(zip(b, s)) for b, s in zip(batches, seeds)]

    def __iter__(self) -> Iterator[list]:
        yield from self._global_batches()[self.rank::self.world_size]

    def __len__(self) -> int:
        bs = self.batch_size
        counts = self._per_group(range(len(self.groups))) if self.shuffle or not self.train else {0: self.groups}
        total = sum(-(-len(m) // bs) for m in counts.values())
        if self.train:
            return -(-total // self.world_size)
        return len(range(self.rank, total, self.world_size))


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, num_workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> Loader:
    """A ``Loader`` over ``dataset`` (a ``CocoDataset``) with an ``AspectRatioBatchSampler`` and ``collate``.
    Call ``loader.batch_sampler.set_epoch(epoch)`` before each training epoch."""
    groups = getattr(dataset, "aspect_groups", None) or [0] * len(dataset)
    sampler = AspectRatioBatchSampler(groups, batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
    return Loader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                  persistent_workers=num_workers > 0)


__all__ = ["collate", "AspectRatioBatchSampler", "Loader", "build_loader"]
