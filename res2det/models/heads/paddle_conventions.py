"""PaddleDetection's test-time conventions for Faster / Mask R-CNN (v2.6.0), where they differ from mmdetection.

The layers are the same as mmdetection's (RPN conv + 1x1 predictors, two FC box head, four-conv mask head);
what differs is how their outputs are turned into boxes:

* anchors: computed in float64 (``w = sqrt(size^2 / r)``, ``h = r * w``) then rounded to float32, offset 0;
* proposals (``generate_proposals``): ranked by the raw objectness **logit** (no sigmoid), dw/dh clipped only
  from above at log(1000/16), boxes clipped to ``[0, W] x [0, H]``, boxes with a side **< 1 px** dropped even
  with ``min_size`` 0, NMS per level, then the best ``post_nms_top_n`` over all levels;
* RoIs go to FPN levels by ``distribute_fpn_proposals`` (``floor(4 + log2(sqrt(wh) / 224))``, P2..P5);
* box decoding (``RCNNBox`` / ``delta2bbox``): deltas **divided** by the weights (10, 10, 5, 5), dw/dh clipped
  only from above, boxes clipped to the image;
* ``MultiClassNMS``: per-class NMS of the (box, class) pairs scoring ``> score_threshold``, the best
  ``keep_top_k`` overall, returned grouped by class (ascending) and, within a class, by proposal index.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import ops
from .anchors import AnchorGenerator
from .bbox_head import Shared2FCBBoxHead
from .box_coder import clip_boxes
from .roi_head import StandardRoIHead
from .rpn_head import ProposalConfig, RPNHead

BBOX_CLIP = math.log(1000.0 / 16)  # Paddle's kBBoxClipDefault / delta2bbox clip_scale
MIN_PROPOSAL_SIZE = 1.0  # generate_proposals raises min_size to at least 1 px


class PaddleAnchorGenerator(AnchorGenerator):
    """Paddle's ``AnchorGenerator`` (offset 0): per location, for each size and each ratio ``r = h / w``,
    ``w = sqrt(size^2 / r)`` and ``h = r * w`` in float64, rounded to float32 once (not mmdet's float32 op order).
    The sizes are ``stride * scale``."""

    def _base_anchors(self, base_size: int) -> Tensor:
        rows = []
        for scale in self.scales:
            area = (base_size * scale) ** 2.0
            for r in self.ratios:
                w = math.sqrt(area / r)
                h = r * w
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        # Paddle orders size-major (ratio-minor) within a location; with one size this equals mmdet's order.
        return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


def paddle_delta2bbox(boxes: Tensor, deltas: Tensor, weights: Sequence[float]) -> Tensor:
    """``ppdet.modeling.bbox_utils.delta2bbox``: ``boxes [N, 4]``, ``deltas [N, 4k]`` -> ``[N, k, 4]``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = (float(w) for w in weights)
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=BBOX_CLIP)
    dh = (deltas[:, 3::4] / wh).clamp(max=BBOX_CLIP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)


