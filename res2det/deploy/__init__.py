"""Deployment: ONNX export of the detectors (the model's own ``detect``, NMS inside the graph) and an ONNX
Runtime / OpenVINO runner with ``predict``'s pre- and post-processing (``res2det.inference``).

``export_onnx(model, path, size=None)`` writes the graph; ``OnnxDetector(path).predict(images)`` runs it;
``onnx_backend(model, ...)`` does both through a checked cache.
``openvino_backend`` runs the same graph in OpenVINO (fp32, or bf16 where the CPU has it).
Needs the ``onnx`` extra (onnx, onnxruntime), or ``openvino`` (onnx, openvino)."""
from .onnx_export import export_onnx
from .graph import DetectionGraph
from .runner import GraphInfo, OnnxDetector, OpenVinoDetector
from .backend import graph_backend, onnx_backend, openvino_backend

__all__ = ["export_onnx", "DetectionGraph", "OnnxDetector", "OpenVinoDetector", "GraphInfo", "graph_backend",
           "onnx_backend", "openvino_backend"]
