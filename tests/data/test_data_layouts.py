"""Pascal VOC and YOLO(-seg) folders give exactly the targets of their COCO conversions (both ways: against a COCO
json of the same objects, and against their own ``res2det data --to-coco`` output); their bad files get one error
naming the file and the object or line; ``res2det data`` summarises a folder."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from res2det.cli.main import main
from res2det.data import CocoDataset
from res2det.data.layouts import detect_format, read_split
from res2det.errors import DataError

from layout_data import CLASSES, write_coco, write_voc, write_yolo


def dataset(root: Path, split: str, *, with_masks: bool, fmt: str = "auto", **kw) -> CocoDataset:
    source = read_split(root, split, fmt=fmt, **kw)
    return CocoDataset(source.ann_file, source.image_dir, train=False, with_masks=with_masks,
                       coco_data=source.coco_data)


def targets(ds: CocoDataset) -> dict[str, tuple]:
    """Per image file name: (boxes, labels, masks or None) at the original size."""
    out = {}
    for i, rec in enumerate(ds.records):
        s = ds.load_sample(i)
        out[rec.file.name] = (s.boxes, s.labels, s.masks)
    return out


def assert_same(a: dict, b: dict, *, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        (ba, la, ma), (bb, lb, mb) = a[name], b[name]
        np.testing.assert_allclose(ba, bb, atol=atol, rtol=0, err_msg=name)
        np.testing.assert_array_equal(la, lb, err_msg=name)
        assert (ma is None) == (mb is None)
        if ma is not None:
            np.testing.assert_array_equal(ma, mb, err_msg=name)


@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_targets_equal_the_coco_json_of_the_same_boxes(tmp_path, split):
    coco = dataset(write_coco(tmp_path / "coco", masks=False), split, with_masks=False)
    voc_root = write_voc(tmp_path / "voc")
    assert detect_format(voc_root) == "voc" and detect_format(tmp_path / "coco") == "coco"
    voc = dataset(voc_root, split, with_masks=False)
    assert voc.class_names == coco.class_names == tuple(CLASSES)
    assert_same(targets(voc), targets(coco))


@pytest.mark.parametrize("seg", [False, True])
@pytest.mark.parametrize("split", ["train", "val"])
def test_yolo_targets_equal_the_coco_json_of_the_same_objects(tmp_path, split, seg):
    coco = dataset(write_coco(tmp_path / "coco", masks=seg), split, with_masks=seg)
    root = write_yolo(tmp_path / "yolo", seg=seg, names_as_dict=seg)
    assert detect_format(root) == "yolo"
    yolo = dataset(root, split, with_masks=seg)
    assert yolo.class_names == tuple(CLASSES)
    # boxes: 1e-9 px (normalised floats); masks rasterised from the same polygons: equal
    assert_same(targets(yolo), targets(coco), atol=1e-9)


@pytest.mark.parametrize("layout", ["voc", "yolo", "yolo-seg"])
def test_to_coco_output_reads_back_as_the_same_targets(tmp_path, layout, capsys):
    root = write_voc(tmp_path / "src") if layout == "voc" else write_yolo(tmp_path / "src", seg=layout == "yolo-seg")
    masks = layout == "yolo-seg"
    assert main(["data", str(root), "--to-coco", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"{'VOC' if layout == 'voc' else 'YOLO'} layout, splits: train, val" in out
    for split in ("train", "val"):
        ann = tmp_path / "out" / "annotations" / f"instances_{split}.json"
        converted = CocoDataset(ann, tmp_path / "out" / split, train=False, with_masks=masks)
        assert_same(targets(converted), targets(dataset(root, split, with_masks=masks)))
        gt = COCO(str(ann))  # pycocotools reads it as a ground truth
        assert len(gt.getAnnIds()) == sum(len(r.annotations) for r in converted.records) > 0
        assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == CLASSES


def test_res2det_data_summary(tmp_path, capsys):
    root = write_yolo(tmp_path / "y")
    assert main(["data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "split train" in out and "3 images, 5 objects (boxes only)" in out and "1 image(s) without objects" in out
    assert "person" in out and "2 objects in 2 images" in out
    assert "problems: none" in out and "box size" in out


def test_voc_difficult_objects_are_crowd_regions_and_classes_can_be_given(tmp_path):
    root = write_voc(tmp_path / "voc", difficult=(1, 0))
    ds = dataset(root, "train", with_masks=False)
    rec = next(r for r in ds.records if r.file.name == "img1.png")
    assert len(rec.annotations) == 3 and len(rec.targets) == 2  # the difficult cat is left out of the targets
    assert [a["iscrowd"] for a in rec.annotations] == [1, 0, 0]
    ds = dataset(root, "train", with_masks=False, classes=["person", "cat", "dining table"])
    assert ds.class_names == ("person", "cat", "dining table")
    with pytest.raises(DataError, match=r"img0\.xml: object 0 \(dining table\): class 'dining table' is not in "
                                        r"data.classes"):
        dataset(root, "train", with_masks=False, classes=["person", "cat"])


def test_voc_bad_files_get_one_line_naming_file_and_object(tmp_path):
    root = write_voc(tmp_path / "voc")
    xml = root / "Annotations" / "img1.xml"
    xml.write_text(xml.read_text().replace("<xmin>81</xmin>", "<xmin>eighty</xmin>"))
    with pytest.raises(DataError, match=r"img1\.xml: object 1 \(person\): <bndbox> needs numeric"):
        dataset(root, "train", with_masks=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        source = read_split(root, "train", on_bad="skip")
    assert source.skipped == {"bad_box": 1} and len(source.coco_data["annotations"]) == 4
    (root / "Annotations" / "img0.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"img0\.xml: not a valid XML file"):
        dataset(root, "train", with_masks=False)
    with pytest.raises(DataError, match=r"ImageSets/Main/test\.txt: split list not found .* splits here: train, val"):
        dataset(root, "test", with_masks=False)


@pytest.mark.parametrize("line, message", [
    ("7 0.5 0.5 0.1 0.1", r"img0\.txt:2: class 7 is not in 0\.\.2"),
    ("1 0.5 0.5 0.1", r"img0\.txt:2: 3 coordinates; a box has 4"),
    ("1 12 30 50 20", r"img0\.txt:2: coordinates must be normalised"),
    ("x 0.5 0.5 0.1 0.1", r"img0\.txt:2: expected 'class cx cy w h'"),
])
def test_yolo_bad_lines_get_one_line_naming_file_and_line(tmp_path, line, message):
    root = write_yolo(tmp_path / "y")
    labels = root / "labels" / "train" / "img0.txt"
    labels.write_text(labels.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        dataset(root, "train", with_masks=False)


def test_yolo_yaml_problems(tmp_path):
    root = write_yolo(tmp_path / "y")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\n")
    with pytest.raises(DataError, match=r"data\.yaml: a YOLO data\.yaml needs 'names'"):
        dataset(root, "train", with_masks=False)
    (root / "data.yaml").write_text("train: images/train\nnames: [a, b, c]\n")
    with pytest.raises(DataError, match=r"data\.yaml: no split 'val' \(splits here: train\)"):
        dataset(root, "val", with_masks=False)
    with pytest.raises(DataError, match="no dataset layout found"):
        detect_format(tmp_path / "y" / "images")


def test_roboflow_exports(tmp_path):
    """Roboflow's COCO export (``<split>/_annotations.coco.json``, 'valid') and its YOLO data.yaml (paths one
    folder up: ``../train/images``) read as Ultralytics reads them."""
    from res2det.data.layouts import split_name

    coco = write_coco(tmp_path / "coco", masks=False)
    rf = tmp_path / "rf"
    for split, name in (("train", "train"), ("val", "valid")):
        (rf / name).mkdir(parents=True)
        for image in (coco / split).iterdir():
            (rf / name / image.name).write_bytes(image.read_bytes())
        (rf / name / "_annotations.coco.json").write_text((coco / "annotations" / f"instances_{split}.json").read_text())
    assert detect_format(rf) == "coco" and split_name(rf, "coco", "auto", "val") == "valid"
    assert_same(targets(dataset(rf, "valid", with_masks=False)), targets(dataset(coco, "val", with_masks=False)))
    yolo = write_yolo(tmp_path / "y")
    (yolo / "data.yaml").write_text("train: ../images/train\nval: ../images/val\nnc: 3\nnames: "
                                    "['dining table', 'person', 'cat']\n")
    assert_same(targets(dataset(yolo, "val", with_masks=False)), targets(dataset(coco, "val", with_masks=False)),
                atol=1e-9)
