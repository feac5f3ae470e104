"""Winograd F(4x4, 3x3) 3x3 convolution against F.conv2d (float64: the algorithm exactly; float32: rounding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from res2det.ops.winograd import conv3x3_winograd, transform_matrices, winograd_weight


def test_transform_matrices_compute_the_1d_correlation_exactly():
    at, g, bt = transform_matrices()
    assert at.shape == (4, 6) and g.shape == (6, 3) and bt.shape == (6, 6)
    d = torch.randn(6, dtype=torch.float64)
    taps = torch.randn(3, dtype=torch.float64)
    expected = torch.stack([(d[i:i + 3] * taps).sum() for i in range(4)])
    torch.testing.assert_close(at @ ((g @ taps) * (bt @ d)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, c_in, c_out, h, w, chunk", [
    (1, 3, 5, 8, 8, 256),     # whole tiles
    (2, 4, 6, 13, 9, 256),    # partial tiles at the bottom/right, several images per chunk
    (1, 2, 3, 1, 1, 256),     # a single pixel
    (3, 5, 4, 17, 23, 3),     # chunks of a few tile rows inside each image
    (5, 3, 2, 6, 7, 5),       # chunks of one image
])
@pytest.mark.parametrize("bias, relu", [(True, True), (False, False)])
def test_winograd_equals_conv2d_in_float64(n, c_in, c_out, h, w, chunk, bias, relu):
    g = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    ref = F.conv2d(x, weight, b, padding=1)
    ref = ref.relu() if relu else ref
    y = conv3x3_winograd(x, winograd_weight(weight), b, relu=relu, tiles_per_chunk=chunk)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)


def test_winograd_float32_rounding_is_small_at_256_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 20, 24, generator=g).relu().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3, generator=g) / 48
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    err = (conv3x3_winograd(x, winograd_weight(weight)).double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5  # ~2.4e-6 (benchmarks/conv3x3.py)


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="3x3"):
        winograd_weight(torch.zeros(4, 4, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        conv3x3_winograd(torch.zeros(1, 3, 8, 8), winograd_weight(torch.zeros(4, 5, 3, 3)))
