"""Dataset layouts found in a data folder: COCO json, Pascal VOC and YOLO (Ultralytics), each split read as the
COCO instances dict ``CocoDataset`` takes, so every layout gives exactly the targets of its COCO conversion.

``detect_format(root)``: ``annotations/instances_*.json`` is COCO, ``Annotations/`` with ``JPEGImages/`` is VOC,
a ``data.yaml`` (or a single other ``.yaml``) is YOLO. ``read_split(root, split, ...)``: a ``Split`` (the dict,
or ``None`` for COCO whose file ``CocoDataset`` reads itself, and the image folder). Bad annotations get one
``DataError`` naming the file and the object or line (``on_bad='fail'``), or are dropped and counted in
``Split.skipped`` (``on_bad='skip'``), as COCO data's are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .layout_base import Split
from .voc import read_voc
from .yolo import read_yaml, read_yolo

FORMATS = ("auto", "coco", "voc", "yolo")
# the names data.train_split / data.val_split = 'auto' stand for, in each layout: the first one present
DEFAULT_SPLITS = {"coco": (("train2017", "train"), ("val2017", "val", "valid")),
                  "voc": (("train", "trainval"), ("val", "test")),
                  "yolo": (("train",), ("val", "valid", "test"))}


# Roboflow's COCO export: each split folder holds its images and this file
ROBOFLOW_COCO = "_annotations.coco.json"


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
        return read_voc(root, split, classes=classes, on_bad=on_bad)
    return read_yolo(root, split, on_bad=on_bad)


__all__ = ["FORMATS", "DEFAULT_SPLITS", "Split", "Problems", "detect_format", "read_split", "split_name",
           "split_names",
           "image_size", "polygon_area"]
