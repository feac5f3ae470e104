"""Your own data: box-only data trains box-only models (a mask model refuses it in one line), HTC without semantic
maps drops its branch, and fine-tuning from a checkpoint with other classes transfers each class's rows by name
in every stage and mask branch, the rest strictly."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from res2det.checkpoint import save_weights
from res2det.engine.train_config import DataConfig, Recipe, TrainConfig
from res2det.engine.trainer import Trainer, build_dataset, fit_to_data, model_preprocess
from res2det.errors import CheckpointError, DataError, Res2DetError
from res2det.zoo import create_model
from res2det.zoo.transfer import class_layers, normalise_class_name

from layout_data import CLASSES, write_coco, write_voc

# the cascade rows at a size a test builds in a fraction of a second (same heads, same class-dependent layers)
SMALL = {"backbone.stage_blocks": (1, 1, 1, 1), "backbone.base_channels": 16, "neck.out_channels": 32,
         "rpn.feat_channels": 32, "fc_channels": 64, "mask_channels": 16, "mask_num_convs": 1}


def config(root: Path, model: str = "mask_rcnn_r2_tiny_fpn", **changes) -> TrainConfig:
    cfg = TrainConfig(model=model, data=DataConfig(root=str(root), train_split="train", val_split="val",
                                                   num_workers=0, scale=(128, 128)),
                      recipe=Recipe(epochs=2, milestones=(2,), optimizer="adamw", base_lr=1e-3, base_batch_size=2,
                                    warmup_iters=0),
                      batch_size=2, eval_every=0, log_every=1, draw=0, max_iters=2)
    return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------------------------- box-only data
@pytest.mark.slow
def test_box_only_model_trains_and_evaluates_on_box_only_data(tmp_path):
    root = write_coco(tmp_path / "boxes", masks=False)
    cfg = config(root, model_options={"with_mask": False})
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["iterations"] == 2 and "bbox_AP" in summary["metrics"] and "segm_AP" not in summary["metrics"]


def test_box_model_leaves_polygons_unloaded(tmp_path):
    root = write_coco(tmp_path / "masks", masks=True)
    cfg = config(root, model="faster_rcnn_r2_101_fpn_2x_coco")
    train = build_dataset(cfg, model_preprocess(cfg), "train")
    assert not train.with_masks and "masks" not in train[(0, 0)]


@pytest.mark.parametrize("model, hint", [
    ("mask_rcnn_r2_101_fpn_2x_coco", "train the box-only row faster_rcnn_r2_101_fpn_2x_coco on it"),
    ("cascade_mask_rcnn_r2_101_fpn_20e_coco", "cascade_rcnn_r2_101_fpn_20e_coco"),
    ("htc_r2_101_fpn_20e_coco", "cascade_rcnn_r2_101_fpn_20e_coco"),
    ("mask_rcnn_r2_tiny_fpn", "--set model.with_mask=False"),
])
def test_mask_model_refuses_box_only_data_in_one_line(tmp_path, model, hint):
    root = write_coco(tmp_path / "boxes", masks=False)
    cfg = config(root, model=model)
    with pytest.raises(DataError) as e:
        build_dataset(cfg, model_preprocess(cfg), "train")
    message = str(e.value)
    assert "\n" not in message and "instances_train.json: box-only data" in message and "needs masks" in message
    assert hint in message
    voc = write_voc(tmp_path / "voc")  # VOC is box-only: the same refusal, naming the split list
    with pytest.raises(DataError, match=r"ImageSets/Main/train\.txt: box-only data"):
        cfg = config(voc, model=model)
        build_dataset(cfg, model_preprocess(cfg), "train")


def test_htc_without_semantic_maps_trains_without_its_branch(tmp_path):
    cfg = config(tmp_path, model="htc_r2_101_fpn_20e_coco", data=DataConfig(root=str(tmp_path),
                                                                          stuff_dir="stuffthingmaps/train2017"))
    fitted, notes = fit_to_data(cfg)
    assert fitted.model_options["with_semantic"] is False and fitted.data.stuff_dir is None
    assert len(notes) == 1 and "without the semantic branch" in notes[0] and "stuffthingmaps" in notes[0]
    (tmp_path / "stuffthingmaps" / "train2017").mkdir(parents=True)
    assert fit_to_data(cfg) == (cfg, [])  # maps present: unchanged
    assert fit_to_data(config(tmp_path))[1] == []  # not HTC


# --------------------------------------------------------------------------------------------- class transfer
def _checkpoint(tmp_path: Path, row: str, names: tuple[str, ...], **options) -> tuple[Path, dict]:
    torch.manual_seed(1)
    model = create_model(row, num_classes=len(names), class_names=names, **options)
    path = tmp_path / f"{row}.safetensors"
    save_weights(model, path, model_name=row, options={**options, "num_classes": len(names), "class_names": list(names)})
    return path, model.state_dict()


@pytest.mark.parametrize("row", ["mask_rcnn_r2_tiny_fpn", "cascade_mask_rcnn_r2_101_fpn_20e_coco",
                                 "htc_r2_101_fpn_20e_coco"])
def test_transferred_rows_equal_the_checkpoint_rows_by_name_in_every_stage(tmp_path, row):
    options = {} if "tiny" in row else SMALL
    old = ("person", "Dining_Table", "couch", "dog")
    path, before = _checkpoint(tmp_path, row, old, **options)
    new = ("diningtable", "widget", "sofa", "PERSON", "gadget")
    extra = {"with_semantic": False} if row.startswith("htc") else {}
    torch.manual_seed(2)
    model = create_model(row, weights=str(path), class_names=new, class_map={"sofa": "couch"}, **extra)
    after = model.state_dict()
    report = model.class_transfer
    assert report.transferred == [("diningtable", "Dining_Table"), ("sofa", "couch"), ("PERSON", "person")]
    assert report.new == ["widget", "gadget"]
    layers = class_layers(model)
    stages = 1 if "tiny" in row else 3
    assert sorted(report.rebuilt) == sorted(layers)
    assert len([k for k in layers if k.endswith("fc_cls")]) == stages
    assert len([k for k in layers if k.endswith("conv_logits")]) == stages
    pairs = {0: 1, 2: 2, 3: 0}  # new index -> old index
    for layer, kind in layers.items():
        per = 4 if kind == "reg" else 1
        for suffix in ("weight", "bias"):
            a, b = after[f"{layer}.{suffix}"], before[f"{layer}.{suffix}"]
            assert a.shape[0] == per * len(new) + (kind == "cls")
            for i, j in pairs.items():
                assert torch.equal(a[per * i:per * (i + 1)], b[per * j:per * (j + 1)]), (layer, i)
            if kind == "cls":
                assert torch.equal(a[-1], b[-1])  # background
            for i in (1, 4) if suffix == "weight" else ():  # new classes: the head's own init (biases are 0)
                assert not any(torch.equal(a[per * i:per * (i + 1)], b[per * j:per * (j + 1)]) for j in range(4))
    if stages == 3:  # cascade regression is class-agnostic: copied whole
        assert not any(k.endswith("fc_reg") for k in layers)
        for s in range(3):
            assert torch.equal(after[f"roi_head.bbox_head.{s}.fc_reg.weight"], before[f"roi_head.bbox_head.{s}.fc_reg.weight"])
    class_free = [k for k in after if not any(k.startswith(layer + ".") for layer in layers)]
    assert class_free and all(torch.equal(after[k], before[k]) for k in class_free)  # everything else loaded
    if row.startswith("htc"):
        assert report.dropped == ["roi_head.semantic_head"]
    lines = "\n".join(report.lines())
    assert "sofa <- couch" in lines and "new classes (2/5): widget, gadget" in lines


def test_class_independent_layers_still_load_strictly(tmp_path):
    path, _ = _checkpoint(tmp_path, "mask_rcnn_r2_tiny_fpn", ("a", "b"), fc_channels=128)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*shared_fcs"):
        create_model("mask_rcnn_r2_tiny_fpn", weights=str(path), class_names=("a", "c", "d"), fc_channels=256)
    with pytest.raises(Res2DetError, match=r"--class-map c=z: 'z' is not a class of the checkpoint"):
        create_model("mask_rcnn_r2_tiny_fpn", weights=str(path), class_names=("a", "c"), class_map=["c=z"])


def test_same_classes_load_as_before(tmp_path):
    names = ("a", "b", "c")
    path, before = _checkpoint(tmp_path, "mask_rcnn_r2_tiny_fpn", names)
    model = create_model("mask_rcnn_r2_tiny_fpn", weights=str(path), class_names=names)
    assert not hasattr(model, "class_transfer")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_name_normalisation():
    assert normalise_class_name("Dining Table") == normalise_class_name("dining_table") == "diningtable"
    assert normalise_class_name("traffic-light") == normalise_class_name("TrafficLight")


@pytest.mark.slow
def test_cli_fine_tunes_a_voc_folder_and_records_the_transfer(tmp_path, capsys):
    from res2det.cli.main import main

    old = ("person", "table", "dog")
    path, _ = _checkpoint(tmp_path, "mask_rcnn_r2_tiny_fpn", old, with_mask=False)
    voc = write_voc(tmp_path / "voc")
    code = main(["train", "shapes", "--data", str(voc), "--init", str(path), "--class-map", "dining table=table",
                 "--out", str(tmp_path / "runs"), "--set", "max_iters=2", "batch_size=2", "model.with_mask=False",
                 "data.scale=(128,128)", "data.num_workers=0", "draw=0", "eval_every=0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "classes transferred (2/3): dining table <- table, person" in out and "new classes (1/3): cat" in out
    record = json.loads((tmp_path / "runs" / "shapes" / "class_transfer.json").read_text())
    assert record["new"] == ["cat"] and ["person", "person"] in record["transferred"]
    assert "roi_head.bbox_head.fc_cls" in record["rebuilt"]


def test_voc_classes_map_onto_coco_with_the_documented_pairs():
    """docs/your-data.md: the 20 Pascal VOC classes all find a COCO class by name, with four pairs by hand."""
    from res2det.zoo.mmdetection import COCO_CLASSES
    from res2det.zoo.transfer import match_classes, parse_class_map

    voc = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
           "pottedplant sheep sofa train tvmonitor").split()
    pairs = parse_class_map(["sofa=couch", "aeroplane=airplane", "motorbike=motorcycle", "tvmonitor=tv"])
    matches = match_classes(voc, COCO_CLASSES, pairs)
    assert None not in matches
    assert COCO_CLASSES[matches[voc.index("diningtable")]] == "dining table"
    assert COCO_CLASSES[matches[voc.index("pottedplant")]] == "potted plant"
    assert sorted(v for v, j in zip(voc, match_classes(voc, COCO_CLASSES, {})) if j is None) == sorted(pairs)
