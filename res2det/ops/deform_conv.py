"""Modulated deformable convolution (DCNv2) in pure PyTorch, mmcv layout and semantics."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _tv

_IntPair = int | tuple[int, int]


def _pair(x: _IntPair) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _deform_columns(input: Tensor, offset: Tensor, mask: Tensor, kernel: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                    deform_groups: int) -> Tensor:
    """Modulated, bilinearly sampled columns ``[N, C, kh*kw, Hout*Wout]`` (deformable im2col)."""
    N, C, H, W = input.shape
    kh, kw = kernel
    T = kh * kw
    D = deform_groups
    Ho, Wo = offset.shape[-2:]
    dt, dev = input.dtype, input.device
    # offset channel (g, t, 0/1) = (dy, dx) of tap t = i*kw + j in deform group g.
    # contiguous(): strided offsets (e.g. torch.split views) would make later views fail.
    off = offset.contiguous().view(N, D, T, 2, Ho, Wo)
    base_y = (torch.arange(Ho, device=dev) * stride[0] - padding[0]).to(dt)[:, None] \
        + (torch.arange(kh, device=dev) * dilation[0]).to(dt).repeat_interleave(kw)[:, None, None]
    base_x = (torch.arange(Wo, device=dev) * stride[1] - padding[1]).to(dt)[None, :] \
        + (torch.arange(kw, device=dev) * dilation[1]).to(dt).repeat(kh)[:, None, None]
    y = base_y + off[:, :, :, 0]  # [N, D, T, Ho, Wo]
    x = base_x + off[:, :, :, 1]
    # mmcv/torchvision rule: points with y <= -1, y >= H (same for x) read 0; otherwise
    # bilinear with the out-of-map corner pixels read as 0 (no border clamping).
    inside = ((y > -1) & (y < H) & (x > -1) & (x < W)).to(dt)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    m = mask.contiguous().view(N, D, T, Ho, Wo) * inside

    feat = input.reshape(N, D, C // D, H * W)  # reshape: input may be a non-contiguous view
    cols = None
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yy, xx = y0 + dy, x0 + dx
        wgt = (ly if dy else 1 - ly) * (lx if dx else 1 - lx) * m
        wgt = wgt * ((yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)).to(dt)
        idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).view(N, D, 1, T * Ho * Wo)
        vals = torch.gather(feat, 3, idx.expand(N, D, C // D, T * Ho * Wo))
        term = vals * wgt.view(N, D, 1, T * Ho * Wo)
        cols = term if cols is None else cols + term
    return cols.view(N, C, T, Ho * Wo)


def modulated_deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                            bias: Tensor | None = None, stride: _IntPair = 1, padding: _IntPair = 0,
                            dilation: _IntPair = 1, groups: int = 1, deform_groups: int = 1) -> Tensor:
    """DCNv2: ``input [N, C, H, W]``, ``offset [N, 2*dg*kh*kw, Ho, Wo]`` (per deform group
    and tap: dy, dx), ``mask [N, dg*kh*kw, Ho, Wo]``, ``weight [O, C/groups, kh, kw]``.

    Same semantics as ``mmcv.ops.modulated_deform_conv2d`` and
    ``torchvision.ops.deform_conv2d(..., mask=mask)``; differentiable in all tensors.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    if _tv.deform_conv2d is not None and input.shape[1] == weight.shape[1] * groups \
            and offset.shape[1] == 2 * deform_groups * kh * kw:  # torchvision infers both
        return _tv.deform_conv2d(input, offset, weight, bias, stride=stride, padding=padding,
                                 dilation=dilation, mask=mask)
    N, C, H, W = input.shape
    O, Cg = weight.shape[:2]
    if C != Cg * groups or C % deform_groups or O % groups:
        raise ValueError(f"bad channels: input {C}, weight {tuple(weight.shape)}, "
                         f"groups {groups}, deform_groups {deform_groups}")
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if offset.shape != (N, 2 * deform_groups * kh * kw, Ho, Wo) or \
            mask.shape != (N, deform_groups * kh * kw, Ho, Wo):
        raise ValueError(f"offset {tuple(offset.shape)} / mask {tuple(mask.shape)} do not match "
                         f"output {Ho}x{Wo} with {deform_groups} deform groups and {kh}x{kw} kernel")
    cols = _deform_columns(input, offset, mask, (kh, kw), stride, padding, dilation, deform_groups)
    # Grouped contraction: [G, O/G, Cg*T] @ [N, G, Cg*T, P] -> [N, G, O/G, P].
    out = torch.matmul(weight.reshape(groups, O // groups, Cg * kh * kw),
                       cols.view(N, groups, Cg * kh * kw, Ho * Wo))
    out = out.reshape(N, O, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, O, 1, 1)
    return out


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 layer that predicts its own offsets and mask, with the exact state-dict layout
    of mmcv's ``ModulatedDeformConv2dPack``: ``weight``, optional ``bias``, and
    ``conv_offset`` (a zero-initialised ``nn.Conv2d`` with ``3 * dg * kh * kw`` outputs).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntPair,
                 stride: _IntPair = 1, padding: _IntPair = 0, dilation: _IntPair = 1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 3 * taps, self.kernel_size, self.stride,
                                     self.padding, self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), zero bias; offsets start at 0
        # (mask sigmoid(0) = 0.5), i.e. a plain conv scaled by 0.5.
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        o1, o2, m = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)  # mmcv's channel order, kept for checkpoint parity
        return modulated_deform_conv2d(x, offset, torch.sigmoid(m), self.weight, self.bias, self.stride,
                                       self.padding, self.dilation, self.groups, self.deform_groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deform_groups={self.deform_groups}, bias={self.bias is not None}")
