"""Running an exported detector with ONNX Runtime through ``res2det.inference.predict``: the same
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
from ..inference import iter_predict
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


class OnnxDetector:
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
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise Res2DetError(f"{path}: not a readable ONNX file ({type(e).__name__}: {message})") from None
        self.info = read_info(self.session.get_modelmeta().custom_metadata_map, path)
        self.path = path
        self.model_name = self.info.model
        self.class_names = self.info.class_names
        self.output_names = [o.name for o in self.session.get_outputs()]

    def detect(self, batch: torch.Tensor, sizes: list[tuple[int, int]], metas: list[dict] | None = None
               ) -> list[dict[str, torch.Tensor]]:
        """``TwoStageDetector.detect(..., paste_masks=False)`` through the graph, one image at a time (``metas``
        unused: exported graphs work in input pixels)."""
        results = []
        for image, (h, w) in zip(batch, sizes):
            outputs = self.session.run(None, {"image": image[None].numpy(),
                                              "image_size": np.array([h, w], dtype=np.int64)})
            results.append({name: torch.from_numpy(v) for name, v in zip(self.output_names, outputs)})
        return results

    def predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None
                ) -> "list[Detections]":
        """One ``Detections`` per image (paths, PIL images, arrays, tensors; one or a list), in original pixels,
        by decreasing score; ``score_thr`` keeps those scoring at least that much."""
        return [det for _, _, det in self.iter_predict(images, score_thr=score_thr)]

    def iter_predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None,
                     num_workers: int = 0, on_bad: "Callable[[ImageLike, str], None] | None" = None
                     ) -> "Iterator[tuple[ImageLike, np.ndarray, Detections]]":
        """``predict`` one image at a time, as ``TwoStageDetector.iter_predict``."""
        info = self.info
        return iter_predict(self.detect, images, preprocess=info.preprocess, class_names=self.class_names,
                            mask_thr=info.mask_thr, score_thr=score_thr, input_size=info.input_size,
                            num_workers=num_workers, on_bad=on_bad)


__all__ = ["OnnxDetector", "GraphInfo", "read_info", "METADATA_KEY", "GRAPH_FORMAT"]
