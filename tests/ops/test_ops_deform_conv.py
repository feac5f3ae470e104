"""Modulated deformable convolution against a scalar-loop reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from res2det.ops import ModulatedDeformConv2d, _tv, modulated_deform_conv2d

TV_DEFORM = _tv.deform_conv2d  # probed kernel, saved before the fixture below disables it


@pytest.fixture(autouse=True)
def pure_torch(monkeypatch):
    monkeypatch.setattr(_tv, "deform_conv2d", None)


def pair(v):
    return (v, v) if isinstance(v, int) else v


def ref_sample(img, y, x):
    """mmcv deformable im2col rule: 0 if y <= -1, y >= H (same for x); else bilinear with
    out-of-map corners read as 0."""
    H, W = len(img), len(img[0])
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0

    def v(yy, xx):
        return img[yy][xx] if 0 <= yy < H and 0 <= xx < W else 0.0

    return ((1 - ly) * (1 - lx) * v(y0, x0) + (1 - ly) * lx * v(y0, x0 + 1)
            + ly * (1 - lx) * v(y0 + 1, x0) + ly * lx * v(y0 + 1, x0 + 1))


def ref_mdcn(inp, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    N, C, H, W = inp.shape
    O, Cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[-2:]
    T = kh * kw
    x, off, msk, w = inp.tolist(), offset.tolist(), mask.tolist(), weight.tolist()
    out = torch.zeros(N, O, Ho, Wo, dtype=inp.dtype)
    for n in range(N):
        # cols[c][t][oy][ox]: modulated samples.
        cols = [[[[0.0] * Wo for _ in range(Ho)] for _ in range(T)] for _ in range(C)]
        for c in range(C):
            g = c // (C // dg)
            for i in range(kh):
                for j in range(kw):
                    t = i * kw + j
                    for oy in range(Ho):
                        for ox in range(Wo):
                            dy = off[n][g * 2 * T + 2 * t][oy][ox]
                            dx = off[n][g * 2 * T + 2 * t + 1][oy][ox]
                            y = oy * sh - ph + i * dh + dy
                            xx = ox * sw - pw + j * dw + dx
                            cols[c][t][oy][ox] = ref_sample(x[n][c], y, xx) * msk[n][g * T + t][oy][ox]
        for o in range(O):
            g = o // (O // groups)
            for oy in range(Ho):
                for ox in range(Wo):
                    s = 0.0 if bias is None else bias[o].item()
                    for cl in range(Cg):
                        for t in range(T):
                            s += w[o][cl][t // kw][t % kw] * cols[g * Cg + cl][t][oy][ox]
                    out[n, o, oy, ox] = s
    return out


def make_inputs(gen, N, C, H, W, O, k, stride, padding, dilation, groups, dg, scale=2.5):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(k), pair(stride), pair(padding), pair(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    kw_ = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(N, C, H, W, **kw_)
    # Integer part + fraction in [0.1, 0.9]: never exactly on a pixel or a validity edge,
    # and large enough to push samples off the map.
    offset = torch.randint(-3, 3, (N, 2 * dg * kh * kw, Ho, Wo), generator=gen).double() \
        + 0.1 + 0.8 * torch.rand(N, 2 * dg * kh * kw, Ho, Wo, **kw_)
    offset = offset * (scale / 2.5)
    mask = torch.rand(N, dg * kh * kw, Ho, Wo, **kw_)
    weight = torch.randn(O, C // groups, kh, kw, **kw_)
    return x, offset, mask, weight


CASES = [  # (C, O, k, stride, padding, dilation, groups, deform_groups)
    (3, 2, 3, 1, 1, 1, 1, 1),
    (4, 6, 3, 2, 2, 2, 2, 2),
    (4, 2, (3, 2), (2, 1), (1, 0), (1, 2), 1, 2),
    (4, 4, 1, 1, 0, 1, 2, 4),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    C, O, k, s, p, d, g, dg = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    x, offset, mask, weight = make_inputs(gen, 2, C, 6, 7, O, k, s, p, d, g, dg)
    bias = torch.randn(O, generator=gen, dtype=torch.float64)
    out = modulated_deform_conv2d(x, offset, mask, weight, bias, s, p, d, g, dg)
    ref = ref_mdcn(x, offset, mask, weight, bias, s, p, d, g, dg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    x, offset, mask, weight = make_inputs(gen, 2, 4, 6, 5, 2, 3, 1, 1, 1, 2, 2)  # N=2: slices stay strided
    ref = ref_mdcn(x, offset, mask, weight, None, 1, 1, 1, 2, 2)
    big = torch.cat([torch.randn_like(x), x], dim=1)
    x_view = torch.split(big, 4, dim=1)[1]                 # channel slice of a bigger map
    both = torch.cat([offset, mask], dim=1).transpose(2, 3).contiguous().transpose(2, 3)
    off_view, mask_view = torch.split(both, [offset.shape[1], mask.shape[1]], dim=1)
    assert not (x_view.is_contiguous() or off_view.is_contiguous() or mask_view.is_contiguous())
    out = modulated_deform_conv2d(x_view, off_view, mask_view, weight, None, 1, 1, 1, 2, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("s,p,d,g,dg", [(1, 1, 1, 1, 1), (2, 1, 1, 2, 2), (1, 2, 2, 2, 1), (2, 0, 1, 1, 2)])
def test_zero_offset_unit_mask_equals_conv2d(s, p, d, g, dg):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4 // g, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x, w, b, s, p, d, g)
    Ho, Wo = ref.shape[-2:]
    out = modulated_deform_conv2d(x, x.new_zeros(2, 2 * dg * 9, Ho, Wo), x.new_ones(2, dg * 9, Ho, Wo),
                                  w, b, s, p, d, g, dg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    tensors = make_inputs(gen, 1, 4, 4, 5, 2, 3, 1, 1, 1, 2, 2, scale=1.5)
    tensors = [t.requires_grad_() for t in tensors]
    fn = lambda x, o, m, w: modulated_deform_conv2d(x, o, m, w, None, 1, 1, 1, 2, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)
    # Strided / dilated geometry, input and offset only (cheaper).
    x, o, m, w = make_inputs(gen, 1, 2, 5, 5, 2, 3, 2, 2, 2, 1, 1)
    x.requires_grad_(), o.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, o: modulated_deform_conv2d(x, o, m, w, None, 2, 2, 2), (x, o))


@pytest.mark.parametrize("bias", [False, True])
def test_module_layout_and_forward(bias):
    m = ModulatedDeformConv2d(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2, bias=bias)
    keys = ["weight", "bias", "conv_offset.weight", "conv_offset.bias"] if bias else \
        ["weight", "conv_offset.weight", "conv_offset.bias"]
    assert list(m.state_dict().keys()) == keys
    assert m.weight.shape == (6, 2, 3, 3)
    assert m.conv_offset.weight.shape == (2 * 3 * 9, 4, 3, 3) and m.conv_offset.stride == (2, 2)
    assert m.conv_offset.weight.abs().max() == 0 and m.conv_offset.bias.abs().max() == 0
    m = m.double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    # Zero offsets and sigmoid(0) = 0.5 mask: half a plain convolution (plus bias).
    b = m.bias if bias else None
    expect = 0.5 * F.conv2d(x, m.weight, None, 2, 1, 1, 2) + (0 if b is None else b.view(1, -1, 1, 1))
    torch.testing.assert_close(m(x), expect, rtol=0, atol=1e-12)
    # Random offset conv: output follows mmcv's chunk(3) -> cat(o1, o2), sigmoid(m) layout.
    torch.nn.init.normal_(m.conv_offset.weight, std=0.3)
    torch.nn.init.normal_(m.conv_offset.bias, std=0.3)
    o1, o2, mk = torch.chunk(m.conv_offset(x), 3, dim=1)
    ref = ref_mdcn(x, torch.cat([o1, o2], 1).detach(), mk.sigmoid().detach(), m.weight.detach(),
                   None if b is None else b.detach(), 2, 1, 1, 2, 2)
    out = m(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    out.sum().backward()
    assert m.conv_offset.weight.grad.abs().sum() > 0 and m.weight.grad is not None


def test_bad_shapes_raise():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError):
        modulated_deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5), torch.randn(2, 3, 3, 3),
                                padding=1)
    with pytest.raises(ValueError):
        modulated_deform_conv2d(x, torch.zeros(1, 18, 4, 4), torch.ones(1, 9, 4, 4), torch.randn(2, 4, 3, 3),
                                padding=1)


@pytest.mark.skipif(TV_DEFORM is None, reason="torchvision kernels unavailable")
def test_torchvision_fast_path_agrees(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x, offset, mask, weight = make_inputs(gen, 2, 4, 6, 7, 6, 3, 2, 2, 2, 2, 2)
    pure = modulated_deform_conv2d(x, offset, mask, weight, None, 2, 2, 2, 2, 2)
    monkeypatch.setattr(_tv, "deform_conv2d", TV_DEFORM)
    fast = modulated_deform_conv2d(x, offset, mask, weight, None, 2, 2, 2, 2, 2)
    torch.testing.assert_close(fast, pure, rtol=0, atol=1e-10)
