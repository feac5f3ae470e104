"""Anchor boxes on FPN grids, following mmdetection's ``AnchorGenerator`` conventions exactly."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Anchors per FPN level: ``len(ratios) * len(scales)`` boxes at every grid point.

    mmdetection's conventions (which its checkpoints were trained with): the base box of a level is centred at
    (0, 0) (``center_offset=0``; grid point ``(i, j)`` sits at ``(j*stride, i*stride)``, not at the pixel centre),
    has side ``stride * scale`` scaled by ``w = 1/sqrt(r)``, ``h = sqrt(r)`` for ratio ``r = h/w``, is not
    rounded, and the order is ratio-major (scale-minor) within a location, locations row-major.
    """

    def __init__(self, *, strides: Sequence[int] = (4, 8, 16, 32, 64), ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 scales: Sequence[float] = (8.0,)):
        self.strides = tuple(int(s) for s in strides)
        self.ratios = tuple(float(r) for r in ratios)
        self.scales = tuple(float(s) for s in scales)
        self.base_anchors = [self._base_anchors(s) for s in self.strides]

    @property
    def num_anchors(self) -> int:
        """Anchors per grid location."""
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size: int) -> Tensor:
        # Same float32 op order as mmdet (w * w_ratio * scale), so anchors are bit-identical.
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        scales = torch.tensor(self.scales, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors(self, featmap_sizes: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> list[Tensor]:
        """One ``[H*W*A, 4]`` tensor per level, in the order of the head's ``permute(1, 2, 0)`` outputs."""
        if len(featmap_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(featmap_sizes)}")
        out = []
        for (h, w), stride, base in zip(featmap_sizes, self.strides, self.base_anchors):
            xs = torch.arange(w, device=device).to(torch.float32) * stride
            ys = torch.arange(h, device=device).to(torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            out.append((base.to(device)[None] + shifts).reshape(-1, 4))
        return out

    def valid_flags(self, featmap_sizes: Sequence[Sequence[int]], pad_shape: Sequence[int],
                    device: torch.device | str = "cpu") -> list[Tensor]:
        """Anchors whose grid point lies inside the image's own padded extent (not the batch padding)."""
        flags = []
        for (h, w), stride in zip(featmap_sizes, self.strides):
            vh = min(math.ceil(pad_shape[0] / stride), h)
            vw = min(math.ceil(pad_shape[1] / stride), w)
            valid = torch.zeros(h, w, dtype=torch.bool, device=device)
            valid[:vh, :vw] = True
            flags.append(valid.reshape(-1, 1).expand(-1, self.num_anchors).reshape(-1))
        return flags
