"""The one inference path of the detectors: images -> model input -> detections in original pixels.

``iter_predict`` decodes each image (``images.to_rgb_uint8``), resizes and normalises it as the weights expect
(``images.detection_input``: mmcv's keep-ratio rule, optionally also fitting a fixed input size), in
background workers if asked, pads a batch (``images.pad_batch``), runs a detector on it and maps each result
back with ``postprocess``; ``predict`` collects its detections. The detector is a function, so the same code
serves ``TwoStageDetector.predict`` (its ``detect``), the ONNX Runtime runner (a session) and, through
``postprocess``, the COCO evaluation of dataset batches. ``autocast_dtype`` decides what a reduced
``precision`` runs as on a device.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import Res2DetError, Res2DetWarning
from .images import ImageLike, detection_input, image_list, pad_batch, to_rgb_uint8
from .loading import Loader
from .machine import NATIVE_CPU_FLAGS, cpu_flags as _cpu_flags  # (tests replace _cpu_flags here)
from .models.heads.box_coder import clip_boxes
from .models.heads.mask_head import paste_mask_crops
from .models.heads.paddle_static_conventions import static_paste_masks
from .structures import Detections, InstanceMasks, Preprocess

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU instructions that run each reduced precision natively (without them oneDNN emulates it, slower than fp32)
_CPU_FLAGS = {torch.bfloat16: NATIVE_CPU_FLAGS["bf16"], torch.float16: NATIVE_CPU_FLAGS["fp16"]}


class PrecisionFallback(Res2DetWarning):
    """A reduced precision was asked for where the device cannot run it natively; fp32 runs instead."""


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of ``precision`` ('fp32', 'bf16', 'fp16') on ``device``; ``None`` for fp32.

    A reduced precision the device has no instructions for (CPU: bf16 needs avx512_bf16 or amx_bf16, fp16
    avx512_fp16 or amx_fp16; CUDA: bf16 needs compute capability 8.0) warns with ``PrecisionFallback`` and
    returns ``None``: emulated, it would be slower than fp32. The numerically sensitive steps stay fp32
    under autocast either way: the heads' outputs (``ops.at_least_fp32``), box decoding, softmax / sigmoid
    scores, NMS, RoIAlign sampling and mask pasting."""
    if precision not in PRECISIONS:
        raise Res2DetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    device = torch.device(device)
    if dtype is None:
        return None
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            warnings.warn(f"{torch.cuda.get_device_name(device)} has no bf16 support; running fp32",
                          PrecisionFallback, stacklevel=3)
            return None
        return dtype
    if device.type == "cpu":
        if not _cpu_flags() & set(_CPU_FLAGS[dtype]):
            warnings.warn(f"this CPU has no native {precision} instructions ({' or '.join(_CPU_FLAGS[dtype])}); "
                          f"running fp32, which is faster here than emulated {precision}", PrecisionFallback,
                          stacklevel=3)
            return None
        return dtype
    raise Res2DetError(f"reduced precision on {device.type} is not supported; use precision='fp32'")


# (padded batch [N, 3, H, W], unpadded sizes (h, w), per image {scale_factor, orig_size}) -> per image
# dict(boxes, scores, labels[, mask_probs]) in input pixels: ``TwoStageDetector.detect(..., paste_masks=False)``
# or an exported graph.
DetectFn = Callable[[Tensor, list[tuple[int, int]], list[dict]], Sequence[Mapping[str, Tensor]]]


def postprocess(result: Mapping[str, Tensor], *, scale_factor: Sequence[float], orig_size: Sequence[int],
                mask_thr: float = 0.5, mask_paste: str = "mmdet", score_thr: float | None = None
                ) -> tuple[Tensor, Tensor, Tensor, InstanceMasks | None]:
    """One image's detections in input pixels -> ``(boxes, scores, labels, masks)`` on the CPU in the original
    image's pixels, by decreasing score; ``masks`` an ``InstanceMasks`` when ``result`` has ``mask_probs``.

    ``scale_factor`` is ``(sx, sy)``, input pixels per original pixel; ``orig_size`` is ``(H, W)``. Boxes are
    divided by the scale factors and clipped to the image; masks are pasted (bilinear, ``>= mask_thr``) at the
    original size from the unclipped boxes (``mask_paste`` 'mmdet') or from the clipped ones ('paddle',
    PaddleDetection 2.6), or by the static-graph era's rule ('paddle_static': ``static_paste_masks``,
    ``> mask_thr``). ``score_thr`` keeps only detections scoring at least that much.
    """
    if "masks" in result and "mask_probs" not in result:
        raise ValueError("postprocess needs the mask probabilities: call detect(..., paste_masks=False)")
    sx, sy = (float(s) for s in scale_factor)
    size = (int(orig_size[0]), int(orig_size[1]))
    boxes = result["boxes"].float() / result["boxes"].new_tensor([sx, sy, sx, sy], dtype=torch.float32)
    scores, labels, probs = result["scores"].float(), result["labels"].long(), result.get("mask_probs")
    # Detections are by decreasing score (Paddle's NMS groups them by class; mmdet's are sorted already)
    order = torch.argsort(scores, descending=True, stable=True)
    if score_thr is not None:
        order = order[scores[order] >= score_thr]
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    if mask_paste == "paddle":
        boxes = clip_boxes(boxes, size)
    masks = None
    if probs is not None and mask_paste == "paddle_static":
        masks = static_paste_masks(probs[order], boxes, size, mask_thr)
    elif probs is not None:
        masks = paste_mask_crops(probs[order], boxes, size, mask_thr).cpu()
    return clip_boxes(boxes, size).cpu(), scores.cpu(), labels.cpu(), masks


