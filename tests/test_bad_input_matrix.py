"""Issue #12, item 4: a generated matrix of bad inputs, each run through the command line in-process.

Every case builds its input in a folder of its own (images, a COCO folder, a checkpoint, a config file, an
output path that is in the way), runs ``main([...])`` and checks the reliability rule of the README: exit code
2; stderr ends with exactly one ``res2det: error: ...`` line that names the offending file (and, for
annotations, the annotation / key / field) and holds no traceback; and nothing in the case's folder changed:
the same files with the same bytes and modification times, no new file (no temporary ``*.tmp`` file, no run
folder, no marker written by a pickle that tried to run code).

Only inputs the library must refuse are here; what the dataset rules accept (boxes reaching past the border
are clipped, boxes under 1 px and zero areas are filtered, a PNG without IEND decodes) is not a bad input.
Classes: images, annotations, checkpoints, configs, output paths. Cases are generated from tables and
products; ``test_case_count`` keeps the count at 150 or more.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from res2det.cli.main import main

TINY = "mask_rcnn_r2_tiny_fpn"
MARKER = "PWNED"  # the file a malicious pickle would create in its case folder


@dataclass(frozen=True)
class Case:
    kind: str  # images, annotations, checkpoints, configs, outputs
    name: str
    # (case folder, session env) -> (argv, phrases the error line must contain)
    build: Callable[[Path, Any], tuple[list[str], list[str]]]

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


CASES: list[Case] = []


def case(kind: str, name: str):
    def register(build):
        CASES.append(Case(kind, name, build))
        return build
    return register


# ------------------------------------------------------------------------------------------ file makers
def _encode(fmt: str, w: int = 50, h: int = 40, **kw) -> bytes:
    rng = np.random.default_rng(w * 1000 + h)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


PNG, JPEG = _encode("PNG"), _encode("JPEG", quality=90)


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) if crc is None
                                                                       else crc)


def _png_header(w: int, h: int, depth: int = 8, color: int = 2) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))


def _png_with(w: int, h: int, depth: int = 8, color: int = 2, data: bytes | None = None) -> bytes:
    idat = zlib.compress(data if data is not None else b"\0" * 100)
    return _png_header(w, h, depth, color) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


IDAT_AT = 33  # PNG: 8-byte signature + 25-byte IHDR chunk; then the IDAT chunk (length, type, data, crc)
IDAT_LEN = struct.unpack(">I", PNG[IDAT_AT:IDAT_AT + 4])[0]


class Exploit:
    """Unpickling this calls ``os.system`` to create the marker file: a loader that unpickles arbitrary
    objects would run it."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __reduce__(self):
        return os.system, (f"touch {self.folder / MARKER}",)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


# -------------------------------------------------------------------------------------------------- images
def infer_argv(env, *inputs: str | Path, extra: tuple[str, ...] = ()) -> list[str]:
    # no --weights: the randomly initialised tiny model (a warning line precedes the error where the image is
    # refused only when decoded, after the model is built); loading weights would only add time
    return ["infer", "--model", TINY, *map(str, inputs), *extra]


def _image_file_case(name: str, filename: str, data: Callable[[], bytes]) -> None:
    @case("images", name)
    def build(folder, env, filename=filename, data=data):
        path = write(folder / filename, data())
        return infer_argv(env, path), [f"error: {path}: not a readable image"]


