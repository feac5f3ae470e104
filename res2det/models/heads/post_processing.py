"""Test-time box post-processing shared by the heads (mmcv ``batched_nms`` / mmdet ``multiclass_nms``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ...ops import onnx_ops
from ...ops.onnx_ops import exporting

# mmcv runs one NMS over class-offset boxes below this many boxes, and a per-class loop above it.
SPLIT_THR = 10000


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_num: int = -1) -> Tensor:
    """Class-aware NMS -> kept indices by decreasing score (at most ``max_num``; all for ``max_num <= 0``),
    taking mmcv's two code paths (the offset trick rounds large coordinates, so the paths can differ in the
    last bit; matching them keeps parity). While exporting to ONNX: the same rule with NonMaxSuppression."""
    if exporting():
        return onnx_ops.batched_nms_graph(boxes, scores, idxs, iou_threshold, max_num, SPLIT_THR)
    if boxes.shape[0] < SPLIT_THR:
        keep = ops.batched_nms(boxes, scores, idxs, iou_threshold)
    else:
        kept = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        for c in torch.unique(idxs):
            inds = torch.nonzero(idxs == c).flatten()
            kept[inds[ops.nms(boxes[inds], scores[inds], iou_threshold)]] = True
        keep = torch.nonzero(kept).flatten()
        keep = keep[scores[keep].sort(descending=True).indices]
    return keep[:max_num] if max_num > 0 else keep


def multiclass_nms(boxes: Tensor, scores: Tensor, *, score_thr: float, iou_threshold: float,
                   max_num: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class NMS over class-specific boxes.

    ``boxes [N, 4C]`` (or ``[N, 4]`` shared by all classes) and ``scores [N, C+1]`` with background last.
    Every (box, class) pair scoring ``> score_thr`` is a candidate. Returns (boxes ``[K, 4]``, scores ``[K]``,
    labels ``[K]``, row index into the N inputs ``[K]``), by decreasing score, at most ``max_num``.
    """
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    if boxes.shape[1] != 4:  # (a Python int also while tracing: the layout is fixed)
        boxes = boxes.view(n, boxes.shape[1] // 4, 4)  # (not -1: no rois would make it ambiguous)
    else:
        boxes = boxes[:, None].expand(n, num_classes, 4)
    cls_scores = scores[:, :-1]
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(cls_scores)
    rows = torch.arange(n, device=scores.device).view(-1, 1).expand_as(cls_scores)
    boxes, cls_scores = boxes.reshape(-1, 4), cls_scores.reshape(-1)
    labels, rows = labels.reshape(-1), rows.reshape(-1)
    valid = torch.nonzero(cls_scores > score_thr).flatten()
    boxes, cls_scores, labels, rows = boxes[valid], cls_scores[valid], labels[valid], rows[valid]
    keep = batched_nms(boxes, cls_scores, labels, iou_threshold, max_num)
    return boxes[keep], cls_scores[keep], labels[keep], rows[keep]
