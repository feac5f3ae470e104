"""Two-stage detectors (Faster / Mask R-CNN): backbone -> FPN -> RPN proposals -> RoI heads."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ...structures import DETECTION_PREPROCESS, InstanceMasks, Preprocess
from ..backbones import build_backbone
from ..heads import (AnchorGenerator, FCNMaskHead, RPNHead, Shared2FCBBoxHead, StandardRoIHead, paste_mask_crops)
from ..heads.paddle_conventions import PaddleAnchorGenerator, PaddleBBoxHead, PaddleRoIHead, PaddleRPNHead
from ..necks import FPN
from .detector_config import DetectorConfig

if TYPE_CHECKING:
    from ...images import ImageLike
    from ...structures import Detections

ImageSizes = Sequence[tuple[int, int]]


class TwoStageDetector(nn.Module):
    """mmdetection's split into ``backbone``, ``neck``, ``rpn_head`` and ``roi_head`` (the state-dict prefixes).

    * ``predict(images)``: the user-level entry. Paths, PIL images, HxWx3 uint8 arrays or image tensors go
      through mmdetection's test pipeline (keep-ratio resize to fit (800, 1333), normalise, pad to 32) and come
      back as ``Detections`` in each original image's pixels.
    * eval: ``model(images, image_sizes)`` = ``detect(images, image_sizes)`` -> per image ``dict(boxes [K, 4]
      xyxy, scores [K], labels [K] int64, masks [K, h, w] bool for mask models)`` in the input's pixel
      coordinates. ``images`` are normalised and zero-padded on the bottom/right; ``image_sizes`` are the
      unpadded ``(h, w)`` (default: the full tensor).
    * ``postprocess(result, scale_factor=, orig_size=)``: one image's ``detect(..., paste_masks=False)`` output
      in original-image pixels, masks pasted there (what ``predict`` and ``res2det.evaluation`` use).
    * train: ``model(images, targets)`` -> dict of losses (``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``,
      ``loss_bbox``[, ``loss_mask``]). ``targets`` holds per image ``boxes [N, 4]`` (padded-input pixels),
      ``labels [N]`` (0..C-1) and, for mask models, ``masks [N, H, W]``.
    * ``forward_with_intermediates`` also returns the intermediate tensors under mmdetection's hook names
      (``backbone.0``, ``neck.0``, ``rpn_head.cls_scores.0``, ``rpn_proposals.bboxes``, ``det.bboxes``, ...).
    """

    def __init__(self, *, backbone: nn.Module, neck: FPN, rpn_head: RPNHead, roi_head: StandardRoIHead,
                 class_names: Sequence[str] = (), preprocess: Preprocess = DETECTION_PREPROCESS):
        super().__init__()
        self.preprocess = preprocess  # the input normalisation and resize bounds the weights expect
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
        return self.detect(images, image_sizes)

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

    def detect(self, images: Tensor, image_sizes: ImageSizes | None = None, *,
               capture: dict[str, Tensor] | None = None, paste_masks: bool = True) -> list[dict[str, Tensor]]:
        """Detections per image of a normalised, padded batch, in input pixels; with ``capture`` (a dict) the
        intermediate tensors are stored in it. Mask models return ``masks [K, h, w]`` pasted into the input
        or, with ``paste_masks=False``, the ``mask_probs [K, 28, 28]`` of each detection (its class's map,
        after the sigmoid) to paste elsewhere (``predict`` pastes them at the original image size)."""
        sizes = self._sizes(images, image_sizes)
        feats, pyramid = self.extract_feat(images)
        cls_scores, bbox_preds = self.rpn_head(pyramid)
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes)
        results = self.roi_head.predict(pyramid, [p[0] for p in proposals], sizes, capture=capture,
                                        paste=paste_masks)
        mask_logits = [r.pop("mask_logits", None) for r in results]
        if not paste_masks and self.roi_head.with_mask:
            for r, logits in zip(results, mask_logits):
                if "mask_probs" not in r:  # cascade heads return their own (stage-averaged) probabilities
                    r["mask_probs"] = logits.sigmoid()
        if capture is not None:
            capture["input"] = images
            capture.update({f"backbone.{i}": f for i, f in enumerate(feats)})
            capture.update({f"neck.{i}": p for i, p in enumerate(pyramid)})
            capture.update({f"rpn_head.cls_scores.{i}": c for i, c in enumerate(cls_scores)})
            capture.update({f"rpn_head.bbox_preds.{i}": b for i, b in enumerate(bbox_preds)})
            if len(results) == 1:  # per-image outputs are named for a single image, as in the fixtures
                capture["rpn_proposals.bboxes"], capture["rpn_proposals.scores"] = proposals[0][:2]
                if len(proposals[0]) > 2:  # Paddle's proposals are ranked by (and also report) the raw logit
                    capture["rpn_proposals.logits"] = proposals[0][2]
                r = results[0]
                capture.update({"det.bboxes": r["boxes"], "det.scores": r["scores"], "det.labels": r["labels"]})
                if mask_logits[0] is not None:
                    capture["det.mask_logits.0"] = mask_logits[0]
                if "masks" in r:
                    capture["det.masks"] = r["masks"]
        return results

    def predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None,
                batch_size: int = 1) -> "list[Detections]":
        """Detect objects in images given as paths, PIL images, HxWx3 uint8 arrays or tensors (HxWx3 or 3xHxW;
        floats in 0..1 or 0..255), one or a list (an ``N x 3 x H x W`` tensor or ``N x H x W x 3`` array is
        a list of N). Returns one ``Detections`` per image, always a list.

        As mmdetection's test pipeline: keep-ratio resize to fit the model's (short, long) input bounds
        (mmcv's rule, bilinear), normalise with ``model.preprocess``, zero-pad bottom/right to a multiple of 32,
        ``batch_size`` images per forward. Boxes are divided by the per-axis scale factors and clipped to the
        original image; masks are pasted at the original size from those boxes. ``score_thr`` keeps only
        detections scoring at least that much (after the model's own test threshold). Runs under
        ``torch.inference_mode`` in eval mode (the previous mode is restored); the returned tensors are
        ordinary CPU tensors.
        """
        from ...errors import Res2DetError
        from ...images import image_list, to_rgb_uint8
        from ...structures import Detections

        if batch_size < 1:
            raise Res2DetError(f"batch_size must be at least 1, got {batch_size}")
        items = image_list(images)
        names = self.class_names
        out: list[Detections] = []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(items), batch_size):
                rgbs = [to_rgb_uint8(x) for x in items[start:start + batch_size]]
                for rgb, (boxes, scores, labels, masks) in zip(rgbs, self._predict_batch(rgbs, score_thr)):
                    # clone: inference tensors would refuse in-place edits outside inference mode
                    out.append(Detections(
                        boxes=boxes.clone(), scores=scores.clone(), labels=labels.clone(),
                        categories=[names[i] if i < len(names) else str(i) for i in labels.tolist()],
                        masks=None if masks is None else masks.clone(), width=int(rgb.shape[1]),
                        height=int(rgb.shape[0])))
        finally:
            self.train(was_training)
        return out

    @torch.inference_mode()
    def _predict_batch(self, rgbs: list[np.ndarray], score_thr: float | None
                       ) -> list[tuple[Tensor, Tensor, Tensor, InstanceMasks | None]]:
        """(boxes, scores, labels, masks) per HxWx3 uint8 image, in its own pixels (see ``predict``)."""
        from ...images import detection_input, pad_batch

        pre = self.preprocess
        param = next(self.parameters())
        inputs = [detection_input(rgb, pre) for rgb in rgbs]
        batch = pad_batch([x for x, _ in inputs]).to(param.device, param.dtype)
        sizes = [tuple(x.shape[-2:]) for x, _ in inputs]
        results = self.detect(batch, sizes, paste_masks=False)
        return [self.postprocess(r, scale_factor=sf, orig_size=rgb.shape[:2], score_thr=score_thr)
                for rgb, (_, sf), r in zip(rgbs, inputs, results)]

    def postprocess(self, result: Mapping[str, Tensor], *, scale_factor: Sequence[float], orig_size: Sequence[int],
                    score_thr: float | None = None) -> tuple[Tensor, Tensor, Tensor, InstanceMasks | None]:
        """One image's ``detect(..., paste_masks=False)`` output -> ``(boxes, scores, labels, masks)`` on the
        CPU in the original image's pixels, by decreasing score; ``masks`` an ``InstanceMasks`` (``None`` without
        a mask head). Used by ``predict`` and by ``res2det.evaluation``.

        ``scale_factor`` is ``(sx, sy)``, input pixels per original pixel; ``orig_size`` is ``(H, W)``. Boxes are
        divided by the scale factors and clipped to the image; masks are pasted at the original size from the
        unclipped boxes (mmdetection) or, for Paddle's conventions, from the clipped ones. ``score_thr`` keeps
        only detections scoring at least that much.
        """
        if "masks" in result and "mask_probs" not in result:
            raise ValueError("postprocess needs the mask probabilities: call detect(..., paste_masks=False)")
        sx, sy = (float(s) for s in scale_factor)
        h, w = int(orig_size[0]), int(orig_size[1])
        boxes = result["boxes"].float() / result["boxes"].new_tensor([sx, sy, sx, sy], dtype=torch.float32)
        scores, labels, probs = result["scores"].float(), result["labels"].long(), result.get("mask_probs")
        # Detections are by decreasing score (Paddle's NMS groups them by class; mmdet's are sorted already)
        order = torch.argsort(scores, descending=True, stable=True)
        if score_thr is not None:
            order = order[scores[order] >= score_thr]
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        probs = None if probs is None else probs[order]
        masks = None
        # mmdet (rescale=True) pastes from the rescaled, unclipped boxes; Paddle clips them first
        if getattr(self.roi_head, "paste_clipped_boxes", False):
            boxes = _clip(boxes, h, w)
        if probs is not None:
            masks = paste_mask_crops(probs, boxes, (h, w), self.roi_head.test_cfg.mask_thr_binary).cpu()
        return _clip(boxes, h, w).cpu(), scores.cpu(), labels.cpu(), masks

    @torch.no_grad()
    def forward_with_intermediates(self, images: Tensor, image_sizes: ImageSizes | None = None
                                   ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``(detections, intermediates)`` for inference; per-image intermediates (proposals, ``det.*``) are
        recorded for a batch of one."""
        capture: dict[str, Tensor] = {}
        return self.detect(images, image_sizes, capture=capture), capture

    def loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
             image_sizes: ImageSizes | None = None) -> dict[str, Tensor]:
        t = self._rpn_loss(images, targets, image_sizes)
        t.losses.update(self.roi_head.loss(t.pyramid, t.proposals, t.gt_boxes, t.gt_labels, t.gt_masks))
        return t.losses

    def _rpn_loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
                  image_sizes: ImageSizes | None) -> "_RPNStep":
        """What every two-stage loss starts with: checked targets on the input's device, the pyramid, the RPN
        losses and the training proposals (per image ``[P, 4]``)."""
        sizes = self._sizes(images, image_sizes)
        if len(targets) != images.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]}")
        gt_boxes = [t["boxes"].to(images.device, torch.float32).reshape(-1, 4) for t in targets]
        gt_labels = [t["labels"].to(images.device, torch.long).reshape(-1) for t in targets]
        gt_masks = None
        if self.roi_head.with_mask:
            if any("masks" not in t for t in targets):
                raise ValueError("a mask model needs 'masks' in every target")
            gt_masks = [t["masks"].to(images.device) for t in targets]
        _, pyramid = self.extract_feat(images)
        cls_scores, bbox_preds = self.rpn_head(pyramid)
        losses = self.rpn_head.loss(cls_scores, bbox_preds, gt_boxes, sizes)
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes,
                                                    cfg=self.rpn_head.train_cfg.proposals)
        return _RPNStep(sizes, pyramid, gt_boxes, gt_labels, gt_masks, losses, [p[0] for p in proposals])


