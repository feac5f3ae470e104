"""YOLO folders (the Ultralytics layout): a ``data.yaml`` with ``names`` (a list, or ``{index: name}``) and the
splits' image folders (``train: images/train``; also a ``.txt`` list of images, or a list of either), relative
to ``path`` (when that folder exists) or to the yaml's folder. Each image's labels are the ``.txt`` of the same
name in the parallel ``labels`` folder (the last ``/images/`` of its path replaced by ``/labels/``); an image
without one has no objects. A label line is ``class cx cy w h`` (a box) or ``class x1 y1 x2 y2 ...`` (a polygon,
YOLO-seg, whose box is its extent), coordinates normalised to 0..1 of the image's width and height.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import DataError
from .layout_base import Problems, Split, image_size, polygon_area

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".mpo", ".dng", ".pfm"}


def find_yaml(root: Path) -> Path:
    if root.is_file():
        return root
    if (root / "data.yaml").is_file():
        return root / "data.yaml"
    found = sorted(root.glob("*.yaml"))
    if len(found) != 1:
        raise DataError(f"{root}: a YOLO folder needs a data.yaml (found {len(found)} .yaml files)")
    return found[0]


def read_yaml(root: Path) -> tuple[Path, dict, tuple[str, ...], Path]:
    """(the yaml file, its contents, the class names, the base folder of its paths)."""
    import yaml

    file = find_yaml(Path(root))
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not a valid YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"{file}: a YOLO data.yaml needs 'names' (a list, or index: name)")
    names = data["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{file}: 'names' indexes must be 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DataError(f"{file}: 'names' must be a non-empty list of class names or a {{index: name}} mapping")
    names = tuple(str(n) for n in names)
    if len(set(names)) != len(names):
        raise DataError(f"{file}: 'names' lists a class twice")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{file}: nc is {data['nc']!r} but 'names' has {len(names)} classes")
    base = file.parent
    if isinstance(data.get("path"), str) and (file.parent / data["path"]).is_dir():
        base = (file.parent / data["path"]).resolve()
    return file, data, names, base


def label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` of the path becomes ``/labels/``, the suffix ``.txt``."""
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    path = str(image)
    return Path(b.join(path.rsplit(a, 1)) if a in path else path).with_suffix(".txt")


def _split_images(file: Path, base: Path, entry) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        if not isinstance(e, str):
            raise DataError(f"{file}: a split must be a folder, a .txt list of images or a list of them, got {e!r}")
        p = base / e
        if not p.exists() and e.startswith("../"):  # Roboflow's exports point one folder up (as Ultralytics, retry)
            p = base / e[3:]
        if p.is_dir():
            images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    images.append(q if q.is_absolute() else (p.parent / q))
        else:
            raise DataError(f"{file}: split folder or list {p} not found")
    return images


def read_yolo(root: Path, split: str, *, on_bad: str = "fail") -> Split:
    file, data, names, base = read_yaml(root)
    if split not in data or data[split] is None:
        found = [k for k in ("train", "val", "valid", "test") if data.get(k)]
        raise DataError(f"{file}: no split {split!r} (splits here: {', '.join(found) or 'none'})")
    paths = _split_images(file, base, data[split])
    if not paths:
        raise DataError(f"{file}: split {split!r} has no images")
    image_dir = Path(os.path.commonpath([p.parent.resolve() for p in paths]))
    cat_ids = set(range(1, len(names) + 1))
    problems = Problems(on_bad)
    images, annotations = [], []
    for image_id, path in enumerate(paths, start=1):
        path = path.resolve()
        if not path.is_file():
            problems.add("missing_image", f"{path}: image file not found (split {split!r} of {file})")
            continue
        width, height = image_size(path)
        image = {"id": image_id, "file_name": path.relative_to(image_dir).as_posix(), "width": width,
                 "height": height}
        images.append(image)
        labels = label_file(path)
        if not labels.is_file():
            continue
        try:
            lines = labels.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{labels}: cannot read the label file ({e})") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{labels}:{n}"
            ann = _annotation(line.split(), width, height, len(names), problems, where)
            if ann is None:
                continue
            ann.update(id=len(annotations) + 1, image_id=image_id)
            if problems.check(ann, image, cat_ids, where, with_masks="segmentation" in ann):
                annotations.append(ann)
    skipped = problems.finish(file)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return Split("yolo", file, image_dir, {"images": images, "annotations": annotations, "categories": categories},
                 skipped)


def _annotation(tokens: list[str], width: int, height: int, num_classes: int, problems: Problems,
                where: str) -> dict | None:
    try:
        cls, values = int(tokens[0]), [float(t) for t in tokens[1:]]
    except ValueError:
        problems.add("malformed_annotation", f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 ...' "
                     "(an integer class and numbers)")
        return None
    if not 0 <= cls < num_classes:
        problems.add("unknown_category", f"{where}: class {cls} is not in 0..{num_classes - 1} (data.yaml names)")
        return None
    if len(values) != 4 and (len(values) < 6 or len(values) % 2):
        problems.add("malformed_annotation", f"{where}: {len(values)} coordinates; a box has 4 (cx cy w h), a "
                     "polygon an even number, at least 6")
        return None
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values):
        problems.add("bad_box", f"{where}: coordinates must be normalised to 0..1 of the image size")
        return None
    if len(values) == 4:
        cx, cy, w, h = values
        box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        return {"category_id": cls + 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
    poly = [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]
    xs, ys = poly[0::2], poly[1::2]
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"category_id": cls + 1, "bbox": box, "area": polygon_area(poly), "segmentation": [poly], "iscrowd": 0}


__all__ = ["read_yolo", "read_yaml", "label_file", "find_yaml"]
