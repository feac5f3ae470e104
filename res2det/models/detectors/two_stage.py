"""Two-stage detectors (Faster / Mask R-CNN): backbone -> FPN -> RPN proposals -> RoI heads."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..backbones import build_backbone
from ..heads import (AnchorGenerator, FCNMaskHead, RPNHead, Shared2FCBBoxHead, StandardRoIHead)
from ..necks import FPN
from .config import DetectorConfig

ImageSizes = Sequence[tuple[int, int]]


class TwoStageDetector(nn.Module):
    """mmdetection's split into ``backbone``, ``neck``, ``rpn_head`` and ``roi_head`` (the state-dict prefixes).

    * eval: ``model(images, image_sizes)`` -> per image ``dict(boxes [K, 4] xyxy, scores [K], labels [K] int64,
      masks [K, h, w] bool for mask models)`` in the input's pixel coordinates. ``images`` are normalised and
      zero-padded on the bottom/right; ``image_sizes`` are the unpadded ``(h, w)`` (default: the full tensor).
    * train: ``model(images, targets)`` -> dict of losses (``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``,
      ``loss_bbox``[, ``loss_mask``]). ``targets`` holds per image ``boxes [N, 4]`` (padded-input pixels),
      ``labels [N]`` (0..C-1) and, for mask models, ``masks [N, H, W]``.
    * ``forward_with_intermediates`` also returns the intermediate tensors under mmdetection's hook names
      (``backbone.0``, ``neck.0``, ``rpn_head.cls_scores.0``, ``rpn_proposals.bboxes``, ``det.bboxes``, ...).
    """

    def __init__(self, *, backbone: nn.Module, neck: FPN, rpn_head: RPNHead, roi_head: StandardRoIHead,
                 class_names: Sequence[str] = ()):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head
        self.class_names = tuple(class_names)

    def forward(self, images: Tensor, image_sizes: ImageSizes | Sequence[Mapping[str, Tensor]] | None = None,
                targets: Sequence[Mapping[str, Tensor]] | None = None) -> Any:
        if image_sizes is not None and len(image_sizes) and isinstance(image_sizes[0], Mapping):
            image_sizes, targets = None, image_sizes  # torchvision-style model(images, targets)
        if self.training:
            if targets is None:
                raise ValueError("in train mode the detector needs targets; call model.eval() for inference")
            return self.loss(images, targets, image_sizes)
        return self.predict(images, image_sizes)

    def extract_feat(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(backbone C2..C5, FPN P2..P6)."""
        feats = self.backbone(images)
        return feats, self.neck(feats)

    @staticmethod
    def _sizes(images: Tensor, image_sizes: ImageSizes | None) -> list[tuple[int, int]]:
        if image_sizes is None:
            return [tuple(images.shape[-2:])] * images.shape[0]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {images.shape[0]}")
        return [(int(h), int(w)) for h, w in image_sizes]

    def predict(self, images: Tensor, image_sizes: ImageSizes | None = None, *,
                capture: dict[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Detections per image; with ``capture`` (a dict) the intermediate tensors are stored in it."""
        sizes = self._sizes(images, image_sizes)
        feats, pyramid = self.extract_feat(images)
        cls_scores, bbox_preds = self.rpn_head(pyramid)
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes)
        results = self.roi_head.predict(pyramid, [p[0] for p in proposals], sizes, capture=capture)
        mask_logits = [r.pop("mask_logits", None) for r in results]
        if capture is not None:
            capture["input"] = images
            capture.update({f"backbone.{i}": f for i, f in enumerate(feats)})
            capture.update({f"neck.{i}": p for i, p in enumerate(pyramid)})
            capture.update({f"rpn_head.cls_scores.{i}": c for i, c in enumerate(cls_scores)})
            capture.update({f"rpn_head.bbox_preds.{i}": b for i, b in enumerate(bbox_preds)})
            if len(results) == 1:  # per-image outputs are named for a single image, as in the fixtures
                capture["rpn_proposals.bboxes"], capture["rpn_proposals.scores"] = proposals[0]
                r = results[0]
                capture.update({"det.bboxes": r["boxes"], "det.scores": r["scores"], "det.labels": r["labels"]})
                if "masks" in r:
                    capture["det.mask_logits.0"] = mask_logits[0]
                    capture["det.masks"] = r["masks"]
        return results

    @torch.no_grad()
    def forward_with_intermediates(self, images: Tensor, image_sizes: ImageSizes | None = None
                                   ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``(detections, intermediates)`` for inference; per-image intermediates (proposals, ``det.*``) are
        recorded for a batch of one."""
        capture: dict[str, Tensor] = {}
        return self.predict(images, image_sizes, capture=capture), capture

    def loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
             image_sizes: ImageSizes | None = None) -> dict[str, Tensor]:
        sizes = self._sizes(images, image_sizes)
        if len(targets) != images.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]}")
        gt_boxes = [t["boxes"].to(images.device, torch.float32).reshape(-1, 4) for t in targets]
        gt_labels = [t["labels"].to(images.device, torch.long).reshape(-1) for t in targets]
        gt_masks = [t["masks"].to(images.device) for t in targets] if self.roi_head.with_mask else None
        _, pyramid = self.extract_feat(images)
        cls_scores, bbox_preds = self.rpn_head(pyramid)
        losses = self.rpn_head.loss(cls_scores, bbox_preds, gt_boxes, sizes)
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes,
                                                    cfg=self.rpn_head.train_cfg.proposals)
        losses.update(self.roi_head.loss(pyramid, [p[0] for p in proposals], gt_boxes, gt_labels, gt_masks))
        return losses


def build_detector(cfg: DetectorConfig) -> TwoStageDetector:
    backbone = build_backbone(cfg.backbone)
    neck = FPN(in_channels=backbone.out_channels, out_channels=cfg.neck.out_channels, num_outs=cfg.neck.num_outs)
    r = cfg.rpn
    if len(r.anchor_strides) != cfg.neck.num_outs:
        raise ValueError(f"{len(r.anchor_strides)} anchor strides for {cfg.neck.num_outs} FPN levels")
    anchors = AnchorGenerator(strides=r.anchor_strides, ratios=r.anchor_ratios, scales=r.anchor_scales)
    rpn_head = RPNHead(in_channels=cfg.neck.out_channels, feat_channels=r.feat_channels, anchor_generator=anchors,
                       target_stds=r.target_stds, test_cfg=r.test_proposals, train_cfg=r.rpn_train)
    h = cfg.roi_head
    bbox_head = Shared2FCBBoxHead(in_channels=cfg.neck.out_channels, roi_size=h.roi_size, fc_channels=h.fc_channels,
                                  num_shared_fcs=h.num_shared_fcs, num_classes=h.num_classes, target_stds=h.bbox_stds)
    mask_head = None
    if h.with_mask:
        mask_head = FCNMaskHead(in_channels=cfg.neck.out_channels, conv_channels=h.mask_channels,
                                num_convs=h.mask_num_convs, num_classes=h.num_classes)
    roi_head = StandardRoIHead(bbox_head=bbox_head, mask_head=mask_head, featmap_strides=h.featmap_strides,
                               roi_size=h.roi_size, mask_roi_size=h.mask_roi_size, finest_scale=h.finest_scale,
                               test_cfg=h.rcnn_test, train_cfg=h.rcnn_train)
    if cfg.class_names and len(cfg.class_names) != h.num_classes:
        raise ValueError(f"{len(cfg.class_names)} class names for {h.num_classes} classes")
    return TwoStageDetector(backbone=backbone, neck=neck, rpn_head=rpn_head, roi_head=roi_head,
                            class_names=cfg.class_names)
