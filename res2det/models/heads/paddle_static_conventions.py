"""The inference rules of PaddleDetection's static-graph (Fluid) era, where they differ from its dygraph 2.6
(``paddle_conventions``), for the static-graph Res2Net releases (``../shared/reference/PADDLE_STATIC.md``).

Boxes follow the **+1 pixel** convention of that era: a box ``[x1, y1, x2, y2]`` covers ``x2 - x1 + 1`` pixels,
so widths, centres, areas and IoUs carry a +1 (an IoU of this kind is the usual IoU of boxes with 1 added to
``x2`` and ``y2``). Each function is checked against the Paddle 3.3.1 kernel that implements the rule
(tests/fixtures/paddle_static/make_era_fixtures.py).

Not yet done (issue #15): the heads and the detector that apply these rules end to end (proposal merging over
levels, box post-processing in original pixels) and the zoo rows.
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


def static_scale(height: int, width: int, short: int = 800, long: int = 1333) -> float:
    """The era's ``ResizeImage`` scale: ``short / min(h, w)``, or ``long / max(h, w)`` when that would make the
    long side round above ``long``."""
    scale = short / min(height, width)
    if round(scale * max(height, width)) > long:
        scale = long / max(height, width)
    return scale


def _linear_taps(out_size: int, in_size: int, src_per_dst: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OpenCV's INTER_LINEAR taps along one axis: (first index, second index, weight of first, of second)."""
    f = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * src_per_dst - 0.5).to(torch.float32)
    i0 = torch.floor(f)
    f = f - i0
    i0 = i0.long()
    edge = (i0 < 0) | (i0 >= in_size - 1)  # OpenCV takes the border pixel with weight 1 there
    f = torch.where(edge, torch.zeros_like(f), f)
    i0 = i0.clamp(0, in_size - 1)
    return i0, (i0 + 1).clamp(max=in_size - 1), 1 - f, f


def cv2_resize_linear(image: Tensor, out_size: Sequence[int], src_per_dst: Sequence[float] | None = None
                      ) -> Tensor:
    """``cv2.resize(..., INTER_LINEAR)`` of a float ``[..., H, W]`` tensor to ``out_size`` (h, w): half-pixel
    centres, border pixels repeated, no antialiasing, horizontal then vertical pass in float32.
    ``src_per_dst`` (y, x) is OpenCV's mapping scale: ``1 / fx`` when it was called with ``fx`` / ``fy``,
    else (default) input size / output size."""
    h, w = image.shape[-2:]
    oh, ow = int(out_size[0]), int(out_size[1])
    sy, sx = src_per_dst if src_per_dst is not None else (h / oh, w / ow)
    x0, x1, a0, a1 = _linear_taps(ow, w, sx)
    y0, y1, b0, b1 = _linear_taps(oh, h, sy)
    rows = image[..., x0] * a0 + image[..., x1] * a1
    return rows[..., y0, :] * b0[:, None] + rows[..., y1, :] * b1[:, None]


def static_preprocess(rgb: Tensor, mean: Sequence[float], std: Sequence[float], *, short: int = 800,
                      long: int = 1333) -> tuple[Tensor, float]:
    """The era's pre-processing of an ``[H, W, 3]`` uint8 RGB image: ``/ 255``, normalised with ``mean`` /
    ``std`` (in 0..1 units), **then** resized by ``static_scale`` as ``cv2.resize(fx=scale, fy=scale)``
    does -> (``[3, h, w]`` float32, scale). Padding is the caller's."""
    x = (rgb.to(torch.float32) / 255 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std,
                                                                                              dtype=torch.float32)
    height, width = rgb.shape[:2]
    scale = static_scale(height, width, short, long)
    out = (round(height * scale), round(width * scale))
    return cv2_resize_linear(x.permute(2, 0, 1), out, (1 / scale, 1 / scale)), scale


def static_paste_masks(probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5) -> Tensor:
    """The era's mask pasting: each ``M x M`` probability map padded by one zero pixel on every side, its box
    expanded by ``(M + 2) / M`` about the centre and truncated to int, resized (``cv2_resize_linear``) to the
    expanded box's +1 size, ``> threshold``, placed into an ``H x W`` image -> bool ``[K, H, W]``."""
    m = probs.shape[-1]
    h, w = int(image_size[0]), int(image_size[1])
    out = torch.zeros(probs.shape[0], h, w, dtype=torch.bool)
    scale = (m + 2.0) / m
    b = boxes.to(torch.float64)
    half_w, half_h = (b[:, 2] - b[:, 0]) * 0.5 * scale, (b[:, 3] - b[:, 1]) * 0.5 * scale
    cx, cy = (b[:, 2] + b[:, 0]) * 0.5, (b[:, 3] + b[:, 1]) * 0.5
    expanded = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).trunc().long().tolist()
    padded = torch.nn.functional.pad(probs.to(torch.float32), (1, 1, 1, 1))
    for k, (x0, y0, x1, y1) in enumerate(expanded):
        mask = cv2_resize_linear(padded[k], (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))) > threshold
        cx0, cx1 = min(max(x0, 0), w), min(max(x1 + 1, 0), w)
        cy0, cy1 = min(max(y0, 0), h), min(max(y1 + 1, 0), h)
        out[k, cy0:cy1, cx0:cx1] = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


__all__ = ["static_anchors", "static_decode", "static_levels", "plus_one_nms", "static_multiclass_nms",
           "static_proposals", "static_scale", "cv2_resize_linear", "static_preprocess", "static_paste_masks"]
