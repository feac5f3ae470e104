"""3x3 conv benchmark: Winograd F(4x4, 3x3) (``res2det.ops.conv3x3_winograd``) vs PyTorch's conv2d, per layer shape.

    python benchmarks/conv3x3.py [--threads 2] [--repeats 5] [--json OUT]

The shapes are the stride-1 3x3 convs of the zoo models: the 256-channel FPN/RPN convs at P2..P5 of a
1216x800 input, the mask head's (100 RoIs at 14x14), and Res2Net's 26..208-channel split convs at 224x224
and 1216x800. Each layer is timed alone (best of ``--repeats`` after a warm-up, channels-last input, bias and
ReLU included in both); 'rel err' is the Winograd output's max abs difference from a float64 conv2d, divided
by the output's max abs value.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbone import write_json  # noqa: E402
from res2det.ops.winograd import conv3x3_winograd, winograd_weight  # noqa: E402

# (label, batch, channels, height, width)
SHAPES = [
    ("FPN/RPN P2", 1, 256, 304, 200), ("FPN P3", 1, 256, 152, 100), ("FPN P4", 1, 256, 76, 50),
    ("FPN P5", 1, 256, 38, 25), ("mask head", 100, 256, 14, 14),
    ("Res2Net s1 @800", 1, 26, 304, 200), ("Res2Net s2 @800", 1, 52, 152, 100),
    ("Res2Net s3 @800", 1, 104, 76, 50), ("Res2Net s4 @800", 1, 208, 38, 25),
    ("Res2Net s1 @224", 1, 26, 56, 56), ("Res2Net s3 @224", 1, 104, 14, 14),
]


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


@torch.inference_mode()
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'layer':18s} {'input':>18s} {'conv2d ms':>10s} {'winograd ms':>12s} {'speed-up':>9s} {'rel err':>8s}")
    for label, n, c, h, w in SHAPES:
        x = torch.randn(n, c, h, w, generator=g).relu().contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, c, 3, 3, generator=g) / (3 * c ** 0.5)
        bias = torch.randn(c, generator=g) * 0.1
        weight_t = winograd_weight(weight)
        direct = best_ms(lambda: F.conv2d(x, weight, bias, padding=1).relu_(), args.repeats)
        wino = best_ms(lambda: conv3x3_winograd(x, weight_t, bias, relu=True), args.repeats)
        ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
        err = float((conv3x3_winograd(x, weight_t, bias, relu=True) - ref).abs().max() / ref.abs().max())
        rows.append(dict(layer=label, shape=[n, c, h, w], conv2d_ms=direct, winograd_ms=wino,
                         speedup=direct / wino, rel_err=err))
        print(f"{label:18s} {f'{n}x{c}x{h}x{w}':>18s} {direct:10.2f} {wino:12.2f} {direct / wino:8.2f}x {err:8.1e}")
    result = dict(rows=rows, threads=torch.get_num_threads(), torch=torch.__version__)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
