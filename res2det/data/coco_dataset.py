"""COCO-format instance datasets (an instances JSON and an image folder) for training and evaluation.

What is checked, and when: the JSON at construction (structure, every annotation's category, box and
segmentation; image and stuff-map files exist), each image when it is loaded (readable, and the size the JSON
gives). A bad annotation or image raises one ``DataError`` naming the file, the annotation / image id and the
problem (``on_bad="fail"``, the default), or is dropped and counted by reason in ``dataset.skipped``
(``on_bad="skip"``, one warning summary). Things genuine COCO contains are not errors: boxes reaching past the
image border are clipped; boxes under 1 px (COCO has some of 0 px, e.g. annotation 918 of train2017) and
annotations of zero area are dropped from the targets as mmdetection does, counted in ``dataset.filtered``.

Training (``train=True``) leaves out crowd regions from the targets, and skips images with no target left or
whose short side is under ``min_size`` (mmdetection's ``filter_empty_gt`` and ``min_size=32``; unlike mmdet,
an image with only crowd regions is skipped too). Evaluation keeps every (good) image, in JSON order.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import DataError, Res2DetError
from ..structures import Preprocess
from ..images import load_image, to_rgb_uint8
from .transforms import Sample, Scale, hflip, resize, sample_scale, to_tensors

DEFAULT_PREPROCESS = Preprocess(input_size=(800, 1333), crop_pct=None)  # what predict() uses without one


class MasksMissingError(DataError):
    """Box-only data given to a model that trains masks."""


@dataclass
class ImageRecord:
    """One image of the dataset with its checked annotations (raw COCO dicts, crowd regions included)."""

    image_id: int
    file: Path
    width: int
    height: int
    annotations: list[dict]
    stuff_file: Path | None = None

    @property
    def targets(self) -> list[dict]:
        """The annotations that become targets: not crowd, at least 1 px wide and high, non-zero area."""
        return [a for a in self.annotations if not a.get("iscrowd", 0) and _usable(a)]


def _usable(ann: dict) -> bool:
    w, h = ann["bbox"][2], ann["bbox"][3]
    return w >= 1 and h >= 1 and ann.get("area", 1) > 0


def _is_id(x: Any) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_annotation(ann: dict, image: dict, cat_ids: set[int], *, with_masks: bool) -> tuple[str, str] | None:
    """``(reason, message)`` for a bad annotation, ``None`` for a good one. Cheap: JSON only."""
    missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
    if with_masks and "segmentation" not in ann:
        missing.append("segmentation")
    if missing:
        return "malformed_annotation", f"missing {', '.join(missing)}"
    if not _is_id(ann["id"]):
        return "malformed_annotation", f"id {ann['id']!r}: annotation ids must be integers or strings"
    cat = ann["category_id"]
    if not isinstance(cat, (int, float)) or isinstance(cat, bool) or cat not in cat_ids:
        return "unknown_category", f"unknown category id {cat!r} (not in 'categories')"
    if ann.get("iscrowd", 0) not in (0, 1):  # COCOeval takes int() of it
        return "malformed_annotation", f"iscrowd {ann['iscrowd']!r} is not 0 or 1"
    if "area" in ann and not _is_number(ann["area"]):
        return "malformed_annotation", f"area {ann['area']!r} is not a number"
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        return "bad_box", f"bbox {box!r} is not 4 finite numbers [x, y, w, h]"
    x, y, w, h = box
    if w < 0 or h < 0:
        return "bad_box", f"bbox {box} has a negative size"
    W, H = image["width"], image["height"]
    if w > 0 and h > 0 and (x >= W or y >= H or x + w <= 0 or y + h <= 0):
        return "box_outside", f"bbox {box} lies entirely outside the {W}x{H} image"
    if not with_masks:
        return None
    segm = ann["segmentation"]
    if isinstance(segm, list):
        if not segm:
            return "bad_polygon", "empty polygon list"
        # pycocotools rasterises in int arithmetic: a coordinate far outside the image overflows it (1e30
        # segfaults), so anything beyond a generous margin around the image is an error, not a mask
        limit = 4 * max(W, H) + 1000
        for poly in segm:
            if not (isinstance(poly, list) and all(map(_is_number, poly))):
                return "bad_polygon", "a polygon is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return "bad_polygon", f"polygon with {len(poly) / 2:g} points (needs at least 3 x, y pairs)"
            far = next((v for v in poly if abs(v) > limit), None)
            if far is not None:
                return "bad_polygon", f"polygon coordinate {far!r} lies far outside the {W}x{H} image"
        return None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if not isinstance(segm["size"], list) or segm["size"] != [H, W]:
            return "bad_rle", f"RLE size {segm['size']!r} is not the image's [height, width] [{H}, {W}]"
        counts = segm["counts"]
        if not isinstance(counts, (list, str)):
            return "bad_rle", "RLE counts are neither a list nor a string"
        if isinstance(counts, list) and not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                for c in counts):
            return "bad_rle", "RLE counts must be non-negative integers"
        if isinstance(counts, list) and sum(counts) != H * W:
            return "bad_rle", f"RLE counts cover {sum(counts)} pixels, the image has {H * W}"
        if isinstance(counts, str):
            decoded = _rle_string_counts(counts)
            if decoded is None or sum(decoded) != H * W:
                return "bad_rle", (f"compressed RLE counts {counts[:20]!r}{'...' if len(counts) > 20 else ''} do not "
                                   f"decode to the image's {H * W} pixels")
        return None
    return "bad_segmentation", "segmentation is neither a polygon list nor an RLE dict with counts and size"


def _rle_string_counts(s: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' 6-bit LEB128-like code with deltas from
    the run two back), or ``None`` when it is malformed or decodes to a negative run. pycocotools itself
    decodes garbage without a check (reading past its buffer), so strings are checked here first."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
    return counts


def decode_mask(segm: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an ``height x width`` uint8 mask."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    with warnings.catch_warnings():  # pycocotools' Cython __array__ predates NumPy 2's copy keyword
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (the top level is a {type(data).__name__}, "
                        "not an object)")
    return data


def _entries(data: dict, key: str, path: Path, fields: Sequence[str], *, required: bool = True) -> list[dict]:
    """``data[key]``: a list of objects each holding ``fields``; one clear error otherwise."""
    if key not in data:
        if not required:
            return []
        raise DataError(f"{path}: not a COCO instances file (no '{key}' list)")
    entries = data[key]
    if not isinstance(entries, list):
        raise DataError(f"{path}: '{key}' is a {type(entries).__name__}, not a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DataError(f"{path}: {key}[{i}] is a {type(e).__name__}, not an object")
        missing = [f for f in fields if f not in e]
        if missing:
            ident = f" (id {e['id']})" if "id" in e else ""
            raise DataError(f"{path}: {key}[{i}]{ident} lacks {', '.join(missing)}")
    return entries


def coco_ids(ann_file: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """(image file name -> image id, category name -> category id) of a COCO file: what a results file for it
    needs (``res2det infer --coco-json --ann``). File names are matched by their last component."""
    path = Path(ann_file)
    data = _read_json(path)
    images = _entries(data, "images", path, ("id", "file_name"))
    cats = _entries(data, "categories", path, ("id", "name"))
    by_name: dict[str, Any] = {}
    for img in images:
        name = Path(str(img["file_name"])).name
        if name in by_name:
            raise DataError(f"{path}: two images named {name!r} (ids {by_name[name]!r} and {img['id']!r})")
        by_name[name] = img["id"]
    return by_name, {str(c["name"]): c["id"] for c in cats}


class CocoDataset(torch.utils.data.Dataset):
    """A COCO instances file with its images, as samples for ``res2det.data.loader.collate``.

    A sample (``dataset[i]``, or ``dataset[(i, seed)]`` for a reproducible augmentation draw, which is what the
    loader's batch sampler asks for) is a dict: ``image`` float32 ``[3, h, w]`` normalised with
    ``preprocess``, not padded; ``boxes`` float32 ``[N, 4]`` x1, y1, x2, y2 in the resized (and flipped)
    image; ``labels`` int64 ``[N]`` in 0..C-1; ``masks`` uint8 ``[N, h, w]`` (``with_masks``); ``semantic``
    int64 ``[h, w]`` (``stuff_dir``; 255 = ignore); ``image_id``, ``file``, ``orig_size`` (H, W),
    ``scale_factor`` (sx, sy) = resized / original per axis, ``flipped``.

    Labels are the categories sorted by COCO id, numbered from 0 (``label_to_cat_id`` = ``cat_ids``,
    ``cat_id_to_label``, ``class_names``). Samples are resized to fit ``scale`` (keep ratio; default
    ``preprocess.input_size``, with which evaluation resizes exactly as ``predict`` does). Training draws a
    scale per sample from ``scale_choices``, or keeps ``scale``'s long side and draws the short side from
    ``scale_range`` (see ``transforms.sample_scale``), and flips left-right with probability ``flip_prob``.
    Evaluation samples carry their non-crowd targets too; COCO metrics use ``coco``, the pycocotools ground
    truth of the checked annotations of the kept images (the JSON itself unless ``on_bad="skip"`` dropped
    something).

    ``stuff_dir``: HTC's semantic targets, a folder of PNG label maps named like the images with ``.png``
    (COCO-stuff's ``stuffthingmaps``), at the image's size.

    ``with_masks=False`` (models without a mask head) neither checks nor loads ``segmentation``: box-only data
    trains them. ``with_masks=True`` on data where no annotation has a ``segmentation`` raises
    ``MasksMissingError``. ``coco_data``: the instances dict itself (another layout converted by
    ``res2det.data.layouts``), in place of reading ``ann_file``, which then only names the source in messages.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 preprocess: Preprocess | None = None, scale: Scale | None = None,
                 scale_choices: Sequence[Scale] | None = None, scale_range: tuple[int, int] | None = None,
                 flip_prob: float = 0.5, with_masks: bool = True, stuff_dir: str | os.PathLike | None = None,
                 on_bad: str = "fail", min_size: int = 32, coco_data: dict | None = None):
        if on_bad not in ("fail", "skip"):
            raise ValueError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}")
        if scale_choices is not None and scale_range is not None:
            raise ValueError("give either scale_choices or scale_range, not both")
        if scale_choices is not None and not scale_choices:
            raise ValueError("scale_choices is empty")
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.stuff_dir = None if stuff_dir is None else Path(stuff_dir)
        self.train, self.with_masks, self.on_bad = train, with_masks, on_bad
        self.preprocess = preprocess or DEFAULT_PREPROCESS
        self.scale: Scale = tuple(scale or self.preprocess.input_size)
        self.scale_choices = None if scale_choices is None else [tuple(s) for s in scale_choices]
        self.scale_range = None if scale_range is None else tuple(scale_range)
        self.flip_prob, self.min_size = flip_prob, min_size
        self.skipped: Counter = Counter()  # bad data dropped (on_bad="skip"), by reason
        self.filtered: Counter = Counter()  # legal data left out of training targets / images, by reason
        self._bad_indices: set[int] = set()  # images found unreadable when loaded (skip mode)

        data = _read_json(self.ann_file) if coco_data is None else coco_data
        images = _entries(data, "images", self.ann_file, ("id", "file_name", "width", "height"))
        cats = _entries(data, "categories", self.ann_file, ("id", "name"))
        anns = _entries(data, "annotations", self.ann_file, (), required=train)
        for i, c in enumerate(cats):
            if not isinstance(c["id"], int) or isinstance(c["id"], bool):
                raise DataError(f"{self.ann_file}: categories[{i}] has id {c['id']!r}; category ids must be integers")
            if not isinstance(c["name"], str):
                raise DataError(f"{self.ann_file}: categories[{i}] (id {c['id']}) has name {c['name']!r}; category "
                                "names must be strings")
        cat_ids = sorted(c["id"] for c in cats)
        if len(set(cat_ids)) != len(cat_ids):
            raise DataError(f"{self.ann_file}: duplicate category ids in 'categories'")
        names = {c["id"]: c["name"] for c in cats}
        self.label_to_cat_id: list[int] = cat_ids
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}
        self.class_names: tuple[str, ...] = tuple(names[c] for c in cat_ids)
        self.categories = [{"id": c["id"], "name": c["name"]} for c in sorted(cats, key=lambda c: c["id"])]
        if with_masks and anns and not any(isinstance(a, dict) and "segmentation" in a for a in anns):
            raise MasksMissingError(f"{self.ann_file}: box-only data (no annotation has a 'segmentation'), and this "
                                    "model has a mask head: it needs masks")
        self.records = self._check(images, anns, set(cat_ids))
        self._coco = None

    # ------------------------------------------------------------------------------ construction checks
    def _bad(self, reason: str, message: str, problems: list[str]) -> None:
        problems.append(message)
        if self.on_bad == "skip":
            self.skipped[reason] += 1

    def _check(self, images: list[dict], anns: list[dict], cat_ids: set[int]) -> list[ImageRecord]:
        problems: list[str] = []
        by_id: dict[Any, dict] = {}
        for img in images:
            if not _is_id(img.get("id")):
                raise DataError(f"{self.ann_file}: image {img.get('file_name', '?')!r} has id {img.get('id')!r}; "
                                "image ids must be integers or strings")
            if img["id"] in by_id:
                raise DataError(f"{self.ann_file}: duplicate image id {img['id']!r}")
            by_id[img["id"]] = img
            if not all(isinstance(img[k], int) and not isinstance(img[k], bool) and img[k] > 0
                       for k in ("width", "height")):
                raise DataError(f"{self.ann_file}: image {img['id']!r} ({img['file_name']}) has a bad size "
                                f"{img['width']!r}x{img['height']!r}")
            if not isinstance(img["file_name"], str):
                raise DataError(f"{self.ann_file}: image {img['id']!r} has file_name {img['file_name']!r}; file names "
                                "must be strings")
        per_image: dict[Any, list[dict]] = {i: [] for i in by_id}
        seen_ids: set = set()
        for ann in anns:
            if "id" in ann and _is_id(ann["id"]):
                if ann["id"] in seen_ids:  # COCOeval would keep every copy as another object
                    self._bad("duplicate_annotation_id", f"{self.ann_file}: duplicate annotation id {ann['id']!r}",
                              problems)
                    continue
                seen_ids.add(ann["id"])
            image = by_id.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
            if image is None:
                self._bad("unknown_image", f"{self.ann_file}: annotation {ann.get('id', '?')}: image id "
                          f"{ann.get('image_id')!r} is not in 'images'", problems)
                continue
            bad = check_annotation(ann, image, cat_ids, with_masks=self.with_masks)
            if bad:
                self._bad(bad[0], f"{self.ann_file}: annotation {ann.get('id', '?')} (image {image['file_name']}, "
                          f"id {image['id']}): {bad[1]}", problems)
            else:
                ann.setdefault("iscrowd", 0)  # what COCOeval reads; a box-only file may leave them out
                ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
                per_image[image["id"]].append(ann)

        for folder, what in ((self.image_dir, "image"), (self.stuff_dir, "stuff map")):
            if folder is not None and not folder.is_dir():
                raise DataError(f"{folder}: {what} folder not found (for {self.ann_file})")
        present = set(os.listdir(self.image_dir))
        stuff_present = set(os.listdir(self.stuff_dir)) if self.stuff_dir is not None else set()
        records = []
        for img in images:
            name = img["file_name"]
            file = self.image_dir / name
            if name not in present and not file.is_file():  # file_name may hold a sub-folder
                self._bad("missing_image", f"{file}: image file not found (image id {img['id']} in "
                          f"{self.ann_file})", problems)
                continue
            stuff_file = None
            if self.stuff_dir is not None:
                stuff_file = self.stuff_dir / Path(name).with_suffix(".png")
                if stuff_file.name not in stuff_present and not stuff_file.is_file():
                    self._bad("missing_stuff_map", f"{stuff_file}: stuff label map not found (image {name}, id "
                              f"{img['id']} in {self.ann_file})", problems)
                    continue
            record = ImageRecord(img["id"], file, img["width"], img["height"], per_image[img["id"]], stuff_file)
            if self.train and not record.targets:
                self.filtered["no_annotations"] += 1
                continue
            if self.train and min(record.width, record.height) < self.min_size:
                self.filtered["small_image"] += 1
                continue
            records.append(record)
        for record in records:
            self.filtered["box_under_1px_or_zero_area"] += sum(
                1 for a in record.annotations if not a.get("iscrowd", 0) and not _usable(a))
        self.filtered = +self.filtered  # drop zero counts

        if problems and self.on_bad == "fail":
            more = f" (and {len(problems) - 1} more problem(s); on_bad='skip' drops them)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        if problems:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            warnings.warn(f"{self.ann_file}: skipped {len(problems)} bad annotation(s)/image(s) ({counts}); first: "
                          f"{problems[0]}", stacklevel=3)
        if not records:
            raise DataError(f"{self.ann_file}: no usable images" + (" with annotations" if self.train else ""))
        return records

    # ---------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    @property
    def cat_ids(self) -> list[int]:
        return self.label_to_cat_id

    @property
    def coco(self) -> COCO:
        """The pycocotools ground truth for evaluation: the kept images and their checked annotations."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = {
                "images": [{"id": r.image_id, "file_name": r.file.relative_to(self.image_dir).as_posix(),
                            "width": r.width, "height": r.height} for r in self.records],
                "annotations": [a for r in self.records for a in r.annotations],
                "categories": self.categories}
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def aspect_groups(self) -> list[int]:
        """0 for images with width >= height, 1 for the others (from the JSON sizes)."""
        return [0 if r.width >= r.height else 1 for r in self.records]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        if seed is None and self.train:
            seed = int(torch.randint(2**62, ()).item())  # torch's RNG: seeded per DataLoader worker
        rng = random.Random(seed)
        # an unreadable image: fail -> its DataError; skip -> counted once, the next readable image instead
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._bad_indices:
                continue
            try:
                return self._load(self.records[i], rng)
            except DataError as e:
                if self.on_bad == "fail":
                    raise
                self._bad_indices.add(i)
                self.skipped["unreadable_image"] += 1
                warnings.warn(f"skipped: {e}", stacklevel=2)
        raise DataError(f"{self.ann_file}: none of the {len(self)} images could be read")

    def load_sample(self, index: int) -> Sample:
        """Image ``index`` at its original size with its targets (masks / semantic as configured)."""
        return self._read(self.records[index])

    def _read(self, rec: ImageRecord) -> Sample:
        try:
            rgb = to_rgb_uint8(load_image(rec.file))
        except DataError:
            raise
        except Res2DetError as e:
            raise DataError(f"{e} (image id {rec.image_id} in {self.ann_file})") from None
        if rgb.shape[:2] != (rec.height, rec.width):
            raise DataError(f"{rec.file}: the image is {rgb.shape[1]}x{rgb.shape[0]} (after EXIF orientation), "
                            f"{self.ann_file} says {rec.width}x{rec.height} (image id {rec.image_id})")
        anns = rec.targets
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = np.clip(boxes, 0, [rec.width, rec.height, rec.width, rec.height]).astype(np.float32)
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        masks = None
        if self.with_masks:
            masks = np.zeros((len(anns), rec.height, rec.width), dtype=np.uint8)
            for k, a in enumerate(anns):
                masks[k] = decode_mask(a["segmentation"], rec.height, rec.width)
        semantic = None if rec.stuff_file is None else self._read_stuff(rec)
        return Sample(rgb=rgb, boxes=boxes, labels=labels, masks=masks, semantic=semantic)

    def _read_stuff(self, rec: ImageRecord) -> np.ndarray:
        try:
            with Image.open(rec.stuff_file) as img:
                mode = img.mode
                arr = np.asarray(img)
        except FileNotFoundError:
            raise DataError(f"{rec.stuff_file}: stuff label map not found (image id {rec.image_id})") from None
        except OSError as e:
            raise DataError(f"{rec.stuff_file}: not a readable PNG label map ({e})") from None
        if mode not in ("L", "P") or arr.shape != (rec.height, rec.width):
            raise DataError(f"{rec.stuff_file}: expected a {rec.width}x{rec.height} single-channel 8-bit label map, "
                            f"got mode {mode} size {arr.shape[1] if arr.ndim > 1 else '?'}x{arr.shape[0]} "
                            f"(image id {rec.image_id})")
        return arr.astype(np.uint8)

    def _load(self, rec: ImageRecord, rng: random.Random) -> dict:
        sample = self._read(rec)
        scale = self.scale
        if self.train:
            scale = sample_scale(rng, self.scale, choices=self.scale_choices, short_range=self.scale_range)
        sample, scale_factor = resize(sample, scale)
        flipped = self.train and rng.random() < self.flip_prob
        if flipped:
            sample = hflip(sample)
        out = to_tensors(sample, self.preprocess)
        out.update(image_id=rec.image_id, file=str(rec.file), orig_size=(rec.height, rec.width),
                   scale_factor=scale_factor, flipped=flipped)
        return out


__all__ = ["CocoDataset", "ImageRecord", "MasksMissingError", "check_annotation", "decode_mask", "DEFAULT_PREPROCESS"]
