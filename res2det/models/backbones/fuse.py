"""Inference form of a ResNet/Res2Net backbone: the same outputs (within float rounding), fewer and faster ops.

* Every eval-mode BatchNorm is folded into the conv before it, and the ReLU after a conv runs inside it.
* Each conv is a ``FusedConv2d`` that can be bound to the kernel and memory layout that are fastest for its
  shape (``res2det.optimize.select_kernels`` chooses them by measurement).
* In a Res2Net stage block the 3x3 convs do not depend on each other (no hierarchical additions), so they run
  as one grouped conv over the first ``scale - 1`` splits.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.winograd import conv3x3_winograd, winograd_weight
from .res2net import Bottle2neck
from .resnet import Bottleneck, ResNet

CL = torch.channels_last


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when channels are the innermost dimension: a channels-last tensor, and also a channel
    slice of one (Res2Net's splits), which PyTorch's kernels treat as channels-last too."""
    if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1:
        return CL
    return torch.contiguous_format


def _prepacked_ops():
    return getattr(torch.ops, "mkldnn_prepacked", None)


class FusedConv2d(nn.Module):
    """conv (+ folded BN) (+ ReLU), run by one of several kernels that give the same result:

    'aten' (PyTorch's dispatch), 'onednn' (oneDNN called directly; PyTorch sends small batch-1 convs to a slow
    im2col path), 'prepacked' (oneDNN with weights reordered once and the ReLU fused), 'gemm' (a 1x1 conv as
    a matrix product) and 'winograd' (a stride-1 3x3 conv by F(4x4, 3x3), ``res2det.ops.winograd``).
    ``layout`` (None, or a memory format) converts the input for the kernel and the output back, so neighbours
    never see a layout change.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, relu: bool = False):
        super().__init__()
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                                               device=weight.device)
        if bn is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = (bias - bn.running_mean) * scale + bn.bias.detach()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.relu = relu
        self.kernel = "aten"
        self.layout: torch.memory_format | None = None
        self._prepared = None
        self.input_shape: tuple[int, ...] | None = None  # the input shape the kernel was bound for

    def candidates(self) -> list[str]:
        kernels = ["aten"]
        if self.weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and self.weight.dtype == torch.float32:
            kernels.append("onednn")
            if _prepacked_ops() is not None:
                kernels.append("prepacked")
        one_by_one = self.weight.shape[-2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        if one_by_one and self.groups == 1:
            kernels.append("gemm")
        if (self.weight.shape[-2:] == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.weight.dtype == torch.float32):
            kernels.append("winograd")
        return kernels

    def bind(self, kernel: str, layout: torch.memory_format | None, input_shape: torch.Size) -> None:
        self.kernel, self.layout, self._prepared = kernel, layout, None
        self.input_shape = tuple(input_shape)
        if kernel == "prepacked":
            self._prepared = _prepacked_ops().conv2d_prepack(
                self.weight, self.bias, list(self.stride), list(self.padding), list(self.dilation), self.groups,
                list(input_shape), "relu" if self.relu else "none")
        elif kernel == "winograd":
            self._prepared = winograd_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout is not None:
            back = _layout(x)
            return self._run(x.contiguous(memory_format=self.layout)).contiguous(memory_format=back)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        if k == "prepacked":
            return _prepacked_ops().conv2d_run(x, self._prepared)  # ReLU fused
        if k == "winograd":  # bias and ReLU fused; computed channels-last
            y = conv3x3_winograd(x, self._prepared, self.bias, relu=self.relu)
            return y.contiguous(memory_format=_layout(x))
        if k == "onednn":
            w = self.weight.contiguous(memory_format=_layout(x))
            y = torch.mkldnn_convolution(x, w, self.bias, self.padding, self.stride, self.dilation, self.groups)
        elif k == "gemm":
            n, c, h, w_ = x.shape
            y = torch.baddbmm(self.bias.view(1, -1, 1), self.weight.view(1, -1, c).expand(n, -1, -1),
                              x.contiguous().view(n, c, h * w_)).view(n, -1, h, w_)
            y = y.contiguous(memory_format=_layout(x))
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.relu_() if self.relu else y


def _is_plain_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d


class FastBottle2neck(nn.Module):
    """Eval-only Res2Net block (BN folded, ReLU fused); stage blocks run their 3x3 convs as one grouped conv."""

    def __init__(self, block: Bottle2neck):
        super().__init__()
        self.width, self.scale, self.accumulate, self.pool = block.width, block.scale, block.accumulate, block.pool
        self.conv1 = FusedConv2d(block.conv1, block.bn1, relu=True)
        self.conv3 = FusedConv2d(block.conv3, block.bn3)
        self.downsample = _fuse_shortcut(block.downsample)
        convs = [FusedConv2d(c, bn, relu=True) for c, bn in zip(block.convs, block.bns)]
        if self.accumulate:
            self.convs = nn.ModuleList(convs)
        else:
            c = block.convs[0]
            grouped = nn.Conv2d(c.in_channels * len(convs), c.out_channels * len(convs), 3, stride=c.stride,
                                padding=1, groups=c.groups * len(convs), bias=True, device=c.weight.device,
                                dtype=c.weight.dtype)
            with torch.no_grad():
                grouped.weight.copy_(torch.cat([k.weight for k in convs]))
                grouped.bias.copy_(torch.cat([k.bias for k in convs]))
            self.convs = nn.ModuleList([FusedConv2d(grouped, relu=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x)
        split = (self.scale - 1) * self.width
        last = out[:, split:]
        last = last if self.pool is None else self.pool(last)
        if not self.accumulate:
            outs = [self.convs[0](out[:, :split])]
        else:
            outs, sp = [], None
            for i, conv in enumerate(self.convs):
                part = out[:, i * self.width:(i + 1) * self.width]
                sp = conv(part if sp is None else sp + part)
                outs.append(sp)
        outs.append(last)
        return (self.conv3(torch.cat(outs, dim=1)) + identity).relu_()


class FastBottleneck(nn.Module):
    """Eval-only plain ResNet bottleneck (BN folded, ReLU fused), for like-for-like comparisons."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, block.bn1, relu=True)
        self.conv2 = FusedConv2d(block.conv2, block.bn2, relu=True)
        self.conv3 = FusedConv2d(block.conv3, block.bn3)
        self.downsample = _fuse_shortcut(block.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return (self.conv3(self.conv2(self.conv1(x))) + identity).relu_()


def _fuse_shortcut(downsample: nn.Sequential | None) -> nn.Module | None:
    if downsample is None:
        return None
    *pool, conv, bn = list(downsample)
    return nn.Sequential(*pool, FusedConv2d(conv, bn))


def fuse_backbone(model: ResNet) -> ResNet:
    """An eval-only copy of ``model`` in inference form. Blocks with deformable convs stay as they are."""
    model = copy.deepcopy(model).eval()
    if isinstance(model.conv1, nn.Sequential):
        s = model.conv1
        model.conv1 = nn.Sequential(FusedConv2d(s[0], s[1], relu=True), FusedConv2d(s[3], s[4], relu=True),
                                    FusedConv2d(s[6], model.bn1, relu=True))
    else:
        model.conv1 = FusedConv2d(model.conv1, model.bn1, relu=True)
    model.bn1, model.relu = nn.Identity(), nn.Identity()
    for stage in model.stages():
        for i, block in enumerate(stage):
            if isinstance(block, Bottle2neck) and all(_is_plain_conv(c) for c in block.convs):
                stage[i] = FastBottle2neck(block)
            elif isinstance(block, Bottleneck) and _is_plain_conv(block.conv2):
                stage[i] = FastBottleneck(block)
    return model
