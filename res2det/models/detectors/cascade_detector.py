"""Cascade R-CNN, Cascade Mask R-CNN and Hybrid Task Cascade (mmdetection 3.3.0): a ``TwoStageDetector`` whose
RoI head is a multi-stage cascade."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torch import Tensor

from ...structures import DETECTION_PREPROCESS, Preprocess
from ..backbones import BackboneConfig
from ..heads import FCNMaskHead, Shared2FCBBoxHead
from ..heads.cascade_roi_head import CascadeRoIHead
from ..heads.roi_head import RCNNTestConfig, RCNNTrainConfig
from ..heads.rpn_head import ProposalConfig, RPNTrainConfig
from ..heads.targets import MaxIoUAssigner, RandomSampler
from .detector_config import MMDET_RES2NET, FPNConfig, RPNConfig
from .two_stage import ImageSizes, TwoStageDetector, build_backbone_neck_rpn


def _stage_train(iou: float, low_quality: bool) -> RCNNTrainConfig:
    return RCNNTrainConfig(
        assigner=MaxIoUAssigner(pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou, match_low_quality=low_quality),
        sampler=RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True), mask_size=28)


# mmdet's cascade-rcnn_r50_fpn / cascade-mask-rcnn_r50_fpn: IoU 0.5 / 0.6 / 0.7, no low-quality matches.
CASCADE_TRAIN = tuple(_stage_train(t, False) for t in (0.5, 0.6, 0.7))
# mmdet's htc-without-semantic_r50_fpn leaves match_low_quality at the assigner's default (True).
HTC_TRAIN = tuple(_stage_train(t, True) for t in (0.5, 0.6, 0.7))

# RPN of the cascade configs: smooth L1 (beta 1/9) box loss, 2000 training proposals, only anchors wholly inside
# the image trained (allowed_border=0).
CASCADE_RPN = RPNConfig(rpn_train=RPNTrainConfig(proposals=ProposalConfig(nms_pre=2000, max_per_img=2000),
                                                smooth_l1_beta=1.0 / 9.0, allowed_border=0))


@dataclass(frozen=True)
class CascadeRoIHeadConfig:
    num_classes: int = 80
    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)
    roi_size: int = 7
    finest_scale: int = 56
    fc_channels: int = 1024
    num_shared_fcs: int = 2
    stage_bbox_stds: tuple[tuple[float, float, float, float], ...] = (
        (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
    stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    bbox_loss_beta: float = 1.0  # smooth L1
    with_mask: bool = False
    mask_roi_size: int = 14
    mask_num_convs: int = 4
    mask_channels: int = 256
    rcnn_test: RCNNTestConfig = field(default_factory=RCNNTestConfig)
    stage_train: tuple[RCNNTrainConfig, ...] = CASCADE_TRAIN
    # Hybrid Task Cascade
    htc: bool = False  # interleaved box/mask branches with mask information flow (HTCMaskHead)
    with_semantic: bool = False  # the FusedSemanticHead branch (needs targets[i]["semantic"] to train)
    semantic_num_classes: int = 183
    semantic_fusion_level: int = 1
    semantic_num_convs: int = 4
    semantic_roi_size: int = 14
    semantic_loss_weight: float = 0.2
    semantic_ignore_index: int = 255
    interleaved: bool = True
    mask_info_flow: bool = True


@dataclass(frozen=True)
class CascadeDetectorConfig:
    """Backbone + FPN + RPN + cascade RoI head (see ``DetectorConfig`` for how overrides reach the fields)."""

    backbone: BackboneConfig = MMDET_RES2NET
    neck: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = CASCADE_RPN
    roi_head: CascadeRoIHeadConfig = field(default_factory=CascadeRoIHeadConfig)
    class_names: tuple[str, ...] = ()
    preprocess: Preprocess = DETECTION_PREPROCESS  # see DetectorConfig


class CascadeDetector(TwoStageDetector):
    """``TwoStageDetector`` with a cascade RoI head: the same ``predict`` / ``detect`` / ``forward`` API.

    Training returns the RPN losses and ``s<stage>.loss_cls``, ``s<stage>.loss_bbox`` (``s<stage>.loss_mask``)
    with the stage weights applied, plus ``loss_semantic_seg`` for HTC with the semantic branch; then every
    target needs ``semantic``: an ``[H, W]`` int64 stuff/thing label map of the (padded) input, 255 = ignore.
    """

    def loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
             image_sizes: ImageSizes | None = None) -> dict[str, Tensor]:
        t = self._rpn_loss(images, targets, image_sizes)
        semantic = None
        if getattr(self.roi_head, "with_semantic", False):
            semantic, loss_seg = self.roi_head.semantic_loss(t.pyramid, targets, images.shape[-2:])
            t.losses["loss_semantic_seg"] = loss_seg
        t.losses.update(self.roi_head.loss(t.pyramid, t.proposals, t.gt_boxes, t.gt_labels, t.gt_masks,
                                           image_sizes=t.sizes, semantic=semantic))
        return t.losses


def build_cascade_detector(cfg: CascadeDetectorConfig) -> CascadeDetector:
    backbone, neck, rpn_head = build_backbone_neck_rpn(cfg)
    h = cfg.roi_head
    n = len(h.stage_bbox_stds)
    if len(h.stage_train) != n or len(h.stage_loss_weights) != n:
        raise ValueError(f"{n} stages (stage_bbox_stds) but {len(h.stage_train)} train configs and "
                         f"{len(h.stage_loss_weights)} loss weights")
    c = cfg.neck.out_channels
    bbox_heads = [Shared2FCBBoxHead(in_channels=c, roi_size=h.roi_size, fc_channels=h.fc_channels,
                                    num_shared_fcs=h.num_shared_fcs, num_classes=h.num_classes, target_stds=stds,
                                    reg_class_agnostic=True, smooth_l1_beta=h.bbox_loss_beta)
                  for stds in h.stage_bbox_stds]
    common = dict(stage_loss_weights=h.stage_loss_weights, featmap_strides=h.featmap_strides, roi_size=h.roi_size,
                  mask_roi_size=h.mask_roi_size, finest_scale=h.finest_scale, test_cfg=h.rcnn_test,
                  train_cfgs=h.stage_train)
    if h.htc:
        from ..heads.htc_roi_head import build_htc_roi_head

        roi_head = build_htc_roi_head(h, c, bbox_heads, num_ins=cfg.neck.num_outs, **common)
    else:
        if h.with_semantic:
            raise ValueError("with_semantic needs htc=True")
        mask_heads = None
        if h.with_mask:
            mask_heads = [FCNMaskHead(in_channels=c, conv_channels=h.mask_channels, num_convs=h.mask_num_convs,
                                      num_classes=h.num_classes) for _ in range(n)]
        roi_head = CascadeRoIHead(bbox_heads=bbox_heads, mask_heads=mask_heads, **common)
    if cfg.class_names and len(cfg.class_names) != h.num_classes:
        raise ValueError(f"{len(cfg.class_names)} class names for {h.num_classes} classes")
    return CascadeDetector(backbone=backbone, neck=neck, rpn_head=rpn_head, roi_head=roi_head,
                           class_names=cfg.class_names, preprocess=cfg.preprocess)


__all__ = ["CascadeDetector", "CascadeDetectorConfig", "CascadeRoIHeadConfig", "build_cascade_detector",
           "CASCADE_TRAIN", "HTC_TRAIN", "CASCADE_RPN"]
