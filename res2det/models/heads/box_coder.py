"""The R-CNN box parameterisation (dx, dy, dw, dh), with mmdetection's float op order for bit-exact decoding."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ...ops import at_least_fp32


class DeltaXYWHBBoxCoder:
    """Encode boxes as ``((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))``, normalised by
    ``(delta - means) / stds``; widths are ``x2 - x1`` (no ``+1``).

    ``decode`` clamps ``|dw|, |dh|`` at ``|log(wh_ratio_clip)|`` (so ``exp`` cannot blow up) and, given
    ``max_shape=(h, w)``, clips the boxes to ``[0, w] x [0, h]``.
    """

    def __init__(self, *, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000, clip_border: bool = True):
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))
        self.clip_border = clip_border

    def encode(self, boxes: Tensor, targets: Tensor) -> Tensor:
        """Deltas ``[N, 4]`` that move ``boxes [N, 4]`` onto ``targets [N, 4]``."""
        boxes, targets = at_least_fp32(boxes), at_least_fp32(targets)
        pxy = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        pwh = boxes[:, 2:] - boxes[:, :2]
        gxy = (targets[:, :2] + targets[:, 2:]) * 0.5
        gwh = targets[:, 2:] - targets[:, :2]
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
        """Apply ``deltas [N, 4k]`` (k boxes per row, e.g. one per class) to ``boxes [N, 4]`` -> ``[N, 4k]``."""
        n = deltas.shape[0]
        if n == 0:
            return deltas
        k = deltas.shape[1] // 4
        d = deltas.reshape(-1, 4) * deltas.new_tensor(self.stds).view(1, 4) + deltas.new_tensor(self.means).view(1, 4)
        rois = boxes.repeat(1, k).reshape(-1, 4)
        pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
        pwh = rois[:, 2:] - rois[:, :2]
        gxy = pxy + pwh * d[:, :2]
        gwh = pwh * d[:, 2:].clamp(min=-self.max_ratio, max=self.max_ratio).exp()
        out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if self.clip_border and max_shape is not None:
            out = clip_boxes(out, max_shape)
        return out.reshape(n, -1)


def clip_boxes(boxes: Tensor, size: Sequence) -> Tensor:
    """xyxy ``boxes [..., 4]`` clamped into ``[0, w] x [0, h]`` for ``size = (h, w)``: ints, or 0-d tensors
    (an exported graph's image size is an input, not a constant)."""
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(dim=-1)
    return torch.stack([x1.clamp(min=0, max=w), y1.clamp(min=0, max=h), x2.clamp(min=0, max=w),
                        y2.clamp(min=0, max=h)], dim=-1)
