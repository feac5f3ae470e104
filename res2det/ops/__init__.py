"""Detection ops in pure PyTorch (torchvision kernels are used when they work)."""
from .boxes import box_area, box_iou
from .deform_conv import ModulatedDeformConv2d, modulated_deform_conv2d
from .nms import batched_nms, nms
from .precision import at_least_fp32
from .roi_align import RoIAlign, roi_align
from .roi_extract import MultiLevelRoIAlign, map_roi_levels, paddle_roi_levels
from .winograd import conv3x3_winograd, winograd_weight

__all__ = [
    "box_area", "box_iou", "nms", "batched_nms", "roi_align", "RoIAlign", "map_roi_levels",
    "paddle_roi_levels", "MultiLevelRoIAlign", "modulated_deform_conv2d", "ModulatedDeformConv2d",
    "conv3x3_winograd", "winograd_weight", "at_least_fp32",
]
