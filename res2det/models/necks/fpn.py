"""Feature Pyramid Network (Lin et al., CVPR 2017), as configured in mmdetection's R-CNN models."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .. import weight_init


class FPN(nn.Module):
    """1x1 lateral convs and 3x3 output convs (with bias, no norm/activation) over C2..C5, a nearest-neighbour
    top-down pathway, and extra levels by stride-2 max-pooling of the top output (P6 for ``num_outs=5``).

    Module names mirror mmdetection's (``lateral_convs.i``, ``fpn_convs.i``) without its ``ConvModule``
    wrapper, so its ``...convs.i.conv.weight`` keys map by dropping ``.conv``.
    """

    def __init__(self, *, in_channels: Sequence[int] = (256, 512, 1024, 2048), out_channels: int = 256,
                 num_outs: int = 5):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be >= the number of inputs ({len(in_channels)})")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        weight_init.xavier_([*self.lateral_convs, *self.fpn_convs])

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} feature maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # Upsample to the finer map's exact size (not a fixed 2x), so odd sizes (e.g. 25 -> 50 vs 13) work.
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            # mmdet's add_extra_convs=False: a 1x1 max-pool with stride 2 is plain subsampling.
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
