"""Inference rewrites of a ResNet/Res2Net backbone that keep its outputs (within float rounding).

* ``fold_bn``: every eval-mode BatchNorm that follows a conv is folded into the conv's weight and bias.
* ``merge_stage_convs``: in a Res2Net stage block the 3x3 convs do not depend on each other (no hierarchical
  additions), so they run as one grouped conv over the first ``scale - 1`` splits.
"""
from __future__ import annotations

import torch
from torch import nn

from .res2net import Bottle2neck


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose output equals ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True,
    ).to(conv.weight.device, conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _fold_pairs(owner: nn.Module, pairs: list[tuple[str, str]]) -> None:
    for conv_name, bn_name in pairs:
        conv, bn = owner.get_submodule(conv_name), owner.get_submodule(bn_name)
        if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
            continue  # e.g. a deformable conv: leave the pair as it is
        _set(owner, conv_name, fold_conv_bn(conv, bn))
        _set(owner, bn_name, nn.Identity())


def _set(owner: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(owner.get_submodule(parent) if parent else owner, leaf, module)


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold BN into the preceding conv everywhere in a ``ResNet`` (in place; call on an eval-mode copy)."""
    if model.training:
        raise ValueError("fold_bn needs an eval-mode model (BN must use its running statistics)")
    stem = [("conv1.0", "conv1.1"), ("conv1.3", "conv1.4"), ("conv1.6", "bn1")]
    _fold_pairs(model, stem if isinstance(model.conv1, nn.Sequential) else [("conv1", "bn1")])
    for stage in model.stages():
        for block in stage:
            pairs = [("conv1", "bn1"), ("conv3", "bn3")]
            if isinstance(block, Bottle2neck):
                pairs += [(f"convs.{i}", f"bns.{i}") for i in range(len(block.convs))]
            else:
                pairs.append(("conv2", "bn2"))
            if block.downsample is not None:
                n = len(block.downsample)
                pairs.append((f"downsample.{n - 2}", f"downsample.{n - 1}"))
            _fold_pairs(block, pairs)
    return model


class _StageConvs(nn.Module):
    """The independent 3x3 convs of a Res2Net stage block, as one grouped conv (+ folded BN, ReLU)."""

    def __init__(self, block: Bottle2neck):
        super().__init__()
        convs = list(block.convs)
        c = convs[0]
        n = len(convs)
        self.conv = nn.Conv2d(c.in_channels * n, c.out_channels * n, 3, stride=c.stride, padding=1,
                              groups=c.groups * n, bias=True).to(c.weight.device, c.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([k.weight for k in convs]))
            self.conv.bias.copy_(torch.cat([k.bias for k in convs]))
        self.width = block.width * n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x[:, : self.width]))


class FastBottle2neck(nn.Module):
    """Eval-only Res2Net block with folded BN; stage blocks run their 3x3 convs as one grouped conv."""

    def __init__(self, block: Bottle2neck):
        super().__init__()
        if any(not isinstance(b, nn.Identity) for b in block.bns) or not isinstance(block.bn1, nn.Identity):
            raise ValueError("FastBottle2neck needs a block whose BN is folded (fold_bn first)")
        self.width, self.scale = block.width, block.scale
        self.accumulate = block.accumulate
        self.conv1, self.conv3, self.downsample, self.pool = block.conv1, block.conv3, block.downsample, block.pool
        self.convs = block.convs
        self.stage_convs = None if block.accumulate else _StageConvs(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.conv1(x))
        last = out[:, (self.scale - 1) * self.width:]
        last = last if self.pool is None else self.pool(last)
        if self.stage_convs is not None:
            mid = self.stage_convs(out)
            out = torch.cat([mid, last], dim=1)
        else:
            splits = torch.split(out, self.width, dim=1)
            outs = []
            sp = splits[0]
            for i, conv in enumerate(self.convs):
                if i > 0:
                    sp = sp + splits[i]
                sp = torch.relu(conv(sp))
                outs.append(sp)
            outs.append(last)
            out = torch.cat(outs, dim=1)
        return torch.relu(self.conv3(out) + identity)
