"""``onnx_backend``: a PyTorch detector run by ONNX Runtime without a manual export step.

The first call for a model exports its graph (dynamic input size) into the cache, keyed by everything the graph
depends on: the weights, the class names, the pre-processing and test settings, res2det's and torch's versions.
The graph is checked against the PyTorch model on a real image before it is kept, and reused afterwards.
"""
from __future__ import annotations

import hashlib
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
from .runner import GRAPH_FORMAT, OnnxDetector

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


def onnx_backend(model: TwoStageDetector, *, model_name: str, check_image: ImageLike,
                 threads: int | None = None, root: str | os.PathLike | None = None) -> OnnxDetector:
    """``model`` as an ``OnnxDetector`` (same ``predict``), from the cache (``root``, default
    ``cache_dir()/onnx``) or exported into it first. A new graph is kept only if its detections on
    ``check_image`` agree with ``model.predict`` (``agreement``); a disagreement is an error naming the image."""
    check_exportable(model)
    folder = Path(root) if root is not None else cache_dir() / "onnx"
    path = folder / f"{model_name}-{graph_key(model, model_name)}.onnx"
    checked = path.with_suffix(".checked")
    if path.is_file() and checked.is_file():
        return OnnxDetector(path, threads=threads)
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model.eval(), path, model_name=model_name)
    detector = OnnxDetector(path, threads=threads)
    (ref,), (got,) = model.predict(check_image), detector.predict(check_image)
    problem = agreement(ref, got)
    if problem is not None:
        path.unlink(missing_ok=True)
        raise Res2DetError(f"the exported ONNX graph of {model_name} disagrees with PyTorch on {check_image} "
                           f"({problem}); run with the PyTorch backend")
    atomic_write(checked, lambda tmp: Path(tmp).write_text(f"{len(ref)} detections agree\n"))
    return detector


__all__ = ["onnx_backend", "graph_key", "agreement"]
