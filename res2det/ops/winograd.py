"""3x3 convolution by Winograd's minimal filtering F(4x4, 3x3), in plain PyTorch ops.

A direct 3x3 conv spends 9 multiply-adds per input channel and output pixel; F(4x4, 3x3) computes each 4x4
output tile from a 6x6 input tile with 36 instead of 144, as 36 independent matrix products (one per position
of the transformed tile) between transformed input tiles and transformed weights. The input and output
transforms are two small dense products (the Kronecker forms of B^T and A^T), so everything runs as GEMMs.
Worth it for wide convs (FPN, RPN and mask-head 256-channel convs gain about 1.5x on CPU); the kernel
selection in ``res2det.optimize`` measures it per layer against the direct kernels.

Interpolation points 0, 1, -1, 1/2, -2 (and infinity) rather than the textbook 0, +-1, +-2: the same cost and
less float32 rounding error (Barabasz et al., "Error analysis and improving the accuracy of Winograd
convolution for deep neural networks", 2020); 1.4e-6..3e-6 of the output's range here (benchmarks/conv3x3.py).
The matrices are derived exactly (Toom-Cook with rational arithmetic), not typed in.
"""
from __future__ import annotations

from fractions import Fraction

import torch

TILE = 4                  # output tile side (m)
KERNEL = 3                # filter side (r)
SPAN = TILE + KERNEL - 1  # input tile side (m + r - 1)
POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(1, 2), Fraction(-2))


def _exact_solve(a: list[list[Fraction]], b: list[Fraction]) -> list[Fraction]:
    """Gauss-Jordan elimination over the rationals (a is square and invertible)."""
    n = len(a)
    rows = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [v - rows[r][col] * p for v, p in zip(rows[r], rows[col])]
    return [row[n] for row in rows]


def transform_matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T [m, n], G [n, r], B^T [n, n]) in float64 for F(m, r) on ``POINTS`` plus the point at infinity,
    such that y = A^T [(G g) * (B^T d)] is the 1-D correlation of d (n samples) with g (r taps)."""
    m, r, n = TILE, KERNEL, SPAN
    at = [[p ** i for p in POINTS] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(POINTS):
        norm = Fraction(1)
        for q in POINTS[:j] + POINTS[j + 1:]:
            norm *= p - q
        g.append([p ** k / norm for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    # B^T follows from the identity itself: sum_j A^T[i, j] G[j, k] B^T[j, a] = [a == i + k] for all i, k, a.
    # Column a of B^T solves the n equations with (i, k) in {(i, 0)} + {(m - 1, k >= 1)} (independent rows).
    pairs = [(i, 0) for i in range(m)] + [(m - 1, k) for k in range(1, r)]
    system = [[at[i][j] * g[j][k] for j in range(n)] for i, k in pairs]
    bt_columns = [_exact_solve(system, [Fraction(int(a == i + k)) for i, k in pairs]) for a in range(n)]
    bt = [[bt_columns[a][j] for a in range(n)] for j in range(n)]
    return tuple(torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64) for rows in (at, g, bt))


_AT, _G, _BT = transform_matrices()
_KB = torch.kron(_BT, _BT)  # [36, 36]: the 2-D input transform B^T d B on a flattened 6x6 tile
_KA = torch.kron(_AT, _AT)  # [16, 36]: the 2-D output transform A^T M A


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """Transformed filters [36, C_in, C_out] (computed in float64, stored in ``weight``'s dtype)."""
    if weight.shape[-2:] != (KERNEL, KERNEL):
        raise ValueError(f"winograd_weight: expected 3x3 filters, got {tuple(weight.shape)}")
    g = _G.to(weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.double(), g)
    return u.reshape(SPAN * SPAN, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def conv3x3_winograd(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None, *,
                     relu: bool = False, tiles_per_chunk: int = 256) -> torch.Tensor:
    """``conv2d(x, w, bias, stride=1, padding=1)`` (then ReLU) with ``weight_t = winograd_weight(w)``.

    The output is channels-last. Tiles are processed in chunks of about ``tiles_per_chunk`` so that the
    transformed tiles (36x the chunk's input) stay in cache instead of streaming through memory."""
    n, c, h, w = x.shape
    span2, c_in, c_out = weight_t.shape
    if c_in != c:
        raise ValueError(f"conv3x3_winograd: input has {c} channels, weights expect {c_in}")
    m, a = TILE, SPAN
    th, tw = -(-h // m), -(-w // m)
    hp, wp = th * m + 2, tw * m + 2
    # zero-padded NHWC copy of the input (1 pixel of padding, plus up to 3 to fill the last tiles)
    xp = x.new_empty(n, hp, wp, c)
    xp[:, 0].zero_()
    xp[:, h + 1:].zero_()
    xp[:, 1:h + 1, 0].zero_()
    xp[:, 1:h + 1, w + 1:].zero_()
    xp[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    kb, ka = _KB.to(x), _KA.to(x)
    out = x.new_empty(n, th * m, tw * m, c_out)
    # chunk: k images x r tile rows
    if th * tw <= tiles_per_chunk:
        k, r = tiles_per_chunk // (th * tw), th
    else:
        k, r = 1, max(1, tiles_per_chunk // tw)
    for i0 in range(0, n, k):
        kk = min(k, n - i0)
        for r0 in range(0, th, r):
            rr = min(r, th - r0)
            tiles = xp.as_strided((a, a, kk, rr, tw, c), (wp * c, c, hp * wp * c, m * wp * c, m * c, 1),
                                  xp.storage_offset() + (i0 * hp + r0 * m) * wp * c)
            v = (kb @ tiles.reshape(span2, -1)).view(span2, kk * rr * tw, c)
            prod = torch.bmm(v, weight_t)
            y = ka @ prod.view(span2, -1)
            if bias is not None:  # while the chunk is in cache
                y.view(-1, c_out).add_(bias)
            if relu:
                y.relu_()
            y = y.view(m, m, kk, rr, tw, c_out).permute(2, 3, 0, 4, 1, 5)
            out[i0:i0 + kk, r0 * m:(r0 + rr) * m].view(kk, rr, m, tw, m, c_out).copy_(y)
    if th * m != h or tw * m != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)
