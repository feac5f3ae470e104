"""roi_align and multi-level RoI extraction against scalar-loop references."""
import importlib
import math

import pytest
import torch

from res2det.ops import MultiLevelRoIAlign, RoIAlign, _tv, map_roi_levels, paddle_roi_levels, roi_align

# The package re-exports the function under the module's name, so fetch the module itself.
ra = importlib.import_module("res2det.ops.roi_align")

TV_ROI_ALIGN = _tv.roi_align  # probed kernel, saved before the fixture below disables it


@pytest.fixture(autouse=True)
def pure_torch(monkeypatch):
    monkeypatch.setattr(_tv, "roi_align", None)


def ref_bilinear(f, y, x):
    """Reference kernels' rule: 0 outside [-1, size], border value at the last pixel."""
    H, W = f.shape[-2:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[:, y0, x0] + hy * lx * f[:, y0, x1] + ly * hx * f[:, y1, x0] + ly * lx * f[:, y1, x1]


def ref_roi_align(inp, rois, out_hw, scale, sampling_ratio, aligned):
    oh, ow = out_hw
    out = torch.zeros(rois.shape[0], inp.shape[1], oh, ow, dtype=inp.dtype)
    off = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = torch.zeros(inp.shape[1], dtype=inp.dtype)
                for iy in range(gh):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = x1 + pw * bw + (ix + 0.5) * bw / gw
                        acc += ref_bilinear(inp[int(b)], y, x)
                out[k, :, ph, pw] = acc / count
    return out


def make_rois(gen, n, n_img, img_h, img_w):
    """Random rois in image coordinates incl. tiny, zero-area, partly and fully outside."""
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 1.2 - 5
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 0.7
    rois = torch.cat([torch.randint(0, n_img, (n, 1), generator=gen).double(), xy, xy + wh], dim=1)
    special = torch.tensor([
        [0, 5.0, 5.0, 5.0, 5.0],                       # zero area
        [0, 3.0, 4.0, 3.0, 9.0],                       # zero width
        [1, -40.0, -30.0, -20.0, -12.0],               # fully outside (top-left)
        [1, img_w + 3.0, 2.0, img_w + 20.0, 10.0],     # fully outside (right)
        [0, -6.0, -6.0, img_w + 6.0, img_h + 6.0],     # covers the image and more
        [1, img_w - 3.0, img_h - 2.0, img_w + 9.0, img_h + 1.0],  # bottom-right corner
        [0, 1.3, 2.2, 1.9, 2.4],                        # sub-pixel
    ], dtype=torch.float64)
    special[:, 0] = special[:, 0].clamp(max=n_img - 1)
    return torch.cat([rois, special])


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_roi_align_matches_reference(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(10 + sampling_ratio)
    inp = torch.randn(2, 3, 11, 14, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, 25, 2, 22, 28)  # image twice the map size: spatial_scale 0.5
    out = roi_align(inp, rois, (3, 4), 0.5, sampling_ratio, aligned)
    ref = ref_roi_align(inp, rois, (3, 4), 0.5, sampling_ratio, aligned)
    assert out.shape == (rois.shape[0], 3, 3, 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # Fully outside rois give zeros; so do zero-area ones when the grid is adaptive.
    assert out[-5:-3].abs().max() == 0
    if aligned and sampling_ratio == 0:
        assert out[-7:-5].abs().max() == 0


def test_roi_align_sparse_samples_and_chunking(monkeypatch):
    """Huge rois with few samples use the corner-list path; tiny chunks split the batch."""
    gen = torch.Generator().manual_seed(4)
    inp = torch.randn(1, 2, 40, 45, generator=gen, dtype=torch.float64)
    huge = torch.tensor([[0, 0.0, 0.0, 45.0, 40.0], [0, 2.0, 1.0, 44.0, 30.0]], dtype=torch.float64)
    rois = torch.cat([make_rois(gen, 10, 1, 40, 45), huge])
    ref = ref_roi_align(inp, rois, (2, 2), 1.0, 1, True)
    torch.testing.assert_close(roi_align(inp, rois, 2, 1.0, 1, True), ref, rtol=0, atol=1e-10)
    monkeypatch.setattr(ra, "_CHUNK_ELEMS", 50)
    torch.testing.assert_close(roi_align(inp, rois, 2, 1.0, 1, True), ref, rtol=0, atol=1e-10)
    ref0 = ref_roi_align(inp, rois, (2, 3), 1.0, 0, False)
    torch.testing.assert_close(roi_align(inp, rois, (2, 3), 1.0, 0, False), ref0, rtol=0, atol=1e-10)


def test_roi_align_empty_and_module():
    inp = torch.randn(2, 5, 8, 8)
    assert roi_align(inp, torch.zeros(0, 5), 7, 0.25).shape == (0, 5, 7, 7)
    layer = RoIAlign(output_size=(2, 3), spatial_scale=0.25, sampling_ratio=2, aligned=False)
    rois = torch.tensor([[1, 0.0, 0.0, 20.0, 16.0]])
    torch.testing.assert_close(layer(inp, rois), roi_align(inp, rois, (2, 3), 0.25, 2, False))


@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (2, False), (0, False)])
def test_roi_align_gradcheck(sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(5)
    inp = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.6, 9.1, 7.7], [1, -2.0, 1.0, 4.0, 12.0], [1, 6.5, 5.5, 13.0, 11.0],
                         [0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned), (inp,))


