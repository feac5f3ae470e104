"""The second stage: RoI features from the FPN, the box head and (Mask R-CNN) the mask head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

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


class RoIHead(nn.Module):
    """What every RoI head shares: the RoIAlign extractors of the box and mask branches (P2..P5, a level per roi
    by ``level_mapping``), the test config, the detections' mask maps, the mask loss, and the capabilities the
    detector reads (``with_mask``, ``with_semantic``, ``mask_paste``)."""

    # how ``res2det.inference.postprocess`` pastes masks at the original size: 'mmdet' from the rescaled boxes
    # before clipping them, 'paddle' from the clipped boxes, 'paddle_static' by the static-graph era's rule
    mask_paste = "mmdet"
    with_semantic = False  # HTC's semantic branch (its head: ``semantic_loss``)
    level_mapping = "mmdet"  # how rois pick an FPN level (``ops.MultiLevelRoIAlign``)
    roi_align_aligned, roi_align_sampling_ratio = True, 0  # half-pixel-aligned, adaptive sampling

    def __init__(self, *, with_mask: bool, featmap_strides: Sequence[int] = (4, 8, 16, 32), roi_size: int = 7,
                 mask_roi_size: int = 14, finest_scale: int = 56, test_cfg: RCNNTestConfig | None = None):
        super().__init__()

        def extractor(size: int) -> MultiLevelRoIAlign:
            return MultiLevelRoIAlign(output_size=size, featmap_strides=featmap_strides,
                                      sampling_ratio=self.roi_align_sampling_ratio, aligned=self.roi_align_aligned,
                                      finest_scale=finest_scale, level_mapping=self.level_mapping)

        self.bbox_roi_extractor = extractor(roi_size)
        self.mask_roi_extractor = extractor(mask_roi_size) if with_mask else None
        self.test_cfg = test_cfg or RCNNTestConfig()

    @property
    def with_mask(self) -> bool:
        return self.mask_roi_extractor is not None

    def _store_masks(self, results: list[dict[str, Tensor]], probs: Tensor, image_sizes: Sequence[tuple[int, int]],
                     paste: bool) -> None:
        """Each detection's own class's map of ``probs [K, C, 28, 28]`` (the detections of all images in order):
        ``mask_probs [k, 28, 28]`` per image or, with ``paste``, ``masks [k, h, w]`` pasted into the input."""
        for r, (s, e), size in zip(results, _spans([r["boxes"] for r in results]), image_sizes):
            prob = probs[s:e][torch.arange(e - s, device=probs.device), r["labels"]]
            if paste:
                r["masks"] = paste_masks(prob, r["boxes"], size, self.test_cfg.mask_thr_binary)
            else:
                r["mask_probs"] = prob

    @staticmethod
    def _mask_head_loss(mask_head: FCNMaskHead, mask_pred: Tensor, samples: Sequence[SamplingResult],
                   gt_masks: Sequence[Tensor], mask_size: int) -> Tensor:
        """The mask head's loss on the positives of ``samples`` (``mask_pred`` their logits, in order)."""
        targets = torch.cat([mask_head.targets(s.pos_boxes, s.pos_gt_inds, m.to(s.pos_boxes.device), mask_size)
                             for s, m in zip(samples, gt_masks)])
        return mask_head.loss(mask_pred, targets, torch.cat([s.pos_gt_labels for s in samples]))


class StandardRoIHead(RoIHead):
    """Faster / Mask R-CNN: the box branch on 7x7 RoIAlign features of the proposals; the mask branch on 14x14
    features of the final detections at test time and of the positive proposals in training. Rois are pooled
    from P2..P5 by size (mmdet's level rule, ``finest_scale=56``)."""

    def __init__(self, *, bbox_head: Shared2FCBBoxHead, mask_head: FCNMaskHead | None = None,
                 train_cfg: RCNNTrainConfig | None = None, **common):
        super().__init__(with_mask=mask_head is not None, **common)
        self.bbox_head = bbox_head
        self.mask_head = mask_head
        self.train_cfg = train_cfg or RCNNTrainConfig()

    def _detect_boxes(self, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, image_size: tuple[int, int],
                      meta: Mapping[str, Any] | None) -> tuple[Tensor, Tensor, Tensor]:
        """One image's (boxes, scores, labels) from its rois' head outputs (``meta``: see ``predict``)."""
        cfg = self.test_cfg
        return self.bbox_head.predict(rois, cls_score, bbox_pred, image_size, score_thr=cfg.score_thr,
                                      iou_threshold=cfg.iou_threshold, max_per_img=cfg.max_per_img)

    def predict(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                capture: dict[str, Tensor] | None = None, *, paste: bool = True,
                image_metas: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Tensor]]:
        """Per image dict(boxes, scores, labels[, masks or mask_probs]) from per-image proposal boxes ``[K, 4]``.
        Mask models add each detection's ``mask_probs [K, 28, 28]`` (its own class's map, after the sigmoid)
        or, with ``paste``, the ``masks [K, h, w]`` pasted into the input image. ``image_metas`` (per image
        ``scale_factor`` and ``orig_size``) are for heads whose post-processing works in original pixels."""
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        if capture is not None:
            capture["roi_head.bbox_roi_extractor.call0.rois"] = rois
            capture["roi_head.bbox_head.call0.cls_score"] = cls_score
            capture["roi_head.bbox_head.call0.bbox_pred"] = bbox_pred
        results = []
        for i, ((s, e), size) in enumerate(zip(_spans(proposals), image_sizes)):
            meta = image_metas[i] if image_metas is not None else None
            boxes, scores, labels = self._detect_boxes(rois[s:e], cls_score[s:e], bbox_pred[s:e], size, meta)
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        if self.with_mask:
            rois = boxes_to_rois([r["boxes"] for r in results])
            mask_pred = self.mask_head(self.mask_roi_extractor(feats, rois))  # empty batches work too
            if capture is not None:
                capture["roi_head.mask_roi_extractor.call0.rois"] = rois
                capture["roi_head.mask_head.call0.mask_pred"] = mask_pred
                if len(results) == 1:
                    labels = results[0]["labels"]
                    capture["det.mask_logits.0"] = mask_pred[torch.arange(labels.shape[0]), labels]
            self._store_masks(results, mask_pred.sigmoid(), image_sizes, paste)
        return results

    def loss(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor],
             gt_labels: Sequence[Tensor], gt_masks: Sequence[Tensor] | None = None, *,
             image_sizes: Sequence[tuple[int, int]] | None = None, semantic: Tensor | None = None
             ) -> dict[str, Tensor]:
        """``loss_cls``, ``acc``, ``loss_bbox`` (and ``loss_mask``); ``image_sizes`` and ``semantic`` are the
        cascades' (unused here)."""
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
            losses["loss_mask"] = self._mask_head_loss(self.mask_head, mask_pred, samples, gt_masks, cfg.mask_size)
        return losses


def _spans(per_image: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(start, end) rows of each image's entries in the concatenation."""
    spans, start = [], 0
    for t in per_image:
        spans.append((start, start + t.shape[0]))
        start += t.shape[0]
    return spans
