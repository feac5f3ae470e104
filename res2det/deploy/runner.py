"""Running an exported detector with ONNX Runtime: the same pre-processing and the same ``Detections`` as
``TwoStageDetector.predict``.

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
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..images import normalize, rescale_size, resize_bilinear, to_rgb_uint8
from ..errors import Res2DetError
from ..structures import Preprocess

if TYPE_CHECKING:
    from ..images import ImageLike
    from ..structures import Detections

METADATA_KEY = "res2det"
SIZE_DIVISOR = 32


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
    opset: int
    res2det_version: str

    def to_json(self) -> str:
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> "GraphInfo":
        d = json.loads(text)
        for k in ("class_names", "mean", "std", "resize_bounds"):
            d[k] = tuple(d[k])
        d["input_size"] = None if d["input_size"] is None else tuple(d["input_size"])
        return cls(**d)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(mean=self.mean, std=self.std, input_size=self.resize_bounds, crop_pct=None)


def graph_inputs(rgb: np.ndarray, info: GraphInfo) -> dict[str, np.ndarray]:
    """The graph's four inputs for one HxWx3 uint8 RGB image (see the module docstring)."""
    h, w = rgb.shape[:2]
    if h < 1 or w < 1:
        raise Res2DetError(f"empty image of size {w}x{h}")
    new_w, new_h = rescale_size(w, h, info.resize_bounds)
    if info.input_size is not None:
        ph, pw = info.input_size
        if new_h > ph or new_w > pw:  # also fit the graph's fixed input (mmcv's rounding)
            scale = min(pw / w, ph / h)
            new_w, new_h = min(int(w * scale + 0.5), pw), min(int(h * scale + 0.5), ph)
    else:
        ph, pw = -(-new_h // SIZE_DIVISOR) * SIZE_DIVISOR, -(-new_w // SIZE_DIVISOR) * SIZE_DIVISOR
    x = normalize(resize_bilinear(rgb, max(new_w, 1), max(new_h, 1)), info.preprocess)
    image = torch.nn.functional.pad(x, (0, pw - x.shape[-1], 0, ph - x.shape[-2]))[None]
    return {"image": image.numpy(), "image_size": np.array([x.shape[-2], x.shape[-1]], dtype=np.int64),
            "orig_size": np.array([h, w], dtype=np.int64),
            "scale_factor": np.array([x.shape[-1] / w, x.shape[-2] / h], dtype=np.float32)}


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

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's raw outputs (boxes, scores, labels[, masks]) for prepared inputs."""
        return self.session.run(None, inputs)

    def predict(self, images: "ImageLike | Sequence[ImageLike]", *, score_thr: float | None = None
                ) -> "list[Detections]":
        """One ``Detections`` per image (paths, PIL images, arrays, tensors; one or a list), in original pixels,
        by decreasing score; ``score_thr`` keeps those scoring at least that much."""
        from ..structures import Detections
        from ..images import image_list

        out = []
        for item in image_list(images):
            rgb = to_rgb_uint8(item)
            boxes, scores, labels, *masks = self.run(graph_inputs(rgb, self.info))
            keep = np.ones(len(scores), dtype=bool) if score_thr is None else scores >= score_thr
            labels = torch.from_numpy(labels[keep].astype(np.int64))
            names = self.class_names
            out.append(Detections(
                boxes=torch.from_numpy(boxes[keep]), scores=torch.from_numpy(scores[keep]), labels=labels,
                categories=[names[i] if i < len(names) else str(i) for i in labels.tolist()],
                masks=torch.from_numpy(masks[0][keep]) if masks else None,
                width=int(rgb.shape[1]), height=int(rgb.shape[0])))
        return out


__all__ = ["OnnxDetector", "GraphInfo", "graph_inputs", "read_info", "METADATA_KEY"]
