"""Detectors: the two-stage family (Faster / Mask R-CNN, Cascade (Mask) R-CNN, HTC) with one typed config."""
from ..heads import ProposalConfig, RCNNTestConfig, RCNNTrainConfig, RPNTrainConfig
from .detector_config import (CASCADE_ROI_HEAD, CASCADE_RPN, CASCADE_STAGES, HTC_STAGES, MMDET_RES2NET, DetectorConfig,
                              FPNConfig, HTCConfig, RoIHeadConfig, RPNConfig, StageConfig)
from .two_stage import TwoStageDetector, build_detector, build_roi_head

__all__ = ["DetectorConfig", "FPNConfig", "RPNConfig", "RoIHeadConfig", "StageConfig", "HTCConfig", "ProposalConfig",
           "RPNTrainConfig", "RCNNTestConfig", "RCNNTrainConfig", "MMDET_RES2NET", "CASCADE_STAGES", "HTC_STAGES",
           "CASCADE_ROI_HEAD", "CASCADE_RPN", "TwoStageDetector", "build_detector", "build_roi_head"]
