"""res2det.evaluation.coco_eval against pycocotools run directly, on the real tiny_coco val annotations and
predictions made from them (perturbed: jittered, dropped, duplicated, mislabelled, randomly scored)."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from res2det.errors import Res2DetError
from res2det.evaluation import (coco_evaluate, format_per_class, to_coco_results,
                                write_results_json)

from conftest import SHARED

# pycocotools' mask.decode under NumPy 2 (annToMask): not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

VAL_JSON = SHARED / "data" / "tiny_coco" / "annotations" / "instances_val2017.json"


# COCOeval.stats in the order COCOeval.summarize() prints them
COCOEVAL_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_val_coco() -> COCO:
    if not VAL_JSON.is_file():
        pytest.skip(f"{VAL_JSON} not found (../shared must sit beside the repository)")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(VAL_JSON))


@pytest.fixture(scope="module")
def coco_gt():
    return load_val_coco()


def predictions_from_gt(coco: COCO, *, seed: int | None = 0) -> dict[int, dict[str, np.ndarray]]:
    """Per image id: xyxy boxes, scores, contiguous labels and bool masks made from the non-crowd ground truth.
    ``seed=None``: the ground truth itself (score 1). Otherwise each object is dropped (15%), duplicated (15%),
    mislabelled (10%), its box jittered by ~8% of its size and its mask shifted by the same offset, scores
    random, plus a false positive per image."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco.getCatIds())
    out = {}
    for img_id in sorted(coco.getImgIds()):
        h, w = coco.imgs[img_id]["height"], coco.imgs[img_id]["width"]
        boxes, labels, masks = [], [], []
        for ann in coco.imgToAnns[img_id]:
            if ann["iscrowd"]:
                continue
            x, y, bw, bh = ann["bbox"]
            mask = coco.annToMask(ann).astype(bool)
            copies = 1 if seed is None else int(rng.choice([0, 1, 2], p=[0.15, 0.7, 0.15]))
            for _ in range(copies):
                jitter = np.zeros(4) if seed is None else rng.normal(0.0, 0.08, 4) * [bw, bh, bw, bh]
                boxes.append(np.clip(np.array([x, y, x + bw, y + bh]) + jitter, 0, [w, h, w, h]))
                label = cat_ids.index(ann["category_id"])
                labels.append(label if seed is None or rng.random() > 0.1 else int(rng.integers(len(cat_ids))))
                masks.append(np.roll(mask, (round(jitter[1]), round(jitter[0])), axis=(0, 1)))
        if seed is not None:  # a false positive
            x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            boxes.append(np.array([x0, y0, x0 + w / 4, y0 + h / 4]))
            labels.append(int(rng.integers(len(cat_ids))))
            fp = np.zeros((h, w), bool)
            fp[int(y0):int(y0 + h / 4), int(x0):int(x0 + w / 4)] = True
            masks.append(fp)
        k = len(boxes)
        out[img_id] = {
            "boxes": np.array(boxes, np.float32).reshape(k, 4),
            "scores": np.ones(k, np.float32) if seed is None else rng.random(k).astype(np.float32),
            "labels": np.array(labels, np.int64),
            "masks": np.array(masks, bool).reshape(k, h, w)}
    return out


def records_from(coco: COCO, preds: dict[int, dict[str, np.ndarray]]) -> tuple[list[dict], list[dict]]:
    cat_ids = sorted(coco.getCatIds())
    bbox, segm = [], []
    for img_id, p in preds.items():
        b, s = to_coco_results(img_id, p["boxes"], p["scores"], p["labels"], p["masks"], label_to_cat_id=cat_ids)
        bbox += b
        segm += s
    return bbox, segm


@pytest.fixture(scope="module")
def perturbed(coco_gt):
    return records_from(coco_gt, predictions_from_gt(coco_gt, seed=0))


