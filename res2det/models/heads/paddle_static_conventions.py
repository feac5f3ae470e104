"""The inference rules of PaddleDetection's static-graph (Fluid) era, where they differ from its dygraph 2.6
(``paddle_conventions``), for the static-graph Res2Net releases (``../shared/reference/PADDLE_STATIC.md``).

Boxes follow the **+1 pixel** convention of that era: a box ``[x1, y1, x2, y2]`` covers ``x2 - x1 + 1`` pixels,
so widths, centres, areas and IoUs carry a +1 (an IoU of this kind is the usual IoU of boxes with 1 added to
``x2`` and ``y2``). Each function is checked against the Paddle 3.3.1 kernel that implements the rule
(tests/fixtures/paddle_static/make_era_fixtures.py).

Not yet done (issue #15): the heads and the detector that apply these rules end to end (pre-processing,
proposal merging over levels, box post-processing in original pixels, mask pasting) and the zoo rows.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ... import ops
from .paddle_conventions import BBOX_CLIP, paddle_multiclass_nms


def _round_half_up(x: float) -> float:
    return math.floor(x + 0.5)  # C's round() for the positive sizes here


def static_anchors(grid_size: Sequence[int], stride: int, size: float, ratios: Sequence[float] = (0.5, 1.0, 2.0),
                   offset: float = 0.5) -> Tensor:
    """Paddle's ``anchor_generator`` op on an ``H x W`` grid: ``[H * W * A, 4]`` in (row, column, ratio) order.
    Per ratio ``r = h / w``: ``base_w = round(sqrt(stride^2 / r))``, ``base_h = round(base_w * r)``, scaled by
    ``size / stride``; centred at ``i * stride + offset * (stride - 1)`` with +1 widths."""
    h, w = (int(s) for s in grid_size)
    half = []
    for r in ratios:
        base_w = _round_half_up(math.sqrt(stride * stride / r))
        base_h = _round_half_up(base_w * r)
        half.append((0.5 * (size / stride * base_w - 1), 0.5 * (size / stride * base_h - 1)))
    half_t = torch.tensor(half, dtype=torch.float32)  # [A, 2]
    xs = torch.arange(w, dtype=torch.float32) * stride + offset * (stride - 1)
    ys = torch.arange(h, dtype=torch.float32) * stride + offset * (stride - 1)
    ctr = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flip(-1).reshape(-1, 1, 2)  # (x, y)
    return torch.cat([ctr - half_t, ctr + half_t], -1).reshape(-1, 4)


def static_decode(priors: Tensor, deltas: Tensor, stds: Sequence[float], *, clip_wh: bool = False) -> Tensor:
    """``box_coder(decode_center_size, box_normalized=False)``: ``priors [N, 4]``, ``deltas [N, 4]`` or
    ``[N, C, 4]`` -> boxes of the deltas' shape. +1 widths, centre ``x1 + w / 2``. ``clip_wh``: dw / dh capped
    at log(1000 / 16) first, as ``generate_proposals`` decodes."""
    w = priors[:, 2] - priors[:, 0] + 1
    h = priors[:, 3] - priors[:, 1] + 1
    cx, cy = priors[:, 0] + w / 2, priors[:, 1] + h / 2
    d = deltas if deltas.dim() == 3 else deltas[:, None]
    sx, sy, sw, sh = (float(s) for s in stds)
    dw, dh = sw * d[..., 2], sh * d[..., 3]
    if clip_wh:
        dw, dh = dw.clamp(max=BBOX_CLIP), dh.clamp(max=BBOX_CLIP)
    pcx = sx * d[..., 0] * w[:, None] + cx[:, None]
    pcy = sy * d[..., 1] * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
    out = torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2 - 1, pcy + ph / 2 - 1], -1)
    return out if deltas.dim() == 3 else out[:, 0]


def static_levels(rois: Tensor, *, min_level: int = 2, max_level: int = 5, refer_level: int = 4,
                  refer_scale: float = 224.0) -> Tensor:
    """``distribute_fpn_proposals(pixel_offset=True)``: the FPN level of each roi from its +1 area (0 for an
    inverted box), ``floor(log2(sqrt(area) / refer_scale + 1e-6) + refer_level)`` clamped to the levels."""
    w = rois[:, 2] - rois[:, 0] + 1
    h = rois[:, 3] - rois[:, 1] + 1
    valid = (rois[:, 2] >= rois[:, 0]) & (rois[:, 3] >= rois[:, 1])
    scale = torch.sqrt(torch.where(valid, w * h, torch.zeros_like(w)))
    level = torch.floor(torch.log2(scale / refer_scale + 1e-6) + refer_level)
    return level.clamp(min_level, max_level).long()


def plus_one_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS with the +1 IoU (``normalized=False``): indices kept, by decreasing score."""
    return ops.nms(boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]), scores, iou_threshold)


def static_multiclass_nms(boxes: Tensor, scores: Tensor, *, score_thr: float = 0.05, iou_threshold: float = 0.5,
                          max_num: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """``multiclass_nms3(normalized=False, background_label=0)``: ``boxes [N, C, 4]``, ``scores [N, C]`` with
    the background in column 0 -> (boxes, scores, labels 1..C-1) in Paddle's output order (by class, then by
    proposal index)."""
    shifted = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])  # the +1 IoU of every pair
    kept, kept_scores, labels, _ = paddle_multiclass_nms(shifted[:, 1:], scores[:, 1:], score_thr=score_thr,
                                                         iou_threshold=iou_threshold, max_num=max_num)
    return kept - kept.new_tensor([0.0, 0.0, 1.0, 1.0]), kept_scores, labels + 1


def static_proposals(scores: Tensor, deltas: Tensor, anchors: Tensor, image_size: Sequence[float], *,
                     pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float, min_size: float = 0.0
                     ) -> tuple[Tensor, Tensor]:
    """``generate_proposals(pixel_offset=True)`` for one image and level: ``scores [A, H, W]`` (probabilities),
    ``deltas [4A, H, W]``, ``anchors [H * W * A, 4]`` (``static_anchors``), ``image_size`` (h, w) ->
    (proposals [K, 4], scores [K]). Best ``pre_nms_top_n``, +1 decoding (dw / dh capped), clipped to
    ``[0, w - 1] x [0, h - 1]``, boxes kept with sides >= max(min_size, 1) and the centre inside the image,
    NMS with the +1 IoU, best ``post_nms_top_n``."""
    a = scores.shape[0]
    s = scores.permute(1, 2, 0).reshape(-1)
    d = deltas.reshape(a, 4, *deltas.shape[1:]).permute(2, 3, 0, 1).reshape(-1, 4)
    if 0 < pre_nms_top_n < s.numel():
        s, order = s.topk(pre_nms_top_n)
    else:
        s, order = s.sort(descending=True, stable=True)
    boxes = static_decode(anchors[order], d[order], (1.0, 1.0, 1.0, 1.0), clip_wh=True)
    h, w = float(image_size[0]), float(image_size[1])
    boxes = torch.stack([boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1),
                         boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)], 1)
    ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    size = max(min_size, 1.0)
    keep = (ws >= size) & (hs >= size) & (boxes[:, 0] + ws / 2 <= w) & (boxes[:, 1] + hs / 2 <= h)
    boxes, s = boxes[keep], s[keep]
    keep = plus_one_nms(boxes, s, nms_thresh)[:post_nms_top_n]
    return boxes[keep], s[keep]


__all__ = ["static_anchors", "static_decode", "static_levels", "plus_one_nms", "static_multiclass_nms",
           "static_proposals"]
