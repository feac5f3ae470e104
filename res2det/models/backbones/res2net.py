"""The Res2Net bottleneck (Gao et al., TPAMI 2020).

Inside the bottleneck the 3x3 conv is replaced by ``scale`` groups of ``width`` channels: split ``k``
(k >= 1) is added to the output of split ``k-1`` before its own 3x3 conv, so later splits see ever larger
receptive fields. The last split is passed through without a conv.

The first block of a stage ("stage block") has no hierarchical additions, and the published sources disagree
on how they treat its last split (see ``STAGE_BLOCK_STYLES``); each released checkpoint must be run with the
behaviour it was trained with.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ...ops import ModulatedDeformConv2d

StageBlockStyle = Literal["official", "mmdet", "paddle"]

STAGE_BLOCK_STYLES: dict[str, str] = {
    "official": "Official code and timm. The stage block does not accumulate splits; its last split goes through "
    "AvgPool2d(3, stride, 1) (padding counted), also at stride 1 (layer1.0).",
    "mmdet": "mmdetection. As official, but at stride 1 (layer1.0) the last split is concatenated unpooled.",
    "paddle": "PaddleDetection. Only strided blocks skip the accumulation (layer1.0 accumulates like any block); "
    "the last split is unpooled at stride 1 and avg-pooled 3x3 at stride 2 with padding excluded.",
}


class Bottle2neck(nn.Module):
    """Res2Net bottleneck. Attribute names follow the official code: conv1, bn1, convs.k, bns.k, conv3, bn3."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nn.Module | None = None,
        stage_first: bool = False,
        base_width: int = 26,
        scale: int = 4,
        cardinality: int = 1,
        stage_block: StageBlockStyle = "official",
        dcn: bool = False,
    ):
        super().__init__()
        if scale < 2:
            raise ValueError(f"Res2Net scale must be >= 2, got {scale}")
        if stage_block not in STAGE_BLOCK_STYLES:
            raise ValueError(f"stage_block must be one of {sorted(STAGE_BLOCK_STYLES)}, got {stage_block!r}")
        width = int(math.floor(planes * base_width / 64.0)) * cardinality
        self.width = width
        self.scale = scale
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)

        def conv3x3() -> nn.Module:
            if dcn:
                return ModulatedDeformConv2d(width, width, 3, stride=stride, padding=1, groups=cardinality)
            return nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)

        self.convs = nn.ModuleList(conv3x3() for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

        # Which splits are accumulated and what happens to the last one depends on the source.
        if stage_block == "paddle":
            self.accumulate = stride == 1
            pool = nn.AvgPool2d(3, stride, 1, count_include_pad=False) if stride > 1 else None
        else:
            self.accumulate = not stage_first
            pool_at_stride1 = stage_block == "official"
            wants_pool = stage_first and (stride > 1 or pool_at_stride1)
            pool = nn.AvgPool2d(3, stride, 1) if wants_pool else None
        if pool is None and stride > 1:
            raise ValueError("a strided Res2Net block needs a pool on its last split")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        # Python-int split sizes keep the graph traceable for export.
        splits = torch.split(out, self.width, dim=1)
        outs = []
        sp = splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if i > 0:
                sp = sp + splits[i] if self.accumulate else splits[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        outs.append(splits[-1] if self.pool is None else self.pool(splits[-1]))
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        return self.relu(out + identity)
