"""Small data sets the layout tests write: the same boxes and polygons as COCO json, Pascal VOC and YOLO(-seg).

Image sizes are powers of two and coordinates integers, so YOLO's normalised numbers are exact in binary and
every layout describes exactly the same pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["dining table", "person", "cat"]
# (width, height, [(class index, polygon x1 y1 x2 y2 ...), ...]) per image; an image without objects too
IMAGES = [
    (64, 64, [(0, [4, 4, 40, 6, 36, 30, 6, 28]), (1, [30, 34, 60, 36, 50, 60])]),
    (128, 64, [(2, [10, 10, 70, 12, 64, 50]), (1, [80, 8, 120, 8, 120, 56, 80, 56]), (0, [20, 40, 40, 40, 30, 60])]),
    (64, 128, [(1, [8, 16, 56, 20, 40, 120, 10, 100])]),
    (64, 64, []),
]
SPLITS = {"train": [0, 1, 3], "val": [2, 1]}


def _box(poly: list[int]) -> list[int]:
    xs, ys = poly[0::2], poly[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _image(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_coco(root: Path, *, masks: bool = True, category_ids=(3, 7, 9)) -> Path:
    """``root/annotations/instances_{train,val}.json`` and ``root/{split}/*.png``."""
    for split, indices in SPLITS.items():
        images, anns = [], []
        for image_id, i in enumerate(indices, start=1):
            w, h, objects = IMAGES[i]
            _image(root / split / f"img{i}.png", w, h, i)
            images.append({"id": image_id, "file_name": f"img{i}.png", "width": w, "height": h})
            for c, poly in objects:
                box = _box(poly)
                ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": category_ids[c], "bbox": box,
                       "area": box[2] * box[3], "iscrowd": 0}
                if masks:
                    ann["segmentation"] = [poly]
                anns.append(ann)
        cats = [{"id": category_ids[k], "name": n} for k, n in enumerate(CLASSES)]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def write_voc(root: Path, *, difficult: tuple[int, int] | None = None) -> Path:
    """VOC boxes of the same objects: xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h (1-based, inclusive).
    ``difficult=(image index, object index)`` marks one object difficult."""
    for i, (w, h, objects) in enumerate(IMAGES):
        _image(root / "JPEGImages" / f"img{i}.png", w, h, i)
        objs = ""
        for k, (c, poly) in enumerate(objects):
            x, y, bw, bh = _box(poly)
            objs += (f"<object><name>{CLASSES[c]}</name><difficult>{int(difficult == (i, k))}</difficult><bndbox>"
                     f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox>"
                     "</object>")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"img{i}.xml").write_text(
            f"<annotation><filename>img{i}.png</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{objs}</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, indices in SPLITS.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"img{i}\n" for i in indices))
    return root


def write_yolo(root: Path, *, seg: bool = False, names_as_dict: bool = False) -> Path:
    """``data.yaml``, ``images/{split}/``, ``labels/{split}/`` with boxes (cx cy w h) or polygons, normalised."""
    for split, indices in SPLITS.items():
        for i in indices:
            w, h, objects = IMAGES[i]
            _image(root / "images" / split / f"img{i}.png", w, h, i)
            lines = []
            for c, poly in objects:
                if seg:
                    lines.append(" ".join([str(c)] + [repr(v / (w if j % 2 == 0 else h)) for j, v in enumerate(poly)]))
                else:
                    x, y, bw, bh = _box(poly)
                    lines.append(f"{c} {(x + bw / 2) / w!r} {(y + bh / 2) / h!r} {bw / w!r} {bh / h!r}")
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            if objects:  # an image without objects has no label file
                (root / "labels" / split / f"img{i}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {k}: {n}" for k, n in enumerate(CLASSES)) if names_as_dict else \
        "[" + ", ".join(f"'{n}'" for n in CLASSES) + "]"
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:"
                                    f"{chr(10) if names_as_dict else ' '}{names}\n")
    return root
