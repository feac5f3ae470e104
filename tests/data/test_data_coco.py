"""CocoDataset: the real tiny_coco, label mapping, masks, image formats, HTC stuff maps and every bad-data case."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res2det.data import CocoDataset
from res2det.images import detection_input, load_image, to_rgb_uint8
from res2det.errors import DataError, Res2DetError
from res2det.structures import Preprocess

from conftest import SHARED

TINY = SHARED / "data" / "tiny_coco"
SPLITS = ["train2017", "val2017"]
PRE = Preprocess(input_size=(800, 1333), crop_pct=None)


def tiny(split: str) -> tuple[Path, Path, dict]:
    ann = TINY / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        pytest.skip("tiny_coco not found beside the repository")
    return ann, TINY / split, json.loads(ann.read_text())


# ---------------------------------------------------------------------------------------------- tiny_coco
@pytest.mark.parametrize("split", SPLITS)
def test_tiny_coco_counts_match_the_json(split):
    ann_file, image_dir, data = tiny(split)
    non_crowd = Counter(a["image_id"] for a in data["annotations"] if not a["iscrowd"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fail mode, genuine COCO: no error and no warning
        train = CocoDataset(ann_file, image_dir, train=True)
        evaluation = CocoDataset(ann_file, image_dir, train=False)
    assert evaluation.image_ids == [im["id"] for im in data["images"]]  # all kept, JSON order
    assert set(train.image_ids) == set(non_crowd)  # images without a non-crowd annotation skipped
    assert len(train) < len(evaluation) and train.filtered["no_annotations"] == len(evaluation) - len(train)
    assert not train.skipped and not evaluation.skipped
    assert train.num_classes == len(data["categories"]) == 80
    assert sorted(train.coco.getAnnIds()) == sorted(a["id"] for a in data["annotations"])
    by_id = {r.image_id: r for r in train.records}
    for image_id, n in non_crowd.items():
        assert len(by_id[image_id].targets) == n


def test_label_category_round_trip():
    ann_file, image_dir, data = tiny("val2017")
    ds = CocoDataset(ann_file, image_dir, train=False)
    cat_ids = sorted(c["id"] for c in data["categories"])
    assert ds.label_to_cat_id == ds.cat_ids == cat_ids and cat_ids[-1] == 90  # non-contiguous COCO ids
    assert all(ds.cat_id_to_label[c] == k for k, c in enumerate(cat_ids))
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert ds.class_names[0] == "person" and ds.class_names == tuple(names[c] for c in cat_ids)


def test_tiny_coco_sample_targets_and_masks():
    ann_file, image_dir, data = tiny("train2017")
    ds = CocoDataset(ann_file, image_dir, train=True, flip_prob=0.0, scale=(1333, 800))
    rec = max(ds.records, key=lambda r: len(r.targets))
    index = ds.records.index(rec)
    raw = ds.load_sample(index)
    anns = rec.targets
    assert raw.masks.shape == (len(anns), rec.height, rec.width) and raw.masks.dtype == np.uint8
    for mask, ann in zip(raw.masks, anns):
        # a polygon mask rasterised at the image size has about the annotation's area
        assert abs(int(mask.sum()) - ann["area"]) <= 0.1 * ann["area"] + 10
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert xs.min() >= int(x) - 1 and xs.max() <= x + w + 1 and ys.min() >= int(y) - 1 and ys.max() <= y + h + 1
    labels = [ds.cat_id_to_label[a["category_id"]] for a in anns]
    s = ds[index]
    h, w = s["image"].shape[-2:]
    assert s["image"].dtype == torch.float32 and s["orig_size"] == (rec.height, rec.width) and not s["flipped"]
    assert s["labels"].tolist() == labels and s["boxes"].shape == (len(anns), 4)
    assert s["masks"].shape == (len(anns), h, w) and s["masks"].dtype == torch.uint8
    sx, sy = s["scale_factor"]
    assert sx == w / rec.width and sy == h / rec.height
    expected = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns]) * torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(s["boxes"], expected.clamp(min=0).float(), rtol=0, atol=1e-3)


def test_crowd_regions_are_not_targets():
    ann_file, image_dir, data = tiny("val2017")
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    ds = CocoDataset(ann_file, image_dir, train=False, with_masks=False)
    i = ds.image_ids.index(crowd["image_id"])
    n = sum(1 for a in data["annotations"] if a["image_id"] == crowd["image_id"] and not a["iscrowd"])
    assert len(ds[i]["labels"]) == n and "masks" not in ds[i]
    assert len(ds.coco.getAnnIds(imgIds=[crowd["image_id"]], iscrowd=None)) == n + 1  # kept for COCOeval


def test_eval_input_is_exactly_predicts():
    ann_file, image_dir, _ = tiny("val2017")
    pre = Preprocess(mean=(1.0, 2.0, 3.0), std=(50.0, 60.0, 70.0), input_size=(480, 800), crop_pct=None)
    ds = CocoDataset(ann_file, image_dir, train=False, preprocess=pre, with_masks=False)
    for i in (0, 7):
        s = ds[i]
        x, scale = detection_input(to_rgb_uint8(s["file"]), pre)
        assert torch.equal(s["image"], x) and s["scale_factor"] == scale


# ------------------------------------------------------------------------------------- mini COCO helpers
def write_image(path: Path, w: int = 64, h: int = 48, mode: str = "RGB") -> None:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)


def mini_coco(root: Path, anns: list[dict] | None = None, *, n_images: int = 3, size=(64, 48)) -> tuple[Path, Path]:
    """A small valid COCO set: ``n_images`` PNGs, two categories (ids 3 and 7), one polygon per image."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    w, h = size
    images = []
    for k in range(1, n_images + 1):
        write_image(root / "img" / f"im{k}.png", w, h)
        images.append({"id": k, "file_name": f"im{k}.png", "width": w, "height": h})
    if anns is None:
        anns = []
    base = [{"id": 100 + k, "image_id": k, "category_id": 3 if k % 2 else 7, "iscrowd": 0,
             "bbox": [10.0, 8.0, 30.0, 20.0], "area": 600.0,
             "segmentation": [[10.0, 8.0, 40.0, 8.0, 40.0, 28.0, 10.0, 28.0]]} for k in range(1, n_images + 1)]
    data = {"images": images, "annotations": base + anns,
            "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, root / "img"


def bad_ann(**overrides) -> dict:
    ann = {"id": 555, "image_id": 2, "category_id": 3, "iscrowd": 0, "bbox": [5.0, 5.0, 10.0, 10.0], "area": 100.0,
           "segmentation": [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0]]}
    return {**ann, **overrides}


