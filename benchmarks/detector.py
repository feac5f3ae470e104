"""Detector benchmark: params, GMACs and CPU latency per image at 800x1333, eager vs optimised.

    python benchmarks/detector.py [--models NAME ...] [--repeats 3] [--threads 2] [--json OUT]

Default: every detector in the zoo (mmdetection and PaddleDetection rows).

Input: the reference photo at 1199x800 (padded to 1216x800), with the seed-0 reference weights from
../shared/reference when present (random weights otherwise), so the detections, and with them the RoI-head
work, are those of the parity fixtures. GMACs are conv + linear multiply-adds of one whole forward pass (RPN,
1000 proposals through the box head, the mask head on the final detections). Latency is the median of
``--repeats`` interleaved calls after a warm-up. 'optimised' is ``res2det.optimize.optimize_for_inference``;
its detections are compared with eager's (max box / score difference, label and mask equality).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import res2det  # noqa: E402
from backbone import time_interleaved, write_json  # noqa: E402
from res2det.cli.main import SHARED, seeded_reference_weights  # noqa: E402
from res2det.data.image import normalize  # noqa: E402
from res2det.optimize import optimize_for_inference  # noqa: E402
from res2det.utils.complexity import count_macs, count_params  # noqa: E402



def reference_input(model) -> torch.Tensor:
    photo = SHARED / "reference" / "parity" / "det_input_1199x800.png"
    rgb = np.asarray(Image.open(photo).convert("RGB")) if photo.is_file() else \
        np.random.default_rng(0).integers(0, 255, (1199, 800, 3), dtype=np.uint8)
    x = normalize(rgb, model.preprocess)
    return torch.nn.functional.pad(x, (0, 0, 0, 1216 - x.shape[1]))[None]


def compare(a: dict, b: dict) -> dict:
    same = a["boxes"].shape == b["boxes"].shape and torch.equal(a["labels"], b["labels"])
    out = {"same_count_and_labels": bool(same)}
    if same:
        out["max_box_diff"] = float((a["boxes"] - b["boxes"]).abs().max()) if len(a["boxes"]) else 0.0
        out["max_score_diff"] = float((a["scores"] - b["scores"]).abs().max()) if len(a["scores"]) else 0.0
        if "masks" in a:
            out["mask_pixels_differing"] = int((a["masks"] != b["masks"]).sum())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=res2det.list_models("detection") + res2det.list_models("instance_segmentation"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        weights = seeded_reference_weights(name)
        model = res2det.create_model(name, weights=None if weights is None else str(weights)).eval()
        x = reference_input(model)
        start = time.perf_counter()
        opt = optimize_for_inference(model, x)
        selection_s = time.perf_counter() - start
        with torch.inference_mode():
            check = compare(model(x)[0], opt(x)[0])
        ms = time_interleaved({"eager": model, "optimised": opt}, x, warmup=1, repeats=args.repeats, device="cpu")
        rows.append(dict(model=name, params_m=count_params(model) / 1e6, gmacs=count_macs(model, x) / 1e9,
                         eager_s=ms["eager"] / 1000, optimised_s=ms["optimised"] / 1000,
                         speedup=ms["eager"] / ms["optimised"], selection_s=selection_s,
                         weights="seeded reference" if weights else "random", **check))
    header = f"{'model':32s} {'params(M)':>9s} {'GMACs':>7s} {'eager s':>8s} {'opt s':>7s} {'speedup':>7s}  outputs"
    print(header)
    print("-" * len(header))
    for r in rows:
        same = "identical labels" if r["same_count_and_labels"] else "DIFFERENT"
        if r["same_count_and_labels"]:
            same += f", max|d| box {r['max_box_diff']:.1e} score {r['max_score_diff']:.1e}"
            if "mask_pixels_differing" in r:
                same += f", {r['mask_pixels_differing']} mask px differ"
        print(f"{r['model']:32s} {r['params_m']:9.1f} {r['gmacs']:7.1f} {r['eager_s']:8.2f} {r['optimised_s']:7.2f} "
              f"{r['speedup']:6.2f}x  {same}")
    result = dict(rows=rows, threads=torch.get_num_threads(), torch=torch.__version__,
                  cpu=platform.processor() or platform.machine(), repeats=args.repeats)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
