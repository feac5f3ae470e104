"""Multi-level (FPN) RoI feature extraction: assign each roi to a level, RoIAlign there."""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from . import onnx_ops
from .roi_align import roi_align


def _wh(rois: Tensor) -> tuple[Tensor, Tensor]:
    return rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: int = 56) -> Tensor:
    """mmdetection's rule: ``floor(log2(sqrt(w*h) / finest_scale + 1e-6))`` clamped to
    ``[0, num_levels - 1]`` (scale < 112 -> 0, [112, 224) -> 1, [224, 448) -> 2, ...)."""
    w, h = _wh(rois)
    scale = torch.sqrt((w * h).clamp(min=0))  # clamp: inverted rois give level 0, not NaN
    lvls = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvls.clamp(min=0, max=num_levels - 1).long()


def paddle_roi_levels(rois: Tensor, min_level: int = 2, max_level: int = 5,
                      refer_level: int = 4, refer_scale: int = 224) -> Tensor:
    """PaddleDetection's ``distribute_fpn_proposals`` rule, as an index from 0:
    ``clamp(floor(refer_level + log2(sqrt(w*h) / refer_scale + 1e-8)), min, max) - min``
    (side 112 -> P3, 224 -> P4, 448 -> P5)."""
    w, h = _wh(rois)
    scale = torch.sqrt(w.clamp(min=0) * h.clamp(min=0))  # Paddle: inverted boxes have area 0
    lvls = torch.floor(refer_level + torch.log2(scale / refer_scale + 1e-8))
    return (lvls.clamp(min=min_level, max=max_level) - min_level).long()


def paddle_static_roi_levels(rois: Tensor, min_level: int = 2, max_level: int = 5, refer_level: int = 4,
                             refer_scale: float = 224.0) -> Tensor:
    """PaddleDetection's static-graph ``distribute_fpn_proposals(pixel_offset=True)``, as an index from 0: the
    +1 area ``(w + 1)(h + 1)`` (0 for an inverted box), ``floor(log2(sqrt(area) / refer_scale + 1e-6) +
    refer_level)`` clamped to the levels."""
    w, h = _wh(rois)
    valid = (w >= 0) & (h >= 0)
    scale = torch.sqrt(torch.where(valid, (w + 1) * (h + 1), torch.zeros_like(w)))
    lvls = torch.floor(torch.log2(scale / refer_scale + 1e-6) + refer_level)
    return (lvls.clamp(min=min_level, max=max_level) - min_level).long()


_LEVEL_RULES = {"paddle": paddle_roi_levels, "paddle_static": paddle_static_roi_levels}


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels (mmdet ``SingleRoIExtractor`` without roi scaling).

    ``forward(feats, rois)`` uses ``feats[:len(featmap_strides)]``; each roi is pooled
    from the level chosen by ``level_mapping`` with ``spatial_scale = 1 / stride``.
    Output rows follow the order of ``rois``.
    """

    def __init__(self, *, output_size: int, featmap_strides: Sequence[int], sampling_ratio: int = 0,
                 aligned: bool = True, finest_scale: int = 56,
                 level_mapping: Literal["mmdet", "paddle", "paddle_static"] = "mmdet") -> None:
        super().__init__()
        if level_mapping not in ("mmdet", "paddle", "paddle_static"):
            raise ValueError(f"unknown level_mapping {level_mapping!r}")
        self.output_size = int(output_size)
        self.featmap_strides = tuple(int(s) for s in featmap_strides)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.finest_scale = int(finest_scale)
        self.level_mapping = level_mapping

    @property
    def num_levels(self) -> int:
        return len(self.featmap_strides)

    def map_levels(self, rois: Tensor) -> Tensor:
        if self.level_mapping == "mmdet":
            return map_roi_levels(rois, self.num_levels, self.finest_scale)
        # Paddle names levels by log2(stride): stride 4 is P2.
        min_level = round(math.log2(self.featmap_strides[0]))
        return _LEVEL_RULES[self.level_mapping](rois, min_level=min_level, max_level=min_level + self.num_levels - 1)

    def forward(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        out_size = self.output_size
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], out_size, out_size)
        exporting = onnx_ops.exporting()
        if not exporting and rois.shape[0] == 0:
            return out
        levels = self.map_levels(rois) if self.num_levels > 1 else torch.zeros_like(rois[:, 0]).long()
        for lvl, stride in enumerate(self.featmap_strides):
            inds = torch.nonzero(levels == lvl).flatten()
            if exporting:  # ONNX's RoiAlign; no Python branch on how many rois a level has in this image
                if not self.aligned:
                    raise ValueError("ONNX export supports aligned RoIAlign only")
                r = rois[inds]
                pooled = onnx_ops.roi_align(feats[lvl], r[:, 1:], r[:, 0].long(), out_size, 1.0 / stride,
                                            self.sampling_ratio)
                out = out.index_put((inds,), pooled)
            elif inds.numel():
                out[inds] = roi_align(feats[lvl], rois[inds], out_size, 1.0 / stride,
                                      self.sampling_ratio, self.aligned).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, featmap_strides={self.featmap_strides}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"level_mapping={self.level_mapping!r}")
