"""CUDA parity of the five mmdetection R2-101 detectors against the CPU reference fixtures.

    RES2DET_SHARED=/path/to/shared python benchmarks/gpu_parity.py [--device cuda] [--json OUT]

Each detector gets the seed-0 reference weights, runs ``forward_with_intermediates`` on the fixture input on
``--device`` and is compared with ``../shared/reference/check_parity.py`` (the tolerances the CPU parity tests
use); the table gives PASS/FAIL per model, the worst checked tensor and the detections' agreement.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import res2det  # noqa: E402
from res2det.structures import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

from backbone import write_json  # noqa: E402
from shared_weights import SHARED, seeded_reference_weights  # noqa: E402

MODELS = ["faster_rcnn_r2_101_fpn_2x_coco", "mask_rcnn_r2_101_fpn_2x_coco", "cascade_rcnn_r2_101_fpn_20e_coco",
          "cascade_mask_rcnn_r2_101_fpn_20e_coco", "htc_r2_101_fpn_20e_coco"]


def fixture_input() -> torch.Tensor:
    """The fixtures' (1, 3, 1216, 800) input, as the reference README builds it."""
    rgb = np.asarray(Image.open(SHARED / "reference" / "parity" / "det_input_1199x800.png").convert("RGB")).copy()
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return F.pad(x, (0, 0, 0, 1216 - 1199))[None]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("check_parity", SHARED / "reference" / "check_parity.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    rows = []
    x = fixture_input().to(args.device)
    for name in args.models:
        model = res2det.create_model(name, weights=str(seeded_reference_weights(name))).to(args.device).eval()
        results, outputs = model.forward_with_intermediates(x, [(1199, 800)])
        report = io.StringIO()
        ok = check.compare({k: v.cpu() for k, v in outputs.items()}, SHARED / "reference" / "parity" / f"{name}.pt",
                           strict=True, file=report)
        fails = [line for line in report.getvalue().splitlines() if "FAIL" in line]
        rows.append(dict(model=name, device=args.device, passed=bool(ok), detections=len(results[0]["boxes"]),
                         failures=fails[:10]))
        print(f"{name:40s} {'PASS' if ok else 'FAIL'}  {len(results[0]['boxes'])} detections"
              + ("".join(f"\n    {f}" for f in fails[:10]) if fails else ""))
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
