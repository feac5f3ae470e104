"""``res2det data DIR``: what a data folder holds (layout, splits, images and instances per class, box sizes,
images without objects, problems), and ``--to-coco OUT``: the same data as COCO json."""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from ..errors import Res2DetError
from .common import check_output


def _dataset(root: Path, fmt: str, split: str, classes, on_bad: str):
    """The split as a checked ``CocoDataset`` (evaluation mode: every good image kept)."""
    from ..data import CocoDataset
    from ..data.coco_dataset import _read_json
    from ..data.layouts import read_split

    source = read_split(root, split, fmt=fmt, classes=classes, on_bad=on_bad)
    data = source.coco_data if source.coco_data is not None else _read_json(source.ann_file)
    anns = data.get("annotations") or []
    with_masks = any(isinstance(a, dict) and "segmentation" in a for a in anns)
    dataset = CocoDataset(source.ann_file, source.image_dir, train=False, with_masks=with_masks, on_bad=on_bad,
                          coco_data=data)
    dataset.skipped.update(source.skipped)
    return dataset, with_masks


def _percentiles(values: list[float], qs=(0, 10, 50, 90, 100)) -> str:
    v = sorted(values)
    return " / ".join(f"{v[min(len(v) - 1, round(q / 100 * (len(v) - 1)))]:.0f}" for q in qs)


def summary(dataset, with_masks: bool) -> list[str]:
    anns = [a for r in dataset.records for a in r.annotations]
    objects = [a for a in anns if not a.get("iscrowd", 0)]
    per_class = Counter(dataset.cat_id_to_label[a["category_id"]] for a in objects)
    empty = sum(1 for r in dataset.records if not r.targets)
    sides = [(a["bbox"][2] * a["bbox"][3]) ** 0.5 for a in objects]
    lines = [f"  {len(dataset.records)} images, {len(objects)} objects ({'masks' if with_masks else 'boxes only'})"
             + (f", {len(anns) - len(objects)} ignored regions (crowd / difficult)" if len(anns) > len(objects) else "")
             + f", {empty} image(s) without objects"]
    width = max(len(n) for n in dataset.class_names)
    images = Counter(label for r in dataset.records for label in {dataset.cat_id_to_label[a["category_id"]]
                                                                 for a in r.targets})
    for label, name in enumerate(dataset.class_names):
        if per_class[label]:
            lines.append(f"    {name:<{width}}  {per_class[label]:>6} objects in {images[label]} images")
    absent = [n for label, n in enumerate(dataset.class_names) if not per_class[label]]
    if absent:
        lines.append(f"    no objects of {len(absent)} class(es): {', '.join(absent)}")
    if sides:
        small = sum(s < 32 for s in sides)
        large = sum(s >= 96 for s in sides)
        lines.append(f"  box size sqrt(w*h) px, min / 10% / median / 90% / max: {_percentiles(sides)}; COCO small "
                     f"{small}, medium {len(sides) - small - large}, large {large}")
    if dataset.filtered:
        lines.append("  left out of training targets: " + ", ".join(f"{k}={v}" for k, v in
                                                                    sorted(dataset.filtered.items())))
    if dataset.skipped:
        lines.append("  problems (dropped with data.on_bad=skip): " + ", ".join(f"{k}={v}" for k, v in
                                                                             sorted(dataset.skipped.items())))
    else:
        lines.append("  problems: none")
    return lines


def write_coco(dataset, out: Path, split: str) -> Path:
    """``out/annotations/instances_{split}.json`` and ``out/{split}`` (a link to the image folder): a COCO root
    that res2det reads, and a json and image prefix for pycocotools and mmdetection."""
    from ..checkpoint import atomic_write

    data = {**dataset.coco.dataset, "categories": dataset.categories}
    ann = out / "annotations" / f"instances_{split}.json"
    text = json.dumps(data)
    atomic_write(ann, lambda tmp: Path(tmp).write_text(text))
    images = out / split
    if images.is_symlink() or not images.exists():
        if images.is_symlink():
            images.unlink()
        os.symlink(dataset.image_dir.resolve(), images, target_is_directory=True)
    elif images.resolve() != dataset.image_dir.resolve():
        raise Res2DetError(f"--to-coco {out}: {images} exists and is not a link to {dataset.image_dir}")
    return ann


def cmd_data(args) -> None:
    from ..data.layouts import detect_format, split_names
    from ..data.voc import voc_classes

    root = Path(args.dir)
    fmt = detect_format(root) if args.format == "auto" else args.format
    if args.to_coco:
        check_output(args.to_coco, "--to-coco", folder=True)
    splits = args.split or split_names(root, fmt)
    if not splits:
        raise Res2DetError(f"{root}: a {fmt.upper()} layout with no split found")
    print(f"{root}: {fmt.upper() if fmt != 'yolo' else 'YOLO'} layout, splits: {', '.join(splits)}")
    if fmt == "voc" and not args.classes:
        print(f"  classes (as first seen in Annotations/): {', '.join(voc_classes(root))}")
    for split in splits:
        dataset, with_masks = _dataset(root, fmt, split, args.classes, args.on_bad)
        print(f"split {split} ({dataset.ann_file}):")
        print("\n".join(summary(dataset, with_masks)))
        if args.to_coco:
            print(f"  COCO json: {write_coco(dataset, Path(args.to_coco), split)} (images: "
                  f"{Path(args.to_coco) / split} -> {dataset.image_dir})")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="what a data folder (COCO, Pascal VOC or YOLO) holds; --to-coco converts it")
    p.add_argument("dir", metavar="DIR", help="the data folder (or a YOLO data.yaml)")
    p.add_argument("--format", choices=["auto", "coco", "voc", "yolo"], default="auto",
                   help="the layout (default: found from the folder), as data.format")
    p.add_argument("--split", nargs="+", help="splits to read (default: every split found)")
    p.add_argument("--classes", nargs="+", help="Pascal VOC: the classes in this order, as data.classes")
    p.add_argument("--on-bad", choices=["fail", "skip"], default="fail",
                   help="fail: stop at the first problem (as training does); skip: count the problems by kind")
    p.add_argument("--to-coco", metavar="OUT", help="write OUT/annotations/instances_<split>.json and OUT/<split> "
                   "(a link to the images): a COCO root for res2det, pycocotools and mmdetection")
    p.set_defaults(func=cmd_data)
