"""An embedded instance-segmentation dataset in COCO format: circles, squares and triangles of random colours,
sizes and rotations on a textured, noisy background, some partly hiding others. Generated deterministically
from a seed on first use into the cache (``cache_dir()/datasets/<name with version, seed and sizes>``), built
in a temporary folder and renamed into place, so an interrupted or concurrent generation never leaves half
a dataset.

Annotations are the visible part of each shape (a shape drawn later hides what it covers). Unoccluded squares
and triangles are polygons (the image pixels are rasterised from those same polygons by pycocotools), circles
and partly hidden shapes compressed RLE, so both mask paths of a COCO loader are exercised. Boxes are the
masks' pixel extents, areas their pixel counts.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from ..checkpoint import cache_dir
from .coco_dataset import decode_mask

GENERATOR_VERSION = 1
CATEGORIES = [{"id": 1, "name": "circle", "supercategory": "shape"},
              {"id": 2, "name": "square", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"}]
MAX_OBJECTS = 4
MIN_VISIBLE = 0.6
NOISE = 5.0  # pixel noise standard deviation  # a shape placed later may hide at most 40% of an earlier one


class ShapesSplits(NamedTuple):
    train_ann: Path
    train_dir: Path
    val_ann: Path
    val_dir: Path


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient plus a smooth random texture, float32 HxWx3 in about 0..255."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    t = ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    coarse = torch.from_numpy(rng.normal(0, 25, (1, 3, 6, 6)).astype(np.float32))
    texture = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    return c0 + (c1 - c0) * t[..., None] + texture.numpy()


def _polygon_mask(points: np.ndarray, size: int) -> np.ndarray:
    return decode_mask([points.reshape(-1).tolist()], size, size).astype(bool)


def _random_shape(rng: np.random.Generator, size: int) -> tuple[int, np.ndarray | None, np.ndarray]:
    """(category id, polygon vertices or None for a circle, full mask) of one shape inside the image."""
    cat = int(rng.integers(1, 4))
    extent = rng.uniform(size * 0.125, size * 0.47)  # 40..150 px at 320
    if cat == 1:
        r = extent / 2
        cx, cy = rng.uniform(r, size - r, 2)
        centres = np.arange(size, dtype=np.float32) + 0.5
        return cat, None, (centres[None, :] - cx) ** 2 + (centres[:, None] - cy) ** 2 <= r * r
    theta = rng.uniform(0, 2 * math.pi)
    k = 4 if cat == 2 else 3
    radius = extent / 2 if k == 3 else extent / (2 * math.sqrt(2)) * 1.2  # square side ~0.85 extent
    angles = theta + np.arange(k) * 2 * math.pi / k
    pts = np.stack([np.cos(angles), np.sin(angles)], 1) * radius
    lo, hi = -pts.min(0), size - pts.max(0)
    pts = np.round(pts + rng.uniform(lo, hi), 2)
    return cat, pts, _polygon_mask(pts, size)


def _colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour that stands out from ``background``'s mean (the first of 10 draws that does)."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(10):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - mean) > 90:
            break
    return c


def _image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    """One image (HxWx3 uint8) and its objects: dicts of category_id, polygon (or None) and visible mask."""
    img = _background(rng, size)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _ in range(20):  # place a shape that leaves every earlier one mostly visible
            cat, poly, full = _random_shape(rng, size)
            if all((o["visible"] & ~full).sum() >= MIN_VISIBLE * o["full_area"] for o in objects):
                break
        else:
            continue
        for o in objects:
            o["visible"] &= ~full
        shade = np.linspace(-20, 20, size, dtype=np.float32)[:, None] * float(rng.choice([-1, 1]))
        img[full] = (_colour(rng, img[full]) + shade[np.nonzero(full)[0]]).astype(np.float32)
        objects.append({"category_id": cat, "polygon": poly, "visible": full.copy(), "full_area": int(full.sum())})
    img += rng.standard_normal((size, size, 3), dtype=np.float32) * NOISE  # sensor-like noise over everything
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def _annotation(obj: dict, ann_id: int, image_id: int) -> dict:
    mask = np.asfortranarray(obj["visible"].astype(np.uint8))
    rle = mask_utils.encode(mask)
    unoccluded = obj["visible"].sum() == obj["full_area"]
    if obj["polygon"] is not None and unoccluded:
        segmentation = [[float(v) for v in obj["polygon"].reshape(-1)]]
    else:
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": obj["category_id"], "iscrowd": 0,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
            "segmentation": segmentation}


def _write_split(root: Path, split: int, name: str, *, seed: int, count: int, size: int) -> None:
    (root / name).mkdir()
    images, annotations = [], []
    for k in range(count):
        rng = np.random.default_rng([seed, split, k])  # each image independent of the split sizes
        img, objects = _image(rng, size)
        image_id, file_name = k + 1, f"{k + 1:06d}.png"
        Image.fromarray(img).save(root / name / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            annotations.append(_annotation(obj, len(annotations) + 1, image_id))
    data = {"info": {"description": "res2det synthetic shapes", "version": str(GENERATOR_VERSION), "seed": seed},
            "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(data))


def dataset_name(*, seed: int, num_train: int, num_val: int, image_size: int) -> str:
    return f"shapes-v{GENERATOR_VERSION}-seed{seed}-train{num_train}-val{num_val}-{image_size}px"


def shapes_dataset(root: str | os.PathLike | None = None, *, seed: int = 0, num_train: int = 400,
                   num_val: int = 50, image_size: int = 320) -> Path:
    """The synthetic shapes dataset's folder (``annotations/instances_{train,val}.json``, ``train/``, ``val/``),
    generated on first use under ``root`` (default ``cache_dir()/"datasets"``) in a folder named by
    ``dataset_name``; later calls return the existing one."""
    if num_train < 1 or num_val < 1 or image_size < 64:
        raise ValueError(f"need num_train, num_val >= 1 and image_size >= 64, got {num_train}, {num_val}, "
                         f"{image_size}")
    parent = Path(root) if root is not None else cache_dir() / "datasets"
    target = parent / dataset_name(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        (tmp / "annotations").mkdir()
        _write_split(tmp, 0, "train", seed=seed, count=num_train, size=image_size)
        _write_split(tmp, 1, "val", seed=seed, count=num_val, size=image_size)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent generation that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shapes_splits(root: str | os.PathLike | None = None, **kwargs) -> ShapesSplits:
    """``shapes_dataset(root, **kwargs)`` as (train_ann, train_dir, val_ann, val_dir) for ``CocoDataset``."""
    base = shapes_dataset(root, **kwargs)
    return ShapesSplits(base / "annotations" / "instances_train.json", base / "train",
                        base / "annotations" / "instances_val.json", base / "val")


__all__ = ["shapes_dataset", "shapes_splits", "ShapesSplits", "dataset_name", "CATEGORIES", "GENERATOR_VERSION"]
