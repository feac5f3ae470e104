"""``export_onnx``: a detector's own ``detect`` to one ONNX graph (opset 17), NMS and RoIAlign inside."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..version import __version__
from ..checkpoint import atomic_write
from ..errors import Res2DetError
from ..ops.onnx_ops import OPSET, register_symbolics
from .graph import INPUT_NAMES, DetectionGraph, check_exportable
from .runner import METADATA_KEY, SIZE_DIVISOR, GraphInfo

# The size a dynamic graph is traced at; any other multiple of 32 runs through the same graph.
TRACE_SIZE = (320, 320)


def check_size(size: Sequence[int]) -> None:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0 or h % SIZE_DIVISOR or w % SIZE_DIVISOR:
        raise Res2DetError(f"the input size must be positive multiples of {SIZE_DIVISOR} (height x width), "
                           f"got {h}x{w}")


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, size: Sequence[int] | None = None,
                model_name: str | None = None) -> Path:
    """Write ``model`` (a res2det two-stage or cascade detector) to ``path`` as an ONNX graph, atomically.

    ``size=(H, W)`` fixes the image input to ``[1, 3, H, W]`` (multiples of 32; images are padded to it);
    ``None`` leaves height and width dynamic (any multiple of 32). See ``res2det.deploy.graph`` for the inputs,
    outputs and what runs inside; ``OnnxDetector`` runs the file. Uses PyTorch's TorchScript-based exporter:
    it records the data-dependent parts (NonZero, TopK, NonMaxSuppression) by tracing, ten times faster on
    these 100-layer graphs than the torch.export-based one.
    """
    check_exportable(model)
    try:
        import onnx
    except ImportError as e:
        raise Res2DetError(f"ONNX export needs the onnx package (pip install 'res2det[onnx]'): {e}") from None
    if size is not None:
        check_size(size)
    h, w = (int(v) for v in (size or TRACE_SIZE))
    pre = model.preprocess
    info = GraphInfo(model=model_name or getattr(model, "model_name", type(model).__name__),
                     class_names=tuple(model.class_names), mean=tuple(pre.mean), std=tuple(pre.std),
                     resize_bounds=tuple(pre.input_size), input_size=None if size is None else (h, w),
                     with_mask=bool(model.roi_head.with_mask), mask_thr=float(model.roi_head.test_cfg.mask_thr_binary),
                     opset=OPSET, res2det_version=__version__)
    graph = DetectionGraph(model)
    param = next(model.parameters())
    example = (torch.zeros(1, 3, h, w, dtype=param.dtype, device=param.device), torch.tensor([h, w]))
    dynamic_axes = {name: {0: "detections"} for name in graph.output_names}
    if size is None:
        dynamic_axes["image"] = {2: "height", 3: "width"}
    register_symbolics()
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter announces its deprecation on every call
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # benign here: the coder's early return for no boxes (the traced path handles none as well), the
            # advanced-indexing note (no index is negative) and a skipped constant fold
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"res2det\.models\.heads")
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(graph, example, buffer, dynamo=False, opset_version=OPSET,
                              input_names=list(INPUT_NAMES), output_names=list(graph.output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()
    proto.producer_name = "res2det"
    path = Path(path)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


__all__ = ["export_onnx", "check_size", "TRACE_SIZE"]
