"""Plain data types shared by every layer: how a model expects its input (``Preprocess``) and what a detector
returns for one image (``Detections``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    # detectors: 'mmdet' resizes the uint8 image (mmcv's keep-ratio rule), then normalises; 'paddle_static'
    # (PaddleDetection's static-graph era) normalises, then resizes the float image by its own scale rule
    pipeline: str = "mmdet"


# mmdetection's detection input: RGB, ImageNet mean/std on 0..255 pixels, keep-ratio resize to fit (800, 1333)
DETECTION_PREPROCESS = Preprocess(input_size=(800, 1333), crop_pct=None)


class InstanceMasks:
    """K binary masks of one ``height x width`` image, each kept as the crop of its box's window (memory grows
    with the box areas, not with K x image pixels: 100 masks on a 9000 x 9000 image would be 8 GB in full).

    ``masks[i]`` is mask ``i`` at full size ``[H, W]`` (bool), ``to_tensor()`` all of them ``[K, H, W]``,
    ``rle()`` COCO run-length encodings computed from the crops, ``select(keep)`` a subset."""

    def __init__(self, crops: Sequence[Tensor], origins: Sequence[tuple[int, int]], height: int, width: int):
        if len(crops) != len(origins):
            raise ValueError(f"{len(crops)} mask crops but {len(origins)} origins")
        self.crops = [c.to(torch.bool) for c in crops]  # [h_i, w_i] each
        self.origins = [(int(x), int(y)) for x, y in origins]  # (x0, y0) of each crop in the image
        self.height, self.width = int(height), int(width)

    @classmethod
    def from_tensor(cls, masks: Tensor) -> "InstanceMasks":
        """From full-image masks ``[K, H, W]``: each cropped to the rows and columns it covers."""
        masks = masks.to(torch.bool)
        crops, origins = [], []
        for m in masks:
            rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
            if len(rows) == 0:
                crops.append(m[:0, :0])
                origins.append((0, 0))
                continue
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            crops.append(m[y0:y1, x0:x1].clone())
            origins.append((x0, y0))
        return cls(crops, origins, masks.shape[-2], masks.shape[-1])

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.crops), self.height, self.width)

    @property
    def device(self) -> torch.device:
        return self.crops[0].device if self.crops else torch.device("cpu")

    def __getitem__(self, i: int) -> Tensor:
        out = torch.zeros(self.height, self.width, dtype=torch.bool, device=self.device)
        crop, (x0, y0) = self.crops[i], self.origins[i]
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return out

    def to_tensor(self) -> Tensor:
        """All masks at full size, ``[K, H, W]`` bool (K x H x W bytes)."""
        out = torch.zeros(len(self.crops), self.height, self.width, dtype=torch.bool, device=self.device)
        for k, (crop, (x0, y0)) in enumerate(zip(self.crops, self.origins)):
            out[k, y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return out

    def cpu(self) -> "InstanceMasks":
        return InstanceMasks([c.cpu() for c in self.crops], self.origins, self.height, self.width)

    def clone(self) -> "InstanceMasks":
        """Copies of the crops (e.g. ordinary tensors out of ``torch.inference_mode``)."""
        return InstanceMasks([c.clone() for c in self.crops], self.origins, self.height, self.width)

    def select(self, keep: Sequence[int]) -> "InstanceMasks":
        return InstanceMasks([self.crops[i] for i in keep], [self.origins[i] for i in keep], self.height, self.width)

    def area(self) -> Tensor:
        return torch.tensor([int(c.sum()) for c in self.crops], dtype=torch.int64)

    def rle_counts(self, i: int) -> list[int]:
        """Mask ``i`` as COCO's uncompressed run lengths (column-major, zeros first), from its crop alone."""
        crop, (x0, y0) = self.crops[i], self.origins[i]
        h = self.height
        if crop.numel() == 0 or not bool(crop.any()):
            return [h * self.width]
        # run boundaries down each crop column, as positions in the column-major image
        cols = torch.nn.functional.pad(crop.cpu().t().to(torch.int8), (1, 1))  # [w_i, h_i + 2]
        col, row = torch.nonzero(cols.diff(dim=1)).unbind(1)  # a change before row `row` of column `col`
        bounds = ((x0 + col) * h + y0 + row).tolist()  # alternately starts and ends of runs of ones
        merged: list[int] = []
        for b in bounds:  # a run ending at a column's bottom may go on at the top of the next one
            if merged and merged[-1] == b:
                merged.pop()
            else:
                merged.append(b)
        edges = [0, *merged]
        if merged[-1] != h * self.width:  # pycocotools writes no empty last run
            edges.append(h * self.width)
        return [b - a for a, b in zip(edges[:-1], edges[1:])]

    def rle(self) -> list[dict]:
        """COCO compressed RLE dicts (``counts`` as bytes), one per mask, as ``pycocotools.mask.encode`` makes."""
        from pycocotools import mask as mask_utils

        return [mask_utils.frPyObjects({"size": [self.height, self.width], "counts": self.rle_counts(i)},
                                       self.height, self.width) for i in range(len(self))]


class Detections:
    """Detections of one image, by decreasing score.

    ``boxes`` float ``[K, 4]`` (x1, y1, x2, y2 in the original image's pixels), ``scores`` ``[K]``, ``labels``
    int64 ``[K]`` (0..C-1), ``categories`` the K class names, the original image's ``width`` and ``height``,
    and for mask models ``instance_masks`` (an ``InstanceMasks``: per-box crops, memory bounded by the box
    areas) with ``masks`` the full-image bool ``[K, height, width]`` made from them on request (``None``
    without masks). ``masks=`` takes either form.
    """

    def __init__(self, *, boxes: Tensor, scores: Tensor, labels: Tensor, categories: list[str],
                 masks: "InstanceMasks | Tensor | None", width: int, height: int):
        self.boxes, self.scores, self.labels, self.categories = boxes, scores, labels, list(categories)
        self.width, self.height = int(width), int(height)
        self.instance_masks = masks if masks is None or isinstance(masks, InstanceMasks) else \
            InstanceMasks.from_tensor(masks)

    @property
    def masks(self) -> Tensor | None:
        return None if self.instance_masks is None else self.instance_masks.to_tensor()

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __repr__(self) -> str:
        return (f"Detections({len(self)} on a {self.width}x{self.height} image"
                f"{', with masks' if self.instance_masks is not None else ''})")

    def select(self, keep: Tensor) -> "Detections":
        """The detections picked by a bool mask or an index tensor, in that order."""
        if keep.dtype == torch.bool:
            keep = torch.nonzero(keep).flatten()
        idx = keep.tolist()
        return Detections(boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep],
                          categories=[self.categories[i] for i in idx],
                          masks=None if self.instance_masks is None else self.instance_masks.select(idx),
                          width=self.width, height=self.height)

    def above(self, score_thr: float) -> "Detections":
        """Only the detections scoring at least ``score_thr``."""
        return self.select(self.scores >= score_thr)
