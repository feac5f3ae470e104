"""COCO-style evaluation with pycocotools: detections -> results records -> COCOeval metrics (+ per-class AP)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..checkpoint import atomic_write
from ..errors import Res2DetError
from ..structures import InstanceMasks

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats, in order (maxDets 100 unless named)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ClassAP(NamedTuple):
    """One row of the per-class table: AP averaged over IoU 0.5:0.95 (and at 0.5, 0.75), area all, 100 dets."""

    category_id: int
    name: str
    AP: float
    AP50: float
    AP75: float


class CocoEvaluation(NamedTuple):
    """What ``coco_evaluate`` returns."""

    metrics: dict[str, float]  # f"{iou_type}_{name}" for each of STAT_NAMES
    per_class: list[ClassAP]
    summary: str  # what COCOeval.summarize() printed


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def to_coco_results(image_id: int, boxes: Any, scores: Any, labels: Any, masks: Any = None, *,
                    label_to_cat_id: Sequence[int] | Mapping[int, int]) -> tuple[list[dict], list[dict]]:
    """One image's detections (xyxy ``boxes [K, 4]``, ``scores [K]``, contiguous ``labels [K]``, optional bool
    ``masks [K, H, W]`` or ``InstanceMasks``; tensors or arrays) -> ``(bbox_records, segm_records)`` in COCO's
    results format.

    Boxes become ``[x, y, w, h]``; masks compressed RLE with ``counts`` as str (JSON-ready). Segm records carry
    no ``bbox``: with one, ``COCO.loadRes`` would take the box area as the instance area, and the small /
    medium / large split of mask AP would follow boxes instead of masks.
    """
    boxes, scores, labels = _numpy(boxes).astype(np.float64), _numpy(scores), _numpy(labels)
    cat_ids = []
    for k in labels.tolist():
        try:
            cat_ids.append(int(label_to_cat_id[k]))
        except (IndexError, KeyError):
            raise Res2DetError(f"label {k} has no COCO category id ({len(label_to_cat_id)} known): does the "
                               "model have more classes than the dataset?") from None
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1) if len(boxes) else boxes
    bbox = [{"image_id": int(image_id), "category_id": c, "bbox": [float(v) for v in b], "score": float(s)}
            for c, b, s in zip(cat_ids, xywh, scores)]
    segm: list[dict] = []
    if masks is not None and len(cat_ids):
        if isinstance(masks, InstanceMasks):  # from the crops, without full-image masks
            rles = masks.rle()
        else:
            rles = mask_utils.encode(np.asfortranarray(_numpy(masks).astype(np.uint8).transpose(1, 2, 0)))
        for c, s, rle in zip(cat_ids, scores, rles):
            segm.append({"image_id": int(image_id), "category_id": c, "score": float(s),
                         "segmentation": {"size": [int(v) for v in rle["size"]],
                                          "counts": rle["counts"].decode("ascii")}})
    return bbox, segm


def write_results_json(records: list[dict], path: str | Path) -> None:
    """Write results records as a JSON list (atomically) that ``COCO.loadRes(path)`` reads directly."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(records, f)

    atomic_write(Path(path), write)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results set without detections (``loadRes`` cannot take an empty list): every GT is then missed."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                   "annotations": []}
    res.createIndex()
    return res


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_type: str, *, img_ids: Sequence[int] | None = None
                  ) -> CocoEvaluation:
    """Run pycocotools' COCOeval on results records over ``img_ids`` (default: every image of ``coco_gt``).

    Returns ``CocoEvaluation(metrics, per_class, summary)``: ``metrics`` maps ``f"{iou_type}_{name}"`` for each of
    ``STAT_NAMES`` to COCOeval's stats (-1 where no ground truth falls in that area range; no detections give
    0 there); ``per_class`` one ``ClassAP`` per category with (non-crowd) ground truth in those images,
    computed from ``eval['precision']`` as mmdetection's ``classwise`` option does; ``summary`` what
    ``COCOeval.summarize()`` printed.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise Res2DetError(f"results for {len(unknown)} image ids not in the annotations, e.g. {min(unknown)}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        # loadRes adds fields to the records it is given: hand it copies
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_eval.summarize()
    metrics = {f"{iou_type}_{name}": float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    return CocoEvaluation(metrics, per_class_ap(coco_eval), printed.getvalue())


def per_class_ap(coco_eval: COCOeval) -> list[ClassAP]:
    """Per-category AP of an accumulated COCOeval: the mean of ``precision[iou, recall, k, area all, maxDets
    100]`` over the entries > -1; categories without ground truth (all -1) get no row."""
    precision = coco_eval.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M maxDets]
    area, max_dets = coco_eval.params.areaRngLbl.index("all"), coco_eval.params.maxDets.index(100)
    iou50, iou75 = (int(np.argmin(np.abs(coco_eval.params.iouThrs - t))) for t in (0.5, 0.75))

    def mean(p: np.ndarray) -> float:
        return float(p[p > -1].mean())

    rows = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, area, max_dets]
        if (p > -1).any():
            name = coco_eval.cocoGt.cats[cat_id]["name"]
            rows.append(ClassAP(int(cat_id), name, mean(p), mean(p[iou50]), mean(p[iou75])))
    return rows


def format_per_class(rows: Sequence[ClassAP], title: str = "") -> str:
    """The per-class AP rows as an aligned text table."""
    width = max([len("category")] + [len(r.name) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'category':<{width}}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}")
    lines += [f"{r.name:<{width}}  {r.AP:6.3f}  {r.AP50:6.3f}  {r.AP75:6.3f}" for r in rows]
    return "\n".join(lines) + "\n"