_PNG_CUTS = {"signature": 8, "mid-IHDR": 20, "IHDR-crc": 29, "after-IHDR": IDAT_AT, "IDAT-length": IDAT_AT + 6,
             "IDAT-start": IDAT_AT + 8 + 10, "IDAT-quarter": IDAT_AT + 8 + IDAT_LEN // 4,
             "IDAT-half": IDAT_AT + 8 + IDAT_LEN // 2, "IDAT-three-quarters": IDAT_AT + 8 + 3 * IDAT_LEN // 4}
for _cut, _at in _PNG_CUTS.items():
    _image_file_case(f"png-truncated-at-{_cut}", "cut.png", lambda at=_at: PNG[:at])
_JPEG_CUTS = {"2": 2, "20": 20, "200": 200, "quarter": len(JPEG) // 4, "half": len(JPEG) // 2,
              "three-quarters": 3 * len(JPEG) // 4, "minus-10": len(JPEG) - 10, "no-EOI": len(JPEG) - 2}
for _cut, _at in _JPEG_CUTS.items():
    _image_file_case(f"jpeg-truncated-at-{_cut}", "cut.jpg", lambda at=_at: JPEG[:at])
for _fmt, _suffix, _at in (("GIF", "gif", 30), ("BMP", "bmp", 60), ("TIFF", "tif", 200), ("WEBP", "webp", 40),
                           ("PPM", "ppm", 100)):
    _image_file_case(f"{_fmt.lower()}-truncated", f"cut.{_suffix}", lambda f=_fmt, at=_at: _encode(f)[:at])
for _suffix in ("jpg", "png", "webp", "JPEG"):
    _image_file_case(f"empty-.{_suffix}", f"empty.{_suffix}", lambda: b"")
_NOT_IMAGES = {  # name -> (file name, bytes): content that is not an image, under an image's name
    "text-named-jpg": ("notes.jpg", lambda: b"hello world\n"),
    "html-named-png": ("page.png", lambda: b"<!doctype html><html><body>404</body></html>\n"),
    "json-named-png": ("data.png", lambda: json.dumps({"images": []}).encode()),
    "zip-named-jpg": ("archive.jpg", lambda: b"PK\x03\x04" + b"\0" * 200),
    "pdf-named-png": ("doc.png", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
    "random-bytes-named-jpg": ("noise.jpg", lambda: np.random.default_rng(1).integers(
        0, 256, 4096, np.uint8).tobytes()),
    "jpeg-marker-then-noise": ("noise2.jpg", lambda: b"\xff\xd8\xff" + np.random.default_rng(2).integers(
        0, 256, 4096, np.uint8).tobytes()),
    "png-signature-then-noise": ("noise3.png", lambda: PNG[:8] + np.random.default_rng(3).integers(
        0, 256, 4096, np.uint8).tobytes()),
    "checkpoint-named-jpg": ("weights.jpg", lambda: pickle.dumps({"a": [1, 2, 3]})),
    "truncated-png-named-jpg": ("mixed.jpg", lambda: PNG[:IDAT_AT + 8 + IDAT_LEN // 2]),
    "truncated-jpeg-named-png": ("mixed.png", lambda: JPEG[:len(JPEG) // 2]),
    "svg-named-png": ("vector.png", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
}
for _name, (_file, _data) in _NOT_IMAGES.items():
    _image_file_case(_name, _file, _data)
_CORRUPT = {  # name -> (file name, bytes): a damaged or hostile file of an image format
    "png-IHDR-crc-corrupt": ("crc.png", lambda: PNG[:29] + b"\0\0\0\0" + PNG[33:]),
    "png-IDAT-not-zlib": ("idat.png", lambda: PNG[:IDAT_AT] + _chunk(b"IDAT", b"\xff" * IDAT_LEN)
                          + PNG[IDAT_AT + 12 + IDAT_LEN:]),
    "png-IDAT-bytes-overwritten": ("idat2.png", lambda: PNG[:IDAT_AT + 8] + b"\xff" * IDAT_LEN
                                   + PNG[IDAT_AT + 8 + IDAT_LEN:]),
    "png-IDAT-too-short-for-size": ("short.png", lambda: _png_with(64, 64, data=b"\0" * 100)),
    "png-zero-width": ("w0.png", lambda: _png_with(0, 10)),
    "png-zero-height": ("h0.png", lambda: _png_with(10, 0)),
    "png-bit-depth-7": ("depth.png", lambda: _png_with(10, 10, depth=7)),
    "png-color-type-5": ("color.png", lambda: _png_with(10, 10, color=5)),
    "png-decompression-bomb-header": ("bomb.png", lambda: _png_with(100_000, 100_000)),
    "png-bomb-just-over-the-warning": ("bomb2.png", lambda: _png_with(10_000, 10_000)),
    "bmp-decompression-bomb-header": ("bomb.bmp", lambda: b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 0, 0, 0, 0)),
    "ppm-decompression-bomb-header": ("bomb.ppm", lambda: b"P6\n60000 60000\n255\n" + b"\0" * 100),
    "gif-decompression-bomb-header": ("bomb.gif", lambda: b"GIF89a" + struct.pack("<HH", 65535, 65535)
                                      + b"\x00\x00\x00" + b",\0\0\0\0" + struct.pack("<HH", 65535, 65535)
                                      + b"\x00\x02\x02\x44\x01\x00;"),
}
for _name, (_file, _data) in _CORRUPT.items():
    _image_file_case(_name, _file, _data)


@case("images", "missing-file")
def _(folder, env):
    path = folder / "nope.jpg"
    return infer_argv(env, path), [f"error: {path}: image file not found"]


@case("images", "missing-file-in-missing-folder")
def _(folder, env):
    path = folder / "gone" / "nope.png"
    return infer_argv(env, path), [f"error: {path}: image file not found"]


@case("images", "broken-symlink")
def _(folder, env):
    path = folder / "link.jpg"
    path.symlink_to(folder / "target-that-does-not-exist.jpg")
    return infer_argv(env, path), [f"error: {path}: image file not found"]


@case("images", "empty-folder")
def _(folder, env):
    (folder / "photos").mkdir()
    return infer_argv(env, folder / "photos"), [f"error: {folder / 'photos'}: no image files in this folder"]


@case("images", "folder-named-like-an-image")
def _(folder, env):
    (folder / "photo.jpg").mkdir()
    return infer_argv(env, folder / "photo.jpg"), [f"error: {folder / 'photo.jpg'}: no image files in this folder"]


@case("images", "folder-of-non-image-files")
def _(folder, env):
    write(folder / "docs" / "a.txt", "text")
    write(folder / "docs" / "b.json", "{}")
    return infer_argv(env, folder / "docs"), [f"error: {folder / 'docs'}: no image files in this folder"]


@case("images", "glob-matching-nothing")
def _(folder, env):
    write(folder / "a.png", PNG)
    pattern = str(folder / "*.jpg")
    return infer_argv(env, pattern), [f"error: {pattern}: no image files match"]


@case("images", "recursive-glob-matching-nothing")
def _(folder, env):
    (folder / "tree" / "sub").mkdir(parents=True)
    pattern = str(folder / "tree" / "**" / "*.png")
    return infer_argv(env, pattern), [f"error: {pattern}: no image files match"]


@case("images", "glob-matching-only-folders")
def _(folder, env):
    (folder / "x1.jpg").mkdir()
    (folder / "x2.jpg").mkdir()
    pattern = str(folder / "x?.jpg")
    return infer_argv(env, pattern), [f"error: {pattern}: no image files match"]


@case("images", "folder-with-one-corrupt-image")
def _(folder, env):
    write(folder / "photos" / "a.png", PNG)
    bad = write(folder / "photos" / "b.jpg", "not a jpeg")
    return infer_argv(env, folder / "photos", extra=("--on-bad", "fail")), [f"error: {bad}: not a readable image"]


@case("images", "folder-with-one-truncated-image")
def _(folder, env):
    bad = write(folder / "photos" / "a.png", PNG[:IDAT_AT + 8 + IDAT_LEN // 2])  # first: no forward pass to wait for
    write(folder / "photos" / "b.png", PNG)
    return infer_argv(env, folder / "photos", extra=("--on-bad", "fail")), [f"error: {bad}: not a readable image"]


@case("images", "glob-matching-a-text-file")
def _(folder, env):
    write(folder / "in" / "a.png", PNG)
    bad = write(folder / "in" / "b.txt", "text")
    return infer_argv(env, str(folder / "in" / "*"), extra=("--on-bad", "fail")), \
        [f"error: {bad}: not a readable image"]


@case("images", "good-image-then-missing-one")
def _(folder, env):
    good = write(folder / "a.png", PNG)
    return infer_argv(env, good, folder / "b.png", extra=("--on-bad", "fail")), \
        [f"error: {folder / 'b.png'}: image file not found"]


@case("images", "existing-outputs-kept-on-a-bad-image")
def _(folder, env):
    write(folder / "dets.json", "[]\n")
    write(folder / "drawn" / "old.png", PNG)
    bad = write(folder / "b.jpg", JPEG[:len(JPEG) // 2])
    return infer_argv(env, bad, extra=("--out", str(folder / "dets.json"), "--draw", str(folder / "drawn"))), \
        [f"error: {bad}: not a readable image"]


# --------------------------------------------------------------------------------------------- annotations
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}]
IMAGE_W, IMAGE_H = 64, 48


def coco_data() -> dict:
    """A valid three-image, three-category COCO file (the tiny model's 3 classes); annotations 101..103."""
    images = [{"id": k, "file_name": f"im{k}.png", "width": IMAGE_W, "height": IMAGE_H} for k in (1, 2, 3)]
    anns = [{"id": 100 + k, "image_id": k, "category_id": k, "iscrowd": 0, "bbox": [10.0, 8.0, 30.0, 20.0],
             "area": 600.0, "segmentation": [[10.0, 8.0, 40.0, 8.0, 40.0, 28.0, 10.0, 28.0]]} for k in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in CATEGORIES]}


def coco_root(folder: Path, split: str, text: str | bytes | None = None, *, data: dict | None = None) -> Path:
    """``folder/data`` with ``annotations/instances_{split}.json`` (``text`` or ``data``, default valid) and the
    images of the valid file in ``{split}/``; returns the annotation file."""
    root = folder / "data"
    for k in (1, 2, 3):
        rng = np.random.default_rng(k)
        path = root / split / f"im{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)).save(path)
    ann = root / "annotations" / f"instances_{split}.json"
    write(ann, text if text is not None else json.dumps(data if data is not None else coco_data()))
    return ann


FAST_EVAL = ("--set", "data.num_workers=0", "data.scale=(64,64)")


def eval_argv(folder: Path, weights: Path | str) -> list[str]:
    return ["test", "shapes", "--data", str(folder / "data"), "--weights", str(weights), "--out", str(folder / "runs"),
            *FAST_EVAL]


def train_argv(folder: Path) -> list[str]:
    # the settings make an (unexpected) accepted run short; a refused file never gets that far
    return ["train", "shapes", "--data", str(folder / "data"), "--out", str(folder / "runs"), "--set",
            "max_iters=1", "draw=0", "eval_every=0", "data.num_workers=0", "data.scale=(64,64)"]


def _json_case(name: str, text: str | bytes, phrases: tuple[str, ...] = ()) -> None:
    """A file that is not a COCO instances object: refused by `test` (val split) and `train` (train split)."""
    for command in ("test", "train"):
        @case("annotations", f"{command}-{name}")
        def build(folder, env, command=command):
            split = "val" if command == "test" else "train"
            ann = coco_root(folder, split, text)
            argv = eval_argv(folder, env.weights) if command == "test" else train_argv(folder)
            return argv, [f"error: {ann}: ", *phrases]


for _name, _text, _phrases in [
    ("json-syntax-error", '{"images": [', ("not a valid JSON file",)),
    ("json-trailing-garbage", '{"images": []} trailing', ("not a valid JSON file",)),
    ("json-single-quotes", "{'images': []}", ("not a valid JSON file",)),
    ("empty-file", "", ("not a valid JSON file",)),
    ("whitespace-only", "  \n\n", ("not a valid JSON file",)),
    ("not-utf8", b"\xff\xfe\x00{\x00}", ("not a valid JSON file",)),
    ("top-level-list", "[]", ("top level is a list",)),
    ("top-level-string", '"instances"', ("top level is a str",)),
    ("top-level-number", "3", ("top level is a int",)),
    ("top-level-null", "null", ("top level is a NoneType",)),
    ("top-level-NaN", "NaN", ("top level is a float",)),
]:
    _json_case(_name, _text, _phrases)


def _mutation_case(name: str, mutate: Callable[[dict], Any], phrases: tuple[str, ...], *,
                   commands: tuple[str, ...] = ("test", "train")) -> None:
    """``coco_data()`` changed by ``mutate`` (in place, or returning the new object); refused when the file is
    read: by `test` (val split) and by `train` (train split)."""
    for command in commands:
        @case("annotations", f"{command}-{name}")
        def build(folder, env, command=command):
            data = coco_data()
            data = mutate(data) or data
            split = "val" if command == "test" else "train"
            ann = coco_root(folder, split, json.dumps(data))
            argv = eval_argv(folder, env.weights) if command == "test" else train_argv(folder)
            return argv, [str(ann), *[p.format(folder=folder, root=folder / "data" / split) for p in phrases]]


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """Set ``data[key][index][field] = value`` (``path`` like ``annotations.0.bbox``); a value of DELETE
    removes the key."""
    def mutate(data: dict) -> None:
        *parents, last = path.split(".")
        obj = data
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        if isinstance(obj, list):
            obj[int(last)] = value
        elif value is DELETE:
            del obj[last]
        else:
            obj[last] = value
    return mutate


DELETE = object()

# the file's structure: missing keys, containers of the wrong type, entries lacking fields
for _key in ("images", "categories"):
    _mutation_case(f"no-{_key}-key", _set(_key, DELETE), (f"no '{_key}' list",))
_mutation_case("no-annotations-key-for-training", _set("annotations", DELETE), ("no 'annotations' list",),
               commands=("train",))
for _key in ("images", "categories", "annotations"):
    for _label, _value in (("object", {}), ("string", "x"), ("null", None), ("number", 5)):
        _mutation_case(f"{_key}-is-a-{_label}", _set(_key, _value), (f"'{_key}' is a ",))
    for _label, _value in (("number", 5), ("string", "x"), ("list", [1]), ("null", None)):
        _mutation_case(f"{_key}-entry-is-a-{_label}", _set(f"{_key}.0", _value), (f"{_key}[0] is a ",))
for _field in ("id", "file_name", "width", "height"):
    _mutation_case(f"image-lacks-{_field}", _set(f"images.0.{_field}", DELETE), ("images[0]", f"lacks {_field}"))
for _field in ("id", "name"):
    _mutation_case(f"category-lacks-{_field}", _set(f"categories.0.{_field}", DELETE),
                   ("categories[0]", f"lacks {_field}"))

# image entries
for _label, _value in (("list", [1]), ("object", {"a": 1}), ("null", None), ("float", 1.5), ("bool", True)):
    _mutation_case(f"image-id-{_label}", _set("images.0.id", _value), ("im1.png", "image ids must be"))
_mutation_case("duplicate-image-id", _set("images.1.id", 1), ("duplicate image id 1",))
for _field in ("width", "height"):
    for _label, _value in (("string", "64"), ("zero", 0), ("negative", -1), ("float", 64.5), ("null", None),
                           ("list", [64]), ("bool", True)):
        _mutation_case(f"image-{_field}-{_label}", _set(f"images.0.{_field}", _value), ("image 1 (im1.png)",
                                                                                        "bad size"))
for _label, _value in (("number", 5), ("null", None), ("list", ["im1.png"]), ("object", {"a": 1})):
    _mutation_case(f"image-file_name-{_label}", _set("images.0.file_name", _value), ("image 1", "file_name"))
_mutation_case("image-file-missing", _set("images.0.file_name", "absent.png"),
               ("{root}/absent.png: image file not found", "image id 1"))
_mutation_case("image-file-name-is-a-folder", _set("images.0.file_name", "."), ("image file not found", "image id 1"))
_mutation_case("no-images-at-all", lambda d: d.update(images=[], annotations=[]), ("no usable images",))

# categories
_mutation_case("duplicate-category-id", _set("categories.1.id", 1), ("duplicate category ids",))
for _label, _value in (("string", "2"), ("list", [2]), ("null", None), ("float", 2.5), ("bool", True)):
    _mutation_case(f"category-id-{_label}", _set("categories.1.id", _value), ("categories[1]", "id"))
for _label, _value in (("number", 5), ("null", None), ("list", ["circle"])):
    _mutation_case(f"category-name-{_label}", _set("categories.1.name", _value), ("categories[1]", "name"))

# annotation entries (annotation 101 is image 1's)
for _field, _phrase in (("id", "missing id"), ("image_id", "image id None is not in 'images'"),
                        ("category_id", "missing category_id"), ("bbox", "missing bbox"),
                        ("segmentation", "missing segmentation")):
    _mutation_case(f"annotation-lacks-{_field}", _set(f"annotations.0.{_field}", DELETE), ("annotation", _phrase))
for _label, _value in (("list", [101]), ("object", {"a": 1}), ("null", None), ("bool", True)):
    _mutation_case(f"annotation-id-{_label}", _set("annotations.0.id", _value), ("annotation", "id"))
_mutation_case("duplicate-annotation-id", _set("annotations.1.id", 101), ("duplicate annotation id 101",))
for _label, _value in (("unknown", 999), ("string", "1"), ("list", [1]), ("null", None), ("object", {"a": 1})):
    _mutation_case(f"annotation-image_id-{_label}", _set("annotations.0.image_id", _value),
                   ("annotation 101", "image id"))
for _label, _value in (("unknown", 99), ("string", "1"), ("list", [1]), ("null", None), ("object", {"a": 1})):
    _mutation_case(f"annotation-category_id-{_label}", _set("annotations.0.category_id", _value),
                   ("annotation 101", "category id"))
_BAD_BOXES = {
    "string": "10,8,30,20", "number": 5, "null": None, "object": {"x": 1}, "three-values": [10, 8, 30],
    "five-values": [10, 8, 30, 20, 1], "string-values": ["10", 8, 30, 20], "bool-values": [True, 8, 30, 20],
    "NaN": [float("nan"), 8, 30, 20], "inf": [10, 8, float("inf"), 20], "minus-inf": [10, float("-inf"), 30, 20],
    "nested": [[10, 8, 30, 20]], "empty": [], "negative-width": [10, 8, -3, 20], "negative-height": [10, 8, 30, -1],
    "negative-both": [10, 8, -30, -20], "outside-right": [70, 8, 10, 10], "outside-bottom": [10, 50, 10, 10],
    "outside-left": [-30, 8, 10, 10], "outside-top": [10, -30, 10, 10], "huge-x": [1e300, 8, 30, 20],
    "huge-negative-y": [10, -1e300, 30, 20], "huge-negative-width": [10, 8, -1e300, 20],
}
for _label, _value in _BAD_BOXES.items():
    _mutation_case(f"bbox-{_label}", _set("annotations.0.bbox", _value), ("annotation 101", "im1.png", "bbox"))
for _label, _value in (("string", "600"), ("null", None), ("NaN", float("nan")), ("inf", float("inf")),
                       ("list", [600])):
    _mutation_case(f"area-{_label}", _set("annotations.0.area", _value), ("annotation 101", "area"))
for _label, _value in (("string", "yes"), ("null", None), ("list", [0]), ("two", 2), ("half", 0.5),
                       ("negative", -1)):
    _mutation_case(f"iscrowd-{_label}", _set("annotations.0.iscrowd", _value), ("annotation 101", "iscrowd"))
_BAD_SEGMENTATIONS = {
    "string": "polygon", "number": 5, "null": None, "empty-list": [], "empty-polygon": [[]],
    "flat-list": [10.0, 8.0, 40.0, 8.0, 40.0, 28.0], "odd-coordinates": [[10, 8, 40, 8, 40, 28, 10]],
    "two-points": [[10, 8, 40, 8]], "one-coordinate": [[10]], "string-coordinates": [["10", 8, 40, 8, 40, 28]],
    "NaN-coordinate": [[float("nan"), 8, 40, 8, 40, 28]], "inf-coordinate": [[10, 8, float("inf"), 8, 40, 28]],
    "coordinate-1e30": [[10, 8, 1e30, 8, 40, 28]], "coordinate-minus-1e9": [[10, 8, -1e9, 8, 40, 28]],
    "nested-too-deep": [[[10, 8], [40, 8], [40, 28]]], "second-polygon-bad": [[10, 8, 40, 8, 40, 28], [1, 2]],
    "object-without-counts": {"size": [IMAGE_H, IMAGE_W]}, "object-without-size": {"counts": [IMAGE_H * IMAGE_W]},
    "RLE-wrong-size": {"size": [10, 10], "counts": [100]},
    "RLE-size-swapped": {"size": [IMAGE_W, IMAGE_H], "counts": [IMAGE_H * IMAGE_W]},
    "RLE-size-one-value": {"size": [IMAGE_H], "counts": [IMAGE_H * IMAGE_W]},
    "RLE-size-number": {"size": 48, "counts": [IMAGE_H * IMAGE_W]},
    "RLE-size-null": {"size": None, "counts": [IMAGE_H * IMAGE_W]},
    "RLE-size-string": {"size": "48x64", "counts": [IMAGE_H * IMAGE_W]},
    "RLE-counts-short": {"size": [IMAGE_H, IMAGE_W], "counts": [100, 200]},
    "RLE-counts-long": {"size": [IMAGE_H, IMAGE_W], "counts": [IMAGE_H * IMAGE_W, 5]},
    "RLE-counts-negative": {"size": [IMAGE_H, IMAGE_W], "counts": [IMAGE_H * IMAGE_W + 5, -5]},
    "RLE-counts-floats": {"size": [IMAGE_H, IMAGE_W], "counts": [1000.5, IMAGE_H * IMAGE_W - 1000.5]},
    "RLE-counts-strings": {"size": [IMAGE_H, IMAGE_W], "counts": ["1000", IMAGE_H * IMAGE_W - 1000]},
    "RLE-counts-null": {"size": [IMAGE_H, IMAGE_W], "counts": None},
    "RLE-counts-object": {"size": [IMAGE_H, IMAGE_W], "counts": {"a": 1}},
    "RLE-compressed-garbage": {"size": [IMAGE_H, IMAGE_W], "counts": "garbage!!"},
    "RLE-compressed-wrong-length": {"size": [IMAGE_H, IMAGE_W], "counts": "0"},
    "RLE-compressed-empty": {"size": [IMAGE_H, IMAGE_W], "counts": ""},
    "RLE-compressed-unterminated": {"size": [IMAGE_H, IMAGE_W], "counts": "o"},
}
for _label, _value in _BAD_SEGMENTATIONS.items():
    _mutation_case(f"segmentation-{_label}", _set("annotations.0.segmentation", _value), ("annotation 101", "im1.png"))
_mutation_case("every-annotation-bad", lambda d: [a.update(category_id=42) for a in d["annotations"]] and None,
               ("annotation 101", "unknown category id 42", "and 2 more problem(s)"))


@case("annotations", "test-fewer-categories-than-the-checkpoint")
def _(folder, env):
    data = coco_data()
    data["categories"].pop()
    data["annotations"].pop()
    coco_root(folder, "val", data=data)
    return eval_argv(folder, env.weights), [str(env.weights), "shape mismatches"]


def _image_content_case(name: str, prepare: Callable[[Path, dict], None], phrases: tuple[str, ...]) -> None:
    """A JSON that passes, an image that does not: refused by `test` when the image is read (after the model is
    built), before any result is written."""
    @case("annotations", f"test-{name}")
    def build(folder, env):
        data = coco_data()
        ann = coco_root(folder, "val", data=data)
        prepare(folder / "data" / "val", data)
        write(ann, json.dumps(data))
        return eval_argv(folder, env.weights), [str(ann), *[p.format(val=folder / "data" / "val") for p in phrases]]


for _label, _value in (("wider", IMAGE_W + 1), ("narrower", IMAGE_W - 1)):
    _image_content_case(f"image-width-{_label}-than-the-file", lambda d, data, v=_value: data["images"][1].update(
        width=v), ("{val}/im2.png: the image is 64x48", "says"))
for _label, _value in (("taller", IMAGE_H + 1), ("shorter", IMAGE_H - 1)):
    _image_content_case(f"image-height-{_label}-than-the-file", lambda d, data, v=_value: data["images"][1].update(
        height=v), ("{val}/im2.png: the image is 64x48", "says"))
_image_content_case("image-width-height-swapped", lambda d, data: data["images"][1].update(
    width=IMAGE_H, height=IMAGE_W), ("{val}/im2.png: the image is 64x48", "says"))
for _label, _data in (("truncated-png", lambda: PNG[:IDAT_AT + 8 + IDAT_LEN // 2]), ("text", lambda: b"text"),
                      ("empty", lambda: b""), ("truncated-jpeg", lambda: JPEG[:len(JPEG) // 2])):
    _image_content_case(f"image-file-{_label}", lambda d, data, f=_data: write(d / "im2.png", f()),
                        ("{val}/im2.png: not a readable image", "image id 2"))


# ------------------------------------------------------------------------------------------- checkpoints
def _tiny_state(env) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in env.state.items()}


def _save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _safetensors(state: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    return path


def _res2det_file(env, path: Path, *, model: str = TINY, options: Any = "{}", state=None) -> Path:
    options = options if isinstance(options, str) else json.dumps(options)
    meta = {"format": "res2det", "model": model, "options": options}
    state = _tiny_state(env) if state is None else state
    if path.suffix == ".safetensors":
        return _safetensors(state, path, meta)
    return _save({**meta, "state_dict": state}, path)


def _checkpoint_case(name: str, make: Callable[[Path, Any], Path], phrases: tuple[str, ...] = (), *,
                     commands: tuple[str, ...] = ("infer", "test")) -> None:
    """``make(folder, env)`` writes the bad checkpoint (returns its path); refused by `infer --weights` and by
    `test --weights`."""
    for command in commands:
        @case("checkpoints", f"{command}-{name}")
        def build(folder, env, command=command):
            path = make(folder, env)
            if command == "infer":
                image = write(folder / "im.png", PNG)
                argv = ["infer", "--model", TINY, "--weights", str(path), str(image)]
            else:
                coco_root(folder, "val")
                argv = eval_argv(folder, path)
            return argv, [str(path), *phrases]


_checkpoint_case("missing-pth", lambda f, env: f / "nope.pth", ("checkpoint file not found",))
_checkpoint_case("missing-safetensors", lambda f, env: f / "nope.safetensors", ("checkpoint file not found",))
_checkpoint_case("missing-pdparams", lambda f, env: f / "nope.pdparams", ("checkpoint file not found",))
_checkpoint_case("folder-named-pth", lambda f, env: (f / "w.pth").mkdir() or f / "w.pth", ("not found",))
for _suffix in (".pth", ".safetensors", ".pdparams", ".bin", ".pt"):
    _checkpoint_case(f"empty{_suffix}", lambda f, env, s=_suffix: write(f / f"w{s}", b""))
    _checkpoint_case(f"random-bytes{_suffix}", lambda f, env, s=_suffix: write(
        f / f"w{s}", np.random.default_rng(5).integers(0, 256, 3000, np.uint8).tobytes()))
_checkpoint_case("text.pth", lambda f, env: write(f / "w.pth", "these are not weights\n"))
_checkpoint_case("image-named-pth", lambda f, env: write(f / "w.pth", PNG))


def _truncated(make_full: Callable[[Path, Any], Path], fraction: float | None = None, size: int | None = None):
    def make(folder, env):
        path = make_full(folder, env)
        data = path.read_bytes()
        cut = size if size is not None else int(len(data) * fraction)
        if cut < 0:
            cut = len(data) + cut
        path.write_bytes(data[:cut])
        return path
    return make


_full_pth = lambda f, env: _res2det_file(env, f / "w.pth")  # noqa: E731
_full_safetensors = lambda f, env: _res2det_file(env, f / "w.safetensors")  # noqa: E731
for _label, _kw in (("10-bytes", dict(size=10)), ("1000-bytes", dict(size=1000)), ("quarter", dict(fraction=0.25)),
                    ("half", dict(fraction=0.5)), ("90-percent", dict(fraction=0.9)), ("last-byte", dict(size=-1)),
                    ("last-100-bytes", dict(size=-100))):
    _checkpoint_case(f"pth-truncated-{_label}", _truncated(_full_pth, **_kw), ("not a readable PyTorch checkpoint",))
for _label, _kw in (("4-bytes", dict(size=4)), ("8-bytes", dict(size=8)), ("9-bytes", dict(size=9)),
                    ("mid-header", dict(size=200)), ("half", dict(fraction=0.5)), ("last-byte", dict(size=-1))):
    _checkpoint_case(f"safetensors-truncated-{_label}", _truncated(_full_safetensors, **_kw))
_checkpoint_case("pth-legacy-format-truncated", _truncated(
    lambda f, env: (torch.save(_tiny_state(env), f / "w.pth", _use_new_zipfile_serialization=False), f / "w.pth")[1],
    fraction=0.5), ("not a readable PyTorch checkpoint",))


def _safetensors_header(header: bytes, length: int | None = None, body: bytes = b"") -> Callable:
    return lambda f, env: write(f / "w.safetensors", struct.pack("<Q", len(header) if length is None else length)
                                + header + body)


_checkpoint_case("safetensors-header-length-huge", _safetensors_header(b"{}", length=2**62))
_checkpoint_case("safetensors-header-not-json", _safetensors_header(b"{not json}   "))
_checkpoint_case("safetensors-offsets-past-the-end", _safetensors_header(
    json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1600]}}).encode(), body=b"\0" * 16))
_checkpoint_case("safetensors-unknown-dtype", _safetensors_header(
    json.dumps({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}).encode(), body=b"\0" * 16))


# pickles that would run code when unpickled; the marker file must not appear (the snapshot check, and here)
def _exploit_pickle(folder: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"backbone.stem.0.weight": Exploit(folder)}, protocol=protocol)


_checkpoint_case("pickle-running-os-system.pth", lambda f, env: write(f / "w.pth", _exploit_pickle(f)),
                 ("refused to unpickle",))
_checkpoint_case("pickle-running-os-system-protocol-5.pt", lambda f, env: write(f / "w.pt", _exploit_pickle(f, 5)),
                 ("refused to unpickle",))
_checkpoint_case("torch-zip-running-os-system.pth", lambda f, env: _save({"state_dict": Exploit(f)}, f / "w.pth"),
                 ("refused to unpickle",))
_checkpoint_case("pdparams-running-os-system", lambda f, env: write(f / "w.pdparams", _exploit_pickle(f)),
                 ("refused to unpickle global",))
_checkpoint_case("pickle-calling-eval.pth", lambda f, env: write(
    f / "w.pth", b"cbuiltins\neval\n(V__import__('os').system('touch " + str(f / MARKER).encode() + b"')\ntR."),
    ("refused to unpickle",))
_checkpoint_case("pdparams-calling-eval", lambda f, env: write(
    f / "w.pdparams", b"cbuiltins\neval\n(V__import__('os').system('touch " + str(f / MARKER).encode() + b"')\ntR."),
    ("refused to unpickle global builtins.eval",))


def _zip(members: dict[str, bytes]) -> Callable:
    def make(folder, env):
        path = folder / "w.pth"
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        return path
    return make


_checkpoint_case("zip-of-a-text-file", _zip({"readme.txt": b"hello"}), ("not a readable PyTorch checkpoint",))
_checkpoint_case("zip-with-data-pkl-garbage", _zip({"archive/data.pkl": b"garbage", "archive/version": b"3\n"}))
_checkpoint_case("empty-zip", _zip({}))

# readable files that hold something else than this model's weights
_checkpoint_case("pth-holding-a-list", lambda f, env: _save(list(_tiny_state(env).values()), f / "w.pth"),
                 ("expected a state dict of tensors, found list",))
_checkpoint_case("pth-holding-a-tensor", lambda f, env: _save(torch.zeros(3), f / "w.pth"),
                 ("expected a state dict of tensors, found Tensor",))
_checkpoint_case("pth-holding-an-empty-dict", lambda f, env: _save({}, f / "w.pth"), ("expected a state dict",))
_checkpoint_case("pth-holding-numbers", lambda f, env: _save({"a": 1, "b": 2.0}, f / "w.pth"),
                 ("expected a state dict",))
_checkpoint_case("pth-holding-none", lambda f, env: _save(None, f / "w.pth"), ("found NoneType",))
_checkpoint_case("pth-of-another-model", lambda f, env: _res2det_file(
    env, f / "w.pth", model="faster_rcnn_r2_101_fpn_2x_coco"),
                 ("this checkpoint is for model 'faster_rcnn_r2_101_fpn_2x_coco'",))
_checkpoint_case("safetensors-of-another-model", lambda f, env: _res2det_file(
    env, f / "w.safetensors", model="htc_r2_101_fpn_20e_coco"),
    ("this checkpoint is for model 'htc_r2_101_fpn_20e_coco'",))
_checkpoint_case("training-checkpoint-of-another-model", lambda f, env: _save(
    {"model": _tiny_state(env), "optimizer": {}, "iteration": 3, "model_name": "mask_rcnn_r2_101_fpn_2x_coco",
     "options": "{}"}, f / "iter_0000003.pth"), ("this checkpoint is for model 'mask_rcnn_r2_101_fpn_2x_coco'",))
_checkpoint_case("keys-of-another-layout", lambda f, env: _save(
    {f"foo.{k}": v for k, v in _tiny_state(env).items()}, f / "w.pth"), ("not a mask_rcnn_r2_tiny_fpn checkpoint",))
_checkpoint_case("classifier-keys", lambda f, env: _save(
    {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, f / "w.pth"),
    ("not a mask_rcnn_r2_tiny_fpn checkpoint",))


def _state_change(change: Callable[[dict], None], suffix: str = ".pth") -> Callable:
    def make(folder, env):
        state = _tiny_state(env)
        change(state)
        path = folder / f"w{suffix}"
        if suffix == ".safetensors":
            return _safetensors(state, path)
        return _save(state, path)
    return make


FC = "roi_head.bbox_head.fc_cls.weight"


def _pop_first(state: dict, n: int) -> None:
    for k in list(state)[:n]:
        del state[k]


_STATE_CHANGES = {  # name -> (change, phrase)
    "missing-one-key": (lambda s: s.pop(FC), "missing keys (1): " + FC),
    "missing-half-the-keys": (lambda s: _pop_first(s, len(s) // 2 - 1), "missing keys"),
    "unexpected-key": (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unexpected keys (1): extra.weight"),
    "wrong-shape": (lambda s: s.__setitem__(FC, torch.zeros(5, 7)), "shape mismatches (1"),
    "transposed": (lambda s: s.__setitem__(FC, s[FC].t().contiguous()), "shape mismatches (1"),
    "scalar-for-a-weight": (lambda s: s.__setitem__(FC, torch.tensor(1.0)), "shape mismatches (1"),
    "NaN-weight": (lambda s: s[FC].view(-1).__setitem__(0, float("nan")), "NaN or infinite values (1)"),
    "inf-weight": (lambda s: s[FC].view(-1).__setitem__(3, float("inf")), "NaN or infinite values (1)"),
    "minus-inf-bias": (lambda s: s["roi_head.bbox_head.fc_cls.bias"].fill_(float("-inf")),
                       "NaN or infinite values (1)"),
    "all-NaN": (lambda s: [v.fill_(float("nan")) for v in s.values() if v.is_floating_point()] and None,
                "NaN or infinite values"),
    "int64-for-float": (lambda s: s.__setitem__(FC, s[FC].round().to(torch.int64)), "integer / float mismatches (1"),
    "int8-for-float": (lambda s: s.__setitem__(FC, s[FC].to(torch.int8)), "integer / float mismatches (1"),
    "bool-for-float": (lambda s: s.__setitem__(FC, s[FC] > 0), "integer / float mismatches (1"),
}
_ALSO_TEST = ("missing-one-key", "wrong-shape", "NaN-weight", "int64-for-float")  # `test` loads as `infer` does
for _name, (_change, _phrase) in _STATE_CHANGES.items():
    _checkpoint_case(f"pth-{_name}", _state_change(_change), (_phrase,),
                     commands=("infer", "test") if _name in _ALSO_TEST else ("infer",))
for _name in ("missing-one-key", "wrong-shape", "NaN-weight", "int64-for-float"):
    _checkpoint_case(f"safetensors-{_name}", _state_change(_STATE_CHANGES[_name][0], ".safetensors"),
                     (_STATE_CHANGES[_name][1],), commands=("infer",))
_checkpoint_case("NaN-in-a-batchnorm-buffer", _state_change(
    lambda s: s[next(k for k in s if k.endswith("running_var"))].fill_(float("nan"))), ("NaN or infinite values (1)",),
    commands=("infer",))
_checkpoint_case("float-step-counter", _state_change(
    lambda s: s.__setitem__(next(k for k in s if k.endswith("num_batches_tracked")), torch.tensor(0.5))),
    ("integer / float mismatches (1",), commands=("infer",))
# a res2det file whose recorded model options are broken
_checkpoint_case("options-not-json", lambda f, env: _res2det_file(env, f / "w.safetensors", options="{oops"),
                 ("recorded model options are not a JSON object",))
_checkpoint_case("options-a-list", lambda f, env: _res2det_file(env, f / "w.safetensors", options="[1, 2]"),
                 ("recorded model options are not a JSON object",))
_checkpoint_case("options-unknown-field", lambda f, env: _res2det_file(env, f / "w.safetensors", options={"nope": 1}),
                 ("no field 'nope'",))
_checkpoint_case("options-num_classes-string", lambda f, env: _res2det_file(
    env, f / "w.safetensors", options={"num_classes": "3"}), ("num_classes",), commands=("infer",))
_checkpoint_case("options-num_classes-other", lambda f, env: _res2det_file(
    env, f / "w.safetensors", options={"num_classes": 5}), ("shape mismatches",), commands=("infer",))
_checkpoint_case("options-num_classes-zero", lambda f, env: _res2det_file(
    env, f / "w.safetensors", options={"num_classes": 0}), ("num_classes must be at least 1",), commands=("infer",))
_checkpoint_case("options-num_classes-negative", lambda f, env: _res2det_file(  # torch refused the layer: a traceback
    env, f / "w.safetensors", options={"num_classes": -2}), ("bad config value",), commands=("infer",))
_checkpoint_case("trained-on-other-classes", lambda f, env: _res2det_file(
    env, f / "w.safetensors", options={"num_classes": 3, "class_names": ["cat", "dog", "cow"]}),
    ("trained on classes ['cat', 'dog', 'cow']",), commands=("test",))


# .pdparams (PaddleDetection) files: a restricted unpickler, then a strict load
def _pdparams(obj: Any, protocol: int = 2) -> Callable:
    return lambda f, env: write(f / "w.pdparams", pickle.dumps(obj, protocol=protocol))


_checkpoint_case("pdparams-a-list", _pdparams([np.zeros(3, np.float32)]), ("expected a dict of arrays",))
_checkpoint_case("pdparams-an-empty-dict", _pdparams({}), ("none at all",))
_checkpoint_case("pdparams-string-values", _pdparams({"conv1_weights": "x"}), ("found other entries",))
_checkpoint_case("pdparams-object-array", _pdparams({"conv1_weights": np.array(["a", 1], dtype=object)}),
                 ("arrays that are not numbers (1)",))
_checkpoint_case("pdparams-string-array", _pdparams({"conv1_weights": np.array(["a", "b"])}),
                 ("arrays that are not numbers (1)",))
_checkpoint_case("pdparams-truncated", _truncated(lambda f, env: _pdparams(
    {f"w{i}": np.ones((64, 64), np.float32) for i in range(4)})(f, env), fraction=0.5),
    ("not a readable .pdparams file",))
_checkpoint_case("pdparams-of-another-layout", _pdparams({"conv1_weights": np.zeros((4, 3, 3, 3), np.float32)}),
                 ("not a mask_rcnn_r2_tiny_fpn checkpoint",))
_checkpoint_case("pdparams-a-torch-file", lambda f, env: _save(_tiny_state(env), f / "w.pdparams"),
                 ("not a readable .pdparams file",))


# -------------------------------------------------------------------------------------------------- configs
def train_set_argv(folder: Path, *edits: str) -> list[str]:
    # --data: a missing folder, so that an edit the config accepted by mistake fails on the data, not trains
    return ["train", "shapes", "--data", str(folder / "no-data"), "--out", str(folder / "runs"), "--set", *edits]


_BAD_SETTINGS = {  # field -> bad values (as typed after --set field=)
    "recipe.epochs": ["0", "-1", "1.5", "abc", "None", "True"],
    "recipe.milestones": ["(0,)", "(-1, 2)", "5", "('a',)", "(1.5,)", "None"],
    "recipe.gamma": ["0", "-0.1", "abc", "1e999"],
    "recipe.base_lr": ["0", "-0.1", "abc", "None", "1e999"],
    "recipe.base_batch_size": ["0", "-4", "2.5"],
    "recipe.momentum": ["1", "1.5", "-0.1", "abc"],
    "recipe.weight_decay": ["-1e-4", "abc", "1e999"],
    "recipe.warmup_iters": ["-1", "1.5", "1"],
    "recipe.warmup_ratio": ["0", "1.5", "-0.5", "abc"],
    "data.flip_prob": ["-0.1", "7", "abc", "1e999"],
    "data.num_workers": ["-2", "1.5", "abc", "1e999"],
    "data.scale": ["(0,0)", "(-1,64)", "(1.5,2)", "(1,2,3)", "5", "abc"],
    "data.train_scale_range": ["(800,600)", "(0,600)", "(600,)", "600"],
    "data.on_bad": ["maybe", "1", "None"],
    "data.shuffle": ["maybe", "2"],
    "exhaustive_sampling": ["maybe", "1"],
    "data.root": ["5", "(1,2)"],
    "data.train_split": ["5", "None"],
    "data.format": ["pascal", "1", "None"],
    "data.classes": ["()", "5", "('a','')"],
    "class_map": ["5", "('a',1)", "('sofa',)", "('=couch',)"],
    "batch_size": ["0", "-1", "2.5", "None", "abc"],
    "amp": ["int8", "fp64", "1"],
    "grad_clip": ["0", "-1", "abc"],
    "seed": ["1.5", "abc", "1000000000000000000000000000", "-1000000000000000000000000000"],
    "on_nonfinite": ["ignore", "0"],
    "sync_bn": ["1", "yes"],
    "eval_every": ["-1", "0.5"],
    "checkpoint_every": ["-1", "x"],
    "keep_last": ["0", "-3"],
    "log_every": ["0", "-1"],
    "draw": ["-1", "2.5"],
    "max_iters": ["0", "-1", "1.5"],
    "device": ["tpu", "cuda:x", "gpu0", "5"],
    "model": ["nonexistent_model", "5"],
    "init_weights": ["5"],
    "backbone_init": ["5", "('a',)"],
    "model_options": ["5", "x"],
    "data": ["5"],
    "recipe": ["(1,2)"],
    "out_dir": ["5"],
}
for _key, _values in _BAD_SETTINGS.items():
    for _value in _values:
        @case("configs", f"set-{_key}={_value}")
        def _(folder, env, key=_key, value=_value):
            return train_set_argv(folder, f"{key}={value}"), [key.split(".")[-1]]
for _edit, _phrase in (("nope=1", "no field 'nope' in TrainConfig"), ("recipe.nope=1", "no field 'nope' in Recipe"),
                       ("data.nope=1", "no field 'nope' in DataConfig"), ("data.scale.0=5", "data.scale.0"),
                       ("recipe.epochs", "--set expects key=value"), ("=5", "--set expects key=value"),
                       ("recipe..epochs=1", "recipe..epochs"), ("batch_size.x=1", "batch_size.x")):
    @case("configs", f"set-{_edit}")
    def _(folder, env, edit=_edit, phrase=_phrase):
        return train_set_argv(folder, edit), [phrase]


_CONFIG_FILES = {  # name -> (body, phrase)
    "raises": ("raise ValueError('nope')\n", "running the config file raised ValueError: nope"),
    "raises-res2det-error": ("from res2det.errors import Res2DetError\nraise Res2DetError('bad thing')\n", "bad thing"),
    "exits-0": ("import sys\nsys.exit(0)\n", "the config file exited (sys.exit(0))"),
    "exits-1": ("import sys\nsys.exit(1)\n", "the config file exited (sys.exit(1))"),
    "exits-message": ("raise SystemExit('bye')\n", "the config file exited"),
    "syntax-error": ("config = TrainConfig(model=\n", "syntax error in the config file"),
    "indentation-error": ("x = 1\n  y = 2\n", "syntax error in the config file"),
    "null-bytes": ("config = 1\0\n", "config file"),
    "not-utf8": (b"config = '\xff\xfe'\n", "config file"),
    "import-error": ("import res2det_no_such_module\n", "ModuleNotFoundError"),
    "name-error": ("config = TrainConfig(model='shapes')\n", "NameError"),
    "empty": ("", "must define `config = TrainConfig(...)`"),
    "no-config": ("x = 1\n", "must define `config = TrainConfig(...)`"),
    "config-is-a-dict": ("config = {'model': 'mask_rcnn_r2_tiny_fpn'}\n", "must define `config = TrainConfig(...)`"),
    "config-is-a-preset-name": ("config = 'shapes'\n", "must define `config = TrainConfig(...)`"),
    "bad-batch-size": ("from res2det.engine.train_config import TrainConfig\n"
                       "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', batch_size=0)\n",
                       "TrainConfig.batch_size: 0"),
    "bad-recipe": ("from res2det.engine.train_config import Recipe\nr = Recipe(epochs=0)\n", "Recipe.epochs: 0"),
    "bad-data-type": ("from res2det.engine.train_config import DataConfig\nd = DataConfig(scale=5)\n", "scale"),
    "float-batch-size": ("from res2det.engine.train_config import TrainConfig\n"
                         "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', batch_size=2.5)\n", "batch_size"),
    "string-epochs": ("from res2det.engine.train_config import TrainConfig, Recipe\n"
                      "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', recipe=Recipe(epochs='2'))\n", "epochs"),
    "float-max-iters": ("from res2det.engine.train_config import TrainConfig\n"
                        "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', max_iters=1.5)\n", "max_iters"),
    "nan-lr": ("from res2det.engine.train_config import TrainConfig, Recipe\n"
               "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', recipe=Recipe(base_lr=float('nan')))\n", "base_lr"),
    "data-is-a-dict": ("from res2det.engine.train_config import TrainConfig\n"
                       "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', data={'root': 'x'})\n", "data"),
    "seed-too-big": ("from res2det.engine.train_config import TrainConfig\n"
                     "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', seed=2**70)\n", "TrainConfig.seed"),
    "backbone-init-one-value": ("from res2det.engine.train_config import TrainConfig\n"
                                "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', backbone_init=('res2net50',))\n",
                                "TrainConfig.backbone_init"),
    "keep-last-float": ("from res2det.engine.train_config import TrainConfig\n"
                        "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', keep_last=1.5)\n", "keep_last"),
    "sync-bn-string": ("from res2det.engine.train_config import TrainConfig\n"
                       "config = TrainConfig(model='mask_rcnn_r2_tiny_fpn', sync_bn='no')\n", "sync_bn"),
}
for _name, (_body, _phrase) in _CONFIG_FILES.items():
    @case("configs", f"file-{_name}")
    def _(folder, env, body=_body, phrase=_phrase):
        path = write(folder / "my_config.py", body)
        argv = ["train", str(path), "--data", str(folder / "no-data"), "--out", str(folder / "runs")]
        return argv, [str(path), phrase]


# (the model configs check only some fields; a negative width is torch's error, named as a bad config value)
for _edit, _phrase in (("model.backbone.base_channels=-4", "base_channels"), ("model.nope=1", "nope"),
                       ("model.backbone.depth=7", "depth"), ("model.neck.out_channels=-8", "bad config value"),
                       ("model.frozen_stages=9", "frozen_stages"),
                       ("model.backbone.scale=abc", "scale"), ("model.rpn.feat_channels=-1", "bad config value")):
    @case("configs", f"set-{_edit}")
    def _(folder, env, edit=_edit, phrase=_phrase):
        # model options are checked when the model is built, after the data is read: real data here
        coco_root(folder, "train")
        coco_root(folder, "val")
        return [*train_argv(folder), edit], [phrase]


@case("configs", "file-missing")
def _(folder, env):
    path = folder / "nope.py"
    return ["train", str(path), "--out", str(folder / "runs")], [f"{path}: config file not found"]


@case("configs", "file-is-a-folder")
def _(folder, env):
    (folder / "cfg.py").mkdir()
    path = folder / "cfg.py"
    return ["train", str(path), "--out", str(folder / "runs")], [f"{path}: config file not found"]


@case("configs", "unknown-preset")
def _(folder, env):
    return ["train", "shapez", "--out", str(folder / "runs")], ["unknown config 'shapez'", "did you mean shapes"]


@case("configs", "test-with-a-bad-setting")
def _(folder, env):
    coco_root(folder, "val")
    return [*eval_argv(folder, env.weights), "data.flip_prob=2"], ["DataConfig.flip_prob: 2"]


def _earlier_run(folder: Path) -> Path:
    run = folder / "runs" / "shapes"
    write(run / "iter_0000004.pth", b"an earlier run's checkpoint")
    write(run / "latest", "iter_0000004.pth\n")
    write(run / "config.json", "{}\n")
    write(run / "log.jsonl", '{"iter": 4}\n')
    return run


for _edit in ("batch_size=0", "recipe.base_lr=-1", "data.scale=(0,0)", "nope=1"):
    @case("configs", f"earlier-run-kept-on-set-{_edit}")
    def _(folder, env, edit=_edit):
        _earlier_run(folder)
        return train_set_argv(folder, edit), [edit.split("=")[0].split(".")[-1]]

    @case("configs", f"earlier-run-kept-on-resume-with-set-{_edit}")
    def _(folder, env, edit=_edit):
        _earlier_run(folder)
        return [*train_set_argv(folder, edit), "--resume"], [edit.split("=")[0].split(".")[-1]]


@case("configs", "resume-without-a-run")
def _(folder, env):
    (folder / "runs" / "shapes_small").mkdir(parents=True)
    write(folder / "runs" / "shapes_small" / "latest", "iter_4.pth\n")
    return ["train", "shapes", "--resume", "--out", str(folder / "runs")], ["no run of 'shapes'"]


# ------------------------------------------------------------------------------------------- output paths
def _infer_output_case(name: str, flag: str, target: str, phrase: str) -> None:
    @case("outputs", f"infer-{name}")
    def _(folder, env):
        (folder / "folder").mkdir()
        write(folder / "folder" / "kept.txt", "keep me\n")
        write(folder / "file", "keep me\n")
        image = write(folder / "im.png", PNG)
        path = folder / target
        return infer_argv(env, image, extra=(flag, str(path))), [str(path), phrase]


for _flag, _target, _phrase in (
        ("--out", "folder", "is a folder; --out takes the path of a file"),
        ("--out", "file/x.json", "is a file, so nothing can be written under it"),
        ("--out", "file/deeper/x.jsonl", "is a file, so nothing can be written under it"),
        ("--out", "folder/kept.txt/x.json", "is a file, so nothing can be written under it"),
        ("--draw", "file", "is a file; --draw takes the path of a folder"),
        ("--draw", "file/sub", "is a file, so nothing can be written under it"),
        ("--draw", "folder/kept.txt", "is a file; --draw takes the path of a folder"),
        ("--draw", "folder/kept.txt/sub", "is a file, so nothing can be written under it")):
    _infer_output_case(f"{_flag[2:]}-{_target.replace('/', '-')}", _flag, _target, _phrase)


@case("outputs", "infer-out-jsonl-is-a-folder")
def _(folder, env):
    (folder / "dets.jsonl").mkdir()
    image = write(folder / "im.png", PNG)
    return infer_argv(env, image, extra=("--out", str(folder / "dets.jsonl"))), [str(folder / "dets.jsonl"),
                                                                                  "is a folder"]


@case("outputs", "infer-resume-a-file-with-a-bad-line")
def _(folder, env):
    image = write(folder / "im.png", PNG)
    out = write(folder / "dets.jsonl", '{"file": "a.png", "detections": []}\nnot json\n{"file": "b.png"}\n')
    return infer_argv(env, image, extra=("--out", str(out), "--resume")), [f"{out}: line 2 is not a record"]


@case("outputs", "infer-draw-target-is-a-folder")
def _(folder, env):
    image = write(folder / "im.png", PNG)
    (folder / "drawn" / "im.png").mkdir(parents=True)  # where the drawing of im.png goes
    return infer_argv(env, image, extra=("--draw", str(folder / "drawn"))), [str(folder / "drawn" / "im.png")]


for _command in ("train", "test"):
    for _target, _phrase in (("file", "is a file; --out takes the path of a folder"),
                             ("file/runs", "is a file, so nothing can be written under it")):
        @case("outputs", f"{_command}-out-{_target.replace('/', '-')}")
        def _(folder, env, command=_command, target=_target, phrase=_phrase):
            write(folder / "file", "keep me\n")
            coco_root(folder, "val")
            if command == "train":
                argv = ["train", "shapes", "--data", str(folder / "data"), "--set", "max_iters=1"]
            else:
                argv = ["test", "shapes", "--data", str(folder / "data"), "--weights", str(env.weights)]
            return [*argv, "--out", str(folder / target)], [str(folder / target), phrase]


def _export_case(name: str, target: str, phrase: str) -> None:
    @case("outputs", f"export-{name}")
    def _(folder, env):
        pytest.importorskip("onnx")
        (folder / "folder").mkdir()
        (folder / "dir.onnx").mkdir()
        write(folder / "file", "keep me\n")
        write(folder / "model.onnx", "an earlier export\n")
        path = folder / target
        return ["export", TINY, "--weights", str(env.weights), "--out", str(path)], [str(path), phrase]


_export_case("out-is-a-folder", "folder", "is a folder; --out takes the path of a file")
_export_case("out-is-a-folder-named-onnx", "dir.onnx", "is a folder; --out takes the path of a file")
_export_case("out-under-a-file", "file/model.onnx", "is a file, so nothing can be written under it")
_export_case("out-under-an-earlier-export", "model.onnx/x.onnx", "is a file, so nothing can be written under it")


# ------------------------------------------------------------------------------------------------- running
@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The tiny Mask R-CNN (3 classes) saved once as res2det weights, and its state dict."""
    import res2det
    from res2det.checkpoint import save_weights

    model = res2det.create_model(TINY)
    weights = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_weights(model, weights, model_name=TINY)
    return SimpleNamespace(weights=weights, state={k: v.detach().clone() for k, v in model.state_dict().items()})


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: (bytes, mtime) for files, the link target for links."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("dir",)
            else:
                st = p.stat()
                out[str(p)] = ("file", p.read_bytes(), st.st_mtime_ns)
    return out


def test_case_count():
    kinds: dict[str, int] = {}
    for c in CASES:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    print(f"{len(CASES)} generated bad inputs: {kinds}")
    assert len({c.id for c in CASES}) == len(CASES)  # unique ids
    assert len(CASES) >= 150 and set(kinds) == {"images", "annotations", "checkpoints", "configs", "outputs"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, tmp_path, capsys):
    folder = tmp_path / "case"
    folder.mkdir()
    argv, phrases = case.build(folder, env)
    before = snapshot(folder, env.weights)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("res2det: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert code == 2
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])
    assert not (folder / MARKER).exists()
    after = snapshot(folder, env.weights)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert (changed, sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())) == ([], [], [])
