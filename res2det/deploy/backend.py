"""``graph_backend``: a PyTorch detector run by ONNX Runtime or OpenVINO without a manual export step.

The first call for a model exports its graph (dynamic input size) into the cache, keyed by everything the graph
depends on: the weights, the class names, the pre-processing and test settings, res2det's and torch's versions.
The graph is checked against the PyTorch model on a real image before it is kept, and reused afterwards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from ..checkpoint import atomic_write, cache_dir
from ..errors import Res2DetError
from ..images import ImageLike
from ..models.detectors.two_stage import TwoStageDetector
from ..ops import box_iou
from ..version import __version__
from .graph import check_exportable
from .onnx_export import export_onnx
from .runner import GRAPH_FORMAT, OPENVINO_PRECISIONS, GraphDetector, OnnxDetector, OpenVinoDetector

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
        raise Res2DetError(f"the OpenVINO backend runs in {' or '.join(OPENVINO_PRECISIONS)}, not {precision}")


def open_graph(path: Path, runtime: str, *, precision: str = "fp32", threads: int | None = None,
               streams: int = 1) -> GraphDetector:
    """The ONNX file ``path`` in ``runtime`` ('onnxruntime', fp32 only; 'openvino', fp32 or bf16)."""
    check_precision(runtime, precision)
    if runtime == "onnxruntime":
        return OnnxDetector(path, threads=threads)
    if runtime == "openvino":
        return OpenVinoDetector(path, threads=threads, precision=precision, streams=streams)
    raise Res2DetError(f"backend must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def graph_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike,
                  runtime: str = "onnxruntime", precision: str = "fp32", threads: int | None = None,
                  streams: int = 1, root: str | os.PathLike | None = None) -> GraphDetector:
    """``model`` run by ``runtime`` (``open_graph``) from its exported graph (same ``predict``), from the cache
    (``root``, default ``cache_dir()/onnx``) or exported into it first; one graph serves both runtimes. The
    first time a graph is opened in a runtime, its fp32 detections on ``check_image`` must agree with
    ``model.predict`` (``agreement``; a reduced ``precision`` is the same graph computed in bf16, which moves
    near-tied scores: its accuracy is judged by AP, ``benchmarks/inference_ap.py``); a disagreement is an
    error naming the image, and the graph is not kept."""
    check_exportable(model)
    folder = Path(root) if root is not None else cache_dir() / "onnx"
    path = folder / f"{model_name}-{graph_key(model, model_name)}.onnx"
    checked = path.with_suffix(".checked" if runtime == "onnxruntime" else f".{runtime}.checked")
    if path.is_file() and checked.is_file():
        return open_graph(path, runtime, precision=precision, threads=threads, streams=streams)
    require_runtime(runtime)  # before an export of minutes
    check_precision(runtime, precision)
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(model.eval(), path, model_name=model_name)
    detector = open_graph(path, runtime, threads=threads)
    (ref,), (got,) = model.predict(check_image), detector.predict(check_image)
    problem = agreement(ref, got)
    if problem is not None:
        path.unlink(missing_ok=True)
        for marker in folder.glob(f"{path.stem}.*checked"):
            marker.unlink(missing_ok=True)
        raise Res2DetError(f"the exported ONNX graph of {model_name} disagrees with PyTorch on {check_image} "
                           f"in {runtime} ({problem}); run with the PyTorch backend")
    atomic_write(checked, lambda tmp: Path(tmp).write_text(f"{len(ref)} detections agree\n"))
    if precision == "fp32" and streams == 1:
        return detector
    return open_graph(path, runtime, precision=precision, threads=threads, streams=streams)


def onnx_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike,
                 threads: int | None = None, root: str | os.PathLike | None = None) -> OnnxDetector:
    """``graph_backend`` in ONNX Runtime."""
    return graph_backend(model, model_name=model_name, check_image=check_image, threads=threads, root=root)


def openvino_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike, precision: str = "fp32",
                     threads: int | None = None, streams: int = 1,
                     root: str | os.PathLike | None = None) -> OpenVinoDetector:
    """``graph_backend`` in OpenVINO (``precision`` 'fp32' or 'bf16', ``streams`` images at once)."""
    return graph_backend(model, model_name=model_name, check_image=check_image, runtime="openvino",
                         precision=precision, threads=threads, streams=streams, root=root)


__all__ = ["graph_backend", "onnx_backend", "openvino_backend", "open_graph", "graph_key", "agreement", "RUNTIMES"]