class _RPNStep(NamedTuple):
    sizes: list[tuple[int, int]]
    pyramid: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_masks: list[Tensor] | None
    losses: dict[str, Tensor]
    proposals: list[Tensor]


def _clip(boxes: Tensor, h: int, w: int) -> Tensor:
    """xyxy boxes clamped into a ``w x h`` image."""
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def build_backbone_neck_rpn(cfg, *, anchor_cls=AnchorGenerator, rpn_cls=RPNHead) -> tuple[nn.Module, FPN, nn.Module]:
    """The parts every two-stage and cascade detector shares, from ``cfg.backbone``, ``cfg.neck`` and ``cfg.rpn``."""
    backbone = build_backbone(cfg.backbone)
    neck = FPN(in_channels=backbone.out_channels, out_channels=cfg.neck.out_channels, num_outs=cfg.neck.num_outs)
    r = cfg.rpn
    if len(r.anchor_strides) != cfg.neck.num_outs:
        raise ValueError(f"{len(r.anchor_strides)} anchor strides for {cfg.neck.num_outs} FPN levels")
    anchors = anchor_cls(strides=r.anchor_strides, ratios=r.anchor_ratios, scales=r.anchor_scales)
    rpn_head = rpn_cls(in_channels=cfg.neck.out_channels, feat_channels=r.feat_channels, anchor_generator=anchors,
                       target_stds=r.target_stds, test_cfg=r.test_proposals, train_cfg=r.rpn_train)
    return backbone, neck, rpn_head


