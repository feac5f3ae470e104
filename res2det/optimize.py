"""Inference optimisation of ResNet/Res2Net models: outputs stay within float rounding (<= 1e-4).

``optimize_for_inference(model, example)`` returns an eval-only module that
1. folds every BatchNorm into the conv before it;
2. in Res2Net blocks, runs the independent 3x3 convs of each stage block as one grouped conv;
3. traces and freezes the result with TorchScript (constant weights, fewer Python dispatches), optionally
   letting PyTorch rewrite it for oneDNN (``onednn=True``);
4. optionally uses channels-last memory format.
The best combination differs by shape and machine; ``benchmarks/backbone.py`` measures them side by side.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .models.backbones import Bottle2neck, ResNet
from .models.backbones.fuse import FastBottle2neck, fold_bn


def fuse_backbone(model: ResNet) -> ResNet:
    """An eval-mode copy with BN folded and Res2Net blocks replaced by their fast inference form."""
    model = fold_bn(copy.deepcopy(model).eval())
    for stage in model.stages():
        for i, block in enumerate(stage):
            if isinstance(block, Bottle2neck) and all(isinstance(b, nn.Identity) for b in block.bns):
                stage[i] = FastBottle2neck(block)
    return model


def optimize_for_inference(
    model: ResNet,
    example: torch.Tensor,
    *,
    jit: bool = True,
    onednn: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """An optimised, eval-only equivalent of ``model`` for inputs shaped like ``example``."""
    fused = fuse_backbone(model)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    if not jit:
        return _ChannelsLast(fused) if channels_last else fused
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(fused, example, check_trace=False))
        if onednn:
            traced = torch.jit.optimize_for_inference(traced)
    return _ChannelsLast(traced) if channels_last else traced


class _ChannelsLast(nn.Module):
    """Feeds the wrapped model channels-last input (callers keep passing ordinary tensors)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        return self.inner(x.contiguous(memory_format=torch.channels_last))
