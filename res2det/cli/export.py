"""``res2det export``: a zoo detector to one ONNX graph; and the ONNX side of ``res2det infer --onnx``."""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import Res2DetError
from .common import check_output, parse_size

DETECTION_TASKS = ("detection", "instance_segmentation")


def cmd_export(args) -> None:
    from ..deploy import export_onnx
    from ..deploy.onnx_export import check_size
    from ..zoo import create_model, get_spec, list_models

    spec = get_spec(args.model)
    if spec.task not in DETECTION_TASKS:
        detectors = [n for t in DETECTION_TASKS for n in list_models(t)]
        raise Res2DetError(f"{args.model} is a {spec.task} model; export needs a detector: {', '.join(detectors)}")
    if spec.config.conventions != "mmdet":
        raise Res2DetError(f"ONNX export of PaddleDetection-convention detectors ({args.model}) is not implemented; "
                           "export an mmdetection row")
    if args.size is not None and args.dynamic:
        raise Res2DetError("give either --size HxW or --dynamic, not both")
    size = parse_size(args.size, square_ok=False) if args.size is not None else None
    if size is not None:
        check_size(size)
    out = check_output(args.out, "--out")  # before the model is built and traced
    model = create_model(args.model, weights=args.weights).eval()
    if args.weights is None:
        print(f"res2det: warning: no --weights given, so the exported {args.model} is randomly initialised; its "
              "detections mean nothing.", file=sys.stderr)
    start = time.perf_counter()
    export_onnx(model, out, size=size, model_name=args.model)
    shape = f"1x3x{size[0]}x{size[1]}" if size else "1x3xHxW (H, W: any multiple of 32)"
    print(f"exported {args.model} to {out} ({out.stat().st_size / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - start:.1f} s: opset 17, input image {shape}; NMS in the graph, masks pasted by "
          f"the runner; run it with `res2det infer --onnx {out} IMAGE`")


def onnx_detector(path: str, *, model: str | None, weights: str | None):
    """The ``OnnxDetector`` that ``res2det infer --onnx`` runs (its ``predict`` is the model's)."""
    from ..deploy import OnnxDetector

    if weights is not None:
        raise Res2DetError("--weights does not apply with --onnx: the ONNX file holds the weights")
    detector = OnnxDetector(path)
    if model is not None and model != detector.model_name:
        raise Res2DetError(f"{path}: this ONNX file holds {detector.model_name!r}, not {model!r}")
    return detector


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a detector to ONNX (opset 17; the model's detect with NMS in the graph)")
    p.add_argument("model", metavar="MODEL", help="a detection or instance_segmentation model (see `res2det list`)")
    p.add_argument("--weights", help="checkpoint file or a published source ('mmdet')")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", metavar="HxW", help="fixed input size (multiples of 32, e.g. 800x1344): images are "
                   "padded to it (and scaled down when they would not fit)")
    p.add_argument("--dynamic", action="store_true", help="dynamic input height and width (the default)")
    p.set_defaults(func=cmd_export)