def build_detector(cfg: DetectorConfig) -> TwoStageDetector:
    if cfg.conventions not in ("mmdet", "paddle"):
        raise ValueError(f"conventions must be 'mmdet' or 'paddle', got {cfg.conventions!r}")
    # PaddleDetection's weights need its test-time rules: same layers, other anchors/proposals/decoding/NMS
    anchor_cls, rpn_cls, bbox_cls, roi_cls = (
        (PaddleAnchorGenerator, PaddleRPNHead, PaddleBBoxHead, PaddleRoIHead) if cfg.conventions == "paddle"
        else (AnchorGenerator, RPNHead, Shared2FCBBoxHead, StandardRoIHead))
    backbone, neck, rpn_head = build_backbone_neck_rpn(cfg, anchor_cls=anchor_cls, rpn_cls=rpn_cls)
    h = cfg.roi_head
    bbox_head = bbox_cls(in_channels=cfg.neck.out_channels, roi_size=h.roi_size, fc_channels=h.fc_channels,
                         num_shared_fcs=h.num_shared_fcs, num_classes=h.num_classes, target_stds=h.bbox_stds)
    mask_head = None
    if h.with_mask:
        mask_head = FCNMaskHead(in_channels=cfg.neck.out_channels, conv_channels=h.mask_channels,
                                num_convs=h.mask_num_convs, num_classes=h.num_classes)
    roi_head = roi_cls(bbox_head=bbox_head, mask_head=mask_head, featmap_strides=h.featmap_strides,
                       roi_size=h.roi_size, mask_roi_size=h.mask_roi_size, finest_scale=h.finest_scale,
                       test_cfg=h.rcnn_test, train_cfg=h.rcnn_train)
    if cfg.class_names and len(cfg.class_names) != h.num_classes:
        raise ValueError(f"{len(cfg.class_names)} class names for {h.num_classes} classes")
    return TwoStageDetector(backbone=backbone, neck=neck, rpn_head=rpn_head, roi_head=roi_head,
                            class_names=cfg.class_names, preprocess=cfg.preprocess)