@pytest.mark.skipif(TV_ROI_ALIGN is None, reason="torchvision kernels unavailable")
def test_torchvision_fast_path_agrees(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    inp = torch.randn(2, 3, 11, 14, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, 25, 2, 22, 28)
    pure = roi_align(inp, rois, 3, 0.5, 0, True)
    monkeypatch.setattr(_tv, "roi_align", TV_ROI_ALIGN)
    torch.testing.assert_close(roi_align(inp, rois, 3, 0.5, 0, True), pure, rtol=0, atol=1e-10)


def square_rois(sides, dtype=torch.float32):
    s = torch.tensor(sides, dtype=dtype)
    z = torch.zeros_like(s)
    return torch.stack([z, z + 10, z + 20, s + 10, s + 20], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_map_roi_levels_boundaries(dtype):
    sides = [0.0, 50.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 1000.0]
    assert map_roi_levels(square_rois(sides, dtype), 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert map_roi_levels(square_rois(sides, dtype), 3).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    inverted = torch.tensor([[0, 10.0, 10.0, 5.0, 20.0]], dtype=dtype)
    assert map_roi_levels(inverted, 4).tolist() == [0]
    sides = [10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0]
    assert paddle_roi_levels(square_rois(sides, dtype)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("mapping", ["mmdet", "paddle"])
def test_multi_level_roi_align(mapping):
    gen = torch.Generator().manual_seed(7)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 3, 256 // s, 320 // s, generator=gen, dtype=torch.float64) for s in strides]
    feats.append(torch.randn(2, 3, 4, 5, dtype=torch.float64))  # extra level (e.g. P6) is ignored
    rois = make_rois(gen, 30, 2, 256, 320)
    layer = MultiLevelRoIAlign(output_size=3, featmap_strides=strides, sampling_ratio=0, aligned=True,
                               level_mapping=mapping)
    out = layer(feats, rois)
    levels = (map_roi_levels(rois, 4) if mapping == "mmdet" else paddle_roi_levels(rois)).tolist()
    assert len(set(levels)) >= 3  # the test exercises several levels
    for k, lvl in enumerate(levels):
        ref = ref_roi_align(feats[lvl], rois[k:k + 1], (3, 3), 1 / strides[lvl], 0, True)
        torch.testing.assert_close(out[k:k + 1], ref, rtol=0, atol=1e-10)
    assert layer(feats, rois[:0]).shape == (0, 3, 3, 3)
    with pytest.raises(ValueError):
        MultiLevelRoIAlign(output_size=7, featmap_strides=strides, level_mapping="detectron")
