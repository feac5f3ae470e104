"""RoIAlign (average mode) in pure PyTorch, matching mmcv/torchvision semantics.

Bilinear interpolation is separable, so the average over a bin's sample grid is
``Ay @ F @ Ax^T`` where ``Ay [out_h, Ly]`` / ``Ax [out_w, Lx]`` hold the summed 1-D
interpolation weights over a short list of rows / columns of the feature map ``F``.
Per roi we gather only a ``[Ly, Lx, C]`` crop (channels last, so each gather copies a
contiguous C-vector) and contract it with two batched matmuls. That does ~4x fewer
gathers than evaluating every sample's four corners, and the FLOPs run in BLAS.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _tv

# Upper bound on elements of one gathered crop batch [k, Ly, Lx, C] (~128 MB in fp32).
_CHUNK_ELEMS = 1 << 25


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, out: int, size: int):
    """1-D sampling along one axis (rows or columns) for all rois.

    Returns ``idx [K, L]`` (map rows/cols to gather, all in ``[0, size)``), ``weight
    [K, out, L]`` (interpolation weights summed over each bin's samples and divided by
    the grid size, so ``weight @ feature[idx]`` averages the samples) and the used
    length ``[K]`` of each roi's list (columns beyond it have zero weight).
    """
    K, dev, dt = start.shape[0], start.device, start.dtype
    G = max(int(grid.max()), 1)
    i = torch.arange(G, device=dev)
    o = torch.arange(out, device=dev)
    # Same expression order as the reference kernels: s + o*bin + (i+0.5)*bin/grid.
    g = grid.clamp(min=1).to(dt)[:, None, None]
    bs = bin_size[:, None, None]
    c = start[:, None, None] + o.to(dt)[:, None] * bs + (i.to(dt) + 0.5) * bs / g  # [K, out, G]
    in_grid = i < grid[:, None, None]  # rois share G; samples past their own grid are padding
    valid = in_grid & (c >= -1.0) & (c <= size)  # off-map samples contribute 0
    c = c.clamp(min=0, max=size)  # the upper clamp only touches invalid samples (keeps lo sane)
    lo = c.floor().long()
    edge = lo >= size - 1  # at/after the last pixel the kernels read the border value
    lo = torch.where(edge, size - 1, lo)
    hi = torch.where(edge, lo, lo + 1)
    frac = torch.where(edge, 0.0, c - lo.to(dt))
    scale = valid.to(dt) / g
    w_lo, w_hi = (1 - frac) * scale, frac * scale

    # Two ways to list the rows a roi needs; per roi take the shorter one.
    # (a) the contiguous window [first, last] spanned by its valid samples;
    first = torch.where(valid, lo, size).amin(dim=(1, 2)).clamp(max=size - 1)
    last = torch.where(valid, hi, -1).amax(dim=(1, 2))
    win_len = (last - first + 1).clamp(min=1)
    # (b) both corners of every sample (wins when samples are sparse, e.g. a fixed
    #     sampling_ratio on a huge roi).
    list_len = (2 * out * grid).clamp(min=1)
    use_win = (win_len <= list_len)[:, None, None]
    length = torch.where(use_win.flatten(), win_len, list_len)
    L = int(length.max())

    # Column of each (sample, corner) in the list; column L is a dump for padding.
    slot = (o[:, None] * grid[:, None, None] + i) * 2
    pos_lo = torch.where(use_win, torch.where(valid, lo - first[:, None, None], L),
                         torch.where(in_grid, slot, L))
    pos_hi = torch.where(use_win, torch.where(valid, hi - first[:, None, None], L),
                         torch.where(in_grid, slot + 1, L))
    list_idx = torch.zeros(K, L + 1, dtype=torch.long, device=dev)
    list_idx.scatter_(1, pos_lo.flatten(1), lo.flatten(1)).scatter_(1, pos_hi.flatten(1), hi.flatten(1))
    win_idx = (first[:, None] + torch.arange(L, device=dev)).clamp(max=size - 1)
    idx = torch.where(use_win[:, :, 0], win_idx, list_idx[:, :L])
    weight = torch.zeros(K, out, L + 1, dtype=dt, device=dev)
    weight.scatter_add_(2, pos_lo, w_lo).scatter_add_(2, pos_hi, w_hi)
    return idx, weight[:, :, :L], length


def _chunks(ly: Tensor, lx: Tensor, C: int, max_waste: float = 1.25) -> list[tuple[Tensor, int, int]]:
    """Split rois into batches sharing one padded crop size ``(max_y, max_x)``.

    Rois are sorted by (Ly, Lx); a batch is closed when padding would exceed
    ``max_waste`` x the useful crop area, or the crop would exceed ``_CHUNK_ELEMS``.
    """
    key = ly * (int(lx.max()) + 1) + lx
    order = torch.argsort(key)
    ly_s, lx_s = ly[order].tolist(), lx[order].tolist()
    chunks, start = [], 0
    while start < len(ly_s):
        end, max_y, max_x, area = start, 1, 1, 0
        while end < len(ly_s):
            ny, nx, na = max(max_y, ly_s[end]), max(max_x, lx_s[end]), area + ly_s[end] * lx_s[end]
            padded = (end - start + 1) * ny * nx
            if end > start and (padded * C > _CHUNK_ELEMS or padded > max_waste * na):
                break
            max_y, max_x, area, end = ny, nx, na, end + 1
        chunks.append((order[start:end], max_y, max_x))
        start = end
    return chunks


class _Plan(NamedTuple):
    """Sampling geometry of a roi_align call (independent of feature values)."""
    rows: Tensor    # [K, Ly] map rows to gather per roi
    cols: Tensor    # [K, Lx] map columns to gather per roi
    wy: Tensor      # [K, out_h, Ly] row weights (bilinear, averaged over the grid)
    wx: Tensor      # [K, out_w, Lx] column weights
    batch: Tensor   # [K] image index of each roi
    chunks: list[tuple[Tensor, int, int]]  # (roi indices, Ly, Lx) batches

    def flat_index(self, sel: Tensor, ly: int, lx: int, H: int, W: int) -> Tensor:
        """Rows of the channels-last ``[N*H*W, C]`` map forming the crops of ``sel``."""
        r, c = self.rows[sel, :ly], self.cols[sel, :lx]
        return ((self.batch[sel, None, None] * H + r[:, :, None]) * W + c[:, None, :]).flatten()


@torch.no_grad()  # sampling geometry is not differentiable (as in the reference kernels)
def _make_plan(rois: Tensor, input_shape: torch.Size, output_size: tuple[int, int],
               spatial_scale: float, sampling_ratio: int, aligned: bool, dtype: torch.dtype) -> _Plan:
    _, C, H, W = input_shape
    oh, ow = output_size
    rois = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - offset).unbind(1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy mode forces rois to be at least 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(x1, sampling_ratio, dtype=torch.long)
    else:  # adaptive: about one sample per pixel; <= 0 means no samples (output 0)
        grid_h = torch.ceil(bin_h).long().clamp(min=0)
        grid_w = torch.ceil(bin_w).long().clamp(min=0)
    rows, wy, ly = _axis_weights(y1, bin_h, grid_h, oh, H)
    cols, wx, lx = _axis_weights(x1, bin_w, grid_w, ow, W)
    return _Plan(rows, cols, wy, wx, rois[:, 0].long(), _chunks(ly, lx, C))


class _RoIAlignFunction(torch.autograd.Function):
    """RoIAlign is linear in the input: out = A(input), grad_input = A^T(grad_out).

    A custom backward keeps the chunking (one gradient buffer, bounded temporaries)
    instead of letting autograd materialise a full-size gradient per chunk.
    """

    @staticmethod
    def forward(ctx, input: Tensor, plan: _Plan) -> Tensor:
        N, C, H, W = input.shape
        oh, ow = plan.wy.shape[1], plan.wx.shape[1]
        flat = input.permute(0, 2, 3, 1).reshape(N * H * W, C)  # channels last: rows are C-vectors
        out = input.new_empty(plan.wy.shape[0], oh, ow, C)  # every roi is in exactly one chunk
        for sel, ly, lx in plan.chunks:
            crop = flat.index_select(0, plan.flat_index(sel, ly, lx, H, W)).view(-1, ly, lx * C)
            t = torch.bmm(plan.wy[sel, :, :ly], crop).view(-1, oh, lx, C)      # contract rows
            out.index_copy_(0, sel, torch.matmul(plan.wx[sel, None, :, :lx], t))  # then columns
        ctx.plan, ctx.input_shape = plan, input.shape
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        plan, (N, C, H, W) = ctx.plan, ctx.input_shape
        oh = plan.wy.shape[1]
        g = grad_out.permute(0, 2, 3, 1)  # [K, oh, ow, C]
        grad_flat = grad_out.new_zeros(N * H * W, C)
        for sel, ly, lx in plan.chunks:
            gt = torch.matmul(plan.wx[sel, None, :, :lx].transpose(-1, -2), g[sel])  # [k, oh, Lx, C]
            gcrop = torch.bmm(plan.wy[sel, :, :ly].transpose(1, 2), gt.reshape(-1, oh, lx * C))
            grad_flat.index_add_(0, plan.flat_index(sel, ly, lx, H, W), gcrop.view(-1, C))
        return grad_flat.view(N, H, W, C).permute(0, 3, 1, 2), None


def _roi_align_torch(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    plan = _make_plan(rois, input.shape, output_size, spatial_scale, sampling_ratio, aligned, input.dtype)
    return _RoIAlignFunction.apply(input, plan).contiguous()


def roi_align(input: Tensor, rois: Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """RoIAlign (avg) of ``input [N, C, H, W]`` over ``rois [K, 5]`` = (batch, x1, y1, x2, y2).

    Same semantics as ``mmcv.ops.roi_align`` / ``torchvision.ops.roi_align``: with
    ``aligned`` roi coordinates are shifted by -0.5 pixel and not clamped to size >= 1;
    ``sampling_ratio=0`` uses ``ceil(roi_size / output_size)`` samples per bin and axis.
    Returns ``[K, C, out_h, out_w]``; differentiable w.r.t. ``input``.
    """
    output_size = _pair(output_size)
    if torch.is_autocast_enabled(input.device.type):  # sample in fp32, as the reference kernels do under AMP
        with torch.autocast(input.device.type, enabled=False):
            return roi_align(input.float(), rois.float(), output_size, spatial_scale, sampling_ratio, aligned)
    if rois.shape[0] == 0:
        return input.new_zeros(0, input.shape[1], *output_size)
    if _tv.roi_align is not None:
        return _tv.roi_align(input, rois.to(input.dtype), output_size, float(spatial_scale),
                             int(sampling_ratio), bool(aligned))
    return _roi_align_torch(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """Single-level RoIAlign module (keyword-only arguments as in ``roi_align``)."""

    def __init__(self, *, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
                 sampling_ratio: int = 0, aligned: bool = True) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
