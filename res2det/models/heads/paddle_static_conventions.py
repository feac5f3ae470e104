"""The inference rules of PaddleDetection's static-graph (Fluid) era, where they differ from its dygraph 2.6
(``paddle_conventions``), for the static-graph Res2Net releases (``../shared/reference/PADDLE_STATIC.md``).

Boxes follow the **+1 pixel** convention of that era: a box ``[x1, y1, x2, y2]`` covers ``x2 - x1 + 1`` pixels,
so widths, centres, areas and IoUs carry a +1 (``plus_one_iou``: the usual IoU of boxes with 1 added to ``x2``
and ``y2``, except that an inverted box has area 0, as Paddle computes it). Each function is checked against
the Paddle 3.3.1 kernel that implements the rule (tests/fixtures/paddle_static/make_era_fixtures.py) or, for
OpenCV's part, against OpenCV (make_cv2_fixtures.py).

The heads (``StaticRPNHead``, ``StaticRoIHead`` with ``StaticBBoxHead``) apply them in a detector built with
``DetectorConfig(conventions='paddle_static')``; the pre-processing is ``images.detection_input`` with
``Preprocess(pipeline='paddle_static')``. Inference only: training raises ``NotImplementedError``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...images import resize_linear_float
from ...structures import InstanceMasks
from .bbox_head import Shared2FCBBoxHead
from .paddle_conventions import BBOX_CLIP, paddle_multiclass_nms
from .roi_head import StandardRoIHead
from .rpn_head import ProposalConfig, RPNHead


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


def plus_one_iou(a: Tensor, b: Tensor) -> Tensor:
    """Paddle's ``JaccardOverlap`` with the +1 pixel offset, ``[N, M]``: 0 for disjoint boxes, an inverted box
    has area 0 (so the IoU can come out negative, or NaN: neither is "<= threshold" below)."""
    def area(x: Tensor) -> Tensor:
        inverted = (x[:, 2] < x[:, 0]) | (x[:, 3] < x[:, 1])
        return torch.where(inverted, torch.zeros_like(x[:, 0]), (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1))

    disjoint = ((b[None, :, 0] > a[:, None, 2]) | (b[None, :, 2] < a[:, None, 0])
                | (b[None, :, 1] > a[:, None, 3]) | (b[None, :, 3] < a[:, None, 1]))
    iw = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = iw * ih
    iou = inter / (area(a)[:, None] + area(b)[None, :] - inter)
    return torch.where(disjoint, torch.zeros_like(iou), iou)


def plus_one_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Paddle's greedy NMS with ``plus_one_iou`` (``normalized=False`` / ``pixel_offset``): by decreasing score
    (stable), a box is kept while its overlap with every kept box is ``<= iou_threshold``. Kept indices."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep_ok = plus_one_iou(boxes[order], boxes[order]) <= iou_threshold
    suppressed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    kept = []
    for i in range(order.numel()):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= ~keep_ok[i]
    return order[kept]


def static_multiclass_nms(boxes: Tensor, scores: Tensor, *, score_thr: float = 0.05, iou_threshold: float = 0.5,
                          max_num: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """``multiclass_nms3(normalized=False, background_label=0)``: ``boxes [N, C, 4]``, ``scores [N, C]`` with
    the background in column 0 -> (boxes, scores, labels 1..C-1): per class ``plus_one_nms`` of the boxes
    scoring ``> score_thr``, the best ``max_num`` overall, in Paddle's output order (by class, then by
    proposal index)."""
    kept, kept_scores, labels, _ = paddle_multiclass_nms(boxes[:, 1:], scores[:, 1:], score_thr=score_thr,
                                                         iou_threshold=iou_threshold, max_num=max_num,
                                                         nms=plus_one_nms)
    return kept, kept_scores, labels + 1


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


def static_paste_masks(probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5
                       ) -> InstanceMasks:
    """The era's mask pasting: each ``M x M`` probability map padded by one zero pixel on every side, its box
    expanded by ``(M + 2) / M`` about the centre and truncated to int, resized (``resize_linear_float``, as
    ``cv2.resize``) to the expanded box's +1 size, ``> threshold``, placed into an ``H x W`` image (clipped at
    its borders): one crop per detection."""
    m = probs.shape[-1]
    h, w = int(image_size[0]), int(image_size[1])
    scale = (m + 2.0) / m
    b = boxes.to(torch.float64).cpu()
    half_w, half_h = (b[:, 2] - b[:, 0]) * 0.5 * scale, (b[:, 3] - b[:, 1]) * 0.5 * scale
    cx, cy = (b[:, 2] + b[:, 0]) * 0.5, (b[:, 3] + b[:, 1]) * 0.5
    expanded = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).trunc().long().tolist()
    padded = F.pad(probs.to(torch.float32).cpu(), (1, 1, 1, 1))
    crops, origins = [], []
    for k, (x0, y0, x1, y1) in enumerate(expanded):
        mask = resize_linear_float(padded[k], (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))) > threshold
        cx0, cx1 = min(max(x0, 0), w), min(max(x1 + 1, 0), w)
        cy0, cy1 = min(max(y0, 0), h), min(max(y1 + 1, 0), h)
        crops.append(mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] if cx1 > cx0 and cy1 > cy0
                     else torch.zeros(0, 0, dtype=torch.bool))
        origins.append((cx0, cy0))
    return InstanceMasks(crops, origins, h, w)


class StaticRPNHead(RPNHead):
    """The RPN layers (shared by all levels) with the era's proposals: per level ``static_anchors`` (size
    ``stride * scale``), ``static_proposals`` clipped to the image padded to a multiple of 32; then the best
    ``max_per_img`` over all levels by score (``collect_fpn_proposals``). Training is not implemented."""

    @torch.no_grad()
    def predict_proposals(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                          image_sizes: Sequence[tuple[int, int]], cfg: ProposalConfig | None = None
                          ) -> list[tuple[Tensor, Tensor]]:
        cfg = cfg or self.test_cfg
        gen = self.anchor_generator
        anchors = [static_anchors(c.shape[-2:], stride, stride * gen.scales[0], gen.ratios).to(c.device)
                   for c, stride in zip(cls_scores, gen.strides)]
        results = []
        for b, (h, w) in enumerate(image_sizes):
            padded = (-(-h // 32) * 32, -(-w // 32) * 32)  # im_info holds the padded size
            level = [static_proposals(cls[b].sigmoid(), reg[b], anc, padded, pre_nms_top_n=cfg.nms_pre,
                                      post_nms_top_n=cfg.max_per_img, nms_thresh=cfg.iou_threshold,
                                      min_size=cfg.min_bbox_size)
                     for cls, reg, anc in zip(cls_scores, bbox_preds, anchors)]
            boxes, scores = torch.cat([p[0] for p in level]), torch.cat([p[1] for p in level])
            scores, order = scores.sort(descending=True, stable=True)
            results.append((boxes[order[:cfg.max_per_img]], scores[:cfg.max_per_img]))
        return results

    def loss(self, *args, **kwargs):
        raise NotImplementedError("training with PaddleDetection's static-graph rules is not implemented")


class StaticBBoxHead(Shared2FCBBoxHead):
    """The two-fc box head with the era's post-processing, in the original image's pixels: softmax over the
    classes, proposals divided by the resize scale, ``static_decode`` (no dw / dh cap), boxes clipped to
    ``[0, W - 1] x [0, H - 1]``, ``static_multiclass_nms``; returned times the scale (input pixels)."""

    def predict(self, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, image_size: tuple[int, int], *,
                score_thr: float, iou_threshold: float, max_per_img: int,
                meta: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        scale = float(meta["scale_factor"][0]) if meta else 1.0
        orig_h, orig_w = (int(v) for v in (meta["orig_size"] if meta else image_size))
        probs = F.softmax(cls_score, dim=-1)
        probs = torch.cat([probs[:, -1:], probs[:, :-1]], 1)  # the era's layout: background first
        deltas = bbox_pred.reshape(bbox_pred.shape[0], -1, 4)
        boxes = static_decode(rois[:, 1:] / scale, deltas, self.bbox_coder.stds)
        limit = boxes.new_tensor([orig_w - 1, orig_h - 1, orig_w - 1, orig_h - 1])
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        boxes = torch.cat([boxes.new_zeros(boxes.shape[0], 1, 4), boxes], 1)  # background's column, unused
        boxes, scores, labels = static_multiclass_nms(boxes, probs, score_thr=score_thr, iou_threshold=iou_threshold,
                                                      max_num=max_per_img)
        return boxes * scale, scores, labels - 1


class StaticRoIHead(StandardRoIHead):
    """``StandardRoIHead`` with the era's rules: rois to levels by ``distribute_fpn_proposals(pixel_offset)``,
    RoIAlign unaligned with 2 x 2 samples per bin, ``StaticBBoxHead`` post-processing (needs each image's
    ``image_metas``: resize scale and original size), masks pasted by ``static_paste_masks``."""

    level_mapping = "paddle_static"
    roi_align_aligned = False
    roi_align_sampling_ratio = 2
    mask_paste = "paddle_static"

    def _detect_boxes(self, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, image_size: tuple[int, int],
                      meta: Mapping[str, Any] | None) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.test_cfg
        return self.bbox_head.predict(rois, cls_score, bbox_pred, image_size, score_thr=cfg.score_thr,
                                      iou_threshold=cfg.iou_threshold, max_per_img=cfg.max_per_img, meta=meta)

    def loss(self, *args, **kwargs):
        raise NotImplementedError("training with PaddleDetection's static-graph rules is not implemented")


__all__ = ["static_anchors", "static_decode", "plus_one_iou", "plus_one_nms", "static_multiclass_nms",
           "static_proposals", "static_paste_masks", "StaticRPNHead", "StaticBBoxHead", "StaticRoIHead"]
