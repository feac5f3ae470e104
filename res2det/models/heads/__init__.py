"""Detection heads: anchors and box coding, the RPN, and the R-CNN box and mask heads."""
from .anchors import AnchorGenerator
from .bbox_head import Shared2FCBBoxHead
from .box_coder import DeltaXYWHBBoxCoder
from .mask_head import FCNMaskHead, paste_mask_crops, paste_masks
from .post_processing import batched_nms, multiclass_nms
from .roi_head import RCNNTestConfig, RCNNTrainConfig, StandardRoIHead, boxes_to_rois
from .rpn_head import ProposalConfig, RPNHead, RPNTrainConfig
from .targets import AssignResult, MaxIoUAssigner, RandomSampler, SamplingResult, assign_and_sample

__all__ = [
    "AnchorGenerator", "DeltaXYWHBBoxCoder", "RPNHead", "ProposalConfig", "RPNTrainConfig", "Shared2FCBBoxHead",
    "FCNMaskHead", "paste_masks", "paste_mask_crops", "StandardRoIHead", "RCNNTestConfig", "RCNNTrainConfig",
    "boxes_to_rois",
    "batched_nms", "multiclass_nms", "MaxIoUAssigner", "RandomSampler", "AssignResult", "SamplingResult",
    "assign_and_sample",
]
