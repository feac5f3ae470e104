"""``graph_backend``: a PyTorch detector run by ONNX Runtime or OpenVINO without a manual export step.

The first call for a model exports its graph (dynamic input size) into the cache, keyed by everything the graph
depends on: the weights, the class names, the pre-processing and test settings, res2det's and torch's versions.
The graph is checked against the PyTorch model on a real image before it is kept, and reused afterwards.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import atomic_write, cache_dir
from ..errors import Res2DetError
from ..images import ImageLike
from ..inference import no_detections, predict
from ..models.detectors.two_stage import TwoStageDetector
from ..ops import box_iou
from ..version import __version__
from .graph import check_exportable
from .onnx_export import export_onnx
from .runner import GRAPH_FORMAT, METADATA_KEY, OPENVINO_PRECISIONS, GraphDetector, OnnxDetector, OpenVinoDetector

# What a cached graph must reproduce of the PyTorch model on the check image: every detection scoring at least
# CHECK_SCORE has a counterpart of the same class with box IoU >= CHECK_IOU and a score within CHECK_SCORE_TOL.
CHECK_SCORE, CHECK_IOU, CHECK_SCORE_TOL = 0.3, 0.98, 1e-3


def graph_key(model: TwoStageDetector, model_name: str) -> str:
    """A digest of everything the exported graph depends on."""
    h = hashlib.sha256()
    meta = {"model": model_name, "classes": list(model.class_names), "preprocess": repr(model.preprocess),
            "rpn": repr(model.rpn_head.test_cfg), "rcnn": repr(model.roi_head.test_cfg),
            "res2det": __version__, "torch": torch.__version__, "graph_format": GRAPH_FORMAT}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def agreement(ref, got) -> str | None:
    """``None`` if ``got`` reproduces every detection of ``ref`` scoring at least ``CHECK_SCORE``; else what
    is missing."""
    iou = box_iou(ref.boxes.float(), got.boxes.float()) if len(ref) and len(got) else torch.zeros(len(ref), len(got))
    # boxes clipped to zero area on the image border have no IoU: corners within half a pixel pair them
    close = (ref.boxes[:, None] - got.boxes[None]).abs().amax(-1) <= 0.5 if len(ref) and len(got) else iou > 0
    for i in torch.nonzero(ref.scores >= CHECK_SCORE).flatten().tolist():
        same = (got.labels == ref.labels[i]) & ((got.scores - ref.scores[i]).abs() <= CHECK_SCORE_TOL)
        if not bool((same & ((iou[i] >= CHECK_IOU) | close[i])).any()):
            return (f"detection {i} ({ref.categories[i]} {float(ref.scores[i]):.3f} at "
                    f"{[round(v, 1) for v in ref.boxes[i].tolist()]}) has no counterpart")
    return None


# runtime -> (its Python package, the res2det extra that installs it)
RUNTIMES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}


def require_runtime(runtime: str) -> None:
    """One clear error for an unknown runtime or one that is not installed."""
    if runtime not in RUNTIMES:
        raise Res2DetError(f"backend must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    package, extra = RUNTIMES[runtime]
    if importlib.util.find_spec(package) is None:
        raise Res2DetError(f"--backend {runtime} needs {package}, which is not installed "
                           f"(pip install 'res2det[{extra}]')")


def check_precision(runtime: str, precision: str) -> None:
    if runtime == "onnxruntime" and precision != "fp32":
        raise Res2DetError(f"ONNX Runtime runs the graph in fp32; --precision {precision} needs the PyTorch or "
                           f"OpenVINO backend")
    if runtime == "openvino" and precision not in OPENVINO_PRECISIONS:
        raise Res2DetError(f"the OpenVINO backend runs in fp32, bf16 or int8, not {precision}")
    if precision == "int8" and importlib.util.find_spec("nncf") is None:
        raise Res2DetError("--precision int8 quantises the graph with NNCF, which is not installed "
                           "(pip install 'res2det[int8]')")


def open_graph(path: Path, runtime: str, *, precision: str = "fp32", threads: int | None = None,
               streams: int = 1) -> GraphDetector:
    """The ONNX file ``path`` in ``runtime`` ('onnxruntime', fp32 only; 'openvino', fp32 or bf16)."""
    check_precision(runtime, precision)
    if runtime == "onnxruntime":
        return OnnxDetector(path, threads=threads)
    if runtime == "openvino":
        return OpenVinoDetector(path, threads=threads, precision=precision, streams=streams)
    raise Res2DetError(f"backend must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


# The layers an int8 graph keeps in f32: the mask heads. Quantised, they cost the main-job model 0.059 mask AP
# (box AP +0.0008); kept f32, mask AP moves by -0.0001 (`benchmarks/inference_ap.py --int8-mask-head`,
# docs/fast-inference.md); they run on at most 100 RoIs of 14x14, so keeping them costs no measurable time.
INT8_KEEP_FP32 = [".*mask_head.*"]


def int8_graph_path(path: Path, calibration: Sequence[ImageLike]) -> Path:
    """Where the int8 form of the graph ``path`` calibrated on ``calibration`` is cached: beside it, keyed by the
    images' bytes, ``INT8_KEEP_FP32`` and NNCF's version."""
    h = hashlib.sha256(repr((INT8_KEEP_FP32, importlib.metadata.version("nncf"))).encode())
    for image in calibration:
        h.update(Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else repr(image).encode())
    return path.with_name(f"{path.stem}.int8-{h.hexdigest()[:12]}.xml")


def quantize_graph(path: Path, fp32: GraphDetector, calibration: Sequence[ImageLike], target: Path) -> None:
    """Write ``target``: the OpenVINO graph ``path`` quantised to int8 by NNCF's post-training quantisation
    (activation ranges from ``fp32``'s inputs on the ``calibration`` images, no labels; ``INT8_KEEP_FP32`` left
    in f32), atomically."""
    import nncf
    import openvino as ov

    inputs = []

    def record(batch, sizes, metas=None):  # the graph's own inputs, as predict() builds them; the graph need not run
        inputs.extend(fp32._inputs(image, size) for image, size in zip(batch, sizes))
        return no_detections(batch, sizes)

    info = fp32.info
    predict(record, list(calibration), preprocess=info.preprocess, class_names=info.class_names,
            input_size=info.input_size)
    graph = ov.Core().read_model(str(path))
    nncf.set_log_level(logging.ERROR)  # its per-layer INFO lines would bury the run's output
    quantised = nncf.quantize(graph, nncf.Dataset(inputs), subset_size=len(inputs), fast_bias_correction=True,
                              ignored_scope=nncf.IgnoredScope(patterns=INT8_KEEP_FP32, validate=False))
    meta = graph.get_rt_info(["framework", METADATA_KEY]).astype(str)
    quantised.set_rt_info(meta, ["framework", METADATA_KEY])  # the res2det metadata OpenVinoDetector reads
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.xml")
    ov.save_model(quantised, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), target.with_suffix(".bin"))
    os.replace(tmp, target)  # the .xml last: it marks a complete pair


def graph_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike,
                  runtime: str = "onnxruntime", precision: str = "fp32", threads: int | None = None,
                  streams: int = 1, root: str | os.PathLike | None = None,
                  calibration: Sequence[ImageLike] | None = None) -> GraphDetector:
    """``model`` run by ``runtime`` (``open_graph``) from its exported graph (same ``predict``), from the cache
    (``root``, default ``cache_dir()/onnx``) or exported into it first; one graph serves both runtimes. The
    first time a graph is opened in a runtime, its fp32 detections on ``check_image`` must agree with
    ``model.predict`` (``agreement``; a reduced ``precision`` is the same graph computed in bf16, or quantised to
    int8 on the ``calibration`` images (default: ``check_image``; OpenVINO only, ``quantize_graph``), which moves
    near-tied scores: its accuracy is judged by AP, ``benchmarks/inference_ap.py``); a disagreement is an
    error naming the image, and the graph is not kept."""
    check_exportable(model)
    folder = Path(root) if root is not None else cache_dir() / "onnx"
    path = folder / f"{model_name}-{graph_key(model, model_name)}.onnx"
    checked = path.with_suffix(".checked" if runtime == "onnxruntime" else f".{runtime}.checked")
    require_runtime(runtime)
    check_precision(runtime, precision)
    calibration = [check_image] if calibration is None else calibration
    int8 = int8_graph_path(path, calibration) if precision == "int8" else None
    detector = None
    if not (path.is_file() and checked.is_file()):
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            export_onnx(model.eval(), path, model_name=model_name)
        detector = open_graph(path, runtime, threads=threads)
        _check(model, detector, check_image, path, runtime, model_name, checked)
    if int8 is not None:
        if not int8.is_file():
            quantize_graph(path, detector or open_graph(path, runtime, threads=threads), calibration, int8)
        return open_graph(int8, runtime, precision=precision, threads=threads, streams=streams)
    if detector is not None and precision == "fp32" and streams == 1:
        return detector
    return open_graph(path, runtime, precision=precision, threads=threads, streams=streams)


def _check(model: TwoStageDetector, detector: GraphDetector, check_image: ImageLike, path: Path, runtime: str,
           model_name: str, checked: Path) -> None:
    """The graph's fp32 detections on ``check_image`` against PyTorch's; kept (``checked``) or removed."""
    (ref,), (got,) = model.predict(check_image), detector.predict(check_image)
    problem = agreement(ref, got)
    if problem is not None:
        path.unlink(missing_ok=True)
        for marker in path.parent.glob(f"{path.stem}.*checked"):
            marker.unlink(missing_ok=True)
        raise Res2DetError(f"the exported ONNX graph of {model_name} disagrees with PyTorch on {check_image} "
                           f"in {runtime} ({problem}); run with the PyTorch backend")
    atomic_write(checked, lambda tmp: Path(tmp).write_text(f"{len(ref)} detections agree\n"))


def onnx_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike,
                 threads: int | None = None, root: str | os.PathLike | None = None) -> OnnxDetector:
    """``graph_backend`` in ONNX Runtime."""
    return graph_backend(model, model_name=model_name, check_image=check_image, threads=threads, root=root)


def openvino_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike, precision: str = "fp32",
                     threads: int | None = None, streams: int = 1, root: str | os.PathLike | None = None,
                     calibration: Sequence[ImageLike] | None = None) -> OpenVinoDetector:
    """``graph_backend`` in OpenVINO (``precision`` 'fp32', 'bf16' or 'int8' calibrated on ``calibration``,
    ``streams`` images at once)."""
    return graph_backend(model, model_name=model_name, check_image=check_image, runtime="openvino",
                         precision=precision, threads=threads, streams=streams, root=root, calibration=calibration)


__all__ = ["graph_backend", "onnx_backend", "openvino_backend", "open_graph", "quantize_graph", "graph_key",
           "agreement", "RUNTIMES"]
