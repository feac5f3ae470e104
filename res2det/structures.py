"""Plain data types shared by every layer: how a model expects its input (``Preprocess``) and what a detector
returns for one image (``Detections``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 pixel scale
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocess:
    """How the weights expect their input: RGB pixels in 0..255, ``(x - mean) / std``."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int] = (224, 224)  # (H, W); detectors: the (short, long) resize bounds
    crop_pct: float | None = 0.875
    interpolation: str = "bilinear"


# mmdetection's detection input: RGB, ImageNet mean/std on 0..255 pixels, keep-ratio resize to fit (800, 1333)
DETECTION_PREPROCESS = Preprocess(input_size=(800, 1333), crop_pct=None)


@dataclass
class Detections:
    """Detections of one image, by decreasing score.

    ``boxes`` float ``[K, 4]`` (x1, y1, x2, y2 in the original image's pixels), ``scores`` ``[K]``, ``labels``
    int64 ``[K]`` (0..C-1), ``categories`` the K class names, ``masks`` bool ``[K, height, width]`` for mask
    models (``None`` otherwise), and the original image's ``width`` and ``height``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    categories: list[str]
    masks: Tensor | None
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, keep: Tensor) -> "Detections":
        """The detections picked by a bool mask or an index tensor, in that order."""
        if keep.dtype == torch.bool:
            keep = torch.nonzero(keep).flatten()
        idx = keep.tolist()
        return Detections(boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep],
                          categories=[self.categories[i] for i in idx],
                          masks=None if self.masks is None else self.masks[keep],
                          width=self.width, height=self.height)

    def above(self, score_thr: float) -> "Detections":
        """Only the detections scoring at least ``score_thr``."""
        return self.select(self.scores >= score_thr)