class PaddleRPNHead(RPNHead):
    """mmdet's ``RPNHead`` layers with Paddle's proposal generation (see the module docstring).

    ``predict_proposals`` returns per image ``(boxes, sigmoid(logit), logit)``: the sigmoid is only for
    reporting (it saturates in float32, the ranking uses the logit)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if tuple(self.bbox_coder.stds) != (1.0, 1.0, 1.0, 1.0) or any(self.bbox_coder.means):
            raise ValueError("Paddle's RPN decodes with unit variances and zero means")

    @torch.no_grad()
    def predict_proposals(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                          image_sizes: Sequence[tuple[int, int]], cfg: ProposalConfig | None = None
                          ) -> list[tuple[Tensor, Tensor, Tensor]]:
        cfg = cfg or self.test_cfg
        anchors = self.anchor_generator.grid_anchors([c.shape[-2:] for c in cls_scores], cls_scores[0].device)
        results = []
        for b, (h, w) in enumerate(image_sizes):
            level_boxes, level_logits = [], []
            for cls, reg, anc in zip(cls_scores, bbox_preds, anchors):
                logits = cls[b].permute(1, 2, 0).reshape(-1)
                deltas = reg[b].permute(1, 2, 0).reshape(-1, 4)
                if 0 < cfg.nms_pre < logits.shape[0]:
                    logits, order = logits.sort(descending=True, stable=True)
                    logits, order = logits[:cfg.nms_pre], order[:cfg.nms_pre]
                    deltas, anc = deltas[order], anc[order]
                boxes = clip_boxes(paddle_delta2bbox(anc, deltas, (1.0, 1.0, 1.0, 1.0))[:, 0], (h, w))
                min_size = max(cfg.min_bbox_size, MIN_PROPOSAL_SIZE)
                keep = torch.nonzero((boxes[:, 2] - boxes[:, 0] >= min_size)
                                     & (boxes[:, 3] - boxes[:, 1] >= min_size)).flatten()
                boxes, logits = boxes[keep], logits[keep]
                keep = ops.nms(boxes, logits, cfg.iou_threshold)[:cfg.max_per_img]
                level_boxes.append(boxes[keep])
                level_logits.append(logits[keep])
            boxes, logits = torch.cat(level_boxes), torch.cat(level_logits)
            if boxes.shape[0] > cfg.max_per_img:  # the best over all levels; else all of them, in level order
                logits, order = logits.topk(cfg.max_per_img)
                boxes = boxes[order]
            results.append((boxes, logits.sigmoid(), logits))
        return results


def paddle_multiclass_nms(boxes: Tensor, scores: Tensor, *, score_thr: float, iou_threshold: float,
                          max_num: int, nms: Callable[[Tensor, Tensor, float], Tensor] = ops.nms
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Paddle's ``multiclass_nms3`` (``nms_top_k`` -1): ``boxes [N, C, 4]``, ``scores [N, C]`` (no background
    column) -> (boxes, scores, labels, proposal index), grouped by class, then by index. ``nms`` is the per-class
    rule: the usual IoU (normalized boxes) by default, ``plus_one_nms`` for ``normalized=False``."""
    n, num_classes = scores.shape
    rows, labels = torch.nonzero(scores > score_thr, as_tuple=True)
    cand_boxes, cand_scores = boxes[rows, labels], scores[rows, labels]
    kept = [inds[nms(cand_boxes[inds], cand_scores[inds], iou_threshold)]
            for inds in (torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist())]
    keep = torch.cat(kept) if kept else labels.new_zeros(0)
    if 0 < max_num < keep.numel():  # the best keep_top_k over all classes
        keep = keep[cand_scores[keep].sort(descending=True, stable=True).indices[:max_num]]
    # Paddle's output order: by class, and within a class by proposal index.
    order = torch.argsort(labels[keep] * max(n, 1) + rows[keep], stable=True)
    keep = keep[order]
    return cand_boxes[keep], cand_scores[keep], labels[keep], rows[keep]


class PaddleBBoxHead(Shared2FCBBoxHead):
    """``TwoFCHead`` (fc6, fc7) + ``bbox_score`` / ``bbox_delta`` (= mmdet's ``Shared2FCBBoxHead``) with Paddle's
    ``RCNNBox`` decoding and ``MultiClassNMS``."""

    def predict(self, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, image_size: tuple[int, int], *,
                score_thr: float, iou_threshold: float, max_per_img: int) -> tuple[Tensor, Tensor, Tensor]:
        probs = F.softmax(cls_score, dim=-1)[:, :-1]  # background is the last column
        weights = [1.0 / s for s in self.bbox_coder.stds]  # stds (.1, .1, .2, .2) = Paddle's (10, 10, 5, 5)
        boxes = clip_boxes(paddle_delta2bbox(rois[:, 1:], bbox_pred, weights), image_size)
        boxes, scores, labels, _ = paddle_multiclass_nms(boxes, probs, score_thr=score_thr,
                                                        iou_threshold=iou_threshold, max_num=max_per_img)
        # BBoxPostProcess.get_pred marks boxes without area with label -1 (a fixed-shape artefact); drop them.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return boxes, scores, labels


class PaddleRoIHead(StandardRoIHead):
    """``StandardRoIHead`` with RoIs pooled from the FPN level Paddle's ``distribute_fpn_proposals`` picks
    (RoIAlign aligned=True, adaptive sampling, as the v2.6.0 configs). ``predict`` pastes masks from the
    clipped boxes (``mask_paste = 'paddle'``), as Paddle's ``MaskPostProcess`` does at the original size."""

    mask_paste = "paddle"
    level_mapping = "paddle"


__all__ = ["PaddleAnchorGenerator", "PaddleRPNHead", "PaddleBBoxHead", "PaddleRoIHead", "paddle_delta2bbox",
           "paddle_multiclass_nms"]
