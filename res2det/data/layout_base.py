"""What the non-COCO layout readers (``voc``, ``yolo``) share: the ``Split`` they return, the ``Problems`` collector
with ``on_bad`` semantics, and reading an image's size from its header."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .coco_dataset import check_annotation


@dataclass
class Split:
    format: str
    ann_file: Path  # the file (or folder) messages name: COCO's json, VOC's split list, YOLO's data.yaml
    image_dir: Path
    coco_data: dict | None  # None: COCO, read by CocoDataset from ann_file
    skipped: Counter = field(default_factory=Counter)


class Problems:
    """Bad annotations of one split, with ``on_bad`` semantics: ``finish`` raises the first (fail) or warns
    once with the counts (skip)."""

    def __init__(self, on_bad: str):
        if on_bad not in ("fail", "skip"):
            raise ValueError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}")
        self.on_bad, self.messages, self.skipped = on_bad, [], Counter()

    def add(self, reason: str, message: str) -> None:
        self.messages.append(message)
        self.skipped[reason] += 1

    def check(self, ann: dict, image: dict, cat_ids: set[int], where: str, *, with_masks: bool) -> bool:
        """COCO's checks of one converted annotation, reported at ``where`` (file and object / line)."""
        bad = check_annotation(ann, image, cat_ids, with_masks=with_masks)
        if bad:
            self.add(bad[0], f"{where}: {bad[1]}")
        return bad is None

    def finish(self, source: Path) -> Counter:
        if self.messages and self.on_bad == "fail":
            more = f" (and {len(self.messages) - 1} more problem(s); on_bad='skip' drops them)" \
                if len(self.messages) > 1 else ""
            raise DataError(self.messages[0] + more)
        if self.messages:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            warnings.warn(f"{source}: skipped {len(self.messages)} bad annotation(s)/image(s) ({counts}); first: "
                          f"{self.messages[0]}", stacklevel=4)
        return self.skipped


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the header (what ``load_image`` will give)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return w, h


def polygon_area(flat: Sequence[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


__all__ = ["Split", "Problems", "image_size", "polygon_area"]
