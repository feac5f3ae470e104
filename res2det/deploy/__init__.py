"""Deployment: ONNX export of the detectors (the model's own ``detect``, NMS inside the graph) and an ONNX
Runtime runner with ``predict``'s pre- and post-processing (``res2det.inference``).

``export_onnx(model, path, size=None)`` writes the graph; ``OnnxDetector(path).predict(images)`` runs it;
``onnx_backend(model, ...)`` does both through a checked cache.
Needs the ``onnx`` extra (onnx, onnxruntime)."""
from .onnx_export import export_onnx
from .graph import DetectionGraph
from .runner import GraphInfo, OnnxDetector
from .backend import onnx_backend

__all__ = ["export_onnx", "DetectionGraph", "OnnxDetector", "GraphInfo", "onnx_backend"]
