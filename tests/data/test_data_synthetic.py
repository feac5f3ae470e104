"""The embedded shapes dataset: deterministic, valid COCO, generated atomically into the cache."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from res2det.data import CocoDataset, shapes_dataset, shapes_splits, synthetic
from res2det.data.coco_dataset import decode_mask
from res2det.structures import Preprocess

# pycocotools' annToMask: its Cython __array__ predates NumPy 2's copy keyword
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SMALL = dict(num_train=16, num_val=4, image_size=96)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("a"), seed=5, **SMALL)


def test_same_seed_same_bytes(small, tmp_path):
    again = shapes_dataset(tmp_path, seed=5, **SMALL)
    assert again.name == small.name == "shapes-v1-seed5-train16-val4-96px"
    assert files(again) == files(small)
    other = files(shapes_dataset(tmp_path, seed=6, **SMALL))
    assert other.keys() == files(small).keys() and other != files(small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-v1-seed5-train16-val4-96px",
                                                          "shapes-v1-seed6-train16-val4-96px"]  # no temp left


def test_layout_and_valid_coco(small):
    assert (small / "annotations" / "instances_train.json").is_file() and len(list((small / "train").glob("*.png"))) == 16
    assert len(list((small / "val").glob("*.png"))) == 4
    data = json.loads((small / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle"]
    kinds = {type(a["segmentation"]).__name__ for a in data["annotations"]}
    assert kinds == {"list", "dict"}  # polygons and RLE both present
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=17)[1:]
    assert per_image.min() >= 1 and per_image.max() <= synthetic.MAX_OBJECTS
    coco = COCO(str(small / "annotations" / "instances_train.json"))
    for ann in data["annotations"]:
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)  # mask fills its box
        assert mask.sum() == ann["area"] > 0
    for ann in data["annotations"]:  # the RLE / polygon decoders agree with pycocotools' own
        assert np.array_equal(decode_mask(ann["segmentation"], 96, 96), coco.annToMask(ann))


def test_loads_with_the_coco_dataset(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = CocoDataset(small / "annotations" / "instances_train.json", small / "train", train=True,
                            preprocess=Preprocess(input_size=(96, 96), crop_pct=None))
    assert len(train) == 16 and not train.skipped and not train.filtered
    s = train[(0, 1)]
    assert s["masks"].shape[1:] == s["image"].shape[1:] == (96, 96) and (s["masks"].flatten(1).sum(1) > 0).all()


def test_pixels_match_the_masks(small):
    """Each visible shape is a flat colour (plus noise) that differs from the pixels around it."""
    from PIL import Image

    coco = COCO(str(small / "annotations" / "instances_train.json"))
    for img_id in coco.getImgIds()[:6]:
        rgb = np.asarray(Image.open(small / "train" / coco.imgs[img_id]["file_name"])).astype(float)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            mask = coco.annToMask(ann).astype(bool)
            inside = rgb[mask].mean(0)
            ring = np.zeros_like(mask)
            x, y, w, h = (int(v) for v in ann["bbox"])
            ring[max(y - 3, 0):y + h + 3, max(x - 3, 0):x + w + 3] = True
            ring &= ~mask
            if ring.sum() > 20:
                assert np.abs(rgb[ring].mean(0) - inside).max() > 5


def test_existing_dataset_is_reused_and_a_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    first = shapes_dataset(tmp_path, **SMALL)
    stamp = (first / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert shapes_dataset(tmp_path, **SMALL) == first
    assert (first / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp

    def interrupted(root, split, name, **kwargs):
        (root / name).mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes_dataset(tmp_path, seed=1, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_default_location_is_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path))
    splits = shapes_splits(num_train=2, num_val=1, image_size=64)
    assert splits.train_ann == tmp_path / "datasets" / "shapes-v1-seed0-train2-val1-64px" / "annotations" / \
        "instances_train.json"
    assert splits.train_dir.is_dir() and splits.val_ann.is_file() and splits.val_dir.is_dir()
    with pytest.raises(ValueError):
        shapes_dataset(tmp_path, num_train=0)
