"""Box utilities (xyxy, continuous coordinates: no ``+1`` in widths)."""
from __future__ import annotations

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``[N, M]`` of ``boxes1 [N, 4]`` and ``boxes2 [M, 4]``.

    Pairs with zero union (two zero-area boxes) get IoU 0 instead of NaN.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    # Per-coordinate [N, M] ops: fewer full passes than building [N, M, 2] tensors.
    b1, b2 = boxes1[:, None], boxes2[None, :]
    iw = torch.minimum(b1[..., 2], b2[..., 2]) - torch.maximum(b1[..., 0], b2[..., 0])
    ih = torch.minimum(b1[..., 3], b2[..., 3]) - torch.maximum(b1[..., 1], b2[..., 1])
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = area1[:, None] + area2[None, :] - inter
    # inter is 0 wherever union is 0, so dividing by 1 there yields exactly 0.
    return inter / union.masked_fill(union <= 0, 1)
