"""``Detections``: what ``TwoStageDetector.predict`` returns for one image, in that image's own pixels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
