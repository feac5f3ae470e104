"""Training / evaluation transforms of one detection sample, on NumPy arrays, as mmdetection's pipeline:
keep-ratio resize (image bilinear as ``predict``; masks and the semantic map nearest, as mmcv resizes bitmap
masks and segmentation maps), horizontal flip, normalisation. Padding to a multiple of 32 is per batch
(``res2det.data.loader.collate``)."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from ..structures import Preprocess
from ..images import normalize, rescale_size, resize_bilinear

Scale = tuple[int, int]  # keep-ratio bounds, e.g. (1333, 800): the long side fits max(), the short side min()


@dataclass
class Sample:
    """One image and its targets before normalisation. ``boxes`` are x1, y1, x2, y2 in ``rgb`` pixels."""

    rgb: np.ndarray  # H x W x 3 uint8
    boxes: np.ndarray  # N x 4 float32
    labels: np.ndarray  # N int64
    masks: np.ndarray | None = None  # N x H x W uint8
    semantic: np.ndarray | None = None  # H x W uint8 class indices, 255 = ignore

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.rgb.shape[0], self.rgb.shape[1]


def sample_scale(rng: random.Random, scale: Scale, *, choices: Sequence[Scale] | None = None,
                 short_range: tuple[int, int] | None = None) -> Scale:
    """A training scale: one of ``choices`` drawn uniformly (mmdet's RandomChoiceResize), or ``scale``'s long
    side with a short side drawn uniformly from the integers of ``short_range``, ends included (mmdet's
    RandomResize range mode with scales ``(long, lo)``, ``(long, hi)``), or else ``scale`` itself."""
    if choices is not None and short_range is not None:
        raise ValueError("give either scale choices or a short-side range, not both")
    if choices:
        return tuple(choices[rng.randrange(len(choices))])
    if short_range is not None:
        lo, hi = sorted(short_range)
        return max(scale), rng.randint(lo, hi)
    return tuple(scale)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST`` source index of each of ``dst`` outputs: ``floor(d * (1 / (dst / src)))`` in
    double precision, at most ``src - 1``. torch's ``"nearest"`` computes the ratio in float32 and lands one
    row lower at some exact multiples (e.g. 6 of 400 rows for 424 -> 400), which changes mask targets."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


def resize_nearest(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[..., H, W]`` -> ``[..., height, width]``, nearest neighbour exactly as ``cv2.resize`` with
    ``INTER_NEAREST`` (what mmcv's ``imrescale`` gives mmdetection's bitmap masks and segmentation maps)."""
    if maps.shape[-2:] == (height, width):
        return maps
    rows, cols = _nearest_index(maps.shape[-2], height), _nearest_index(maps.shape[-1], width)
    return np.ascontiguousarray(maps[..., rows, :][..., cols])


def resize(sample: Sample, scale: Scale) -> tuple[Sample, tuple[float, float]]:
    """Keep-ratio resize to fit ``scale`` by mmcv's rule (``rescale_size``), the image exactly as
    ``detection_input`` does for ``predict``. Boxes are scaled per axis and clipped to the new image.
    Returns the new sample and ``(sx, sy)`` = new size / old size per axis."""
    h, w = sample.size
    new_w, new_h = rescale_size(w, h, scale)
    sx, sy = new_w / w, new_h / h
    boxes = sample.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
    boxes = np.clip(boxes, 0, np.array([new_w, new_h, new_w, new_h], dtype=np.float32)).astype(np.float32)
    return replace(
        sample, rgb=resize_bilinear(sample.rgb, new_w, new_h), boxes=boxes,
        masks=None if sample.masks is None else resize_nearest(sample.masks, new_h, new_w),
        semantic=None if sample.semantic is None else resize_nearest(sample.semantic, new_h, new_w),
    ), (sx, sy)


def hflip(sample: Sample) -> Sample:
    """Mirror left-right: pixel column ``c`` goes to ``w - 1 - c``, a box edge ``x`` to ``w - x``."""
    w = sample.size[1]
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - sample.boxes[:, 2], w - sample.boxes[:, 0]
    masks = None if sample.masks is None else np.ascontiguousarray(sample.masks[..., ::-1])
    semantic = None if sample.semantic is None else np.ascontiguousarray(sample.semantic[:, ::-1])
    return replace(sample, rgb=np.ascontiguousarray(sample.rgb[:, ::-1]), boxes=boxes, masks=masks, semantic=semantic)


def to_tensors(sample: Sample, pre: Preprocess) -> dict[str, torch.Tensor]:
    """image (normalised float32 ``[3, h, w]``), boxes, labels and, where present, masks / semantic (int64)."""
    out = {"image": normalize(sample.rgb, pre), "boxes": torch.from_numpy(sample.boxes).float().reshape(-1, 4),
           "labels": torch.from_numpy(sample.labels).long().reshape(-1)}
    if sample.masks is not None:
        out["masks"] = torch.from_numpy(np.ascontiguousarray(sample.masks, dtype=np.uint8))
    if sample.semantic is not None:
        out["semantic"] = torch.from_numpy(sample.semantic.astype(np.int64))
    return out


__all__ = ["Sample", "Scale", "sample_scale", "resize", "resize_nearest", "hflip", "to_tensors"]
