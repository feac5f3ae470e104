"""Cascade R-CNN (Cai & Vasconcelos, CVPR 2018) RoI head, as mmdetection 3.3.0's ``CascadeRoIHead``.

Each stage has its own box head (class-agnostic deltas, its own coder stds) and, for Cascade Mask R-CNN, its
own mask head. At test time the boxes regressed by one stage are the rois of the next; the class scores of
the stages are averaged, the boxes come from the last stage. Mask probabilities (sigmoid) of all stages are
averaged on the final detections. In training every stage re-assigns and re-samples its targets from the
boxes refined by the previous stage, with its own IoU thresholds, and its losses are weighted.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bbox_head import Shared2FCBBoxHead
from .mask_head import FCNMaskHead
from .post_processing import multiclass_nms
from .roi_head import RCNNTrainConfig, RoIHead, _spans, boxes_to_rois
from .targets import SamplingResult, assign_and_sample


class CascadeRoIHead(RoIHead):
    """``bbox_head`` / ``mask_head`` are ``nn.ModuleList``s, one head per stage (mmdet's state-dict names
    ``roi_head.bbox_head.<s>.*``). ``train_cfgs`` holds one ``RCNNTrainConfig`` per stage.

    ``predict`` / ``loss`` have ``StandardRoIHead``'s interface, so ``TwoStageDetector`` drives it unchanged.
    """

    def __init__(self, *, bbox_heads: Sequence[Shared2FCBBoxHead], mask_heads: Sequence[FCNMaskHead] | None = None,
                 stage_loss_weights: Sequence[float] = (1.0, 0.5, 0.25),
                 train_cfgs: Sequence[RCNNTrainConfig] | None = None, **common):
        # RoIAlign has no parameters: one extractor serves every stage (mmdet builds one per stage).
        super().__init__(with_mask=mask_heads is not None, **common)
        self.num_stages = len(bbox_heads)
        if len(stage_loss_weights) != self.num_stages:
            raise ValueError(f"{len(stage_loss_weights)} stage loss weights for {self.num_stages} stages")
        if mask_heads is not None and len(mask_heads) != self.num_stages:
            raise ValueError(f"{len(mask_heads)} mask heads for {self.num_stages} stages")
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.bbox_head = nn.ModuleList(bbox_heads)
        self.mask_head = None if mask_heads is None else nn.ModuleList(mask_heads)
        train_cfgs = tuple(train_cfgs) if train_cfgs is not None else (RCNNTrainConfig(),) * self.num_stages
        if len(train_cfgs) != self.num_stages:
            raise ValueError(f"{len(train_cfgs)} train configs for {self.num_stages} stages")
        self.train_cfgs = train_cfgs

    @property
    def train_cfg(self) -> RCNNTrainConfig:
        return self.train_cfgs[0]

    # --------------------------------------------------------------------------------------------- hooks
    def _semantic(self, feats: Sequence[Tensor], capture: dict[str, Tensor] | None) -> Tensor | None:
        """Semantic features fused into the RoI features (HTC); none here."""
        return None

    def _bbox_forward(self, stage: int, feats: Sequence[Tensor], rois: Tensor, semantic: Tensor | None,
                      capture: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return self.bbox_head[stage](self.bbox_roi_extractor(feats, rois))

    # ------------------------------------------------------------------------------------------- predict
    def predict(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                capture: dict[str, Tensor] | None = None, *, paste: bool = True,
                image_metas: Sequence[dict] | None = None) -> list[dict[str, Tensor]]:
        """Per image dict(boxes, scores, labels[, masks or mask_probs]) from per-image proposals ``[K, 4]``
        (``image_metas``: unused, the heads work in input pixels).
        Mask models return the merged probabilities ``mask_probs [K, 28, 28]`` of each detection's class (the
        stage average; HTC: the last stage) or, with ``paste``, ``masks [K, h, w]`` pasted into the input."""
        cfg = self.test_cfg
        semantic = self._semantic(feats, capture)
        spans = _spans(proposals)
        rois = boxes_to_rois(proposals)
        scores_sum = None
        for stage in range(self.num_stages):
            cls_score, bbox_pred = self._bbox_forward(stage, feats, rois, semantic, capture)
            if capture is not None:
                capture[f"roi_head.bbox_roi_extractor.{stage}.call0.rois"] = rois
                capture[f"roi_head.bbox_head.{stage}.call0.cls_score"] = cls_score
                capture[f"roi_head.bbox_head.{stage}.call0.bbox_pred"] = bbox_pred
            # mmdet 3.3 averages the stages' raw class logits; the softmax comes after (predict_by_feat)
            scores_sum = cls_score if scores_sum is None else scores_sum + cls_score
            if stage < self.num_stages - 1:
                rois = self._refine_test_rois(stage, rois, cls_score, bbox_pred, spans, image_sizes)
        cls_score = scores_sum / float(self.num_stages)
        head = self.bbox_head[-1]
        results = []
        for (s, e), size in zip(spans, image_sizes):
            scores = F.softmax(cls_score[s:e], dim=-1)
            boxes = head.bbox_coder.decode(rois[s:e, 1:], bbox_pred[s:e], max_shape=size)
            boxes, scores, labels, _ = multiclass_nms(boxes, scores, score_thr=cfg.score_thr,
                                                      iou_threshold=cfg.iou_threshold, max_num=cfg.max_per_img)
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        if self.with_mask:
            self._predict_masks(feats, results, image_sizes, semantic, capture, paste)
        return results

    def _refine_test_rois(self, stage: int, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, spans,
                          image_sizes) -> Tensor:
        """mmdet's ``regress_by_class`` per image: decode the stage's deltas on its rois, clipped to the image.
        The class is the argmax over the foreground scores; with class-agnostic deltas it selects nothing."""
        head = self.bbox_head[stage]
        out = [rois[:0]]
        for (s, e), size in zip(spans, image_sizes):
            pred = _select_deltas(head, bbox_pred[s:e], cls_score[s:e, :-1].argmax(dim=1))
            boxes = head.bbox_coder.decode(rois[s:e, 1:], pred, max_shape=size)
            out.append(torch.cat([rois[s:e, :1], boxes], dim=1))
        return torch.cat(out)

    def _mask_probs(self, feats: Sequence[Tensor], rois: Tensor, semantic: Tensor | None,
                    capture: dict[str, Tensor] | None) -> list[Tensor]:
        """The mask logits ``[K, C, 28, 28]`` of every stage on the final detections."""
        preds = []
        for stage in range(self.num_stages):
            pred = self.mask_head[stage](self.mask_roi_extractor(feats, rois))
            if capture is not None:
                capture[f"roi_head.mask_roi_extractor.{stage}.call0.rois"] = rois
                capture[f"roi_head.mask_head.{stage}.call0.mask_pred"] = pred
            preds.append(pred)
        return preds

    def _predict_masks(self, feats, results, image_sizes, semantic, capture, paste) -> None:
        rois = boxes_to_rois([r["boxes"] for r in results])
        preds = self._mask_probs(feats, rois, semantic, capture)
        if capture is not None and len(results) == 1:
            labels = results[0]["labels"]
            for stage, p in enumerate(preds):
                capture[f"det.mask_logits.{stage}"] = p[torch.arange(labels.shape[0], device=p.device), labels]
        self._store_masks(results, self._merge_mask_probs(preds), image_sizes, paste)

    def _merge_mask_probs(self, preds: Sequence[Tensor]) -> Tensor:
        """Cascade Mask R-CNN: the mean of the stages' sigmoid maps (mmdet's ``merge_aug_masks``)."""
        return torch.stack([p.sigmoid() for p in preds]).mean(dim=0)

    # ---------------------------------------------------------------------------------------------- loss
    def loss(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor],
             gt_labels: Sequence[Tensor], gt_masks: Sequence[Tensor] | None = None, *,
             image_sizes: Sequence[tuple[int, int]] | None = None,
             semantic: Tensor | None = None) -> dict[str, Tensor]:
        """``s<stage>.loss_cls``, ``s<stage>.loss_bbox`` (and ``s<stage>.loss_mask``), each times the stage's
        loss weight. ``image_sizes`` (unpadded ``(h, w)``, default: the padded input) clip the refined boxes."""
        if image_sizes is None:
            stride = self.bbox_roi_extractor.featmap_strides[0]
            image_sizes = [(feats[0].shape[-2] * stride, feats[0].shape[-1] * stride)] * len(proposals)
        if self.with_mask and gt_masks is None:
            raise ValueError("a mask model needs 'masks' in every target")
        gt_boxes = [g.to(p.dtype).reshape(-1, 4) for p, g in zip(proposals, gt_boxes)]
        losses: dict[str, Tensor] = {}
        boxes = list(proposals)
        for stage in range(self.num_stages):
            cfg, w = self.train_cfgs[stage], self.stage_loss_weights[stage]
            samples = self._sample(boxes, gt_boxes, gt_labels, cfg)
            rois = boxes_to_rois([s.boxes for s in samples])
            cls_score, bbox_pred = self._bbox_forward(stage, feats, rois, semantic)
            for k, v in self.bbox_head[stage].loss(cls_score, bbox_pred, samples).items():
                losses[f"s{stage}.{k}"] = v * w if "loss" in k else v
            refined = None
            if self._refine_before_mask:
                with torch.no_grad():
                    refined = self._refine_train(stage, samples, rois, cls_score, bbox_pred, image_sizes)
                samples = self._sample(refined, gt_boxes, gt_labels, cfg)
            if self.with_mask:
                losses[f"s{stage}.loss_mask"] = self._mask_loss(stage, feats, samples, gt_masks, cfg, semantic) * w
            if stage < self.num_stages - 1:
                if refined is None:
                    with torch.no_grad():
                        refined = self._refine_train(stage, samples, rois, cls_score, bbox_pred, image_sizes)
                boxes = refined
        return losses

    _refine_before_mask = False  # HTC's interleaved execution

    @staticmethod
    def _sample(boxes: Sequence[Tensor], gt_boxes, gt_labels, cfg: RCNNTrainConfig) -> list[SamplingResult]:
        return [assign_and_sample(b, g, l, cfg.assigner, cfg.sampler) for b, g, l in zip(boxes, gt_boxes, gt_labels)]

    def _refine_train(self, stage: int, samples: Sequence[SamplingResult], rois: Tensor, cls_score: Tensor,
                      bbox_pred: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """mmdet's ``refine_bboxes``: every sampled roi regressed by the stage's deltas (for the target class,
        or the predicted one for negatives; clipped to the image), the gt boxes added as proposals dropped."""
        head = self.bbox_head[stage]
        out, start = [], 0
        for s, size in zip(samples, image_sizes):
            n, p = s.num, s.pos_boxes.shape[0]
            labels = torch.cat([s.pos_gt_labels, cls_score[start + p:start + n, :-1].argmax(1)])
            pred = _select_deltas(head, bbox_pred[start:start + n], labels)
            boxes = head.bbox_coder.decode(rois[start:start + n, 1:], pred, max_shape=size)
            keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
            if s.pos_is_gt is not None:
                keep[:p] = ~s.pos_is_gt
            out.append(boxes[keep])
            start += n
        return out

    def _mask_loss(self, stage: int, feats, samples: Sequence[SamplingResult], gt_masks, cfg: RCNNTrainConfig,
                   semantic: Tensor | None) -> Tensor:
        pos_rois = boxes_to_rois([s.pos_boxes for s in samples])
        mask_pred = self._mask_forward_train(stage, feats, pos_rois, semantic)
        return self._mask_head_loss(self.mask_head[stage], mask_pred, samples, gt_masks, cfg.mask_size)

    def _mask_forward_train(self, stage: int, feats, rois: Tensor, semantic: Tensor | None) -> Tensor:
        return self.mask_head[stage](self.mask_roi_extractor(feats, rois))


def _select_deltas(head: Shared2FCBBoxHead, bbox_pred: Tensor, labels: Tensor) -> Tensor:
    """The ``[N, 4]`` deltas of each row's class (class-agnostic heads have only those)."""
    if head.reg_class_agnostic:
        return bbox_pred
    return bbox_pred.view(bbox_pred.shape[0], -1, 4)[torch.arange(bbox_pred.shape[0], device=bbox_pred.device), labels]


__all__ = ["CascadeRoIHead"]
