"""The whole test-time pipeline of a two-stage / cascade detector as one traceable module, for ONNX export.

``DetectionGraph(model)`` runs ``model``'s own layers (backbone, FPN, RPN convs, box / mask / semantic heads)
and re-states its post-processing with tensor operations only, so that one trace gives one ONNX graph with
NMS and mask pasting inside:

* RPN proposals: per level the ``nms_pre`` best anchors (sigmoid objectness), decoding, clipping to the image,
  the ``min_bbox_size`` filter, NMS per level, the ``max_per_img`` best;
* R-CNN: multi-level RoIAlign, the box head (cascade: every stage, refined rois, averaged class logits, HTC:
  semantic fusion), per-class NMS over the (box, class) pairs above ``score_thr``, the ``max_per_img`` best;
* masks: the mask head(s) on the detections (cascade: the stage average of the sigmoids, HTC: the last stage
  after the information flow), pasted at the ORIGINAL image size from the rescaled boxes as
  ``TwoStageDetector.predict`` does (mmdet's ``_do_paste_mask``: bilinear, zero padding, ``>= mask_thr``).

NMS follows ``res2det.models.heads.post_processing.batched_nms`` (and so mmcv) exactly: the same coordinate
offsets per class / level below ``SPLIT_THR`` candidates (the IoUs are the same floats), per-class NMS on the raw
boxes above it, greedy by decreasing score with equal scores taken in index order, ``IoU > threshold``
suppresses. Scores are handed to ONNX's ``NonMaxSuppression`` as distinct ranks because ONNX Runtime pops equal
scores in heap order. Exactly equal scores (anchors over large uniform areas, e.g. an all-black image) are
taken in index order, where the PyTorch RPN's unstable sort may take them in another; on photos there are none.

Pasting at the original size holds a ``[K, height, width]`` float map in the graph (100 detections on a
1333x800 photo: about 430 MB).

Inputs (batch of one): ``image [1, 3, H, W]`` normalised and zero-padded, ``image_size [2]`` int64 = the
unpadded ``(h, w)`` inside it, ``orig_size [2]`` int64 = the original image's ``(height, width)`` and
``scale_factor [2]`` float32 = ``(w / width, h / height)``. Outputs: ``boxes [K, 4]`` (x1, y1, x2, y2 in
original pixels, clipped), ``scores [K]``, ``labels [K]`` int64, and for mask models ``masks [K, height,
width]`` bool; K <= ``max_per_img``, by decreasing score.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Res2DetError
from ..models.detectors.two_stage import TwoStageDetector
from ..models.heads.cascade_roi_head import CascadeRoIHead
from ..models.heads.htc_roi_head import HybridTaskCascadeRoIHead
from ..models.heads.paddle_conventions import PaddleRPNHead
from ..models.heads.post_processing import SPLIT_THR
from ..models.heads.roi_head import StandardRoIHead
from ..ops import MultiLevelRoIAlign
from . import onnx_ops

INPUT_NAMES = ("image", "image_size", "orig_size", "scale_factor")


def check_exportable(model: nn.Module) -> None:
    """A clear error for the models the graph does not cover (one line, names what is missing)."""
    if not isinstance(model, TwoStageDetector):
        raise Res2DetError(f"ONNX export covers the two-stage and cascade detectors, not {type(model).__name__}")
    head = model.roi_head
    if isinstance(model.rpn_head, PaddleRPNHead) or getattr(head, "paste_clipped_boxes", False):
        raise Res2DetError("ONNX export of PaddleDetection-convention detectors is not implemented (their "
                           "proposal ranking, decoding and class-grouped NMS differ); export an mmdetection row")
    if not isinstance(head, (StandardRoIHead, CascadeRoIHead)):
        raise Res2DetError(f"ONNX export does not know the RoI head {type(head).__name__}")


class DetectionGraph(nn.Module):
    """``model``'s inference, batch of one, in traceable form (see the module docstring)."""

    def __init__(self, model: TwoStageDetector):
        super().__init__()
        check_exportable(model)
        self.model = model
        self.with_mask = bool(model.roi_head.with_mask)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("boxes", "scores", "labels") + (("masks",) if self.with_mask else ())

    def forward(self, image: Tensor, image_size: Tensor, orig_size: Tensor, scale_factor: Tensor
                ) -> tuple[Tensor, ...]:
        model = self.model
        hw = image_size.to(torch.float32)  # clip bounds (h, w), as the float(int) clamps of the PyTorch code
        _, pyramid = model.extract_feat(image)
        cls_scores, bbox_preds = model.rpn_head(pyramid)
        proposals = self._proposals(cls_scores, bbox_preds, hw)
        head = model.roi_head
        if isinstance(head, CascadeRoIHead):
            boxes, scores, labels, probs = self._cascade(pyramid, proposals, hw)
        else:
            boxes, scores, labels, probs = self._standard(pyramid, proposals, hw)
        # TwoStageDetector.postprocess: boxes to original pixels; masks pasted from the unclipped boxes (mmdet)
        scale = torch.stack([scale_factor[0], scale_factor[1], scale_factor[0], scale_factor[1]]).to(torch.float32)
        boxes = boxes / scale
        size = orig_size.to(torch.float32)
        outputs = [_clip(boxes, size), scores, labels]
        if self.with_mask:
            outputs.append(paste_masks(probs, boxes, orig_size, head.test_cfg.mask_thr_binary))
        return tuple(outputs)

    # ------------------------------------------------------------------------------------------------ RPN
    def _proposals(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor], hw: Tensor) -> Tensor:
        """``RPNHead.predict_proposals`` for image 0 -> proposal boxes ``[P, 4]`` by decreasing score."""
        rpn = self.model.rpn_head
        cfg = rpn.test_cfg
        anchors = rpn.anchor_generator.grid_anchors([c.shape[-2:] for c in cls_scores], cls_scores[0].device)
        scores, deltas, priors, levels = [], [], [], []
        for lvl, (cls, reg, anc) in enumerate(zip(cls_scores, bbox_preds, anchors)):
            s = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
            d = reg[0].permute(1, 2, 0).reshape(-1, 4)
            if cfg.nms_pre > 0:
                # a slice past the end is the whole level, so this holds for any input size
                s, order = _sort_descending(s)
                s, order = s[:cfg.nms_pre], order[:cfg.nms_pre]
                d, anc = d[order], anc[order]
            scores.append(s)
            deltas.append(d)
            priors.append(anc)
            levels.append(torch.full_like(s, lvl, dtype=torch.long))
        boxes = _clip(rpn.bbox_coder.decode(torch.cat(priors), torch.cat(deltas)), hw)
        scores, levels = torch.cat(scores), torch.cat(levels)
        if cfg.min_bbox_size >= 0:
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            valid = torch.nonzero((w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)).flatten()
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        groups = torch.arange(len(cls_scores), device=levels.device)
        ranks = _ranks(scores)
        group_ranks = torch.where(levels[None, :] == groups[:, None], ranks[None, :], torch.zeros_like(ranks)[None])
        _, keep = _grouped_nms(boxes[None].expand(len(cls_scores), -1, -1), group_ranks, boxes,
                               cfg.iou_threshold, cfg.max_per_img)
        return boxes[keep]

    # ----------------------------------------------------------------------------------------- R-CNN heads
    def _standard(self, feats, proposals: Tensor, hw: Tensor):
        head: StandardRoIHead = self.model.roi_head
        cls_score, bbox_pred = head.bbox_head(roi_extract(head.bbox_roi_extractor, feats, proposals))
        boxes = _clip(head.bbox_head.bbox_coder.decode(proposals, bbox_pred), hw)
        boxes, scores, labels = self._multiclass_nms(boxes, F.softmax(cls_score, dim=-1),
                                                     head.bbox_head.reg_class_agnostic)
        probs = None
        if self.with_mask:
            mask_pred = head.mask_head(roi_extract(head.mask_roi_extractor, feats, boxes))
            probs = _select_class(mask_pred, labels).sigmoid()
        return boxes, scores, labels, probs

    def _cascade(self, feats, proposals: Tensor, hw: Tensor):
        head: CascadeRoIHead = self.model.roi_head
        htc = isinstance(head, HybridTaskCascadeRoIHead)
        semantic = head.semantic_head(feats)[1] if htc and head.with_semantic else None
        rois, scores_sum = proposals, None
        for stage in range(head.num_stages):
            x = self._fuse(roi_extract(head.bbox_roi_extractor, feats, rois), rois, semantic,
                           head.bbox_roi_extractor.output_size)
            cls_score, bbox_pred = head.bbox_head[stage](x)
            scores_sum = cls_score if scores_sum is None else scores_sum + cls_score
            if stage < head.num_stages - 1:  # CascadeRoIHead._refine_test_rois
                stage_head = head.bbox_head[stage]
                deltas = bbox_pred
                if not stage_head.reg_class_agnostic:
                    deltas = _select_class(bbox_pred.view(bbox_pred.shape[0], -1, 4), cls_score[:, :-1].argmax(dim=1))
                rois = _clip(stage_head.bbox_coder.decode(rois, deltas), hw)
        cls_score = scores_sum / float(head.num_stages)
        last_head = head.bbox_head[-1]
        deltas = bbox_pred
        if not last_head.reg_class_agnostic:  # (mmdet's cascades are class-agnostic)
            deltas = bbox_pred.view(bbox_pred.shape[0], -1)
        boxes = _clip(last_head.bbox_coder.decode(rois, deltas), hw)
        boxes, scores, labels = self._multiclass_nms(boxes, F.softmax(cls_score, dim=-1),
                                                     last_head.reg_class_agnostic)
        probs = None
        if self.with_mask:
            x = roi_extract(head.mask_roi_extractor, feats, boxes)
            if htc:  # HybridTaskCascadeRoIHead._mask_probs: the heads chained on the same fused features
                x = self._fuse(x, boxes, semantic, head.mask_roi_extractor.output_size)
                last = None
                for stage in range(head.num_stages):
                    if head.mask_info_flow:
                        pred, last = head.mask_head[stage](x, last)
                    else:
                        pred, last = head.mask_head[stage](x)
                merged = pred.sigmoid()
            else:  # the mean of the stages' sigmoids
                merged = torch.stack([m(x).sigmoid() for m in head.mask_head]).mean(dim=0)
            probs = _select_class(merged, labels)
        return boxes, scores, labels, probs

    def _fuse(self, roi_feats: Tensor, rois: Tensor, semantic: Tensor | None, out: int) -> Tensor:
        """HTC's semantic feature fusion (``HybridTaskCascadeRoIHead._fuse``) into RoI features of size ``out``."""
        if semantic is None:
            return roi_feats
        extractor = self.model.roi_head.semantic_roi_extractor
        sem = roi_extract(extractor, [semantic], rois)
        size = extractor.output_size
        if size != out:
            # adaptive average pooling between sizes that divide is plain average pooling (which exports)
            if size % out:
                raise Res2DetError(f"ONNX export: semantic RoI size {size} is not a multiple of {out}")
            sem = F.avg_pool2d(sem, size // out)
        return roi_feats + sem

    def _multiclass_nms(self, boxes: Tensor, scores: Tensor, class_agnostic: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``multiclass_nms``: ``boxes [N, 4C]`` (``[N, 4]`` if ``class_agnostic``), ``scores [N, C+1]``."""
        cfg = self.model.roi_head.test_cfg
        n, num_classes = scores.shape[0], scores.shape[1] - 1
        if class_agnostic:
            class_boxes = boxes[None].expand(num_classes, n, 4)
        else:
            class_boxes = boxes.view(n, num_classes, 4).transpose(0, 1)
        cls_scores = scores[:, :-1]
        candidate = cls_scores > cfg.score_thr
        # ranks over the (row, class) pairs in row-major order: the order multiclass_nms lists its candidates in
        ranks = _ranks(cls_scores.reshape(-1)).view(n, num_classes)
        group_ranks = torch.where(candidate, ranks, torch.zeros_like(ranks)).transpose(0, 1)
        cand = torch.nonzero(candidate)
        cand_boxes = class_boxes[cand[:, 1], cand[:, 0]]
        label, row = _grouped_nms(class_boxes, group_ranks, cand_boxes, cfg.iou_threshold, cfg.max_per_img)
        return class_boxes[label, row], cls_scores[row, label], label


# ------------------------------------------------------------------------------------------------- helpers
def _sort_descending(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sort by decreasing value, equal values in index order. ONNX's TopK (what ``sort`` exports to) keeps
    that order; the TorchScript exporter cannot write ``stable=True`` itself."""
    if torch.onnx.is_in_onnx_export():
        return x.sort(descending=True)
    return x.sort(descending=True, stable=True)


def _ranks(scores: Tensor) -> Tensor:
    """Distinct float scores with the order of ``scores`` (equal ones in index order): ``N`` for the best."""
    order = _sort_descending(scores)[1]
    n = scores.shape[0]
    return torch.zeros_like(scores).scatter(0, order, torch.arange(n, 0, -1, device=scores.device).to(scores.dtype))


def _grouped_nms(boxes: Tensor, ranks: Tensor, candidates: Tensor, iou_threshold: float,
                 max_num: int) -> tuple[Tensor, Tensor]:
    """NMS within groups (classes / levels) as ``post_processing.batched_nms``.

    ``boxes [G, M, 4]`` are the boxes of group ``g`` at ``[g]``; ``ranks [G, M]`` the distinct rank of each
    candidate, 0 where (g, m) is none; ``candidates [K, 4]`` all candidate boxes.
    Below ``SPLIT_THR`` candidates, group ``g`` is shifted by ``g * (max - min(min, 0) + 1)`` over the candidate
    coordinates (mmcv's offset trick: the IoUs are those of the shifted boxes); above it the raw boxes are used.
    Returns (group, index) of the kept pairs by decreasing rank, at most ``max_num``."""
    big = torch.finfo(candidates.dtype).max
    flat = candidates.reshape(-1)
    # (the +-big entries change nothing but keep the reductions defined when there is no candidate)
    span = F.pad(flat, (0, 1), value=-big).max() - F.pad(flat, (0, 1), value=big).min().clamp(max=0) + 1
    count = torch.ones_like(candidates[:, 0]).sum()  # a tensor, not a Python int: it varies per image
    span = torch.where(count < SPLIT_THR, span, torch.zeros_like(span))
    offsets = torch.arange(boxes.shape[0], device=boxes.device).to(boxes.dtype) * span
    selected = onnx_ops.nms(boxes + offsets[:, None, None], ranks[:, None, :], max_num, iou_threshold, 0.0)
    group, index = selected[:, 0], selected[:, 2]
    order = _sort_descending(ranks[group, index])[1][:max_num]
    return group[order], index[order]


def _clip(boxes: Tensor, hw: Tensor) -> Tensor:
    """Clamp x to ``[0, hw[1]]`` and y to ``[0, hw[0]]`` (``boxes [N, 4k]``), as the box coder's clip."""
    shape = boxes.shape
    b = boxes.reshape(-1, 4)
    zero = torch.zeros_like(hw[0])
    x1, y1, x2, y2 = (torch.minimum(torch.maximum(b[:, i], zero), hw[1 - i % 2]) for i in range(4))
    return torch.stack([x1, y1, x2, y2], dim=1).reshape(shape)


def _select_class(per_class: Tensor, labels: Tensor) -> Tensor:
    """Row ``i``'s entry for class ``labels[i]`` of ``per_class [N, C, ...]``."""
    return per_class[torch.arange(per_class.shape[0], device=labels.device), labels]


def roi_extract(extractor: MultiLevelRoIAlign, feats: Sequence[Tensor], boxes: Tensor) -> Tensor:
    """``MultiLevelRoIAlign(feats, rois)`` for the boxes ``[K, 4]`` of image 0, with ONNX's RoiAlign."""
    if not extractor.aligned:
        raise Res2DetError("ONNX export supports aligned RoIAlign only")
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
    if extractor.num_levels > 1:
        levels = extractor.map_levels(rois)
    else:
        levels = torch.zeros_like(boxes[:, 0], dtype=torch.long)
    size = extractor.output_size
    out = feats[0].new_zeros(boxes.shape[0], feats[0].shape[1], size, size)
    for lvl, stride in enumerate(extractor.featmap_strides):
        inds = torch.nonzero(levels == lvl).flatten()
        pooled = onnx_ops.roi_align(feats[lvl], boxes[inds], torch.zeros_like(inds), size, 1.0 / stride,
                                    extractor.sampling_ratio)
        out = out.index_put((inds,), pooled)
    return out


def paste_masks(probs: Tensor, boxes: Tensor, image_size: Tensor, threshold: float) -> Tensor:
    """``res2det.models.heads.paste_masks`` for all detections at once: ``probs [K, m, m]``, ``boxes [K, 4]``
    and the image ``(height, width)`` as a tensor -> ``[K, height, width]`` bool.

    Bilinear sampling is separable, so ``grid_sample``'s value at a pixel is ``Wy @ probs @ Wx^T`` with
    per-detection row and column weights (the same products of the same factors, summed in another order).
    As there, pixels outside each box's window (box +- 1 px) stay false."""
    m = probs.shape[-1]
    wy, in_y = _paste_weights(boxes[:, 1], boxes[:, 3], image_size[0], m)
    wx, in_x = _paste_weights(boxes[:, 0], boxes[:, 2], image_size[1], m)
    values = torch.matmul(torch.matmul(wy, probs), wx.transpose(1, 2))
    return (values >= threshold) & in_y[:, :, None] & in_x[:, None, :]


def _paste_weights(lo: Tensor, hi: Tensor, size: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Per detection, for every pixel along one axis: the bilinear weights ``[K, size, m]`` of the ``m`` mask
    cells (``grid_sample``, ``align_corners=False``, zeros outside) and whether the pixel is in the window."""
    pixels = torch.arange(size, device=lo.device)
    start = (torch.floor(lo) - 1).clamp(min=0)
    stop = torch.minimum(torch.ceil(hi) + 1, size.to(lo.dtype))
    inside = (pixels[None, :] >= start[:, None]) & (pixels[None, :] < stop[:, None])
    g = (pixels.to(torch.float32)[None, :] + 0.5 - lo[:, None]) / (hi - lo)[:, None] * 2 - 1
    g = torch.where(torch.isinf(g), torch.zeros_like(g), g)  # a zero-width box samples its centre
    src = (g + 1) * (m / 2) - 0.5  # grid_sample's unnormalisation (align_corners=False)
    low = torch.floor(src)
    frac = src - low
    cells = torch.arange(m, device=lo.device).to(torch.float32)
    # cells outside 0..m-1 never match, which is grid_sample's zero padding
    weights = torch.where(cells == low[..., None], (1 - frac)[..., None], torch.zeros_like(frac)[..., None]) \
        + torch.where(cells == low[..., None] + 1, frac[..., None], torch.zeros_like(frac)[..., None])
    return weights, inside


__all__ = ["DetectionGraph", "check_exportable", "paste_masks", "roi_extract", "INPUT_NAMES"]
