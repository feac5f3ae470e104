"""Typed configuration of two-stage detectors (mmdetection 3.3.0 defaults for Faster/Mask R-CNN with FPN)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...structures import DETECTION_PREPROCESS, Preprocess
from ..backbones import BackboneConfig
from ..heads import ProposalConfig, RCNNTestConfig, RCNNTrainConfig, RPNTrainConfig

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
class RoIHeadConfig:
    num_classes: int = 80
    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)  # P2..P5
    roi_size: int = 7
    finest_scale: int = 56
    fc_channels: int = 1024
    num_shared_fcs: int = 2
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    with_mask: bool = False
    mask_roi_size: int = 14
    mask_num_convs: int = 4
    mask_channels: int = 256
    rcnn_test: RCNNTestConfig = field(default_factory=RCNNTestConfig)
    rcnn_train: RCNNTrainConfig = field(default_factory=RCNNTrainConfig)


@dataclass(frozen=True)
class DetectorConfig:
    """Backbone + FPN + RPN + R-CNN head.

    ``create_model`` overrides reach the fields of these nested configs by name (``frozen_stages=0``,
    ``with_mask=True``); deeper settings are replaced as whole dataclasses, e.g.
    ``rcnn_test=RCNNTestConfig(score_thr=0.3)`` or ``test_proposals=ProposalConfig(nms_pre=500)``.
    The R-CNN train defaults are Faster R-CNN's; mmdet's Mask R-CNN also sets ``match_low_quality=True`` in the
    R-CNN assigner (see the zoo row). ``conventions='paddle'`` runs PaddleDetection's test-time rules."""

    backbone: BackboneConfig = MMDET_RES2NET
    neck: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    class_names: tuple[str, ...] = ()
    # Test-time conventions of the weights' source: 'mmdet', or 'paddle' for PaddleDetection's anchors, proposal
    # generation (logit ranking, < 1 px boxes dropped), RoI level rule, box decoding and NMS output (see
    # res2det.models.heads.paddle_conventions). The layers and their shapes are the same.
    conventions: Literal["mmdet", "paddle"] = "mmdet"
    # How the weights expect their input (mean/std on 0..255 RGB pixels, resize bounds): part of the detector,
    # used by ``predict``, evaluation, the datasets and ONNX export alike.
    preprocess: Preprocess = DETECTION_PREPROCESS