class _Unreadable:
    """Image ``index`` could not be read or decoded: ``message`` (naming it) instead of its sample."""

    def __init__(self, index: int, message: str):
        self.index, self.message = index, message


class _Prepared(Dataset):
    """Image ``i`` decoded and pre-processed (in a loader worker when there are workers): ``(i, rgb, input,
    scale_factor)``; with ``keep_going``, an image that cannot be read is an ``_Unreadable`` instead of an
    error."""

    def __init__(self, items: list, preprocess: Preprocess, input_size: tuple[int, int] | None,
                 keep_going: bool = False):
        self.items, self.preprocess, self.input_size, self.keep_going = items, preprocess, input_size, keep_going

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            rgb = to_rgb_uint8(self.items[i])
        except Res2DetError as e:
            if not self.keep_going:
                raise
            return _Unreadable(i, str(e))
        return (i, rgb, *detection_input(rgb, self.preprocess, fit=self.input_size))


def iter_predict(detect: DetectFn, images: ImageLike | Sequence[ImageLike], *, preprocess: Preprocess,
                 class_names: Sequence[str], mask_thr: float = 0.5, mask_paste: str = "mmdet",
                 score_thr: float | None = None, batch_size: int = 1, input_size: tuple[int, int] | None = None,
                 num_workers: int = 0, on_bad: Callable[[ImageLike, str], None] | None = None
                 ) -> Iterator[tuple[ImageLike, np.ndarray, Detections]]:
    """``(image, its HxWx3 uint8 pixels, Detections)`` per image, in order, as each batch is done.

    Images go through ``detection_input`` with ``preprocess`` (in ``num_workers`` background processes while
    the model runs, if above 0) and are padded to a multiple of 32 per batch of ``batch_size``, or to exactly
    ``input_size = (H, W)`` (an exported graph's fixed input; an image whose resized size does not fit is
    scaled down to fit). ``mask_thr``, ``mask_paste`` and ``score_thr`` are ``postprocess``'s. ``detect`` gets
    each image's ``scale_factor`` and ``orig_size`` too (heads that post-process in original pixels need them).

    An image that cannot be read or decoded raises its ``Res2DetError`` (naming the file); with ``on_bad``, it
    is passed to ``on_bad(image, message)`` instead and skipped, and the other images go on (a folder run).
    """
    if batch_size < 1:
        raise Res2DetError(f"batch_size must be at least 1, got {batch_size}")
    items = image_list(images)
    # (an unreadable image is the same one-line error with workers as without: ``Loader``)
    loader = Loader(_Prepared(items, preprocess, input_size, keep_going=on_bad is not None),
                    batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for samples in loader:
        if on_bad is not None:
            for s in samples:
                if isinstance(s, _Unreadable):
                    on_bad(items[s.index], s.message)
            samples = [s for s in samples if not isinstance(s, _Unreadable)]
            if not samples:
                continue
        batch = pad_batch([x for _, _, x, _ in samples], size=input_size)
        results = detect(batch, [tuple(x.shape[-2:]) for _, _, x, _ in samples],
                         [{"scale_factor": scale, "orig_size": rgb.shape[:2]} for _, rgb, _, scale in samples])
        for (i, rgb, _, scale), result in zip(samples, results):
            boxes, scores, labels, masks = postprocess(result, scale_factor=scale, orig_size=rgb.shape[:2],
                                                       mask_thr=mask_thr, mask_paste=mask_paste,
                                                       score_thr=score_thr)
            yield items[i], rgb, Detections(
                boxes=boxes, scores=scores, labels=labels,
                categories=[class_names[k] if k < len(class_names) else str(k) for k in labels.tolist()],
                masks=masks, width=int(rgb.shape[1]), height=int(rgb.shape[0]))


def no_detections(batch: Tensor, sizes: Sequence[tuple[int, int]], metas: Sequence[dict] | None = None
                  ) -> list[dict[str, Tensor]]:
    """A ``DetectFn`` that finds nothing: ``predict``'s pipeline without a model (to time that pipeline, or to
    collect what a model would be given)."""
    return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
            for _ in sizes]


def predict(detect: DetectFn, images: ImageLike | Sequence[ImageLike], **options) -> list[Detections]:
    """One ``Detections`` per image (paths, PIL images, arrays, tensors; one or a list), in original pixels:
    ``iter_predict``'s detections, as a list."""
    return [det for _, _, det in iter_predict(detect, images, **options)]


__all__ = ["predict", "iter_predict", "no_detections", "postprocess", "autocast_dtype", "PrecisionFallback", "PRECISIONS", "DetectFn"]
