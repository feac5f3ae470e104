"""The second stage: RoI features from the FPN, the box head and (Mask R-CNN) the mask head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ...ops import MultiLevelRoIAlign
from .bbox_head import Shared2FCBBoxHead
from .mask_head import FCNMaskHead, paste_masks
from .targets import MaxIoUAssigner, RandomSampler, SamplingResult, assign_and_sample


@dataclass(frozen=True)
class RCNNTestConfig:
    score_thr: float = 0.05
    iou_threshold: float = 0.5  # class-aware NMS
    max_per_img: int = 100
    mask_thr_binary: float = 0.5


@dataclass(frozen=True)
class RCNNTrainConfig:
    assigner: MaxIoUAssigner = field(default_factory=lambda: MaxIoUAssigner(
        pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False))
    sampler: RandomSampler = field(default_factory=lambda: RandomSampler(
        num=512, pos_fraction=0.25, add_gt_as_proposals=True))
    mask_size: int = 28


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes -> ``[N, 5]`` rois (image index, x1, y1, x2, y2)."""
    return torch.cat([torch.cat([b.new_full((b.shape[0], 1), float(i)), b[:, :4]], dim=1) for i, b in enumerate(boxes)])


class StandardRoIHead(nn.Module):
    """Box branch on 7x7 RoIAlign features of the proposals; mask branch on 14x14 features of the final
    detections at test time and of the positive proposals in training. Rois are pooled from P2..P5 by size
    (mmdet's level rule, ``finest_scale=56``)."""

    # ``TwoStageDetector.predict`` pastes masks from the rescaled boxes before clipping them (mmdet); Paddle's
    # heads clip first.
    paste_clipped_boxes = False

    def __init__(self, *, bbox_head: Shared2FCBBoxHead, mask_head: FCNMaskHead | None = None,
                 featmap_strides: Sequence[int] = (4, 8, 16, 32), roi_size: int = 7, mask_roi_size: int = 14,
                 finest_scale: int = 56, test_cfg: RCNNTestConfig | None = None,
                 train_cfg: RCNNTrainConfig | None = None):
        super().__init__()
        self.bbox_roi_extractor = MultiLevelRoIAlign(output_size=roi_size, featmap_strides=featmap_strides,
                                                     sampling_ratio=0, aligned=True, finest_scale=finest_scale)
        self.bbox_head = bbox_head
        self.mask_roi_extractor = None
        self.mask_head = mask_head
        if mask_head is not None:
            self.mask_roi_extractor = MultiLevelRoIAlign(output_size=mask_roi_size, featmap_strides=featmap_strides,
                                                         sampling_ratio=0, aligned=True, finest_scale=finest_scale)
        self.test_cfg = test_cfg or RCNNTestConfig()
        self.train_cfg = train_cfg or RCNNTrainConfig()

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    def predict(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                capture: dict[str, Tensor] | None = None, *, paste: bool = True) -> list[dict[str, Tensor]]:
        """Per image dict(boxes, scores, labels[, mask_logits, masks]) from per-image proposal boxes ``[K, 4]``.
        Mask models add the final detections' ``mask_logits [K, 28, 28]`` (their own class's map) and, with
        ``paste``, the ``masks [K, h, w]`` pasted into the input image."""
        cfg = self.test_cfg
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        if capture is not None:
            capture["roi_head.bbox_roi_extractor.call0.rois"] = rois
            capture["roi_head.bbox_head.call0.cls_score"] = cls_score
            capture["roi_head.bbox_head.call0.bbox_pred"] = bbox_pred
        results = []
        for (s, e), size in zip(_spans(proposals), image_sizes):
            boxes, scores, labels = self.bbox_head.predict(
                rois[s:e], cls_score[s:e], bbox_pred[s:e], size, score_thr=cfg.score_thr,
                iou_threshold=cfg.iou_threshold, max_per_img=cfg.max_per_img)
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        if self.with_mask:
            self._predict_masks(feats, results, image_sizes, capture, paste)
        return results

    def _predict_masks(self, feats: Sequence[Tensor], results: list[dict[str, Tensor]],
                       image_sizes: Sequence[tuple[int, int]], capture: dict[str, Tensor] | None,
                       paste: bool = True) -> None:
        boxes = [r["boxes"] for r in results]
        rois = boxes_to_rois(boxes)
        mask_pred = self.mask_head(self.mask_roi_extractor(feats, rois))  # empty batches work too
        if capture is not None:
            capture["roi_head.mask_roi_extractor.call0.rois"] = rois
            capture["roi_head.mask_head.call0.mask_pred"] = mask_pred
        for r, (s, e), size in zip(results, _spans(boxes), image_sizes):
            logits = mask_pred[s:e][torch.arange(e - s, device=rois.device), r["labels"]]
            r["mask_logits"] = logits
            if paste:
                r["masks"] = paste_masks(logits.sigmoid(), r["boxes"], size, self.test_cfg.mask_thr_binary)

    def loss(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor],
             gt_labels: Sequence[Tensor], gt_masks: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        cfg = self.train_cfg
        samples: list[SamplingResult] = [
            assign_and_sample(p, g.to(p.dtype).reshape(-1, 4), l, cfg.assigner, cfg.sampler)
            for p, g, l in zip(proposals, gt_boxes, gt_labels)]
        rois = boxes_to_rois([s.boxes for s in samples])
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        losses = self.bbox_head.loss(cls_score, bbox_pred, samples)
        if self.with_mask:
            if gt_masks is None:
                raise ValueError("a mask model needs 'masks' in every target")
            pos_rois = boxes_to_rois([s.pos_boxes for s in samples])
            mask_pred = self.mask_head(self.mask_roi_extractor(feats, pos_rois))
            targets = torch.cat([self.mask_head.targets(s.pos_boxes, s.pos_gt_inds, m, cfg.mask_size)
                                 for s, m in zip(samples, gt_masks)])
            labels = torch.cat([s.pos_gt_labels for s in samples])
            losses["loss_mask"] = self.mask_head.loss(mask_pred, targets, labels)
        return losses


def _spans(per_image: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(start, end) rows of each image's entries in the concatenation."""
    spans, start = [], 0
    for t in per_image:
        spans.append((start, start + t.shape[0]))
        start += t.shape[0]
    return spans
