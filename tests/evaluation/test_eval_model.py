"""``evaluate_model`` end to end (a scaled-down Mask R-CNN over real tiny_coco val images, in a dataset with
the plan.md sample interface) and the DDP gather (2 CPU processes, gloo)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from res2det.images import detection_input, to_rgb_uint8
from res2det.evaluation import STAT_NAMES, coco_evaluate, evaluate_model, gather_and_evaluate
from res2det.models.detectors import build_detector
from res2det.models.heads import paste_masks
from res2det.structures import Preprocess

from conftest import SHARED, free_port
from test_det_units import tiny_config
from test_eval_coco import VAL_JSON, load_val_coco, predictions_from_gt, records_from

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

VAL_DIR = SHARED / "data" / "tiny_coco" / "val2017"
IMAGE_IDS = (37777, 6818, 17627)  # 352x230, 427x640 (portrait), 640x480


class FakeCocoDataset(torch.utils.data.Dataset):
    """Samples as plan.md's CocoDataset gives them (eval transforms: predict's resize, no flip)."""

    def __init__(self, coco, image_ids, pre: Preprocess):
        self.coco, self.image_ids, self.pre = coco, list(image_ids), pre

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        info = self.coco.imgs[self.image_ids[i]]
        rgb = to_rgb_uint8(VAL_DIR / info["file_name"])
        image, scale = detection_input(rgb, self.pre)
        return {"image": image, "image_id": info["id"], "file": info["file_name"], "orig_size": rgb.shape[:2],
                "scale_factor": scale, "flipped": False}


def tiny_model(with_mask=True):
    torch.manual_seed(0)
    model = build_detector(tiny_config(with_mask)).eval()
    # a threshold of 0 so that the random model returns detections
    model.roi_head.test_cfg = dataclasses.replace(model.roi_head.test_cfg, score_thr=0.0)
    model.preprocess = Preprocess(input_size=(128, 192), crop_pct=None)
    return model


def test_postprocess_maps_detections_to_original_pixels():
    model = tiny_model()
    torch.manual_seed(1)
    result = {"boxes": torch.tensor([[10.0, 10, 30, 20], [40, 4, 90, 30], [0, 0, 8, 8]]),  # input pixels
              "scores": torch.tensor([0.3, 0.9, 0.01]), "labels": torch.tensor([1, 2, 3]),
              "mask_probs": torch.rand(3, 28, 28)}
    args = dict(scale_factor=(0.5, 0.25), orig_size=(100, 150))
    boxes, scores, labels, masks = model.postprocess(result, **args)
    assert scores.tolist() == pytest.approx([0.9, 0.3, 0.01]) and labels.tolist() == [2, 1, 3]
    unclipped = torch.tensor([[80.0, 16, 180, 120], [20, 40, 60, 80], [0, 0, 16, 32]])
    clipped = torch.tensor([[80.0, 16, 150, 100], [20, 40, 60, 80], [0, 0, 16, 32]])
    assert torch.equal(boxes, clipped)
    probs = result["mask_probs"][[1, 0, 2]]
    masks = masks.to_tensor()  # postprocess keeps per-box crops (InstanceMasks)
    assert torch.equal(masks, paste_masks(probs, unclipped, (100, 150)))  # mmdet: from the unclipped boxes
    model.roi_head.mask_paste = "paddle"  # Paddle's rule
    paddle_masks = model.postprocess(result, **args)[3].to_tensor()
    assert torch.equal(paddle_masks, paste_masks(probs, clipped, (100, 150)))
    assert not torch.equal(paddle_masks, masks)
    kept = model.postprocess(result, **args, score_thr=0.3)
    assert kept[1].tolist() == pytest.approx([0.9, 0.3]) and kept[3].shape == (2, 100, 150)
    with pytest.raises(ValueError, match="paste_masks=False"):
        pasted = {k: v for k, v in result.items() if k != "mask_probs"} | {"masks": masks}  # detect()'s default
        model.postprocess(pasted, **args)


@pytest.fixture(scope="module")
def coco_gt():
    if not VAL_DIR.is_dir():
        pytest.skip(f"{VAL_DIR} not found (../shared must sit beside the repository)")
    return load_val_coco()


def test_evaluate_model_scores_what_predict_returns(coco_gt, tmp_path):
    model = tiny_model().train()
    dataset = FakeCocoDataset(coco_gt, IMAGE_IDS, model.preprocess)
    metrics = evaluate_model(model, dataset, batch_size=2, out_dir=tmp_path, progress=False)
    assert model.training  # mode restored
    assert list(metrics) == [f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bbox.json", "coco_eval.txt", "metrics.json", "segm.json"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    report = (tmp_path / "coco_eval.txt").read_text()
    assert "bbox AP per class" in report and "segm AP per class" in report and "person" in report

    # the records are predict()'s detections (same resize, padding and batches) in COCO's format
    dets = model.predict([VAL_DIR / coco_gt.imgs[i]["file_name"] for i in IMAGE_IDS], batch_size=2)
    dt_bbox = coco_gt.loadRes(str(tmp_path / "bbox.json"))
    dt_segm = coco_gt.loadRes(str(tmp_path / "segm.json"))
    cat_ids = sorted(coco_gt.getCatIds())
    for image_id, det in zip(IMAGE_IDS, dets):
        assert len(det) > 0
        anns = dt_bbox.imgToAnns[image_id]
        xywh = np.array([a["bbox"] for a in anns])
        np.testing.assert_array_equal(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                      det.boxes.numpy().astype(np.float64))
        assert [a["score"] for a in anns] == det.scores.tolist()
        assert [a["category_id"] for a in anns] == [cat_ids[k] for k in det.labels.tolist()]
        masks = np.stack([mask_utils.decode(a["segmentation"]) for a in dt_segm.imgToAnns[image_id]])
        np.testing.assert_array_equal(masks.astype(bool), det.masks.numpy())  # original size (H, W)

    # the metrics are COCOeval's over exactly these images
    for iou_type in ("bbox", "segm"):
        records = json.loads((tmp_path / f"{iou_type}.json").read_text())
        expected = coco_evaluate(coco_gt, records, iou_type, img_ids=IMAGE_IDS).metrics
        assert {k: v for k, v in metrics.items() if k.startswith(iou_type)} == expected


def test_coco_dataset_evaluates_like_the_fake_one(coco_gt, tmp_path):
    """res2det.data.CocoDataset (eval mode) over an annotation file of the same three images."""
    from res2det.data import CocoDataset

    data = json.loads(VAL_JSON.read_text())
    data["images"] = [i for i in data["images"] if i["id"] in IMAGE_IDS]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in IMAGE_IDS]
    (tmp_path / "val3.json").write_text(json.dumps(data))
    model = tiny_model()
    real = CocoDataset(tmp_path / "val3.json", VAL_DIR, train=False, preprocess=model.preprocess)
    metrics = evaluate_model(model, real, batch_size=2, out_dir=tmp_path / "real", progress=False)
    fake = evaluate_model(model, FakeCocoDataset(coco_gt, IMAGE_IDS, model.preprocess), batch_size=2,
                          out_dir=tmp_path / "fake", progress=False)
    assert metrics == fake
    for name in ("bbox.json", "segm.json"):
        assert (tmp_path / "real" / name).read_bytes() == (tmp_path / "fake" / name).read_bytes()


def test_box_only_model_has_no_mask_metrics(coco_gt, tmp_path):
    model = tiny_model(with_mask=False)
    metrics = evaluate_model(model, FakeCocoDataset(coco_gt, IMAGE_IDS[:1], model.preprocess),
                             out_dir=tmp_path, progress=False)
    assert list(metrics) == [f"bbox_{n}" for n in STAT_NAMES]
    assert not (tmp_path / "segm.json").exists()
    assert len(json.loads((tmp_path / "bbox.json").read_text())) > 0



def _ddp_worker(rank: int, world: int, port: int, shards: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    coco = load_val_coco()
    model = tiny_model()
    dataset = FakeCocoDataset(coco, IMAGE_IDS, model.preprocess)
    if rank == 0:  # the single-process reference, computed with the same threads before joining the group
        single = evaluate_model(model, dataset, progress=False)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gathered = gather_and_evaluate(coco, shards[rank], iou_types=("bbox", "segm"),
                                       out_dir=os.path.join(out, f"records{rank}"))
        model_metrics = evaluate_model(model, dataset, progress=False, out_dir=os.path.join(out, f"model{rank}"))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"gathered": gathered, "model": model_metrics, "single": single if rank == 0 else None}, f)


@pytest.mark.slow
def test_ddp_gather_evaluates_each_image_once(coco_gt, tmp_path):
    bbox, segm = records_from(coco_gt, predictions_from_gt(coco_gt, seed=3))
    per_image = {i: ([r for r in bbox if r["image_id"] == i], [r for r in segm if r["image_id"] == i])
                 for i in sorted(coco_gt.getImgIds())}
    ids = sorted(per_image)
    shards = [{i: per_image[i] for i in ids[0::2]}, {i: per_image[i] for i in ids[1::2]}]  # disjoint halves
    expected = gather_and_evaluate(coco_gt, per_image, iou_types=("bbox", "segm"), out_dir=tmp_path / "single")
    assert 0 < expected["bbox_AP"] < 1

    mp.spawn(_ddp_worker, args=(2, free_port(), shards, str(tmp_path)), nprocs=2, join=True)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # every rank gets rank 0's metrics
        assert r["gathered"] == expected
        assert r["model"] == ranks[0]["single"]
    for name in ("bbox.json", "segm.json"):  # only rank 0 writes, the same records as one process
        assert (tmp_path / "records0" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
        assert not (tmp_path / "records1" / name).exists()
    # evaluate_model split the images between the ranks and evaluated each once
    records = json.loads((tmp_path / "model0" / "bbox.json").read_text())
    assert sorted({r["image_id"] for r in records}) == sorted(IMAGE_IDS)
    assert not (tmp_path / "model1").exists()
