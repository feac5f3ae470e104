"""Detectors: the two-stage Faster / Mask R-CNN family, with typed configs."""
from ..heads import ProposalConfig, RCNNTestConfig, RCNNTrainConfig, RPNTrainConfig
from .detector_config import MMDET_RES2NET, DetectorConfig, FPNConfig, RoIHeadConfig, RPNConfig
from .two_stage import TwoStageDetector, build_detector

__all__ = ["DetectorConfig", "FPNConfig", "RPNConfig", "RoIHeadConfig", "ProposalConfig", "RPNTrainConfig",
           "RCNNTestConfig", "RCNNTrainConfig", "MMDET_RES2NET", "TwoStageDetector", "build_detector"]
