"""Running an exported detector with ONNX Runtime or OpenVINO through ``res2det.inference.predict``: the same
pre-processing, mask pasting and ``Detections`` as ``TwoStageDetector.predict``.

Pre-processing stays outside the graph (it is a few lines of image resizing that every deployment does its own
way): keep-ratio resize to the model's bounds (mmcv's rule, bilinear), normalise with the weights' own
statistics, zero-pad bottom/right, to a multiple of 32 for a graph exported with dynamic height and width,
or to the graph's fixed size. An image whose resized size would not fit a fixed-size graph is scaled down
further until it does (so it sees a smaller input than ``predict`` gives it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..errors import Res2DetError
from ..inference import autocast_dtype, iter_predict
from ..structures import Preprocess

if TYPE_CHECKING:
    from typing import Iterator

    from ..images import ImageLike
    from ..structures import Detections

METADATA_KEY = "res2det"
SIZE_DIVISOR = 32
# 2: the graph ends at the detections in input pixels with 28x28 mask probabilities (pasted by the runner);
# 1 (res2det <= 0.4) pasted masks inside and took orig_size / scale_factor inputs.
GRAPH_FORMAT = 2


@dataclass(frozen=True)
class GraphInfo:
    """What ``export_onnx`` records in the ONNX file (``metadata_props['res2det']``, JSON)."""

    model: str
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_bounds: tuple[int, int]  # predict's (short, long) keep-ratio bounds
    input_size: tuple[int, int] | None  # the fixed (H, W) of the image input; None: dynamic
    with_mask: bool
    mask_thr: float
    opset: int
    res2det_version: str
    graph_format: int = GRAPH_FORMAT

    def to_json(self) -> str:
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> "GraphInfo":
        d = json.loads(text)
        if d.get("graph_format", 1) != GRAPH_FORMAT:
            raise ValueError(f"graph format {d.get('graph_format', 1)} of res2det {d.get('res2det_version')}; "
                             f"this version reads format {GRAPH_FORMAT}: export the model again")
        for k in ("class_names", "mean", "std", "resize_bounds"):
            d[k] = tuple(d[k])
        d["input_size"] = None if d["input_size"] is None else tuple(d["input_size"])
        return cls(**d)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(mean=self.mean, std=self.std, input_size=self.resize_bounds, crop_pct=None)


def read_info(props: dict[str, str], path: str | os.PathLike) -> GraphInfo:
    """The ``GraphInfo`` in an ONNX file's metadata properties."""
    if METADATA_KEY not in props:
        raise Res2DetError(f"{path}: not an ONNX file written by `res2det export` (no '{METADATA_KEY}' metadata)")
    try:
        return GraphInfo.from_json(props[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as e:
        raise Res2DetError(f"{path}: unreadable res2det metadata ({e})") from None


class GraphDetector:
    """What every runtime's runner shares: ``predict`` / ``iter_predict`` as ``TwoStageDetector``'s, around the
    runtime's ``detect`` (one graph call per image)."""

    info: GraphInfo
    path: Path
    precision = "fp32"  # what the runtime computes in (bf16 only where asked and native)

    def _set_info(self, info: GraphInfo, path: Path) -> None:
        self.info, self.path = info, path
        self.model_name = info.model
        self.class_names = info.class_names
        self.output_names = ["boxes", "scores", "labels"] + (["mask_probs"] if info.with_mask else [])

    def detect(self, batch: torch.Tensor, sizes: list[tuple[int, int]], metas: list[dict] | None = None
               ) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _inputs(self, image: torch.Tensor, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """One image's graph inputs; a dynamic graph gets the image padded to its own multiple of 32 (as with a
        batch of one), whatever else shared its batch."""
        h, w = size
        if self.info.input_size is None:
            image = image[:, :-(-h // SIZE_DIVISOR) * SIZE_DIVISOR, :-(-w // SIZE_DIVISOR) * SIZE_DIVISOR]
        return {"image": np.ascontiguousarray(image[None].numpy()), "image_size": np.array([h, w], dtype=np.int64)}

    def predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None
                ) -> "list[Detections]":
        """One ``Detections`` per image (paths, PIL images, arrays, tensors; one or a list), in original pixels,
        by decreasing score; ``score_thr`` keeps those scoring at least that much."""
        return [det for _, _, det in self.iter_predict(images, score_thr=score_thr)]

    def iter_predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None,
                     num_workers: int = 0, batch_size: int = 1,
                     on_bad: "Callable[[ImageLike, str], None] | None" = None
                     ) -> "Iterator[tuple[ImageLike, np.ndarray, Detections]]":
        """``predict`` one image at a time, as ``TwoStageDetector.iter_predict``; ``batch_size`` images are
        handed to ``detect`` together (a runtime with several streams runs them at once)."""
        info = self.info
        return iter_predict(self.detect, images, preprocess=info.preprocess, class_names=self.class_names,
                            mask_thr=info.mask_thr, score_thr=score_thr, input_size=info.input_size,
                            num_workers=num_workers, batch_size=batch_size, on_bad=on_bad)


class OnnxDetector(GraphDetector):
    """An exported detector in ONNX Runtime (CPU), with ``predict`` as ``TwoStageDetector.predict``.

    ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise Res2DetError(f"running an ONNX model needs onnxruntime (pip install 'res2det[onnx]'): {e}") from None
        path = Path(path)
        if not path.is_file():
            raise Res2DetError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime's own exception types (bad protobuf, unknown op, ...)
            raise Res2DetError(f"{path}: not a readable ONNX file ({type(e).__name__}: {_first_line(e)})") from None
        self._set_info(read_info(self.session.get_modelmeta().custom_metadata_map, path), path)

    def detect(self, batch: torch.Tensor, sizes: list[tuple[int, int]], metas: list[dict] | None = None
               ) -> list[dict[str, torch.Tensor]]:
        """``TwoStageDetector.detect(..., paste_masks=False)`` through the graph, one image at a time (``metas``
        unused: exported graphs work in input pixels)."""
        return [{name: torch.from_numpy(v) for name, v in zip(self.output_names, self.session.run(
            None, self._inputs(image, size)))} for image, size in zip(batch, sizes)]


# precision -> OpenVINO's inference precision hint; "int8" is a graph quantised by NNCF (``backend.quantize_graph``:
# its FakeQuantize nodes make the convolutions and matmuls int8; the rest computes in f32)
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoDetector(GraphDetector):
    """An exported detector in OpenVINO (CPU), with ``predict`` as ``TwoStageDetector.predict``.

    ``precision`` 'fp32' or 'bf16' is OpenVINO's inference precision hint (set explicitly: OpenVINO computes in
    bf16 by default on CPUs that have it); bf16 where the CPU has no native bf16 falls back to fp32 with a
    ``PrecisionFallback`` warning; 'int8' runs an NNCF-quantised graph (an OpenVINO ``.xml`` from
    ``backend.quantize_graph``). ``threads`` sets OpenVINO's threads, ``streams`` how many images run at once
    (each stream shares the threads; ``detect`` dispatches a batch's images to them asynchronously)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, precision: str = "fp32",
                 streams: int = 1):
        try:
            import openvino as ov
        except ImportError as e:
            raise Res2DetError(f"--backend openvino needs OpenVINO (pip install 'res2det[openvino]'): {e}") from None
        if precision not in OPENVINO_PRECISIONS:
            raise Res2DetError(f"the OpenVINO backend runs in fp32, bf16 or int8, not {precision}")
        if streams < 1:
            raise Res2DetError(f"streams must be at least 1, got {streams}")
        path = Path(path)
        if not path.is_file():
            raise Res2DetError(f"{path}: {'OpenVINO graph' if path.suffix == '.xml' else 'ONNX file'} not found")
        if precision == "int8" and path.suffix != ".xml":
            raise Res2DetError(f"{path}: precision int8 runs a quantised OpenVINO graph (.xml), not {path.suffix}")
        if precision == "bf16" and autocast_dtype(precision, "cpu") is None:  # warns: no native instructions
            precision = "fp32"
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # OpenVINO's own exception types (bad protobuf, unknown op, ...)
            raise Res2DetError(f"{path}: not an ONNX file OpenVINO can read ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
        # OpenVINO keeps an ONNX file's metadata properties under rt_info['framework']
        meta = {}
        if model.has_rt_info(["framework", METADATA_KEY]):
            meta[METADATA_KEY] = model.get_rt_info(["framework", METADATA_KEY]).astype(str)
        self._set_info(read_info(meta, path), path)
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "NUM_STREAMS": int(streams),
                  "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision, self.streams = precision, int(streams)
        self.requests = ov.AsyncInferQueue(self.compiled, self.streams)

    def detect(self, batch: torch.Tensor, sizes: list[tuple[int, int]], metas: list[dict] | None = None
               ) -> list[dict[str, torch.Tensor]]:
        """``TwoStageDetector.detect(..., paste_masks=False)`` through the graph: the batch's images run as
        asynchronous requests, up to ``streams`` at once (``metas`` unused: graphs work in input pixels)."""
        results: list[dict[str, torch.Tensor] | None] = [None] * len(batch)

        def done(request, i):
            results[i] = {name: torch.from_numpy(request.get_output_tensor(k).data.copy())
                          for k, name in enumerate(self.output_names)}

        self.requests.set_callback(done)
        for i, (image, size) in enumerate(zip(batch, sizes)):
            self.requests.start_async(self._inputs(image, size), i)
        self.requests.wait_all()
        return results


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


__all__ = ["GraphDetector", "OnnxDetector", "OpenVinoDetector", "OPENVINO_PRECISIONS", "GraphInfo", "read_info", "METADATA_KEY", "GRAPH_FORMAT"]
