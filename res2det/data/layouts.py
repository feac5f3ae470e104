"""Dataset layouts found in a data folder: COCO json, Pascal VOC and YOLO (Ultralytics), each split read as the
COCO instances dict ``CocoDataset`` takes, so every layout gives exactly the targets of its COCO conversion.

``detect_format(root)``: ``annotations/instances_*.json`` is COCO, ``Annotations/`` with ``JPEGImages/`` is VOC,
a ``data.yaml`` (or a single other ``.yaml``) is YOLO. ``read_split(root, split, ...)``: a ``Split`` (the dict,
or ``None`` for COCO whose file ``CocoDataset`` reads itself, and the image folder). Bad annotations get one
``DataError`` naming the file and the object or line (``on_bad='fail'``), or are dropped and counted in
``Split.skipped`` (``on_bad='skip'``), as COCO data's are.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .coco_dataset import check_annotation

FORMATS = ("auto", "coco", "voc", "yolo")
# the names data.train_split / data.val_split = 'auto' stand for, in each layout: the first one present
DEFAULT_SPLITS = {"coco": (("train2017", "train"), ("val2017", "val", "valid")),
                  "voc": (("train", "trainval"), ("val", "test")),
                  "yolo": (("train",), ("val", "valid", "test"))}


# Roboflow's COCO export: each split folder holds its images and this file
ROBOFLOW_COCO = "_annotations.coco.json"


@dataclass
class Split:
    format: str
    ann_file: Path  # the file (or folder) messages name: COCO's json, VOC's split list, YOLO's data.yaml
    image_dir: Path
    coco_data: dict | None  # None: COCO, read by CocoDataset from ann_file
    skipped: Counter = field(default_factory=Counter)


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return "yolo"
    if (root / "annotations").is_dir() and any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if any(root.glob(f"*/{ROBOFLOW_COCO}")):
        return "coco"
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    if (root / "data.yaml").is_file() or len(list(root.glob("*.yaml"))) == 1:
        return "yolo"
    raise DataError(f"{root}: no dataset layout found (COCO: annotations/instances_<split>.json and <split>/; Pascal "
                    "VOC: Annotations/*.xml, JPEGImages/, ImageSets/Main/<split>.txt; YOLO: data.yaml with names, "
                    "train and val); set data.format to say which")


def split_names(root: str | Path, fmt: str) -> list[str]:
    """The splits a data folder has."""
    root = Path(root)
    if fmt == "coco":
        return sorted({p.name[len("instances_"):-len(".json")] for p in (root / "annotations").glob("instances_*.json")}
                      | {p.parent.name for p in root.glob(f"*/{ROBOFLOW_COCO}")})
    if fmt == "voc":
        return sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
    from .yolo import read_yaml

    data = read_yaml(root)[1]
    return [k for k in ("train", "val", "valid", "test") if data.get(k)]


def split_name(root: str | Path, fmt: str, split: str, which: str) -> str:
    """``split``, or when it is 'auto' the layout's usual name for ``which`` ('train' / 'val') that ``root`` has."""
    if split != "auto":
        return split
    candidates = DEFAULT_SPLITS[fmt][which == "val"]
    present = split_names(root, fmt)
    return next((c for c in candidates if c in present), candidates[0])


def read_split(root: str | Path, split: str, *, fmt: str = "auto", classes: Sequence[str] | None = None,
               on_bad: str = "fail") -> Split:
    root = Path(root)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt not in DEFAULT_SPLITS:
        raise DataError(f"data.format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if classes is not None and fmt != "voc":
        raise DataError(f"{root}: data.classes names the classes of a Pascal VOC folder; a {fmt.upper()} layout "
                        "names its own classes")
    if fmt == "coco":
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file() and (root / split / ROBOFLOW_COCO).is_file():
            ann = root / split / ROBOFLOW_COCO
        if not ann.is_file():
            raise DataError(f"{ann}: annotation file not found (a COCO-format data root holds annotations/instances_"
                            f"{split}.json and {split}/; splits here: {', '.join(split_names(root, fmt)) or 'none'})")
        return Split("coco", ann, root / split, None)
    if fmt == "voc":
        from .voc import read_voc

        return read_voc(root, split, classes=classes, on_bad=on_bad)
    from .yolo import read_yolo

    return read_yolo(root, split, on_bad=on_bad)


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


__all__ = ["FORMATS", "DEFAULT_SPLITS", "Split", "Problems", "detect_format", "read_split", "split_name",
           "split_names",
           "image_size", "polygon_area"]
