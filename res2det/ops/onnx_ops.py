"""What the detection code takes instead of its eager kernels while ``torch.onnx.export`` traces it.

``exporting()`` is the switch the heads read (as torchvision's detection heads do): the rule stays written
once, and only the kernel under it changes. Two PyTorch custom ops run eagerly with res2det's own kernels
and are written into the ONNX graph as the standard operators with the same semantics:

* ``res2det_onnx::nms`` -> ``NonMaxSuppression`` (opset 11+): per batch item and class, the boxes scoring
  ``> score_threshold`` are visited by decreasing score and a box is dropped when its IoU with a kept box is
  ``> iou_threshold``; at most ``max_per_class`` are kept. Output ``[K, 3]`` rows ``(batch, class, box)``, per
  (batch, class) in the order kept. ONNX Runtime pops equal scores in heap order, so callers pass distinct
  scores (ranks); boxes are ``(x1, y1, x2, y2)`` (the op accepts any diagonal corner pair and IoU is symmetric
  in x and y, so ONNX's ``(y1, x1, y2, x2)`` order computes the same bits).
* ``res2det_onnx::roi_align`` -> ``RoiAlign`` (opset 16+, ``coordinate_transformation_mode='half_pixel'``,
  ``mode='avg'``): mmcv / torchvision ``roi_align(..., aligned=True)``, ``sampling_ratio=0`` meaning
  ``ceil(roi_size / output_size)`` samples per bin and axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .nms import nms as _nms
from .roi_align import roi_align as _roi_align

OPSET = 17  # the ONNX opset of the exported graphs (RoiAlign's half_pixel mode needs >= 16)


@torch.library.custom_op("res2det_onnx::nms", mutates_args=())
def nms(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float, score_threshold: float) -> Tensor:
    """``boxes [B, N, 4]``, ``scores [B, C, N]`` -> selected ``[K, 3]`` int64 (batch, class, box index)."""
    rows = []
    for b in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            cand = torch.nonzero(scores[b, c] > score_threshold).flatten()
            keep = cand[_nms(boxes[b, cand], scores[b, c, cand], iou_threshold)][:max_per_class]
            rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], dim=1))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.long, device=boxes.device)
    return torch.cat(rows)


@nms.register_fake
def _nms_fake(boxes, scores, max_per_class, iou_threshold, score_threshold):
    return boxes.new_empty(torch.library.get_ctx().new_dynamic_size(), 3, dtype=torch.long)


@torch.library.custom_op("res2det_onnx::roi_align", mutates_args=())
def roi_align(features: Tensor, rois: Tensor, batch_indices: Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int) -> Tensor:
    """``features [B, C, H, W]``, ``rois [K, 4]`` (x1, y1, x2, y2), ``batch_indices [K]`` -> ``[K, C, s, s]``."""
    boxes = torch.cat([batch_indices.to(rois.dtype)[:, None], rois], dim=1)
    return _roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, True).contiguous()


@roi_align.register_fake
def _roi_align_fake(features, rois, batch_indices, output_size, spatial_scale, sampling_ratio):
    return features.new_empty(rois.shape[0], features.shape[1], output_size, output_size)


def _symbolic_nms(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
    from torch.onnx import symbolic_helper as sh

    def const(value, dtype):
        return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))

    return g.op("NonMaxSuppression", boxes, scores, const(sh._parse_arg(max_per_class, "i"), torch.long),
                const(sh._parse_arg(iou_threshold, "f"), torch.float32),
                const(sh._parse_arg(score_threshold, "f"), torch.float32))


def _symbolic_roi_align(g, features, rois, batch_indices, output_size, spatial_scale, sampling_ratio):
    from torch.onnx import symbolic_helper as sh

    size = sh._parse_arg(output_size, "i")
    return g.op("RoiAlign", features, rois, batch_indices, coordinate_transformation_mode_s="half_pixel",
                mode_s="avg", output_height_i=size, output_width_i=size,
                sampling_ratio_i=sh._parse_arg(sampling_ratio, "i"),
                spatial_scale_f=sh._parse_arg(spatial_scale, "f"))


_registered = False


def register_symbolics() -> None:
    """Teach the TorchScript-based exporter to write the two ops (idempotent)."""
    global _registered
    if not _registered:
        torch.onnx.register_custom_op_symbolic("res2det_onnx::nms", _symbolic_nms, OPSET)
        torch.onnx.register_custom_op_symbolic("res2det_onnx::roi_align", _symbolic_roi_align, OPSET)
        _registered = True


def exporting() -> bool:
    """True while ``torch.onnx.export`` traces: the heads then take the traceable variant of a step."""
    return torch.onnx.is_in_onnx_export()


def sort_descending(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sort by decreasing value, equal values in index order. ONNX's TopK (what ``sort`` exports to) keeps
    that order; the TorchScript exporter cannot write ``stable=True`` itself."""
    if exporting():
        return x.sort(descending=True)
    return x.sort(descending=True, stable=True)


def ranks(scores: Tensor) -> Tensor:
    """Distinct float scores with the order of ``scores`` (equal ones in index order): ``N`` for the best.
    ONNX Runtime's NonMaxSuppression pops equal scores in heap order, so it is given these instead."""
    order = sort_descending(scores)[1]
    n = scores.shape[0]
    return torch.zeros_like(scores).scatter(0, order, torch.arange(n, 0, -1, device=scores.device).to(scores.dtype))


def batched_nms_graph(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_num: int,
                      split_thr: int) -> Tensor:
    """``models.heads.post_processing.batched_nms`` (mmcv's rule) with ONNX's NonMaxSuppression: below
    ``split_thr`` boxes group ``g`` is shifted by ``g * (max - min(min, 0) + 1)`` (mmcv's offset trick, so the
    IoUs are the same floats), above it the raw boxes are suppressed group by group. The number of boxes
    varies per image, so the choice is a tensor ``where``, not a Python branch. Returns the kept indices by
    decreasing score, at most ``max_num`` (all for ``max_num <= 0``)."""
    big = torch.finfo(boxes.dtype).max
    flat = boxes.reshape(-1)
    # (the +-big entries change nothing but keep the reductions defined when there is no box)
    span = F.pad(flat, (0, 1), value=-big).max() - F.pad(flat, (0, 1), value=big).min().clamp(max=0) + 1
    count = torch.ones_like(scores).sum()
    span = torch.where(count < split_thr, span, torch.zeros_like(span))
    shifted = boxes + (idxs.to(boxes.dtype) * span)[:, None]
    r = ranks(scores)
    groups = torch.arange(F.pad(idxs, (0, 1)).max() + 1, device=idxs.device)
    group_ranks = torch.where(idxs[None] == groups[:, None], r[None], torch.zeros_like(r)[None])
    limit = max_num if max_num > 0 else 2 ** 31 - 1
    keep = nms(shifted[None], group_ranks[None], limit, iou_threshold, 0.0)[:, 2]
    order = sort_descending(r[keep])[1]
    return keep[order[:max_num] if max_num > 0 else order]
