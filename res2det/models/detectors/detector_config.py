"""Typed configuration of the two-stage detectors: Faster / Mask R-CNN, Cascade (Mask) R-CNN and Hybrid Task
Cascade, all with FPN (mmdetection 3.3.0 defaults). One ``DetectorConfig``; its RoI head carries one stage
(Faster / Mask R-CNN) or several (the cascades) and, for HTC, an ``HTCConfig``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...structures import DETECTION_PREPROCESS, Preprocess
from ..backbones import BackboneConfig
from ..heads import ProposalConfig, RCNNTestConfig, RCNNTrainConfig, RPNTrainConfig
from ..heads.targets import MaxIoUAssigner, RandomSampler

# mmdet's Res2Net backbone: deep 3x3 stem, avg-pool shortcuts, its own first-block behaviour; the stem and
# layer1 frozen and BN statistics fixed while training.
MMDET_RES2NET = BackboneConfig(depth=50, stem="deep", shortcut="avg", stage_block="mmdet", frozen_stages=1,
                               norm_eval=True)


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int = 256
    num_outs: int = 5  # P2..P6; the input channels come from the backbone


@dataclass(frozen=True)
class RPNConfig:
    feat_channels: int = 256
    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    test_proposals: ProposalConfig = field(default_factory=ProposalConfig)
    rpn_train: RPNTrainConfig = field(default_factory=RPNTrainConfig)


@dataclass(frozen=True)
class StageConfig:
    """One R-CNN stage: its box coder's stds, the weight of its losses and how it assigns and samples rois."""

    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    loss_weight: float = 1.0  # cascades only (a single stage's losses are not weighted)
    train: RCNNTrainConfig = field(default_factory=RCNNTrainConfig)


@dataclass(frozen=True)
class HTCConfig:
    """Hybrid Task Cascade: interleaved box / mask branches, mask information flow, the semantic branch."""

    with_semantic: bool = True  # the FusedSemanticHead branch (needs targets[i]["semantic"] to train)
    semantic_num_classes: int = 183
    semantic_fusion_level: int = 1
    semantic_num_convs: int = 4
    semantic_roi_size: int = 14
    semantic_loss_weight: float = 0.2
    semantic_ignore_index: int = 255
    interleaved: bool = True
    mask_info_flow: bool = True


@dataclass(frozen=True)
class RoIHeadConfig:
    """The R-CNN head: one stage is Faster / Mask R-CNN's ``StandardRoIHead``, several a ``CascadeRoIHead``, and
    ``htc`` set a ``HybridTaskCascadeRoIHead``."""

    num_classes: int = 80
    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)  # P2..P5
    roi_size: int = 7
    finest_scale: int = 56
    fc_channels: int = 1024
    num_shared_fcs: int = 2
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    reg_class_agnostic: bool = False  # one box per roi instead of one per class (mmdet's cascades)
    bbox_loss_beta: float = 0.0  # 0: L1 box loss (Faster / Mask R-CNN); > 0: smooth L1 (cascades: 1.0)
    with_mask: bool = False
    mask_roi_size: int = 14
    mask_num_convs: int = 4
    mask_channels: int = 256
    rcnn_test: RCNNTestConfig = field(default_factory=RCNNTestConfig)
    htc: HTCConfig | None = None


def _cascade_stages(match_low_quality: bool) -> tuple[StageConfig, ...]:
    """IoU 0.5 / 0.6 / 0.7 assigners, stds halved per stage, loss weights 1 / 0.5 / 0.25."""
    stds = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
    return tuple(StageConfig(
        bbox_stds=s, loss_weight=w,
        train=RCNNTrainConfig(assigner=MaxIoUAssigner(pos_iou_thr=t, neg_iou_thr=t, min_pos_iou=t,
                                                      match_low_quality=match_low_quality),
                              sampler=RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True)))
        for s, w, t in zip(stds, (1.0, 0.5, 0.25), (0.5, 0.6, 0.7)))


# mmdet's cascade-rcnn_r50_fpn / cascade-mask-rcnn_r50_fpn: no low-quality matches.
CASCADE_STAGES = _cascade_stages(False)
# mmdet's htc-without-semantic_r50_fpn leaves match_low_quality at the assigner's default (True).
HTC_STAGES = _cascade_stages(True)
CASCADE_ROI_HEAD = RoIHeadConfig(stages=CASCADE_STAGES, reg_class_agnostic=True, bbox_loss_beta=1.0)

# RPN of the cascade configs: smooth L1 (beta 1/9) box loss, 2000 training proposals, only anchors wholly inside
# the image trained (allowed_border=0).
CASCADE_RPN = RPNConfig(rpn_train=RPNTrainConfig(proposals=ProposalConfig(nms_pre=2000, max_per_img=2000),
                                                smooth_l1_beta=1.0 / 9.0, allowed_border=0))


@dataclass(frozen=True)
class DetectorConfig:
    """Backbone + FPN + RPN + R-CNN head.

    ``create_model`` overrides reach any field by its dotted path (``roi_head.stages.2.train.sampler.num``) or
    by a name that occurs once (``frozen_stages=0``, ``with_mask=True``). The R-CNN train defaults are Faster
    R-CNN's; mmdet's Mask R-CNN also sets ``match_low_quality=True`` in the R-CNN assigner (see the zoo row).
    ``conventions='paddle'`` runs PaddleDetection's test-time rules."""

    backbone: BackboneConfig = MMDET_RES2NET
    neck: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    class_names: tuple[str, ...] = ()
    # Test-time conventions of the weights' source: 'mmdet', or 'paddle' for PaddleDetection's anchors, proposal
    # generation (logit ranking, < 1 px boxes dropped), RoI level rule, box decoding and NMS output (see
    # res2det.models.heads.paddle_conventions). The layers and their shapes are the same.
    conventions: Literal["mmdet", "paddle", "paddle_static"] = "mmdet"
    # How the weights expect their input (mean/std on 0..255 RGB pixels, resize bounds): part of the detector,
    # used by ``predict``, evaluation, the datasets and ONNX export alike.
    preprocess: Preprocess = DETECTION_PREPROCESS