def cocoeval_stats(coco: COCO, records: list[dict], iou_type: str, img_ids=None) -> list[float]:
    """pycocotools run the standard way."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(records)), iou_type)
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_metrics_equal_cocoeval_on_perturbed_predictions(coco_gt, perturbed, iou_type):
    records = perturbed[0] if iou_type == "bbox" else perturbed[1]
    before = copy.deepcopy(records)
    ev = coco_evaluate(coco_gt, records, iou_type)
    assert records == before  # loadRes got copies
    stats = cocoeval_stats(coco_gt, records, iou_type)
    assert ev.metrics == {f"{iou_type}_{n}": v for n, v in zip(COCOEVAL_STATS, stats)}
    assert 0.2 < ev.metrics[f"{iou_type}_AP"] < 0.9  # the perturbations cost AP, the rest is found
    assert ev.summary.startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
    # per-class: one row per category with non-crowd ground truth; over classes they average to the AP
    with_gt = {a["category_id"] for a in coco_gt.dataset["annotations"] if not a["iscrowd"]}
    assert [r.category_id for r in ev.per_class] == sorted(with_gt)
    assert np.mean([r.AP for r in ev.per_class]) == pytest.approx(ev.metrics[f"{iou_type}_AP"], abs=1e-12)
    assert np.mean([r.AP50 for r in ev.per_class]) == pytest.approx(ev.metrics[f"{iou_type}_AP50"], abs=1e-12)
    assert np.mean([r.AP75 for r in ev.per_class]) == pytest.approx(ev.metrics[f"{iou_type}_AP75"], abs=1e-12)
    table = format_per_class(ev.per_class, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and len(lines) == 2 + len(ev.per_class)
    assert lines[2].split()[0] == coco_gt.cats[ev.per_class[0].category_id]["name"]


def test_subset_of_images(coco_gt, perturbed):
    img_ids = sorted(coco_gt.getImgIds())[::3]
    records = [r for r in perturbed[0] if r["image_id"] in img_ids]
    ev = coco_evaluate(coco_gt, records, "bbox", img_ids=img_ids)
    assert list(ev.metrics.values()) == cocoeval_stats(coco_gt, records, "bbox", img_ids=img_ids)
    # without img_ids the other images' ground truth counts as missed
    assert coco_evaluate(coco_gt, records, "bbox").metrics["bbox_AR100"] < ev.metrics["bbox_AR100"]


def test_ground_truth_as_predictions_scores_one(coco_gt):
    bbox, segm = records_from(coco_gt, predictions_from_gt(coco_gt, seed=None))
    for iou_type, records in (("bbox", bbox), ("segm", segm)):
        ev = coco_evaluate(coco_gt, records, iou_type)
        m = ev.metrics
        assert list(m.values()) == cocoeval_stats(coco_gt, records, iou_type)
        # every object found with IoU 1 before any false positive: precision 1 at every recall (up to the
        # eps pycocotools adds to the denominator: tp / (tp + fp + eps))
        one = pytest.approx(1.0, abs=1e-12)
        assert [m[f"{iou_type}_{n}"] for n in ("AP", "AP50", "AP75", "AR100")] == [one] * 4
        assert all(m[f"{iou_type}_{n}"] in (one, -1.0) for n in ("APs", "APm", "APl", "ARs", "ARm", "ARl"))
        assert [r.AP for r in ev.per_class] == [one] * len(ev.per_class)


def test_empty_predictions_give_zero(coco_gt):
    for iou_type in ("bbox", "segm"):
        ev = coco_evaluate(coco_gt, [], iou_type)
        assert ev.metrics[f"{iou_type}_AP"] == 0.0 and ev.metrics[f"{iou_type}_AR100"] == 0.0
        assert set(ev.metrics.values()) <= {0.0, -1.0}
        with_gt = {a["category_id"] for a in coco_gt.dataset["annotations"] if not a["iscrowd"]}
        assert [r.category_id for r in ev.per_class] == sorted(with_gt)
        assert all(r.AP == 0.0 for r in ev.per_class)
    # an image without detections among others: the same as leaving its records out
    preds = predictions_from_gt(coco_gt, seed=1)
    first = min(preds)
    preds[first] = {k: v[:0] for k, v in preds[first].items()}
    bbox, _ = records_from(coco_gt, preds)
    assert not any(r["image_id"] == first for r in bbox)
    assert list(coco_evaluate(coco_gt, bbox, "bbox").metrics.values()) == cocoeval_stats(coco_gt, bbox, "bbox")


def test_results_json_round_trip(coco_gt, tmp_path):
    preds = predictions_from_gt(coco_gt, seed=2)
    bbox, segm = records_from(coco_gt, preds)
    assert all(isinstance(r["segmentation"]["counts"], str) and "bbox" not in r for r in segm)
    write_results_json(bbox, tmp_path / "bbox.json")
    write_results_json(segm, tmp_path / "segm.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bbox.json", "segm.json"]  # no temporary left
    with contextlib.redirect_stdout(io.StringIO()):
        dt_bbox = coco_gt.loadRes(str(tmp_path / "bbox.json"))
        dt_segm = coco_gt.loadRes(str(tmp_path / "segm.json"))
    cat_ids = sorted(coco_gt.getCatIds())
    for img_id, p in preds.items():
        anns = dt_bbox.imgToAnns[img_id]
        assert len(anns) == len(p["boxes"])
        xywh = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
        np.testing.assert_array_equal(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                      p["boxes"].astype(np.float64))
        assert [a["score"] for a in anns] == p["scores"].tolist()
        assert [a["category_id"] for a in anns] == [cat_ids[k] for k in p["labels"]]
        anns = dt_segm.imgToAnns[img_id]
        assert len(anns) == len(p["masks"])
        for a, mask in zip(anns, p["masks"]):
            np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]).astype(bool), mask)
            assert a["area"] == mask.sum()  # the mask's area (no bbox in the record to override it)


def test_bad_inputs_are_named(coco_gt):
    with pytest.raises(Res2DetError, match="label 3 has no COCO category id"):
        to_coco_results(1, np.zeros((1, 4)), [0.5], [3], label_to_cat_id=[1, 2, 3])
    with pytest.raises(Res2DetError, match="image ids not in the annotations"):
        coco_evaluate(coco_gt, [{"image_id": -5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], "bbox")
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(coco_gt, [], "keypoints")
