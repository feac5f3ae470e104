"""One ResNet skeleton (stem, four stages, optional classifier head) with the bottleneck injected.

The same skeleton builds Res2Net/Res2NeXt (``Bottle2neck``) and plain ResNet (``Bottleneck``, the
torchvision/timm v1.5 layout) for comparison. Attribute names are the official ones (``conv1``, ``bn1``,
``layer1..4``, ``fc``), so official and timm ImageNet checkpoints load without renaming.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...ops import ModulatedDeformConv2d
from .. import weight_init
from .res2net import Bottle2neck

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class Bottleneck(nn.Module):
    """Plain ResNet bottleneck (stride on the 3x3 conv), with torchvision's attribute names."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nn.Module | None = None,
        stage_first: bool = False,
        base_width: int = 64,
        cardinality: int = 1,
        dcn: bool = False,
    ):
        super().__init__()
        del stage_first  # a plain bottleneck treats every block alike
        width = int(planes * base_width / 64.0) * cardinality
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if dcn:
            self.conv2 = ModulatedDeformConv2d(width, width, 3, stride=stride, padding=1, groups=cardinality)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _deep_stem(in_chans: int, width: int, out: int) -> nn.Sequential:
    # Indices 0..6 match the official v1b / timm 'deep' stem (conv, bn, relu, conv, bn, relu, conv);
    # the final BN is the skeleton's bn1.
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, out, 3, padding=1, bias=False),
    )


def _shortcut(inplanes: int, outplanes: int, stride: int, kind: str) -> nn.Sequential:
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes))
    # 'avg' (ResNet-D): average-pool first so the 1x1 conv sees every pixel. Index 0 stays a module at
    # stride 1 so the conv/bn keys are downsample.1/.2 in every block, as in the official layout.
    pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False), nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
    """ResNet-style network: ``forward`` returns logits when ``num_classes > 0``, else the feature maps of
    ``out_indices`` (0 = C2, stride 4 ... 3 = C5, stride 32) with ``out_channels`` and ``out_strides``."""

    def __init__(
        self,
        *,
        block: type[nn.Module] = Bottle2neck,
        depth: int = 50,
        stage_blocks: Sequence[int] | None = None,
        base_channels: int = 64,
        block_kwargs: dict | None = None,
        stem: Literal["original", "deep"] = "original",
        shortcut: Literal["conv", "avg"] = "conv",
        in_chans: int = 3,
        num_classes: int = 1000,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        dcn_stages: Sequence[bool] = (False, False, False, False),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
    ):
        super().__init__()
        if stage_blocks is None:
            if depth not in STAGE_DEPTHS:
                raise ValueError(f"depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
            stage_blocks = STAGE_DEPTHS[depth]
        if len(stage_blocks) != 4 or min(stage_blocks) < 1:
            raise ValueError(f"stage_blocks needs 4 positive block counts, got {tuple(stage_blocks)}")
        if base_channels < 8 or base_channels % 2:
            raise ValueError(f"base_channels must be an even number >= 8, got {base_channels}")
        if stem not in ("original", "deep"):
            raise ValueError(f"stem must be 'original' or 'deep', got {stem!r}")
        if shortcut not in ("conv", "avg"):
            raise ValueError(f"shortcut must be 'conv' or 'avg', got {shortcut!r}")
        if len(dcn_stages) != 4:
            raise ValueError(f"dcn_stages needs one flag per stage (4), got {tuple(dcn_stages)}")
        if not set(out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices must be within 0..3, got {tuple(out_indices)}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.num_classes = num_classes

        if stem == "deep":
            self.conv1 = _deep_stem(in_chans, base_channels // 2, base_channels)
        else:
            self.conv1 = nn.Conv2d(in_chans, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        inplanes = base_channels
        channels = []
        planes_per_stage = [base_channels * 2**i for i in range(4)]  # 64, 128, 256, 512 in the published models
        for i, (planes, n_blocks) in enumerate(zip(planes_per_stage, stage_blocks)):
            stride = 1 if i == 0 else 2
            outplanes = planes * block.expansion
            blocks = []
            for j in range(n_blocks):
                first = j == 0
                downsample = _shortcut(inplanes, outplanes, stride, shortcut) if first else None
                blocks.append(
                    block(
                        inplanes,
                        planes,
                        stride=stride if first else 1,
                        downsample=downsample,
                        stage_first=first,
                        dcn=bool(dcn_stages[i]),
                        **(block_kwargs or {}),
                    )
                )
                inplanes = outplanes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            channels.append(outplanes)
        self.out_channels = [channels[i] for i in self.out_indices]
        self.out_strides = [4 * 2**i for i in self.out_indices]
        self.num_features = channels[-1]
        if num_classes > 0:
            self.fc = nn.Linear(channels[-1], num_classes)
        # the official Res2Net's and mmdetection's initialisation; DCN layers keep mmcv's (zero offsets)
        weight_init.kaiming_(m for m in self.modules() if isinstance(m, nn.Conv2d))
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.reset_parameters()
        self._freeze_stages()

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _freeze_stages(self) -> None:
        # frozen_stages=0 freezes the stem, k >= 1 also layer1..layerk (mmdetection's convention).
        if self.frozen_stages < 0:
            return
        for module in [self.conv1, self.bn1, *self.stages()[: self.frozen_stages]]:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for blk in stage:
            if self.with_cp and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps selected by ``out_indices`` (C2..C5)."""
        x = self.forward_stem(x)
        outs = []
        for i, stage in enumerate(self.stages()[: max(self.out_indices) + 1]):
            x = self._run_stage(stage, x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def forward_head(self, c5: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.num_classes == 0:
            return self.forward_features(x)
        x = self.forward_stem(x)
        for stage in self.stages():
            x = self._run_stage(stage, x)
        return self.forward_head(x)
