"""Greedy non-maximum suppression in pure PyTorch (torchvision kernel when available)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _tv
from .boxes import box_iou


def _nms_torch(boxes: Tensor, scores: Tensor, iou_threshold: float, block: int = 512) -> Tensor:
    """Blocked greedy NMS on score-sorted boxes.

    Boxes are visited in blocks of ``block``: a block is first pruned against all boxes
    kept so far (vectorised), then resolved greedily inside itself with a precomputed
    boolean "suppresses" matrix and a cheap numpy loop. Memory is O(block * block).
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    kept: list[Tensor] = []  # indices into sorted_boxes, one tensor per block
    for start in range(0, sorted_boxes.shape[0], block):
        blk = sorted_boxes[start:start + block]
        alive = torch.ones(blk.shape[0], dtype=torch.bool, device=boxes.device)
        for kept_idx in kept:
            alive &= ~(box_iou(blk, sorted_boxes[kept_idx]) > iou_threshold).any(dim=1)
        # Strict ">" as in mmcv/torchvision; only the upper triangle (lower score) matters.
        sup = (box_iou(blk, blk) > iou_threshold).triu_(1).cpu().numpy()
        alive_np = alive.cpu().numpy()
        for i in np.flatnonzero(alive_np):
            if alive_np[i]:  # may have been suppressed by an earlier box of this block
                alive_np[i + 1:] &= ~sup[i, i + 1:]
        new = torch.from_numpy(np.flatnonzero(alive_np)).to(boxes.device) + start
        if new.numel():
            kept.append(new)
    if not kept:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    return order[torch.cat(kept)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of boxes kept by greedy NMS, sorted by decreasing score.

    A box is dropped if its IoU with a higher-scoring kept box is ``> iou_threshold``.
    Equal scores are ordered stably (lower index first).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if _tv.nms is not None and boxes.dtype in (torch.float32, torch.float64):
        # Sort stably ourselves and pass strictly decreasing ranks as scores, so tie
        # handling does not depend on torchvision's sort.
        order = torch.sort(scores, descending=True, stable=True).indices
        ranks = torch.arange(boxes.shape[0], 0, -1, dtype=boxes.dtype, device=boxes.device)
        return order[_tv.nms(boxes[order], ranks, float(iou_threshold))]
    return _nms_torch(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                per_class_above: int = 1000) -> Tensor:
    """Class-aware NMS: boxes with different ``idxs`` never suppress each other.

    Uses the mmcv/torchvision coordinate-offset trick (class ``c`` is shifted by
    ``c * (max_coordinate + 1)``), so IoUs, and hence results, equal mmcv's bit for bit
    on non-negative boxes. For negative coordinates the shift also covers the negative
    span, keeping classes disjoint. Returns kept indices sorted by decreasing score.

    Offset boxes of different classes never overlap, so above ``per_class_above`` boxes
    the same offset boxes are suppressed class by class: identical result, far fewer pairs.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    span = boxes.max() - boxes.min().clamp(max=0) + 1
    shifted = boxes + (idxs.to(boxes) * span)[:, None]
    if boxes.shape[0] <= per_class_above:
        return nms(shifted, scores, iou_threshold)
    keep = []
    for c in torch.unique(idxs):
        inds = torch.nonzero(idxs == c).flatten()
        keep.append(inds[nms(shifted[inds], scores[inds], iou_threshold)])
    keep = torch.cat(keep).sort().values  # index order, so the stable sort breaks ties like nms
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
