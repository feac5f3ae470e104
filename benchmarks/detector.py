"""Detector benchmark: params, GMACs and latency per image at 800x1333, eager vs optimised.

    python benchmarks/detector.py [--models NAME ...] [--repeats 3] [--threads 2] [--device cpu|cuda] [--amp]
                                  [--json OUT] [--profile]

Default: every detector in the zoo (mmdetection and PaddleDetection rows).

Input: the reference photo at 1199x800 (padded to 1216x800), with the seed-0 reference weights from
../shared/reference when present, so the detections, and with them the RoI-head work, are those of the parity
fixtures. Without them (e.g. on a machine without ../shared) the weights are random and the test score
threshold is set to 0 so that the heads still see a full load (100 detections), as in ``res2det benchmark``;
random weights score many detections nearly alike, so rounding can flip NMS and top-k decisions and the output
check below is only meaningful with the seeded weights.
GMACs are conv + linear multiply-adds of one whole forward pass (RPN, 1000 proposals through the box head,
the mask head on the final detections). Latency is the median of ``--repeats`` interleaved calls after
``--warmup`` (on CUDA synchronised; defaults 1 + 3 on CPU, 5 + 20 on CUDA). 'optimised' is
``res2det.optimize.optimize_for_inference`` (kernel selection on CPU in fp32 only; on CUDA and with ``--amp``
the fusion alone); its detections are compared with eager's in fp32 (max box / score difference, label and
mask equality). ``--amp``: both variants timed under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU;
``--amp-dtype`` picks).
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
from backbone import parse_run_options, print_profile, time_interleaved, write_json  # noqa: E402
from res2det.profiling import build_model  # noqa: E402

from shared_weights import SHARED, seeded_reference_weights  # noqa: E402
from res2det.images import normalize  # noqa: E402
from res2det.optimize import optimize_for_inference  # noqa: E402
from res2det.utils.complexity import count_macs, count_params  # noqa: E402



def reference_input(model) -> torch.Tensor:
    photo = SHARED / "reference" / "parity" / "det_input_1199x800.png"
    rgb = np.asarray(Image.open(photo).convert("RGB")) if photo.is_file() else \
        np.random.default_rng(0).integers(0, 255, (1199, 800, 3), dtype=np.uint8)
    x = normalize(rgb, model.preprocess)
    return torch.nn.functional.pad(x, (0, 0, 0, 1216 - x.shape[1]))[None]


def compare(a: dict, b: dict) -> dict:
    """Eager vs optimised detections. Each detection of ``a`` is matched to the nearest box of ``b`` with the
    same label (detections whose scores nearly tie, as with random weights, may come out in another order)."""
    same = a["boxes"].shape == b["boxes"].shape and torch.equal(a["labels"].sort().values, b["labels"].sort().values)
    out = {"same_count_and_labels": bool(same)}
    if same and len(a["boxes"]):
        dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1)
        dist[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
        nearest, match = dist.min(1)
        out["max_box_diff"] = float(nearest.max())
        out["max_score_diff"] = float((a["scores"] - b["scores"][match]).abs().max())
        if "masks" in a:
            out["mask_pixels_differing"] = int((a["masks"] != b["masks"][match]).sum())
    elif same:
        out.update(max_box_diff=0.0, max_score_diff=0.0)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=res2det.list_models("detection") + res2det.list_models("instance_segmentation"))
    args = parse_run_options(ap, argv, warmup=(1, 5), repeats=(3, 20))
    cuda = args.device == "cuda"
    select = not cuda and not args.amp
    autocast = torch.autocast(args.device, dtype=args.amp_dtype, enabled=args.amp)
    rows = []
    for name in args.models:
        weights = seeded_reference_weights(name)
        if weights is None:  # profiling's random full-load model (PyTorch's init: finite eval-mode activations)
            model = build_model(name).eval()
        else:
            model = res2det.create_model(name, weights=str(weights)).eval()
        model = model.to(args.device)
        x = reference_input(model).to(args.device)
        start = time.perf_counter()
        opt = optimize_for_inference(model, x, select=select)
        selection_s = time.perf_counter() - start
        with torch.inference_mode():
            check = compare(model(x)[0], opt(x)[0])

        def wrap(f):
            def run(inp):
                with autocast:
                    return f(inp)
            return run

        if args.profile:
            print_profile(f"{name} optimised", wrap(opt), x, calls=1)
        ms = time_interleaved({"eager": wrap(model), "optimised": wrap(opt)}, x, warmup=args.warmup,
                              repeats=args.repeats, device=args.device)
        rows.append(dict(model=name, params_m=count_params(model) / 1e6, gmacs=count_macs(model, x) / 1e9,
                         eager_s=ms["eager"] / 1000, optimised_s=ms["optimised"] / 1000,
                         speedup=ms["eager"] / ms["optimised"], selection_s=selection_s,
                         weights="seeded reference" if weights else "random (score threshold 0: full load)",
                         **check))
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
                  cpu=platform.processor() or platform.machine(), repeats=args.repeats, warmup=args.warmup,
                  device=args.device, amp=args.amp and str(args.amp_dtype), kernel_selection=select,
                  cuda=torch.cuda.get_device_name() if cuda else None)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
