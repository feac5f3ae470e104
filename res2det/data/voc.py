"""Pascal VOC folders: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/<split>.txt``.

VOC boxes are 1-based inclusive pixel indexes; as detectron2 reads them, ``xmin - 1, ymin - 1`` is the top-left
corner and ``xmax, ymax`` the bottom-right one (COCO ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``).
``difficult`` objects become crowd regions: left out of the training targets and ignored by evaluation, as VOC's
own evaluation ignores them. Classes are ``classes`` in that order, or every class name of ``Annotations/`` in
the order first seen (files sorted by name), so that every split of a folder numbers them alike.
"""
from __future__ import annotations

import functools
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .layout_base import Problems, Split, image_size


def _parse(xml: Path) -> ET.Element:
    try:
        return ET.parse(xml).getroot()
    except FileNotFoundError:
        raise DataError(f"{xml}: annotation file not found") from None
    except ET.ParseError as e:
        raise DataError(f"{xml}: not a valid XML file ({e})") from None
    except OSError as e:
        raise DataError(f"{xml}: cannot read the annotation file ({e})") from None


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = None if node is None else node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


@functools.lru_cache(maxsize=8)
def _classes_first_seen(annotations: Path, _mtime: float) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for xml in sorted(annotations.glob("*.xml")):
        for obj in _parse(xml).iter("object"):
            name = _text(obj, "name")
            if name:
                names.setdefault(name, None)
    return tuple(names)


def voc_classes(root: Path) -> tuple[str, ...]:
    annotations = Path(root) / "Annotations"
    return _classes_first_seen(annotations, annotations.stat().st_mtime)


def read_voc(root: Path, split: str, *, classes: Sequence[str] | None = None, on_bad: str = "fail") -> Split:
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        found = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise DataError(f"{split_file}: split list not found (Pascal VOC lists a split's image ids in "
                        f"ImageSets/Main/<split>.txt; splits here: {', '.join(found) or 'none'})")
    ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = tuple(classes) if classes is not None else voc_classes(root)
    if len(set(names)) != len(names):
        raise DataError(f"data.classes {list(names)} names a class twice")
    label = {n: i + 1 for i, n in enumerate(names)}
    problems = Problems(on_bad)
    images, annotations = [], []
    for image_id, stem in enumerate(ids, start=1):
        xml = root / "Annotations" / f"{stem}.xml"
        try:
            tree = _parse(xml)
        except DataError as e:  # a missing or malformed file: the image is bad (dropped with on_bad='skip')
            problems.add("malformed_annotation", str(e))
            continue
        file = root / "JPEGImages" / f"{stem}.jpg"
        if not file.is_file() and _text(tree, "filename"):
            file = root / "JPEGImages" / _text(tree, "filename")
        try:
            width, height = int(_text(tree.find("size"), "width") or 0), int(_text(tree.find("size"), "height") or 0)
        except ValueError:
            width = height = 0
        if width <= 0 or height <= 0:  # some exports leave the size out or at 0: the image's own
            if not file.is_file():
                problems.add("missing_image", f"{file}: image file not found (image {stem} in {split_file})")
                continue
            width, height = image_size(file)
        image = {"id": image_id, "file_name": file.relative_to(root / "JPEGImages").as_posix(), "width": width,
                 "height": height}
        images.append(image)
        for k, obj in enumerate(tree.iter("object")):
            name = _text(obj, "name")
            where = f"{xml}: object {k} ({name or 'no name'})"
            if not name:
                problems.add("malformed_annotation", f"{where}: no <name>")
                continue
            if name not in label:
                problems.add("unknown_category", f"{where}: class {name!r} is not in data.classes")
                continue
            box = obj.find("bndbox")
            try:
                x1, y1, x2, y2 = (float(_text(box, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
                difficult = int(float(_text(obj, "difficult") or 0))
            except (TypeError, ValueError):
                problems.add("bad_box", f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax (and <difficult> "
                             "0 or 1)")
                continue
            if not all(map(math.isfinite, (x1, y1, x2, y2))) or x2 < x1 or y2 < y1:
                problems.add("bad_box", f"{where}: box xmin {x1:g} ymin {y1:g} xmax {x2:g} ymax {y2:g} is not a box")
                continue
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": label[name],
                   "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                   "iscrowd": int(difficult == 1)}
            if problems.check(ann, image, set(label.values()), where, with_masks=False):
                annotations.append(ann)
    skipped = problems.finish(split_file)
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in label.items()]}
    return Split("voc", split_file, root / "JPEGImages", data, skipped)


__all__ = ["read_voc", "voc_classes"]