BAD_ANNOTATIONS = {  # reason -> (annotation, a phrase of the message)
    "box_outside": (bad_ann(bbox=[70.0, 5.0, 10.0, 10.0]), "entirely outside the 64x48 image"),
    "bad_box": (bad_ann(bbox=[5.0, 5.0, -3.0, 10.0]), "negative size"),
    "bad_polygon": (bad_ann(segmentation=[[5.0, 5.0, 15.0, 5.0]]), "polygon with 2 points"),
    "unknown_category": (bad_ann(category_id=42), "unknown category id 42"),
    "bad_rle": (bad_ann(segmentation={"size": [10, 10], "counts": [100]}), "RLE size [10, 10]"),
}


def test_mini_coco_is_valid_and_maps_labels(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    ds = CocoDataset(ann_file, image_dir, train=True)
    assert ds.class_names == ("three", "seven") and ds.label_to_cat_id == [3, 7]
    assert [int(ds[i]["labels"][0]) for i in range(3)] == [0, 1, 0]


@pytest.mark.parametrize("reason", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_fails_naming_file_and_id(tmp_path, reason):
    ann, phrase = BAD_ANNOTATIONS[reason]
    ann_file, image_dir = mini_coco(tmp_path, [ann])
    with pytest.raises(DataError) as e:
        CocoDataset(ann_file, image_dir, train=True)
    msg = str(e.value)
    assert str(ann_file) in msg and "annotation 555" in msg and phrase in msg and "im2.png" in msg


@pytest.mark.parametrize("reason", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_is_skipped_and_counted(tmp_path, reason):
    ann, _ = BAD_ANNOTATIONS[reason]
    ann_file, image_dir = mini_coco(tmp_path, [ann])
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        ds = CocoDataset(ann_file, image_dir, train=True, on_bad="skip")
    assert ds.skipped == Counter({reason: 1}) and len(ds) == 3
    assert len(ds[ds.image_ids.index(2)]["labels"]) == 1  # the bad one dropped, the good one kept
    assert 555 not in ds.coco.getAnnIds()


def test_fail_mode_counts_further_problems(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path, [bad_ann(id=555, category_id=42), bad_ann(id=556, bbox=[1, 1, -1, 1])])
    with pytest.raises(DataError, match=r"annotation 555 .*unknown category.*\(and 1 more problem"):
        CocoDataset(ann_file, image_dir, train=False)


def test_tiny_and_zero_boxes_are_legal_and_dropped_from_targets(tmp_path):
    # COCO has boxes under 1 px, even 0 px high (train2017 annotation 918): mmdet drops them silently
    tiny_box = bad_ann(id=555, bbox=[5.0, 5.0, 0.5, 10.0], area=2.0)
    zero_box = bad_ann(id=556, bbox=[296.65 / 10, 38.8, 1.03, 0.0], area=0.0,
                       segmentation=[[29.6, 38.8, 29.6, 38.8, 29.7, 38.8, 29.7, 38.8]])
    ann_file, image_dir = mini_coco(tmp_path, [tiny_box, zero_box])
    ds = CocoDataset(ann_file, image_dir, train=True)
    assert not ds.skipped and ds.filtered["box_under_1px_or_zero_area"] == 2
    assert len(ds[ds.image_ids.index(2)]["labels"]) == 1
    assert {555, 556} <= set(ds.coco.getAnnIds())  # still ground truth for COCOeval, as in the JSON


def test_boxes_partly_outside_are_clipped(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path, [bad_ann(bbox=[50.0, 40.0, 30.0, 30.0], area=900.0)])
    ds = CocoDataset(ann_file, image_dir, train=False, scale=(64, 48))
    boxes = ds[ds.image_ids.index(2)]["boxes"]
    assert boxes[-1].tolist() == [50.0, 40.0, 64.0, 48.0]


def test_missing_image(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    (image_dir / "im3.png").unlink()
    with pytest.raises(DataError, match=r"im3.png: image file not found \(image id 3 in .*instances.json\)"):
        CocoDataset(ann_file, image_dir, train=True)
    with pytest.warns(UserWarning, match="missing_image=1"):
        ds = CocoDataset(ann_file, image_dir, train=False, on_bad="skip")
    assert ds.skipped == Counter(missing_image=1) and ds.image_ids == [1, 2]


def test_corrupt_image(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    (image_dir / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = CocoDataset(ann_file, image_dir, train=False)  # found when loaded, not at construction
    with pytest.raises(DataError, match=r"im2.png: not a readable image .*image id 2"):
        ds[1]
    ds = CocoDataset(ann_file, image_dir, train=False, on_bad="skip")
    with pytest.warns(UserWarning, match="im2.png"):
        s = ds[1]
    assert s["image_id"] == 3 and ds.skipped == Counter(unreadable_image=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1]["image_id"] == 3 and ds.skipped["unreadable_image"] == 1  # counted once


def test_image_size_must_match_the_json(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    write_image(image_dir / "im1.png", 50, 50)
    ds = CocoDataset(ann_file, image_dir, train=False)
    with pytest.raises(DataError, match=r"im1.png: the image is 50x50 .* says 64x48 \(image id 1\)"):
        ds[0]


@pytest.mark.parametrize("content, phrase", [
    ("{not json", "not a valid JSON file"),
    ("[1, 2]", "top level is a list"),
    ('{"images": [], "categories": []}', "no 'annotations' list"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] \(id 1\) lacks file_name"),
])
def test_malformed_json(tmp_path, content, phrase):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text(content)
    with pytest.raises(DataError, match=f"broken.json: .*{phrase}"):
        CocoDataset(ann_file, tmp_path, train=True)
    with pytest.raises(DataError, match="nothere.json: annotation file not found"):
        CocoDataset(tmp_path / "nothere.json", tmp_path, train=True)


def test_missing_folders(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    with pytest.raises(DataError, match="nope: image folder not found"):
        CocoDataset(ann_file, tmp_path / "nope", train=True)
    with pytest.raises(DataError, match="nostuff: stuff map folder not found"):
        CocoDataset(ann_file, image_dir, train=True, stuff_dir=tmp_path / "nostuff")


def test_empty_images_skipped_in_training_kept_in_eval(tmp_path):
    crowd = bad_ann(id=555, image_id=3, iscrowd=1, segmentation={"size": [48, 64], "counts": [100, 50, 64 * 48 - 150]})
    ann_file, image_dir = mini_coco(tmp_path, [crowd])
    data = json.loads(ann_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3 or a["iscrowd"]]
    data["images"].append({"id": 4, "file_name": "im4.png", "width": 64, "height": 20})  # short side < 32
    data["annotations"].append(bad_ann(id=557, image_id=4, bbox=[1.0, 1.0, 5.0, 5.0]))
    write_image(image_dir / "im4.png", 64, 20)
    ann_file.write_text(json.dumps(data))
    train = CocoDataset(ann_file, image_dir, train=True)
    assert train.image_ids == [1, 2] and train.filtered == Counter(no_annotations=1, small_image=1)
    assert CocoDataset(ann_file, image_dir, train=False).image_ids == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------- image formats
def test_grayscale_rgba_and_16bit_images_load_as_rgb(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    Image.fromarray(np.full((48, 64), 90, np.uint8)).save(image_dir / "im1.png")  # L
    Image.fromarray(np.full((48, 64, 4), (10, 20, 30, 0), np.uint8)).save(image_dir / "im2.png")  # RGBA, clear
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(image_dir / "im3.png")  # 16-bit grayscale
    ds = CocoDataset(ann_file, image_dir, train=False, scale=(64, 48), preprocess=Preprocess(
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(48, 64), crop_pct=None))
    pixels = [ds[i]["image"][:, 5, 5].tolist() for i in range(3)]
    assert pixels[0] == [90.0] * 3 and pixels[1] == [10.0, 20.0, 30.0]
    assert all(abs(v - 40000 * 255 / 65535) < 1 for v in pixels[2])  # 16 bits scaled to 8, not clipped
    assert all(ds[i]["image"].shape == (3, 48, 64) for i in range(3))


def test_exif_orientation_matches_the_annotated_size(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path, size=(48, 64))  # the JSON holds the displayed (rotated) size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))  # stored 64x48
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 48 wide, 64 high
    img.save(image_dir / "im1.jpg", exif=exif)
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = "im1.jpg"
    ann_file.write_text(json.dumps(data))
    ds = CocoDataset(ann_file, image_dir, train=False, scale=(64, 48))
    s = ds[0]
    assert s["orig_size"] == (64, 48) and s["image"].shape == (3, 64, 48)
    assert np.array_equal(to_rgb_uint8(load_image(image_dir / "im1.jpg")).shape, (64, 48, 3))


# ----------------------------------------------------------------------------------------- HTC stuff maps
def test_stuff_maps_become_semantic_targets(tmp_path):
    ann_file, image_dir = mini_coco(tmp_path)
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    label = np.full((48, 64), 255, np.uint8)
    label[:, :16] = 3  # a band of class 3 on the left
    for k in (1, 2, 3):
        Image.fromarray(label).save(stuff / f"im{k}.png")
    plain = CocoDataset(ann_file, image_dir, train=True, stuff_dir=stuff, flip_prob=0.0, scale=(128, 96))
    flipped = CocoDataset(ann_file, image_dir, train=True, stuff_dir=stuff, flip_prob=1.0, scale=(128, 96))
    a, b = plain[0], flipped[0]
    assert a["semantic"].dtype == torch.int64 and a["semantic"].shape == a["image"].shape[-2:] == (96, 128)
    assert set(a["semantic"].unique().tolist()) == {3, 255}  # nearest: no blended labels
    assert (a["semantic"][:, :32] == 3).all() and (a["semantic"][:, 32:] == 255).all()
    assert torch.equal(b["semantic"], a["semantic"].flip(-1)) and torch.equal(b["image"], a["image"].flip(-1))
    assert torch.equal(b["masks"], a["masks"].flip(-1)) and b["flipped"] and not a["flipped"]
    assert b["boxes"].tolist() == [[128 - x2, y1, 128 - x1, y2] for x1, y1, x2, y2 in a["boxes"].tolist()]

    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(stuff / "im3.png")  # RGB, wrong size
    with pytest.raises(DataError, match=r"stuff/im3.png: expected a 64x48 single-channel 8-bit label map"):
        plain[2]

    (stuff / "im2.png").unlink()
    with pytest.raises(DataError, match=r"stuff/im2.png: stuff label map not found \(image im2.png, id 2"):
        CocoDataset(ann_file, image_dir, train=True, stuff_dir=stuff)
    with pytest.warns(UserWarning, match="missing_stuff_map=1"):
        ds = CocoDataset(ann_file, image_dir, train=True, stuff_dir=stuff, on_bad="skip")
    assert ds.image_ids == [1, 3]


def test_data_error_is_a_res2det_error():
    assert issubclass(DataError, Res2DetError)
