"""Two-stage detectors: backbone -> FPN -> RPN proposals -> RoI head (Faster / Mask R-CNN, the cascades, HTC)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ...errors import Res2DetError
from ...ops.onnx_ops import exporting
from ...structures import DETECTION_PREPROCESS, InstanceMasks, Preprocess
from ..backbones import build_backbone
from ..heads import AnchorGenerator, FCNMaskHead, RPNHead, Shared2FCBBoxHead, StandardRoIHead
from ..heads.cascade_roi_head import CascadeRoIHead
from ..heads.htc_roi_head import build_htc_roi_head
from ..heads.roi_head import RoIHead
from ..heads.paddle_conventions import PaddleAnchorGenerator, PaddleBBoxHead, PaddleRoIHead, PaddleRPNHead
from ..heads.paddle_static_conventions import StaticBBoxHead, StaticRoIHead, StaticRPNHead
from ..necks import FPN
from .detector_config import DetectorConfig

if TYPE_CHECKING:
    from typing import Iterator

    import numpy as np

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

    def __init__(self, *, backbone: nn.Module, neck: FPN, rpn_head: RPNHead, roi_head: RoIHead,
                 class_names: Sequence[str] = (), preprocess: Preprocess = DETECTION_PREPROCESS,
                 conventions: str = "mmdet"):
        super().__init__()
        self.preprocess = preprocess  # the input normalisation and resize bounds the weights expect
        self.conventions = conventions  # whose test-time rules the heads follow: 'mmdet', 'paddle', 'paddle_static'
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
        if exporting():  # the size is a graph input: int() would freeze it to the traced example's
            return [(h, w) for h, w in image_sizes]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {images.shape[0]}")
        return [(int(h), int(w)) for h, w in image_sizes]

    def detect(self, images: Tensor, image_sizes: ImageSizes | None = None, *,
               capture: dict[str, Tensor] | None = None, paste_masks: bool = True,
               image_metas: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Tensor]]:
        """Detections per image of a normalised, padded batch, in input pixels; with ``capture`` (a dict) the
        intermediate tensors are stored in it. Mask models return ``masks [K, h, w]`` pasted into the input
        or, with ``paste_masks=False``, the ``mask_probs [K, 28, 28]`` of each detection (its class's map,
        after the sigmoid) to paste elsewhere (``predict`` pastes them at the original image size).
        ``image_metas``: per image ``scale_factor`` (sx, sy) and ``orig_size`` (H, W), which the heads of
        PaddleDetection's static-graph rules need (they post-process in original pixels; without metas the
        input is taken as the original image)."""
        sizes = self._sizes(images, image_sizes)
        feats, pyramid = self.extract_feat(images)
        cls_scores, bbox_preds = self.rpn_head(pyramid)
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes)
        results = self.roi_head.predict(pyramid, [p[0] for p in proposals], sizes, capture=capture,
                                        paste=paste_masks, image_metas=image_metas)
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
                if "masks" in r:
                    capture["det.masks"] = r["masks"]
        return results

    def predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None,
                batch_size: int = 1, precision: str | None = None) -> "list[Detections]":
        """Detect objects in images given as paths, PIL images, HxWx3 uint8 arrays or tensors (HxWx3 or 3xHxW;
        floats in 0..1 or 0..255), one or a list (an ``N x 3 x H x W`` tensor or ``N x H x W x 3`` array is
        a list of N). Returns one ``Detections`` per image, always a list.

        As mmdetection's test pipeline (``res2det.inference``): keep-ratio resize to fit the model's (short,
        long) input bounds (mmcv's rule, bilinear), normalise with ``model.preprocess``, zero-pad bottom/right
        to a multiple of 32, ``batch_size`` images per forward. Boxes are divided by the per-axis scale factors
        and clipped to the original image; masks are pasted at the original size from those boxes.
        ``score_thr`` keeps only detections scoring at least that much (after the model's own test threshold).
        ``detect`` runs under ``torch.inference_mode`` in eval mode (the previous mode is restored); the
        returned tensors are ordinary CPU tensors.

        ``precision`` 'bf16' / 'fp16' runs the layers under ``torch.autocast`` where the device has native
        instructions for it (else fp32, with a ``PrecisionFallback`` warning); scores, box decoding, NMS,
        RoIAlign sampling and mask pasting stay fp32 (``res2det.inference.autocast_dtype``). ``None`` (the
        default) is the model's own: fp32, or bf16 for the bf16 form of ``optimize_for_inference``.
        """
        return [det for _, _, det in self.iter_predict(images, score_thr=score_thr, batch_size=batch_size,
                                                       precision=precision)]

    def iter_predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None,
                     batch_size: int = 1, precision: str | None = None, num_workers: int = 0,
                     on_bad: "Callable[[ImageLike, str], None] | None" = None
                     ) -> "Iterator[tuple[ImageLike, np.ndarray, Detections]]":
        """``predict`` one image at a time: ``(image, its HxWx3 uint8 pixels, Detections)``, decoding and
        pre-processing in ``num_workers`` background processes while the model runs (for folders of images).
        ``on_bad(image, message)`` gets each image that cannot be read, which is skipped (default: its error is
        raised)."""
        from ...inference import PRECISIONS, autocast_dtype, iter_predict

        param = next(self.parameters())
        own = getattr(self, "inference_precision", "fp32")  # bf16: the weights were converted for it
        if own != "fp32" and precision not in (None, own):
            raise Res2DetError(f"this model's weights were converted to {own} (optimize_for_inference); predict "
                               f"it in {own}, or use the original model for {precision}")
        dtype = autocast_dtype(precision or own, param.device) if own == "fp32" else PRECISIONS[own]

        def detect(batch: Tensor, sizes: list[tuple[int, int]], metas: list[dict]) -> list[dict[str, Tensor]]:
            with torch.inference_mode(), torch.autocast(param.device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                return self.detect(batch.to(param.device, param.dtype), sizes, paste_masks=False, image_metas=metas)

        was_training = self.training
        self.eval()
        try:
            yield from iter_predict(detect, images, preprocess=self.preprocess, class_names=self.class_names,
                                    mask_thr=self.roi_head.test_cfg.mask_thr_binary,
                                    mask_paste=self.roi_head.mask_paste, score_thr=score_thr,
                                    batch_size=batch_size, num_workers=num_workers, on_bad=on_bad)
        finally:
            self.train(was_training)

    def postprocess(self, result: Mapping[str, Tensor], *, scale_factor: Sequence[float], orig_size: Sequence[int],
                    score_thr: float | None = None) -> tuple[Tensor, Tensor, Tensor, InstanceMasks | None]:
        """One image's ``detect(..., paste_masks=False)`` output in the original image's pixels with this
        model's mask threshold and pasting rule (``res2det.inference.postprocess``); used by evaluation."""
        from ...inference import postprocess

        return postprocess(result, scale_factor=scale_factor, orig_size=orig_size,
                           mask_thr=self.roi_head.test_cfg.mask_thr_binary,
                           mask_paste=self.roi_head.mask_paste, score_thr=score_thr)

    @torch.no_grad()
    def forward_with_intermediates(self, images: Tensor, image_sizes: ImageSizes | None = None
                                   ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``(detections, intermediates)`` for inference; per-image intermediates (proposals, ``det.*``) are
        recorded for a batch of one."""
        capture: dict[str, Tensor] = {}
        return self.detect(images, image_sizes, capture=capture), capture

    def loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
             image_sizes: ImageSizes | None = None) -> dict[str, Tensor]:
        """The RPN's losses, then the RoI head's (cascades: ``s<stage>.*`` with the stage weights applied; HTC
        with the semantic branch also ``loss_semantic_seg``, and every target then needs ``semantic``: an
        ``[H, W]`` int64 stuff/thing label map of the (padded) input, 255 = ignore)."""
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
        semantic = None
        if self.roi_head.with_semantic:
            semantic, losses["loss_semantic_seg"] = self.roi_head.semantic_loss(pyramid, targets, images.shape[-2:])
        losses.update(self.roi_head.loss(pyramid, [p[0] for p in proposals], gt_boxes, gt_labels, gt_masks,
                                         image_sizes=sizes, semantic=semantic))
        return losses


# per conventions: anchor generator, RPN head, box head, single-stage RoI head (the layers are the same; the
# test-time rules differ: mmdetection's, PaddleDetection dygraph 2.6's, its static-graph era's)
_HEADS = {"mmdet": (AnchorGenerator, RPNHead, Shared2FCBBoxHead, StandardRoIHead),
          "paddle": (PaddleAnchorGenerator, PaddleRPNHead, PaddleBBoxHead, PaddleRoIHead),
          "paddle_static": (AnchorGenerator, StaticRPNHead, StaticBBoxHead, StaticRoIHead)}


def build_roi_head(cfg: DetectorConfig) -> RoIHead:
    """One stage: ``StandardRoIHead`` (``PaddleRoIHead`` / ``StaticRoIHead`` for Paddle's dygraph / static-graph
    conventions); several: ``CascadeRoIHead``; ``roi_head.htc`` set: ``HybridTaskCascadeRoIHead``."""
    h, c, paddle = cfg.roi_head, cfg.neck.out_channels, cfg.conventions != "mmdet"
    if not h.stages:
        raise ValueError("roi_head.stages needs at least one stage")
    for name in ("num_classes", "roi_size", "fc_channels", "mask_roi_size", "mask_channels"):
        if getattr(h, name) < 1:
            raise ValueError(f"roi_head.{name} must be at least 1, got {getattr(h, name)}")
    cascade = len(h.stages) > 1 or h.htc is not None
    if paddle and cascade:
        raise ValueError("PaddleDetection's conventions are implemented for one-stage RoI heads only")
    bbox_cls, roi_cls = _HEADS[cfg.conventions][2:]
    bbox_heads = [bbox_cls(in_channels=c, roi_size=h.roi_size, fc_channels=h.fc_channels,
                           num_shared_fcs=h.num_shared_fcs, num_classes=h.num_classes, target_stds=stage.bbox_stds,
                           reg_class_agnostic=h.reg_class_agnostic, smooth_l1_beta=h.bbox_loss_beta)
                  for stage in h.stages]
    common = dict(featmap_strides=h.featmap_strides, roi_size=h.roi_size, mask_roi_size=h.mask_roi_size,
                  finest_scale=h.finest_scale, test_cfg=h.rcnn_test)

    def mask_head() -> FCNMaskHead:
        return FCNMaskHead(in_channels=c, conv_channels=h.mask_channels, num_convs=h.mask_num_convs,
                           num_classes=h.num_classes)

    if not cascade:
        if h.stages[0].loss_weight != 1.0:
            raise ValueError("loss_weight weighs cascade stages; a single stage's losses are not weighted")
        return roi_cls(
            bbox_head=bbox_heads[0], mask_head=mask_head() if h.with_mask else None, train_cfg=h.stages[0].train,
            **common)
    stages = dict(stage_loss_weights=[s.loss_weight for s in h.stages], train_cfgs=[s.train for s in h.stages])
    if h.htc is not None:
        return build_htc_roi_head(h, c, bbox_heads, num_ins=cfg.neck.num_outs, **stages, **common)
    return CascadeRoIHead(bbox_heads=bbox_heads, mask_heads=[mask_head() for _ in h.stages] if h.with_mask else None,
                          **stages, **common)


def build_detector(cfg: DetectorConfig) -> TwoStageDetector:
    if cfg.conventions not in _HEADS:
        raise ValueError(f"conventions must be one of {', '.join(_HEADS)}, got {cfg.conventions!r}")
    if cfg.class_names and len(cfg.class_names) != cfg.roi_head.num_classes:
        raise ValueError(f"{len(cfg.class_names)} class names for {cfg.roi_head.num_classes} classes")
    backbone = build_backbone(cfg.backbone)
    neck = FPN(in_channels=backbone.out_channels, out_channels=cfg.neck.out_channels, num_outs=cfg.neck.num_outs)
    r = cfg.rpn
    if len(r.anchor_strides) != cfg.neck.num_outs:
        raise ValueError(f"{len(r.anchor_strides)} anchor strides for {cfg.neck.num_outs} FPN levels")
    # PaddleDetection's weights need its test-time rules: same layers, other anchors/proposals/decoding/NMS
    anchor_cls, rpn_cls = _HEADS[cfg.conventions][:2]
    anchors = anchor_cls(strides=r.anchor_strides, ratios=r.anchor_ratios, scales=r.anchor_scales)
    rpn_head = rpn_cls(in_channels=cfg.neck.out_channels, feat_channels=r.feat_channels, anchor_generator=anchors,
                       target_stds=r.target_stds, test_cfg=r.test_proposals, train_cfg=r.rpn_train)
    return TwoStageDetector(backbone=backbone, neck=neck, rpn_head=rpn_head, roi_head=build_roi_head(cfg),
                            class_names=cfg.class_names, preprocess=cfg.preprocess, conventions=cfg.conventions)
